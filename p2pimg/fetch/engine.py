"""The fetch engine: one verified, resumable, parallel, multi-source fetch per blob.

Theory of operation. A reader asks `Fetcher.open(blob_map)`. If the blob is complete in the cache
it gets None and reads the file. Otherwise it joins the blob's one `BlobFetch` (singleflight).
The fetch's dispatcher repeatedly takes the earliest chunk that is neither verified nor requested,
asks the `SourcePolicy` which source should fetch it, grows a span from it (contiguous chunks that
source holds, up to its span size, never across a segment boundary), and starts a request. Every
chunk is verified against its CID as it arrives, written to the partial blob, and its readers are
woken; readers consume chunks in order. When every chunk is in, the whole blob is checked against
its digest and renamed into place.

A chunk's life:

    missing --(dispatched in a span)--> requested --(CID matches)--> verified (on disk, readers woken)
                                            |--(wrong bytes)--> missing; source penalised/banned
                                            |--(error, stall)--> missing; source backs off
    requested --(no progress for a while, nothing else to do)--> also requested from a 2nd source

Who may fail a pull. A peer is one of many and may be a stranger on the LAN: a peer that fails a
chunk (an error, a stall, wrong bytes, a claim it cannot keep) is not asked for that chunk again
in this fetch, and backs off (see `policy.py`: longer each time, then dropped). Those failures do
not count toward the chunk's attempt limit: only the origin's (or upstream's) do, so however many
peers fail, a chunk gives up only after the authoritative source failed it `attempts` times, or
when no source that holds it is left. A peer request that stalls is stopped at once when it is
hedged. A fetch whose last reader leaves is cancelled (its verified chunks stay on disk for the
next one), unless it is a warm.
Memory is bounded by the number of requests in flight (each source's limit) times one chunk.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
from dataclasses import dataclass, field

import trio

from p2pimg.content.model import BlobMap
from p2pimg.errors import CacheError, OriginError, P2pimgError, VerificationError
from p2pimg.fetch.plan import Span
from p2pimg.fetch.policy import PreferNear, SourcePolicy, SourceStats
from p2pimg.metrics import Metrics
from p2pimg.sources.base import ChunkSource, SourceBusy
from p2pimg.store.chunks import ChunkStore, PartialBlob

log = logging.getLogger(__name__)


@dataclass
class FetchConfig:
    attempts: int = 4  # failed tries of one chunk before the fetch fails
    stall_timeout: float = 30.0  # a request that sends nothing for this long has failed
    tick: float = 0.25  # how often a waiting dispatcher re-checks backoffs and stragglers
    prime_timeout: float = 0.3  # how long a new fetch waits to hear what peers hold
    coming_grace: float = 30.0  # how long a chunk a peer is fetching is left to that peer
    swarm_span: int = 2 << 20  # origin span size while peers may be fetching the same blob
    slow_start: float = 0.6  # with peers, one origin request at a time until they have spoken
    swarm_origin_requests: int = 3  # with peers, origin requests in flight per blob after that
    same_source_hedge: float = 5.0  # no progress for this long: race a request on its own source
    steal_after: float = 1.5  # idle this long, take blocks other peers own but have not brought


@dataclass(eq=False)
class _Request:
    source: ChunkSource
    stats: SourceStats
    span: Span
    started: float
    last_progress: float
    next_index: int
    hedged: bool = False
    overtaken: bool = False  # stopped because others verified the rest while it stalled
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


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
    requested: list[int] = field(default_factory=list)  # requests in flight covering each chunk
    failures: list[int] = field(default_factory=list)  # per chunk, by the origin or upstream
    peer_failed: dict[int, set[str]] = field(default_factory=dict)  # chunk -> peers that failed it
    requests: set[_Request] = field(default_factory=set)
    last_failure: P2pimgError | None = None
    order: list[int] = field(default_factory=list)  # the order chunks are dispatched in
    position: list[int] = field(default_factory=list)  # chunk index -> place in `order`
    cursor: int = 0  # no chunk before order[cursor] is waiting to be requested
    received: dict[str, int] = field(default_factory=dict)  # verified bytes by kind of source
    swarm: bool = False  # peers were known when it started: share the origin's work with them
    last_own_dispatch: float = field(default_factory=trio.current_time)  # last origin request
    started: float = field(default_factory=trio.current_time)
    coming_since: dict[int, float] = field(default_factory=dict)

    @property
    def map(self) -> BlobMap:
        return self.partial.map

    async def wait_chunk(self, index: int) -> None:
        """Return once chunk `index` is verified on disk; raise the fetch's error if it failed."""
        if not self.partial.have[index]:
            await self.ready[index].wait()
        if not self.partial.have[index]:
            raise self.error or OriginError(f"chunk {index} of {self.map.digest} was not fetched")

    def _fail(self, error: P2pimgError) -> None:
        if self.error is None:
            self.error = error
        for event in self.ready:
            event.set()


class _Broadcast:
    """Wake every waiter at once (trio.Event is one-shot; this re-arms itself)."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self, timeout: float) -> None:
        with trio.move_on_after(timeout):
            await self._event.wait()


class Fetcher:
    def __init__(self, store: ChunkStore, sources: list[ChunkSource], nursery: trio.Nursery, *,
                 policy: SourcePolicy | None = None, metrics: Metrics | None = None,
                 config: FetchConfig | None = None, node_id: str | None = None) -> None:
        self.store = store
        self.node_id = node_id
        self.nursery = nursery
        self.policy = policy or PreferNear()
        self.metrics = metrics or Metrics()
        self.config = config or FetchConfig()
        self.sources: list[ChunkSource] = []
        self.stats: dict[str, SourceStats] = {}
        for source in sources:
            self.add_source(source)
        self._fetches: dict[str, BlobFetch] = {}
        self._opening: dict[str, trio.Event] = {}
        self._changed = _Broadcast()

    def add_source(self, source: ChunkSource) -> None:
        self.sources.append(source)
        self.stats.setdefault(source.name, SourceStats(source.name, source.kind, source.limit))

    def remove_source(self, name: str) -> None:
        """Stop choosing a source (requests already running finish or fail on their own)."""
        self.sources = [s for s in self.sources if s.name != name]

    def availability(self, digest: str) -> bytes | None:
        """What this node holds of a blob, per chunk (1 verified, 2 being fetched, 0 missing);
        b"" for a complete blob; None when it holds nothing of it (or nothing verified yet)."""
        if self.store.has_blob(digest):
            return b""
        fetch = self._fetches.get(digest)
        if fetch is None:
            return None
        have, requested = fetch.partial.have, fetch.requested
        return bytes(1 if have[i] else 2 if requested[i] else 0 for i in range(len(have)))

    def fetch_of(self, digest: str) -> BlobFetch | None:
        return self._fetches.get(digest)

    # -- readers ---------------------------------------------------------------------------

    async def open(self, blob_map: BlobMap, *, warm: bool = False) -> BlobFetch | None:
        """None if the blob is complete in the cache; else its (shared) fetch, joined as a reader
        unless `warm` (then it runs to the end whoever reads). Readers must `release()`."""
        digest = blob_map.digest
        while digest in self._opening:
            await self._opening[digest].wait()
        fetch = self._fetches.get(digest)
        if fetch is None:
            if self.store.has_blob(digest):
                return None
            opened = self._opening[digest] = trio.Event()
            try:
                partial = await trio.to_thread.run_sync(self.store.open_partial, blob_map)
                fetch = BlobFetch(partial, [trio.Event() for _ in range(blob_map.count)],
                                  requested=[0] * blob_map.count, failures=[0] * blob_map.count)
                for i, have in enumerate(partial.have):
                    if have:
                        fetch.ready[i].set()
                self._fetches[digest] = fetch
                self.nursery.start_soon(self._run, fetch)
            finally:
                del self._opening[digest]
                opened.set()
        if warm:
            fetch.warm = True
        else:
            fetch.readers += 1
        return fetch

    def release(self, fetch: BlobFetch) -> None:
        """A reader is done; the last one leaving cancels a fetch nobody else wants."""
        fetch.readers -= 1
        if (fetch.readers == 0 and not fetch.warm and not fetch.done.is_set()
                and not fetch.partial.complete):  # complete: only the final check is left
            # Forget it first: a reader arriving now starts a fresh fetch that resumes from disk.
            if self._fetches.get(fetch.map.digest) is fetch:
                del self._fetches[fetch.map.digest]
            fetch.scope.cancel()

    # -- the dispatcher ------------------------------------------------------------------

    async def _run(self, fetch: BlobFetch) -> None:
        bmap = fetch.map
        try:
            with fetch.scope:
                async with trio.open_nursery() as requests:
                    await self._prepare(fetch, requests)
                    while not fetch.partial.complete and fetch.error is None:
                        if not self._dispatch(fetch, requests):
                            self._hedge(fetch, requests)
                            await self._changed.wait(self.config.tick)
                    requests.cancel_scope.cancel()  # hedged losers still reading
                if fetch.error is None:
                    await trio.to_thread.run_sync(fetch.partial.finalize)
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
            fetch.done.set()
            fetch.partial.close()
            self._changed.fire()

    async def _prepare(self, fetch: BlobFetch, nursery: trio.Nursery) -> None:
        """Ask peers what they hold, keep asking while the fetch runs, and choose the order.

        Alone, a blob is fetched in order, which feeds an in-order reader first. With peers, the
        origin's share is taken in a random order of span-sized blocks, so that nodes fetching
        the same blob at once mostly ask the origin for different parts and trade the rest.
        """
        bmap = fetch.map
        sources = list(self.sources)
        with trio.move_on_after(self.config.prime_timeout):
            async with trio.open_nursery() as primes:
                for source in sources:
                    primes.start_soon(source.prime, bmap)
        for source in sources:
            nursery.start_soon(source.track, bmap, self._changed.fire)
        order = list(range(bmap.count))
        if any(s.kind == "peer" for s in sources):
            fetch.swarm = True
            block = max(1, self.config.swarm_span // bmap.chunk_size)
            blocks = [order[i:i + block] for i in range(0, len(order), block)]
            random.shuffle(blocks)
            order = [i for b in blocks for i in b]
        fetch.order = order
        fetch.position = [0] * bmap.count
        for pos, i in enumerate(order):
            fetch.position[i] = pos
        fetch.cursor = 0

    def _left_to_owner(self, fetch: BlobFetch, i: int, now: float) -> bool:
        """Leave chunk `i` to the peer that owns its block, so the origin sends it once.

        Every node fetching a blob ranks the nodes fetching it (itself and the peers that say
        they hold or fetch part of it) per block by a hash of (node, blob, block), the same on
        every node (rendezvous hashing): each block's owner asks the origin for it, the others
        wait and take it from the owner. A node that has nothing of its own left to ask for
        takes an owner's block after `steal_after` seconds, in case the owner is slow or gone.
        """
        bmap = fetch.map
        block = i // max(1, self.config.swarm_span // bmap.chunk_size)
        nodes = {self.node_id: None} if self.node_id else {}
        for s in self.sources:
            st = self.stats[s.name]
            if (s.kind == "peer" and s.node_id and s.participates(bmap) and not st.banned
                    and now >= st.unavailable_until):
                nodes[s.node_id] = None
        if len(nodes) < 2 or not self.node_id:
            return False
        owner = max(nodes, key=lambda n: hashlib.blake2b(f"{n}/{bmap.digest}/{block}".encode(),
                                                           digest_size=8).digest())
        if owner == self.node_id:
            return False
        return now - fetch.last_own_dispatch < self.config.steal_after

    def _waiting_for_peer(self, fetch: BlobFetch, holders: list[ChunkSource], i: int, now: float) -> bool:
        """Leave chunk `i` to a healthy peer that is fetching it, for a while, instead of asking
        the origin for it too."""
        if any(s.kind == "peer" for s in holders):
            return False
        coming = [s for s in self.sources if s.kind == "peer" and s.coming(fetch.map, i)
                  and not self.stats[s.name].banned and now >= self.stats[s.name].unavailable_until]
        if not coming:
            fetch.coming_since.pop(i, None)
            return False
        since = fetch.coming_since.setdefault(i, now)
        return now - since < self.config.coming_grace

    def _dispatch(self, fetch: BlobFetch, nursery: trio.Nursery) -> bool:
        """Start requests for every chunk nobody is fetching yet, as far as sources allow."""
        bmap, have, order = fetch.map, fetch.partial.have, fetch.order
        started = False
        now = trio.current_time()
        # Constant for this pass (`now` is): worked out once, not per chunk.
        live_peers = self._live_peers(now)
        sharing = self._sharing(fetch, now, live_peers)
        while fetch.cursor < bmap.count and (have[order[fetch.cursor]]
                                             or fetch.requested[order[fetch.cursor]]):
            fetch.cursor += 1
        pos = fetch.cursor
        while pos < bmap.count:
            i = order[pos]
            pos += 1
            if have[i] or fetch.requested[i]:
                continue
            if fetch.failures[i] >= self.config.attempts:
                last = fetch.last_failure or OriginError("no answer")
                fetch.error = fetch.error or type(last)(
                    f"chunk {i} of {bmap.digest} failed {fetch.failures[i]} times, giving up; "
                    f"last: {last.message}")
                return started
            holders = self._holders(fetch, i)
            if not holders:
                why = f"; last: {fetch.last_failure.message}" if fetch.last_failure else ""
                fetch.error = fetch.error or OriginError(
                    f"no usable source has chunk {i} of {bmap.digest}{why}")
                return started
            if self._waiting_for_peer(fetch, holders, i, now):
                continue
            if (sharing and not any(s.kind == "peer" for s in holders)
                    and self._left_to_owner(fetch, i, now)):
                continue
            stats = self.policy.choose([self.stats[s.name] for s in holders], now)
            if stats is None:
                if len(holders) == len(self.sources):
                    break  # every source is busy or backing off: nothing later can start either
                continue  # its holders are busy; later chunks may have others
            source = next(s for s in holders if s.name == stats.name)
            if source.kind != "peer" and self._slow_start(fetch, now, sharing):
                continue  # peers may be starting on this blob too: let them say what they take
            span = self._grow_span(fetch, source, i, live_peers, sharing)
            self._start(fetch, nursery, source, span)
            if source.kind != "peer":
                fetch.last_own_dispatch = now
            started = True
        return started

    def _holders(self, fetch: BlobFetch, i: int) -> list[ChunkSource]:
        """The sources that may be asked for chunk `i`: they hold it, are not banned, and (peers)
        have not failed it in this fetch."""
        failed = fetch.peer_failed.get(i, ())
        return [s for s in self.sources if s.has(fetch.map, i) and not self.stats[s.name].banned
                and s.name not in failed]

    def _slow_start(self, fetch: BlobFetch, now: float, sharing: bool) -> bool:
        """In a swarm, keep few origin requests in flight per blob: one right after the start,
        `swarm_origin_requests` after that.

        Nodes fetching the same blob see each other's requests only through availability polls
        (every 0.3 s). Claiming the origin's share a few spans at a time keeps what a node claims
        blind small, and the random block order keeps those claims mostly disjoint; with several
        blobs and nodes, the sum still fills the origin's uplink.
        """
        if not sharing:
            return False
        far = sum(1 for r in fetch.requests if r.source.kind != "peer")
        if now - fetch.started < self.config.slow_start:
            return far >= 1
        # Claim the origin's share a little at a time, so peers see each claim before the next.
        return far >= self.config.swarm_origin_requests

    def _live_peers(self, now: float) -> list[ChunkSource]:
        """Peers that are neither banned nor backing off (nor dropped)."""
        return [s for s in self.sources if s.kind == "peer" and not self.stats[s.name].banned
                and now >= self.stats[s.name].unavailable_until]

    def _sharing(self, fetch: BlobFetch, now: float, live_peers: list[ChunkSource]) -> bool:
        """Whether this blob's origin work is shared with peers now: during the slow start of a
        fetch that began with peers known, then while a live peer holds or fetches some of it.
        Peers that failed their way out (fake ones included) do not slow the origin down."""
        if not fetch.swarm:
            return False
        if now - fetch.started < self.config.slow_start:
            return True
        return any(p.participates(fetch.map) for p in live_peers)

    def _grow_span(self, fetch: BlobFetch, source: ChunkSource, first: int, live_peers: list[ChunkSource],
                   sharing: bool) -> Span:
        bmap, have = fetch.map, fetch.partial.have
        peers = live_peers if source.kind != "peer" else []
        span_bytes = source.max_span if source.kind == "peer" or not sharing else min(
            source.max_span, self.config.swarm_span)
        per_span = max(1, span_bytes // bmap.chunk_size)
        per_segment = max(1, source.segment_size // bmap.chunk_size)
        end = first + 1
        while (end < bmap.count and end - first < per_span and end % per_segment
               and not have[end] and not fetch.requested[end] and source.has(bmap, end)
               and not any(p.coming(bmap, end) or p.has(bmap, end) for p in peers)):
            end += 1
        return Span(first, end)

    def _start(self, fetch: BlobFetch, nursery: trio.Nursery, source: ChunkSource, span: Span) -> _Request:
        now = trio.current_time()
        request = _Request(source, self.stats[source.name], span, now, now, span.first)
        for j in range(span.first, span.end):
            fetch.requested[j] += 1
        fetch.requests.add(request)
        request.stats.started()
        self.metrics.source_requests.labels(source.kind).inc()
        nursery.start_soon(self._request, fetch, request)
        return request

    def _hedge(self, fetch: BlobFetch, nursery: trio.Nursery) -> None:
        """Nothing left to dispatch: race a straggling request against another source."""
        now = trio.current_time()
        bmap = fetch.map
        for request in list(fetch.requests):
            if request.hedged or request.next_index >= request.span.end:
                continue
            holders = self._holders(fetch, request.next_index)
            # What a chunk takes from the fastest source that has it: a source that trickles is a
            # straggler next to it, even though it is "keeping its own pace".
            rate = max([request.stats.throughput, *(self.stats[s.name].throughput for s in holders)])
            # Nothing measured yet: a LAN peer should bring a chunk in well under a second.
            typical = bmap.chunk_size / rate if rate else 0.25 if request.source.kind == "peer" else 1.0
            if not self.policy.should_hedge(request.stats, now - request.last_progress, typical):
                continue
            others = [self.stats[s.name] for s in holders if s is not request.source]
            stats = self.policy.choose_hedge(others, now)
            if stats is None and now - request.last_progress > self.config.same_source_hedge:
                # With no other source, a second request to the same one beats waiting on a
                # stuck connection; but only when it is stuck, not slow: on a saturated link a
                # second request would only send the same bytes twice.
                stats = self.policy.choose_hedge([request.stats], now)
            if stats is None:
                continue
            source = next(s for s in holders if s.name == stats.name)
            request.hedged = True
            if request.source.kind == "peer" and source is not request.source:
                # A LAN peer that stalls has failed: stop it now (it may be a stranger that holds
                # a slot open on purpose); the hedge takes its chunks.
                request.overtaken = True
                request.scope.cancel()
            self.metrics.hedges.inc()
            log.info("hedging chunks %d-%d of %s on %s", request.next_index, request.span.end - 1,
                     bmap.digest, source.name)
            self._start(fetch, nursery, source, Span(request.next_index, request.span.end))

    def _release_overtaken(self, fetch: BlobFetch, winner: _Request) -> None:
        """Stop requests whose remaining chunks others have now verified: they hold a slot of
        their source (a stuck peer's, typically) for nothing."""
        have = fetch.partial.have
        for other in fetch.requests:
            if other is winner or other.next_index >= other.span.end:
                continue
            if all(have[j] for j in range(other.next_index, other.span.end)):
                other.overtaken = other.hedged
                other.scope.cancel()

    # -- one request ---------------------------------------------------------------------

    async def _request(self, fetch: BlobFetch, request: _Request) -> None:
        bmap, partial = fetch.map, fetch.partial
        source, stats, span = request.source, request.stats, request.span
        kind = source.kind
        start, end = span.byte_range(bmap.size, bmap.chunk_size)
        received = 0
        first_byte: float | None = None
        outcome = "cancelled"
        buf = bytearray(bmap.chunk_size)
        filled = 0
        index = span.first
        try:
            with request.scope:
                reader = source.read_span(bmap, start, end - start)
                async with contextlib.aclosing(reader) as pieces:  # type: ignore[type-var]
                    while index < span.end:
                        with trio.fail_after(source.stall_timeout or self.config.stall_timeout):
                            piece = await anext(pieces, None)
                        if piece is None:
                            raise OriginError(f"{source.name} ended chunk {index} of {bmap.digest} early")
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
                                received += hi - lo
                                fetch.received[kind] = fetch.received.get(kind, 0) + hi - lo
                                self.metrics.source_bytes.labels(kind).inc(hi - lo)
                                fetch.ready[index].set()
                                self._changed.fire()
                                self._release_overtaken(fetch, request)
                            index += 1
                            request.next_index = index
                            request.last_progress = trio.current_time()
                        if all(partial.have[j] for j in range(index, span.end)):
                            break  # a hedge (or another process) already has the rest
                outcome = "ok"
        except VerificationError as exc:
            outcome = "bad"
            fetch.last_failure = exc
            self._count_failure(fetch, source, index, span)
            self.metrics.verify_failures.labels(kind).inc()
            log.warning("%s sent a bad chunk %d of %s: %s", source.name, index, bmap.digest, exc)
        except SourceBusy as exc:
            outcome = "busy"  # a polite no: not the source's failure, nor the chunk's
            log.debug("%s: %s", source.name, exc.message)
        except CacheError as exc:
            # The cache cannot take the chunk (a full disk): no source is to blame and asking
            # again cannot help, so the fetch fails now with that error.
            fetch.error = fetch.error or exc
        except (P2pimgError, OSError, trio.TooSlowError) as exc:
            outcome = "error"
            fetch.last_failure = exc if isinstance(exc, P2pimgError) else OriginError(
                f"{source.name}: {exc or type(exc).__name__}")
            self._count_failure(fetch, source, index, span)
            log.info("%s failed on chunks %d-%d of %s: %s", source.name, index, span.end - 1,
                     bmap.digest, exc or type(exc).__name__)
        finally:
            now = trio.current_time()
            if outcome == "ok":
                stats.finished(received, now - request.started, first_byte)
                self.metrics.span_seconds.labels(kind).observe(now - request.started)
            elif outcome == "bad":
                stats.sent_bad_chunk(now, received)
            elif outcome == "busy":
                stats.busy(now, SourceBusy.retry_after)
            elif outcome == "error" or request.overtaken:
                stats.failed(now, received)  # an error, or a stall that a hedge had to make up for
                if request.overtaken:
                    self._count_failure(fetch, source, index, span)
            else:
                stats.in_flight -= 1  # cancelled: says nothing about the source
            for j in range(span.first, span.end):
                fetch.requested[j] -= 1
            if index < span.end and fetch.position:  # what it left undone may need asking again
                fetch.cursor = min(fetch.cursor, *(fetch.position[j] for j in range(index, span.end)))
            fetch.requests.discard(request)
            self._changed.fire()

    @staticmethod
    def _count_failure(fetch: BlobFetch, source: ChunkSource, index: int, span: Span) -> None:
        """Chunk `index` of `span` failed on `source` (nothing to count once the span is done): a
        peer is not asked for it again in this fetch; the origin's (or upstream's) failures count
        toward the chunk's attempt limit."""
        if index >= span.end:
            return
        if source.kind == "peer":
            fetch.peer_failed.setdefault(index, set()).add(source.name)
        else:
            fetch.failures[index] += 1
