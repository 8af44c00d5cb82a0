"""The fetch engine: one verified, resumable, parallel fetch per blob, however many readers.

Theory of operation. A reader asks `Fetcher.open(blob_map)`. If the blob is complete in the cache,
it gets the file. Otherwise it joins the blob's one `BlobFetch` (singleflight), which plans the
missing chunks as spans, fetches spans in parallel from the origin, verifies each chunk against
its CID, writes it to the partial blob and wakes readers waiting for that chunk. Readers consume
chunks in order as soon as each is verified. When every chunk is in, the whole blob is checked
against its digest and renamed into place.

A chunk's life:

    missing --(span requested)--> in flight --(CID matches)--> verified (on disk, readers woken)
                                      |--(mismatch / error)--> missing, span retried (bounded)

Fetches live in a nursery owned by the Fetcher: they finish even if their reader leaves, so a
pull interrupted by a client does not waste what was fetched.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import trio

from .errors import OriginError, P2pimgError, VerificationError
from .model import BlobMap
from .origins import Origin, blob_key
from .plan import Span, plan_spans
from .store import ChunkStore, PartialBlob

log = logging.getLogger(__name__)


@dataclass
class FetchConfig:
    parallel_spans: int = 4
    max_span: int = 8 << 20
    attempts: int = 3
    backoff: float = 0.2


@dataclass
class BlobFetch:
    """The single in-flight fetch of one blob."""

    partial: PartialBlob
    ready: list[trio.Event]
    done: trio.Event = field(default_factory=trio.Event)
    error: P2pimgError | None = None
    readers: int = 0

    async def wait_chunk(self, index: int) -> None:
        """Return once chunk `index` is verified on disk; raise the fetch's error if it failed."""
        if not self.partial.have[index]:
            await self.ready[index].wait()
        if not self.partial.have[index]:
            raise self.error or OriginError(f"chunk {index} of {self.partial.map.digest} was not fetched")

    def fail(self, error: P2pimgError) -> None:
        self.error = error
        for event in self.ready:
            event.set()


class Fetcher:
    def __init__(self, store: ChunkStore, origin: Origin, nursery: trio.Nursery,
                 config: FetchConfig | None = None) -> None:
        self.store = store
        self.origin = origin
        self.nursery = nursery
        self.config = config or FetchConfig()
        self._fetches: dict[str, BlobFetch] = {}
        self._opening: dict[str, trio.Event] = {}

    async def open(self, blob_map: BlobMap) -> BlobFetch | None:
        """None if the blob is complete in the cache; else its (possibly shared) fetch."""
        digest = blob_map.digest
        while digest in self._opening:
            await self._opening[digest].wait()
        if (fetch := self._fetches.get(digest)) is not None:
            return fetch
        if self.store.has_blob(digest):
            return None
        opened = self._opening[digest] = trio.Event()
        try:
            partial = await trio.to_thread.run_sync(self.store.open_partial, blob_map)
            fetch = BlobFetch(partial, [trio.Event() for _ in range(blob_map.count)])
            for i, have in enumerate(partial.have):
                if have:
                    fetch.ready[i].set()
            self._fetches[digest] = fetch
        finally:
            del self._opening[digest]
            opened.set()
        self.nursery.start_soon(self._run, fetch)
        return fetch

    async def _run(self, fetch: BlobFetch) -> None:
        bmap = fetch.partial.map
        try:
            missing = fetch.partial.missing()
            spans = plan_spans(missing, bmap.chunk_size, max_span=self.config.max_span,
                               segment_size=self.origin.segment_size)
            queue = list(reversed(spans))  # pop() takes the earliest span: readers go in order
            async with trio.open_nursery() as workers:
                for _ in range(min(self.config.parallel_spans, len(queue))):
                    workers.start_soon(self._worker, fetch, queue, workers.cancel_scope)
            if fetch.error is None:
                await trio.to_thread.run_sync(fetch.partial.finalize)
        except P2pimgError as exc:
            fetch.error = exc
        except Exception as exc:  # never let one blob's bug take the server down
            log.exception("fetch of %s crashed", bmap.digest)
            fetch.error = OriginError(f"fetch of {bmap.digest} failed: {exc}")
        finally:
            self._fetches.pop(bmap.digest, None)
            if fetch.error is not None:
                log.warning("fetch of %s failed: %s", bmap.digest, fetch.error)
                fetch.fail(fetch.error)
            fetch.done.set()
            fetch.partial.close()

    async def _worker(self, fetch: BlobFetch, queue: list[Span], scope: trio.CancelScope) -> None:
        """Fetch spans until none are left; after the last failed attempt, fail the whole fetch."""
        while queue:
            span = queue.pop()
            for attempt in range(1, self.config.attempts + 1):
                try:
                    await self._fetch_span(fetch, span)
                    break
                except (OriginError, VerificationError) as exc:
                    if attempt == self.config.attempts:
                        fetch.error = exc
                        scope.cancel()
                        return
                    log.info("span %s of %s failed (attempt %d): %s",
                             span, fetch.partial.map.digest, attempt, exc)
                    await trio.sleep(self.config.backoff * 2 ** (attempt - 1))

    async def _fetch_span(self, fetch: BlobFetch, span: Span) -> None:
        partial, bmap = fetch.partial, fetch.partial.map
        todo = [i for i in range(span.first, span.end) if not partial.have[i]]
        if not todo:
            return
        span = Span(todo[0], todo[-1] + 1)
        start, end = span.byte_range(bmap.size, bmap.chunk_size)
        index = span.first
        buf = bytearray()
        reader = self.origin.read_range(blob_key(bmap.digest), start, end - start)
        async with contextlib.aclosing(reader) as pieces:  # type: ignore[type-var]
            async for piece in pieces:
                buf += piece
                while index < span.end:
                    lo, hi = bmap.bounds(index)
                    if len(buf) < hi - lo:
                        break
                    chunk = bytes(buf[: hi - lo])
                    del buf[: hi - lo]
                    await trio.to_thread.run_sync(partial.write_chunk, index, chunk)
                    fetch.ready[index].set()
                    index += 1
        if index < span.end:
            raise OriginError(f"origin ended {bmap.digest} early at chunk {index}")

