"""A blob's first bytes, asked of the origin while its map is still being looked up.

A client that asks a fresh node for a blob by digest makes the node find the blob's map first:
the name's tags, then a tag record (and its head), each a round trip to the origin, before the
first span can start. The origin keeps a published blob under a key named by its digest
(`blob_key`), so its first bytes can be asked for at once, in parallel with that lookup. They are
held here, in memory, until the fetch engine's first span of that blob from the origin asks for
the same bytes: that span then reads what came ahead, and the rest of the same stream, instead
of opening a request of its own. Nothing here is trusted: the span's bytes go through the same
chunk check as any other (a chunk that does not match its CID fails the span, as it would have).

Bounded: at most `most` blobs read ahead at once, at most `hold` bytes held for each (the read
waits beyond that, and TCP holds the sender), each dropped when no span took it within `keep`
seconds of its start or of its last span's end, or when `drop` says the blob is not wanted.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import trio

from p2pimg.errors import P2pimgError
from p2pimg.metrics import Timeline
from p2pimg.sources.origins import Origin, blob_key
from p2pimg.tasks import Broadcast

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AheadReport:
    """How a read ahead went, once it is over (for metrics and the node's timeline)."""

    digest: str
    began: float  # Timeline.now()
    ended: float
    used: int  # bytes spans took
    wasted: int  # bytes read that no span took


def _ignore(_report: AheadReport) -> None:
    pass


@dataclass(eq=False)
class _Ahead:
    digest: str
    scope: trio.CancelScope
    report: Callable[[AheadReport], None]
    began: float
    pieces: deque[bytes | memoryview] = field(default_factory=deque)
    held: int = 0  # bytes in `pieces`
    position: int = 0  # the blob offset of the first held byte
    taken: bool = False  # a span is reading from it
    ended: bool = False  # no more bytes will come (all asked for, the object's end, or a failure)
    used: int = 0  # bytes handed to spans
    changes: Broadcast = field(default_factory=Broadcast)


class ReadAhead:
    """Reads ahead of one origin; `OriginSource` starts them and its spans take them."""

    def __init__(
        self,
        origin: Origin,
        *,
        length: int,
        hold: int = 4 << 20,
        most: int = 4,
        keep: float = 5.0,
    ) -> None:
        self.origin = origin
        self.length = length  # bytes asked for: the first span the engine asks the origin for
        self.hold = hold
        self.most = most
        self.keep = keep
        self._reads: dict[str, _Ahead] = {}
        self.started = 0
        self.used = 0  # bytes spans took from reads ahead
        self.wasted = 0  # bytes read ahead that no span took

    def active(self, digest: str) -> bool:
        return digest in self._reads

    def start(
        self, nursery: trio.Nursery, digest: str, report: Callable[[AheadReport], None] = _ignore
    ) -> bool:
        """Start reading `digest`'s first bytes (False: already reading, or `most` are); `report`
        hears how it went when it is over."""
        if digest in self._reads or len(self._reads) >= self.most:
            return False
        deadline = trio.current_time() + self.keep
        ahead = _Ahead(digest, trio.CancelScope(deadline=deadline), report, Timeline.now())
        self._reads[digest] = ahead
        self.started += 1
        nursery.start_soon(self._run, ahead)
        return True

    def drop(self, digest: str) -> None:
        """The blob is not wanted after all (not part of the name, say): stop reading it."""
        if (ahead := self._reads.get(digest)) is not None and not ahead.taken:
            ahead.scope.cancel()

    async def _run(self, ahead: _Ahead) -> None:
        try:
            with ahead.scope:
                try:
                    reader = self.origin.read_head(blob_key(ahead.digest), self.length)
                    async with contextlib.aclosing(reader) as pieces:  # type: ignore[type-var]
                        async for piece in pieces:
                            ahead.pieces.append(piece)
                            ahead.held += len(piece)
                            ahead.changes.fire()
                            while ahead.held >= self.hold:
                                await ahead.changes.wait()
                except (P2pimgError, OSError) as exc:
                    # Not the span's failure: it asks the origin itself for what did not come.
                    log.debug("reading %s ahead: %s", ahead.digest, exc)
                ahead.ended = True
                ahead.changes.fire()
                while ahead.held or ahead.taken:  # keep what came until a span takes it
                    await ahead.changes.wait()
        finally:
            ahead.ended = True
            wasted = ahead.held
            self.wasted += wasted
            ahead.pieces.clear()
            ahead.held = 0
            if self._reads.get(ahead.digest) is ahead:
                del self._reads[ahead.digest]
            ahead.changes.fire()
            ahead.report(AheadReport(ahead.digest, ahead.began, Timeline.now(), ahead.used, wasted))

    def take(self, digest: str, start: int, length: int) -> AsyncIterator[bytes] | None:
        """Bytes [start, start+length) of the blob, beginning with those read ahead; None if no
        read ahead of it is at `start` (then the span asks the origin as usual)."""
        ahead = self._reads.get(digest)
        if ahead is None or ahead.taken or ahead.position != start or (ahead.ended and not ahead.held):
            return None
        ahead.taken = True
        ahead.scope.deadline = math.inf
        return self._serve(ahead, start, length)

    async def _serve(self, ahead: _Ahead, start: int, length: int) -> AsyncIterator[bytes]:
        sent = 0
        whole = False
        try:
            while sent < length:
                if ahead.pieces:
                    piece = ahead.pieces.popleft()
                    if len(piece) > length - sent:
                        view = memoryview(piece)
                        ahead.pieces.appendleft(view[length - sent :])
                        piece = view[: length - sent]
                    ahead.held -= len(piece)
                    ahead.position += len(piece)
                    ahead.used += len(piece)
                    self.used += len(piece)
                    sent += len(piece)
                    ahead.changes.fire()
                    yield bytes(piece) if isinstance(piece, memoryview) else piece
                elif ahead.ended:
                    break
                else:
                    await ahead.changes.wait()
            whole = sent == length
        finally:
            ahead.taken = False
            if whole:
                ahead.scope.deadline = trio.current_time() + self.keep  # a next span may want the rest
            else:
                ahead.scope.cancel()  # the span stopped (cancelled, or the read ended): nothing to keep
            ahead.changes.fire()
        if sent < length:
            # The read ahead ended first (it asked for less, or failed): the rest as usual.
            rest = self.origin.read_range(blob_key(ahead.digest), start + sent, length - sent)
            async with contextlib.aclosing(rest) as pieces:  # type: ignore[type-var]
                async for piece in pieces:
                    yield piece
