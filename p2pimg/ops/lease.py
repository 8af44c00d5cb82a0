"""Leases: how a publish and a `gc --yes` on the same origin keep out of each other's way.

A publish that finds a blob or block already in the origin does not upload it again: its tag will
reference an object that may be old and, until the tag is written, reachable from no tag. The age
check of gc (`--grace`) cannot protect such an object, so a publish names every key its tag will
reach in a *lease* before it asks which of them exist, and deletes the lease once its tag is
written:

    p2pimg/leases/publish-<random id>   JSON {"keys": [...]}, rewritten every `REFRESH` seconds
    p2pimg/leases/gc-<random id>        a gc's *hold*: written before it lists the leases that
                                        govern a batch of deletions, deleted when the batch is done

A lease or hold the store dates more than `TTL` ago is stale (its writer crashed or stalled) and
is ignored, so a dead publish blocks nothing for long; gc deletes stale ones.

The protocol (`ops.admin` is gc's side, `ops.publish` the publish's):

    publish: P1 write its lease naming keys K; P2 wait while a live gc hold exists;
             P3 check which of K exist, upload the others; P4 write the tag; P5 delete the lease.
    gc:      G1 read the tags and mark; list objects and their ages: candidate garbage;
             then for each batch: G2 write its hold; G3 list live leases, spare what they name;
             G4 read the tags again, spare what any tag whose root was not marked reaches;
             G5 delete the batch; and at the end delete the hold.

Why a key X of K that the publish relies on (found existing at P3) is never deleted at G5:

* P5 before G3 lists: then P4 < P5 < G3 < G4, so G4 reads the tag (or a record that replaced it,
  which no longer needs X unless its own publish does, to which the same argument applies).
* The lease is there when G3 lists: X is named and spared. (A lease G3 lists but can no longer
  read was deleted meanwhile: the first case, since G4 follows.)
* P1 completes after G3 began listing: then G2 < G3 < P1 < P2, so P2 sees the hold (still live: a
  hold is rewritten for each batch) and waits until it is deleted, that is until G5 is over; P3
  then sees X gone if G5 deleted it, and uploads it again.

What this assumes, and what stays open:

* Listings are strongly consistent with completed writes (a file system, S3 since 2020, Storj).
* Clocks: staleness compares the store's date with this machine's clock. A clock ahead of the
  store's by more than `TTL - REFRESH` makes a live lease look stale. A gc batch or a publish
  whose refresh stalls for longer than `TTL` (suspended process, hung request) loses protection.
* A publish waits for a gc hold at most `TTL` (a crashed gc's hold goes stale).
* Deleting is not conditional: with a store offering conditional deletes, the hold would not be
  needed; without it the waiting at P2 is what closes the ordering "publish leases after gc
  listed the leases, then finds X just before gc deletes it".
* Publishes by p2pimg versions without leases are covered only by the grace period.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import trio

from p2pimg.errors import OriginError, OriginNotFound
from p2pimg.sources.origins import PREFIX, Origin

log = logging.getLogger(__name__)

LEASES = f"{PREFIX}/leases/"
PUBLISH = "publish-"
GC = "gc-"
TTL = 3600.0  # a lease or hold the store dates this long ago is stale
REFRESH = 600.0  # a running publish rewrites its lease this often
POLL = 2.0  # how often a publish looks again whether a gc hold is gone
MAX_LEASE = 16 << 20


def _key(kind: str) -> str:
    return f"{LEASES}{kind}{secrets.token_hex(8)}"


async def _pause(seconds: float) -> None:
    """Between two looks at the gc holds (a hook for tests, which never sleep)."""
    await trio.sleep(seconds)


pause: Callable[[float], Awaitable[None]] = _pause


@dataclass
class LeaseView:
    """The leases and holds of an origin at one listing."""

    keys: set[str] = field(default_factory=set)  # named by live publish leases
    holds: list[str] = field(default_factory=list)  # live gc holds
    stale: list[str] = field(default_factory=list)  # leases and holds past `TTL`
    live: set[str] = field(default_factory=set)  # the keys of the live leases and holds


async def read_leases(
    origin: Origin, *, now: float | None = None, ttl: float = TTL, contents: bool = True
) -> LeaseView:
    """List the leases and (with `contents`) read the live ones. A live lease that cannot be
    parsed is an error (what it protects is unknown); one deleted since the listing is skipped
    (its publish ended)."""
    view = LeaseView()
    for info in await origin.list_info(LEASES):
        name = info.key[len(LEASES) :]
        current = time.time() if now is None else now
        if current - info.modified >= ttl:
            view.stale.append(info.key)
            continue
        view.live.add(info.key)
        if name.startswith(GC):
            view.holds.append(info.key)
        elif name.startswith(PUBLISH) and contents:
            try:
                data = await origin.get(info.key, max_size=MAX_LEASE)
            except OriginNotFound:
                continue
            view.keys.update(_parse(data, info.key))
    return view


def _parse(data: bytes, key: str) -> list[str]:
    try:
        keys = json.loads(data)["keys"]
        if isinstance(keys, list) and all(isinstance(k, str) for k in keys):
            return keys
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, RecursionError):
        pass
    raise OriginError(f"lease {key} is unreadable: gc cannot tell what it protects")


class PublishLease:
    """A publish's lease (see the module's docstring): `cover` the keys a tag will reach before
    asking which exist; the context manager refreshes it meanwhile and deletes it at the end."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.key = _key(PUBLISH)
        self.keys: set[str] = set()
        self._lock = trio.Lock()

    async def _write(self) -> None:
        async with self._lock:
            await self.origin.put_bytes(self.key, json.dumps({"keys": sorted(self.keys)}).encode())

    async def cover(self, keys: Iterable[str], progress: Callable[[str], None] = lambda _m: None) -> None:
        """Name `keys` in the lease, then wait until no gc is in its deleting phase: from then on,
        whatever of `keys` exists stays until the lease is deleted (or goes stale)."""
        self.keys.update(keys)
        await self._write()
        await wait_for_gc(self.origin, progress)

    async def _refresh(self) -> None:
        """Rewrite the lease every `REFRESH` seconds. A failed rewrite is logged, not fatal: the
        lease stays live until `TTL` after the last one that worked, and the next one may work."""
        while True:
            await trio.sleep(REFRESH)
            try:
                await self._write()
            except OriginError as exc:
                log.warning("cannot refresh the publish lease %s: %s", self.key, exc.message)


@contextlib.asynccontextmanager
async def publish_lease(origin: Origin) -> AsyncIterator[PublishLease]:
    """A lease for one publish, deleted when the block ends, however it ends (if that delete
    fails, the lease goes stale after `TTL`)."""
    lease = PublishLease(origin)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lease._refresh)
            yield lease
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The refresher raises nothing but Cancelled: the block's own error comes out alone.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        with trio.CancelScope(shield=True), contextlib.suppress(OriginError):
            await origin.delete(lease.key)


async def wait_for_gc(origin: Origin, progress: Callable[[str], None] = lambda _m: None) -> None:
    """Return once the origin holds no live gc hold (they go stale after `TTL`)."""
    told = False
    while (view := await read_leases(origin, contents=False)).holds:
        if not told:
            progress(f"wait   for a gc deleting from {origin.url} ({view.holds[0]})")
            told = True
        await pause(POLL)


@contextlib.asynccontextmanager
async def gc_hold(origin: Origin) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """A gc's hold, deleted at the end; yields how to (re)write it, done before each batch."""
    key = _key(GC)

    async def write() -> None:
        await origin.put_bytes(key, b"{}")

    try:
        yield write
    finally:
        with trio.CancelScope(shield=True), contextlib.suppress(OriginError):
            await origin.delete(key)


__all__ = [
    "LEASES",
    "TTL",
    "LeaseView",
    "PublishLease",
    "gc_hold",
    "publish_lease",
    "read_leases",
    "wait_for_gc",
]
