"""How p2pimg runs concurrent work: one place for the rules every task group follows.

- `first_failure_nursery`: a group of tasks that together do one job (upload the parts of a blob,
  the blobs of an image). When some fail with P2pimgErrors, the caller gets the first one as a
  bare exception, never an ExceptionGroup. It is raised after the `except*` block, not inside it:
  Python 3.11.0-3.11.3 (Debian 12 ships 3.11.2) wraps any exception raised inside `except*` in
  a new ExceptionGroup, `from None` or not.
- `SingleFlight`: concurrent callers asking for the same thing share one fetch of it.
- `guarded`: a background task of a long-running node (a mirror download, a warm job, discovery).
  Whatever it raises is logged and ends that task alone; the node's nursery, and so the node,
  keeps serving. Cancellation still passes through.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import trio

from p2pimg.errors import P2pimgError, first_error

log = logging.getLogger(__name__)
_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")


@asynccontextmanager
async def first_failure_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery whose P2pimgErrors come out as the first one alone (see the module docstring)."""
    failure: P2pimgError | None = None
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except* P2pimgError as group:
        failure = first_error(group)
    if failure is not None:
        raise failure


async def guarded(what: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
    """Run one background task; an error ends it with a log line instead of ending the node."""
    try:
        await fn(*args)
    except P2pimgError as exc:
        log.warning("%s failed: %s", what, exc.message)
    except Exception:  # a bug: logged with its traceback, contained to this task
        log.exception("%s failed with an unexpected error; the node keeps serving", what)
    except BaseExceptionGroup as group:  # noqa: B036 — split: Cancelled must still pass
        cancelled, rest = group.split(trio.Cancelled)
        if rest is not None:
            log.error("%s failed with an unexpected error; the node keeps serving", what, exc_info=rest)
        if cancelled is not None:
            raise cancelled from None


class Broadcast:
    """Wake every waiter at once (trio.Event is one-shot; this re-arms itself)."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self, timeout: float = math.inf) -> None:
        with trio.move_on_after(timeout):
            await self._event.wait()


@dataclass
class _Flight(Generic[_V]):
    done: trio.Event = field(default_factory=trio.Event)
    value: _V | None = None
    error: P2pimgError | None = None
    ok: bool = False


class SingleFlight(Generic[_K, _V]):
    """Merge concurrent calls per key: the first caller runs the fetch, the others wait for it and
    share its value or its P2pimgError (each raises a copy, with its own traceback). When the
    fetching caller is cancelled before an outcome, one of the waiters runs the fetch instead, so
    a client that leaves never fails the others. Nothing is remembered once a flight lands."""

    def __init__(self) -> None:
        self._flights: dict[_K, _Flight[_V]] = {}

    async def run(self, key: _K, fetch: Callable[[], Awaitable[_V]]) -> tuple[_V, bool]:
        """The value for `key`, and whether this caller fetched it (False: it shared a fetch)."""
        while (flight := self._flights.get(key)) is not None:
            await flight.done.wait()
            if flight.error is not None:
                raise copy.copy(flight.error)
            if flight.ok:
                return flight.value, False  # type: ignore[return-value]
        flight = self._flights[key] = _Flight()
        try:
            flight.value = await fetch()
            flight.ok = True
            return flight.value, True
        except P2pimgError as exc:
            flight.error = exc
            raise
        finally:
            del self._flights[key]
            flight.done.set()
