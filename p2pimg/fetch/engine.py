"""The fetch engine: the I/O loop around the scheduling core, one fetch per blob.

Theory of operation. A reader asks `Fetcher.open(blob_map)`. If the blob is complete in the cache
it gets None and reads the file. Otherwise it joins the blob's one `BlobFetch` (singleflight). The
fetch asks its sources what they hold, then loops: it tells the blob's `BlobSchedule`
(`schedule.py`, where every decision about where bytes come from is made) what changed, and
carries out the actions it returns: start a request for a span on a source, cancel a request,
give up. Every chunk is verified against its CID as it arrives, written to the partial blob, its
readers woken, and reported to the schedule; readers consume chunks in order. When every chunk
is in, the whole blob is checked against its digest and renamed into place.

What is left here is only what needs I/O: the trio tasks and cancel scopes of requests, reading
spans from sources, verifying and writing chunks, waking readers, metrics and logs. A fetch whose
last reader leaves is cancelled (its verified chunks stay on disk for the next one), unless it is
a warm. Memory is bounded by the number of requests in flight (each source's limit) times one
chunk.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from p2pimg.content.model import BlobMap
from p2pimg.errors import CacheError, OriginError, P2pimgError, VerificationError
from p2pimg.fetch.nerdctl import FileMap
from p2pimg.fetch.policy import PreferNear, SourcePolicy, SourceStats
from p2pimg.fetch.schedule import (
    COMING,
    HAVE,
    Action,
    BlobSchedule,
    Cancel,
    GiveUp,
    Request,
    ScheduleConfig,
    Scheduler,
    Start,
)
from p2pimg.fetch.transfers import TransferLog, TransferRecord
from p2pimg.metrics import Metrics, Timeline
from p2pimg.sources.base import ChunkSource, SourceBusy
from p2pimg.sources.readahead import AheadReport
from p2pimg.store.chunks import ChunkStore, PartialBlob
from p2pimg.tasks import Broadcast

log = logging.getLogger(__name__)

_FLUSH_EVERY = 16 << 20  # bytes hashed between two pushes of the partial blob to the disk


@dataclass
class FetchConfig(ScheduleConfig):
    tick: float = 0.25  # how often a waiting fetch tells its schedule that time passed
    prime_timeout: float = 0.3  # how long a new fetch waits to hear what peers hold


@dataclass(eq=False)
class BlobFetch:
    """The single in-flight fetch of one blob."""

    partial: PartialBlob
    ready: list[trio.Event]
    warm: bool = False
    readers: int = 0
    error: P2pimgError | None = None
    done: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    schedule: BlobSchedule | None = None  # once its sources have been asked what they hold
    scopes: dict[int, trio.CancelScope] = field(default_factory=dict)  # request id -> its scope
    followed: set[str] = field(default_factory=set)  # sources whose inventory is being kept fresh
    # An unchecked map's blob (mirrored: only its digest can check it) keeps who sent what.
    firsthand: bytearray = field(default_factory=bytearray)  # chunks from a non-peer source
    suppliers: dict[int, str] = field(default_factory=dict)  # chunk -> the peer that sent it
    # Round 2: every chunk -> (the peer that sent it in round 1, or "", the hash of what it sent).
    referee: dict[int, tuple[str, bytes]] | None = None
    changed: set[int] = field(default_factory=set)  # chunks whose bytes round 2 found different
    round: int = 0  # bumped when the bytes received so far turned out wrong and are fetched again
    record: TransferRecord | None = None  # what it did, for people to look at (fetch/transfers.py)

    @property
    def map(self) -> BlobMap:
        return self.partial.map

    @property
    def received(self) -> dict[str, int]:
        """Verified bytes by kind of source."""
        return self.schedule.received if self.schedule is not None else {}

    async def wait_chunk(self, index: int) -> None:
        """Return once chunk `index` is verified on disk; raise the fetch's error if it failed."""
        if not self.partial.have[index]:
            await self.ready[index].wait()
        if not self.partial.have[index]:
            raise self.error or OriginError(f"chunk {index} of {self.map.digest} was not fetched")

    def shareable(self, index: int) -> bool:
        """Whether chunk `index` may go to a peer now: verified against its CID, or, for a blob
        only its digest checks, fetched from a non-peer source by this node itself. Nothing of
        a nerdctl image's blob before the digest check: its leaves are bound to the digest by no
        one, and a peer asking by digest must get the digest's bytes."""
        if isinstance(self.map, FileMap):
            return False
        return bool(self.partial.have[index]) and (self.map.checked or bool(self.firsthand[index]))

    def _fail(self, error: P2pimgError) -> None:
        if self.error is None:
            self.error = error
        for event in self.ready:
            event.set()


class Fetcher:
    def __init__(
        self,
        store: ChunkStore,
        sources: list[ChunkSource],
        nursery: trio.Nursery,
        *,
        policy: SourcePolicy | None = None,
        metrics: Metrics | None = None,
        config: FetchConfig | None = None,
        node_id: str | None = None,
    ) -> None:
        self.store = store
        self.node_id = node_id
        self.nursery = nursery
        self.metrics = metrics or Metrics()
        self.config = config or FetchConfig()
        self.scheduler = Scheduler(policy=policy or PreferNear(), config=self.config, node_id=node_id)
        self.sources: list[ChunkSource] = []
        for source in sources:
            self.add_source(source)
        self._fetches: dict[str, BlobFetch] = {}
        self._opening: dict[str, trio.Event] = {}
        self._changed = Broadcast()
        self.transfers = TransferLog()
        # Told of each fetch as it starts, with its map (nerdctl images: which file to read).
        self.on_start: Callable[[BlobMap], None] = lambda _bmap: None

    @property
    def stats(self) -> dict[str, SourceStats]:
        return self.scheduler.stats

    @property
    def policy(self) -> SourcePolicy:
        return self.scheduler.policy

    def add_source(self, source: ChunkSource) -> None:
        self.sources.append(source)
        self.scheduler.join(source)

    def remove_source(self, name: str) -> None:
        """Stop choosing a source (requests already running finish or fail on their own)."""
        self.sources = [s for s in self.sources if s.name != name]
        self.scheduler.leave(name)

    def availability(self, digest: str) -> bytes | None:
        """What this node holds of a blob, per chunk (1 verified, 2 being fetched, 0 missing);
        b"" for a complete blob; None when it holds nothing of it (or nothing verified yet)."""
        if self.store.has_blob(digest):
            return b""
        fetch = self._fetches.get(digest)
        if fetch is None or isinstance(fetch.map, FileMap):  # (see `BlobFetch.shareable`)
            return None
        if fetch.schedule is None:
            return bytes(HAVE if fetch.shareable(i) else 0 for i in range(fetch.map.count))
        states = fetch.schedule.availability()
        if fetch.map.checked:
            return states
        # Of a blob only its digest checks, peers hear of what this node brings first-hand.
        far = bytearray(fetch.map.count)
        for request in fetch.schedule.requests.values():
            if request.kind != "peer":
                far[request.next_index : request.span.end] = b"\x01" * (request.span.end - request.next_index)
        return bytes(
            HAVE if state == HAVE and fetch.firsthand[i] else COMING if state == COMING and far[i] else 0
            for i, state in enumerate(states)
        )

    def fetch_of(self, digest: str) -> BlobFetch | None:
        return self._fetches.get(digest)

    def read_ahead(self, digest: str) -> bool:
        """A client asked for a blob whose map is still being looked up: sources that can find it
        by digest alone start on its first bytes, for the fetch's first span to take
        (`sources.readahead`); whether one did. Nothing if the blob is being fetched or opened
        already (or read ahead), nor with peers: the swarm may bring the blob's start, and the
        origin's share may lie elsewhere."""
        if any(source.kind == "peer" for source in self.sources):
            return False
        if digest in self._fetches or digest in self._opening:
            return False
        return any(
            [source.read_ahead(self.nursery, digest, self._read_ahead_over) for source in self.sources]
        )

    def _read_ahead_over(self, report: AheadReport) -> None:
        self.metrics.read_ahead_bytes.labels("used").inc(report.used)
        self.metrics.read_ahead_bytes.labels("wasted").inc(report.wasted)
        self.metrics.timeline.add(
            "ahead",
            report.began,
            report.ended,
            blob=report.digest[7:19],
            used=report.used,
            wasted=report.wasted,
        )

    def drop_read_ahead(self, digest: str) -> None:
        for source in self.sources:
            source.drop_read_ahead(digest)

    # -- readers ---------------------------------------------------------------------------

    async def open(
        self, blob_map: BlobMap, *, warm: bool = False, repository: str | None = None
    ) -> BlobFetch | None:
        """None if the blob is complete in the cache; else its (shared) fetch, joined as a reader
        unless `warm` (then it runs to the end whoever reads). Readers must `release()`.
        `repository`: the name a client asked for the blob under, shown with the transfer.

        A fetch of the digest running with another map (another image's claim about the same
        digest, which may be false) is not joined: the reader waits for it to end, then reads
        the blob it made or, if it failed, fetches with its own map."""
        digest = blob_map.digest
        while True:
            while digest in self._opening:
                await self._opening[digest].wait()
            fetch = self._fetches.get(digest)
            if fetch is None or fetch.map is blob_map or fetch.map == blob_map:
                break
            await fetch.done.wait()
        if fetch is None:
            if self.store.has_blob(digest):
                return None
            opened = self._opening[digest] = trio.Event()
            try:
                partial = await trio.to_thread.run_sync(self.store.open_partial, blob_map)
                fetch = BlobFetch(partial, [trio.Event() for _ in range(blob_map.count)])
                fetch.firsthand = bytearray(blob_map.count)
                fetch.record = self.transfers.begin(
                    digest, blob_map.size, blob_map.chunk_size, partial.have, trio.current_time()
                )
                for i, have in enumerate(partial.have):
                    if have:
                        fetch.ready[i].set()
                self._fetches[digest] = fetch
                self.on_start(blob_map)
                self.nursery.start_soon(self._run, fetch)
            finally:
                del self._opening[digest]
                opened.set()
        if fetch.record is not None and fetch.record.repository is None:
            fetch.record.repository = repository
        if warm:
            fetch.warm = True
        else:
            fetch.readers += 1
        return fetch

    def release(self, fetch: BlobFetch) -> None:
        """A reader is done; the last one leaving cancels a fetch nobody else wants."""
        fetch.readers -= 1
        if (
            fetch.readers == 0 and not fetch.warm and not fetch.done.is_set() and not fetch.partial.complete
        ):  # complete: only the final check is left
            # Forget it first: a reader arriving now starts a fresh fetch that resumes from disk.
            if self._fetches.get(fetch.map.digest) is fetch:
                del self._fetches[fetch.map.digest]
            fetch.scope.cancel()

    # -- the loop ----------------------------------------------------------------------------

    async def _run(self, fetch: BlobFetch) -> None:
        bmap = fetch.map
        try:
            with fetch.scope:
                while True:
                    hashed: list[str] = []
                    async with trio.open_nursery() as hashing:
                        hashing.start_soon(self._hash_along, fetch, hashed)
                        schedule = await self._round(fetch)
                        if schedule.error is not None:
                            hashing.cancel_scope.cancel()
                    if schedule.error is not None:
                        raise schedule.error
                    try:
                        digest = hashed[0] if hashed else None
                        finalize = functools.partial(fetch.partial.finalize, digest, vouched=bmap.vouched)
                        await trio.to_thread.run_sync(finalize)
                    except VerificationError as exc:
                        if not await self._refetch_alone(fetch, exc):
                            raise
                        continue
                    await self._judge(fetch)
                    break
        except P2pimgError as exc:
            fetch.error = exc
        except Exception as exc:  # never let one blob's bug take the server down
            log.exception("fetch of %s crashed", bmap.digest)
            fetch.error = OriginError(f"fetch of {bmap.digest} failed: {exc}")
        finally:
            if self._fetches.get(bmap.digest) is fetch:
                del self._fetches[bmap.digest]
            if fetch.scope.cancelled_caught:
                fetch._fail(OriginError(f"fetch of {bmap.digest} was cancelled"))
            elif fetch.error is not None:
                log.warning("fetch of %s failed: %s", bmap.digest, fetch.error)
                fetch._fail(fetch.error)
            if fetch.record is not None:
                failure = fetch.error or (fetch.scope.cancelled_caught and "cancelled: no reader left")
                self.transfers.end(fetch.record, trio.current_time(), str(failure) if failure else None)
            fetch.done.set()
            fetch.partial.close()
            self._changed.fire()

    async def _hash_along(self, fetch: BlobFetch, hashed: list[str]) -> None:
        """The whole blob's sha256, computed in order while its chunks arrive (on another core
        than the chunk checks), so that the digest check at the end waits for nothing; what is
        hashed is also flushed to disk every `_FLUSH_EVERY` bytes, so the final fsync is short.
        Appends the digest to `hashed` once every chunk is in; stops if the fetch fails. A map
        a trusted root vouches for (`BlobMap.vouched`) is not hashed again, only flushed."""
        bmap, partial = fetch.map, fetch.partial
        h = None if bmap.vouched else hashlib.sha256()
        i = unflushed = 0
        while i < bmap.count:
            await fetch.ready[i].wait()
            if not partial.have[i]:
                return  # the fetch failed: its round ends with the error
            j = i + 1
            while j < bmap.count and partial.have[j]:
                j += 1
            lo, hi = bmap.bounds(i)[0], bmap.bounds(j - 1)[1]
            unflushed += hi - lo
            flush = unflushed >= _FLUSH_EVERY
            unflushed = 0 if flush else unflushed
            if h is not None or flush:
                await trio.to_thread.run_sync(functools.partial(partial.hash_into, h, lo, hi, flush=flush))
            i = j
        if h is not None:
            hashed.append("sha256:" + h.hexdigest())

    async def _round(self, fetch: BlobFetch) -> BlobSchedule:
        """Fetch every missing chunk (or fail): the loop around the blob's schedule."""
        async with trio.open_nursery() as requests:
            schedule = await self._prepare(fetch, requests)
            while not schedule.complete and schedule.error is None:
                now = trio.current_time()
                self._follow_new(fetch, requests)
                self._tell_inventories(fetch, now)
                actions = schedule.poll(now)
                self._carry_out(fetch, requests, actions)
                if not any(isinstance(a, Start) for a in actions):
                    await self._changed.wait(self.config.tick)
            requests.cancel_scope.cancel()  # hedged losers still reading
        return schedule

    async def _refetch_alone(self, fetch: BlobFetch, error: VerificationError) -> bool:
        """A blob only its digest checks did not match it. If peers sent some of it, note what
        each sent, forget every chunk, and fetch the blob again from non-peer sources alone
        (True); `_judge` then bans the peers whose bytes differ. If the upstream sent all of it,
        or this was that second round already, the fetch fails (False)."""
        if fetch.map.checked:
            return False  # the publisher's blob map lies about its digest: nothing to fetch again
        if fetch.referee is not None or not fetch.suppliers:
            self.metrics.verify_failures.labels("upstream").inc()
            return False
        suppliers = dict(fetch.suppliers)
        hashes = await trio.to_thread.run_sync(fetch.partial.chunk_hashes, list(range(fetch.map.count)))
        fetch.referee = {i: (suppliers.get(i, ""), h) for i, h in hashes.items()}
        log.warning("%s; fetching it again without peers to find whose bytes were wrong", error)
        await trio.to_thread.run_sync(fetch.partial.reset)
        fetch.round += 1  # readers that sent bytes of the first round are cut (registry.py)
        if fetch.record is not None:
            fetch.record.failures += 1
            fetch.record.restart()
        fetch.firsthand = bytearray(fetch.map.count)
        fetch.suppliers.clear()
        fetch.ready = [trio.Event() for _ in range(fetch.map.count)]
        fetch.schedule = None
        fetch.followed.clear()
        self._changed.fire()
        return True

    async def _judge(self, fetch: BlobFetch) -> None:
        """After a second round matched the digest: ban each peer whose chunks of the first round
        differ from what the non-peer sources sent."""
        if not fetch.referee:
            return
        hashes = await trio.to_thread.run_sync(fetch.partial.chunk_hashes, sorted(fetch.referee))
        fetch.changed = {i for i, (_, sent) in fetch.referee.items() if hashes[i] != sent}
        for peer in sorted({fetch.referee[i][0] for i in fetch.changed} - {""}):
            if (stats := self.scheduler.stats.get(peer)) is not None:
                stats.lied()
            self.metrics.verify_failures.labels("peer").inc()
            log.warning(
                "%s sent wrong bytes of %s (the digest and the upstream's bytes say so): banned",
                peer,
                fetch.map.digest,
            )

    async def _prepare(self, fetch: BlobFetch, nursery: trio.Nursery) -> BlobSchedule:
        """Ask the sources what they hold (briefly), keep asking while the fetch runs, and make
        the blob's schedule."""
        bmap = fetch.map
        sources = list(self.sources)
        with trio.move_on_after(self.config.prime_timeout):
            async with trio.open_nursery() as primes:
                for source in sources:
                    primes.start_soon(source.prime, bmap)
        for source in sources:
            fetch.followed.add(source.name)
            nursery.start_soon(source.track, bmap, self._changed.fire)
        now = trio.current_time()
        schedule = self.scheduler.blob(
            bmap.digest,
            bmap.size,
            bmap.chunk_size,
            [bool(h) for h in fetch.partial.have],
            now,
            with_peers=False if fetch.referee is not None else None,
            unchecked=not bmap.checked,
        )
        fetch.schedule = schedule
        self._tell_inventories(fetch, now)
        return schedule

    def _follow_new(self, fetch: BlobFetch, nursery: trio.Nursery) -> None:
        """A source that joined while the fetch runs (a peer just discovered) is asked what it
        holds, then kept track of, like those known at the start."""
        for source in self.sources:
            if source.name not in fetch.followed:
                fetch.followed.add(source.name)
                nursery.start_soon(self._follow, source, fetch.map)

    async def _follow(self, source: ChunkSource, bmap: BlobMap) -> None:
        await source.prime(bmap)
        self._changed.fire()
        await source.track(bmap, self._changed.fire)

    def _tell_inventories(self, fetch: BlobFetch, now: float) -> None:
        """What each source holds now (peers learn it by polling, in `track`)."""
        assert fetch.schedule is not None
        alone = fetch.referee is not None  # the second round of a blob peers sent wrong bytes of
        for source in self.sources:
            states = None if alone and source.kind == "peer" else source.inventory(fetch.map)
            fetch.schedule.inventory(source.name, states, now)

    def _carry_out(self, fetch: BlobFetch, nursery: trio.Nursery, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Start):
                request = action.request
                source = next((s for s in self.sources if s.name == request.source), None)
                if source is None:  # cannot happen: the schedule only starts sources it knows
                    raise OriginError(f"no source named {request.source}")
                fetch.scopes[request.id] = trio.CancelScope()
                self.metrics.source_requests.labels(request.kind).inc()
                if request.hedge:
                    self.metrics.hedges.inc()
                    log.info(
                        "hedging chunks %d-%d of %s on %s",
                        request.span.first,
                        request.span.end - 1,
                        fetch.map.digest,
                        source.name,
                    )
                nursery.start_soon(self._request, fetch, source, request)
            elif isinstance(action, Cancel):
                self._cancel(fetch, action)
            elif isinstance(action, GiveUp):
                fetch.error = fetch.error or action.error

    @staticmethod
    def _cancel(fetch: BlobFetch, action: Action) -> None:
        if isinstance(action, Cancel) and (scope := fetch.scopes.get(action.request.id)) is not None:
            log.debug(
                "stopping %s on chunks %d-%d: %s",
                action.request.source,
                action.request.next_index,
                action.request.span.end - 1,
                action.reason,
            )
            scope.cancel()

    # -- one request ---------------------------------------------------------------------

    async def _request(self, fetch: BlobFetch, source: ChunkSource, request: Request) -> None:
        bmap, partial = fetch.map, fetch.partial
        schedule = fetch.schedule
        assert schedule is not None
        kind, span = source.kind, request.span
        start, end = span.byte_range(bmap.size, bmap.chunk_size)
        began = Timeline.now()
        first_byte: float | None = None
        outcome = "cancelled"
        error: P2pimgError | None = None
        buf = bytearray(bmap.chunk_size)
        filled = 0
        index = span.first
        scope = fetch.scopes[request.id]
        try:
            with scope:
                reader = source.read_span(bmap, start, end - start)
                async with contextlib.aclosing(reader) as pieces:  # type: ignore[type-var]
                    while index < span.end:
                        piece = await anext(pieces, None)
                        if piece is None:
                            raise OriginError(f"{source.name} ended chunk {index} of {bmap.digest} early")
                        schedule.progressed(request, trio.current_time())
                        if first_byte is None:
                            first_byte = trio.current_time() - request.started
                            self.metrics.first_byte_seconds.labels(kind).observe(first_byte)
                        rest = memoryview(piece)
                        while rest and index < span.end:
                            # One copy per byte: from the piece into the chunk buffer.
                            lo, hi = bmap.bounds(index)
                            take = rest[: hi - lo - filled]
                            buf[filled : filled + len(take)] = take
                            filled += len(take)
                            rest = rest[len(take) :]
                            if filled < hi - lo:
                                break
                            filled = 0
                            if not partial.have[index]:
                                chunk = memoryview(buf)[: hi - lo]
                                await trio.to_thread.run_sync(partial.write_chunk, index, chunk)
                                if kind != "peer":
                                    fetch.firsthand[index] = 1
                                elif not bmap.checked:
                                    fetch.suppliers[index] = source.name
                                self.metrics.source_bytes.labels(kind).inc(hi - lo)
                                if fetch.record is not None:
                                    fetch.record.chunk(index, source.name, hi - lo, trio.current_time())
                                fetch.ready[index].set()
                                self._changed.fire()
                            for action in schedule.verified(request, index, trio.current_time()):
                                self._cancel(fetch, action)
                            index += 1
                        if all(partial.have[j] for j in range(index, span.end)):
                            break  # a hedge (or another process) already has the rest
                outcome = "ok"
        except VerificationError as exc:
            outcome, error = "bad", exc
            self.metrics.verify_failures.labels(kind).inc()
            if fetch.record is not None:
                fetch.record.failures += 1
            log.warning("%s sent a bad chunk %d of %s: %s", source.name, index, bmap.digest, exc)
        except SourceBusy as exc:
            outcome = "busy"  # a polite no: not the source's failure, nor the chunk's
            log.debug("%s: %s", source.name, exc.message)
        except CacheError as exc:
            # The cache cannot take the chunk (a full disk): no source is to blame and asking
            # again cannot help, so the fetch fails now with that error.
            schedule.fail(exc)
        except (P2pimgError, OSError) as exc:
            outcome = "error"
            error = (
                exc
                if isinstance(exc, P2pimgError)
                else OriginError(f"{source.name}: {exc or type(exc).__name__}")
            )
            log.info(
                "%s failed on chunks %d-%d of %s: %s",
                source.name,
                index,
                span.end - 1,
                bmap.digest,
                exc or type(exc).__name__,
            )
        finally:
            now = trio.current_time()
            if outcome == "ok":
                self.metrics.span_seconds.labels(kind).observe(now - request.started)
            request.next_index = max(request.next_index, index)
            self.metrics.timeline.add(
                "span",
                began,
                Timeline.now(),
                blob=bmap.digest[7:19],
                source=source.name,
                chunks=[span.first, span.end],
                bytes=request.received,
                first_byte=None if first_byte is None else round(first_byte, 4),
                outcome=outcome,
                hedge=request.hedge,
                why=request.why,
            )
            schedule.ended(request, outcome, now, error=error, first_byte=first_byte)
            fetch.scopes.pop(request.id, None)
            self._changed.fire()
