"""The multi-source fetch engine: spans, limits, failover, lying and stalling sources, hedging,
cancellation when the last reader leaves, warms that outlive their readers."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from p2pimg.content.cid import Cid, digest_of
from p2pimg.content.model import BlobMap
from p2pimg.fetch.engine import BlobFetch, FetchConfig, Fetcher
from p2pimg.metrics import Metrics
from p2pimg.sources.base import ChunkSource, SourceBusy
from p2pimg.store.chunks import ChunkStore, PartialBlob

CHUNK = 64 << 10


def make_blob(size: int, seed: int = 3) -> tuple[bytes, BlobMap]:
    data = random.Random(seed).randbytes(size)
    chunks = tuple(Cid.of_raw(data[i : i + CHUNK]) for i in range(0, size, CHUNK))
    return data, BlobMap(digest_of(data), size, CHUNK, chunks)


class MemorySource(ChunkSource):
    """A source serving a blob from memory, with switchable misbehaviour."""

    def __init__(
        self,
        name: str,
        kind: str,
        data: bytes,
        *,
        limit: int = 4,
        max_span: int = 4 * CHUNK,
        segment: int = 8 * CHUNK,
        lie: bool = False,
        stall_after: int | None = None,
        fail_first: int = 0,
        delay: float = 0.0,
        holds: set[int] | None = None,
        busy_first: int = 0,
    ) -> None:
        self.name, self.kind, self.data = name, kind, data
        self.limit, self.max_span, self.segment_size = limit, max_span, segment
        self.lie, self.stall_after, self.fail_first, self.delay = lie, stall_after, fail_first, delay
        self.holds = holds
        self.busy_first = busy_first
        self.requests: list[tuple[int, int]] = []
        self.in_flight = self.peak = 0
        self.sent = 0

    def inventory(self, blob_map: BlobMap) -> bytes | None:
        if self.holds is None:
            return b""
        return bytes(1 if i in self.holds else 0 for i in range(blob_map.count))

    async def read_span(self, blob_map: BlobMap, start: int, length: int) -> AsyncIterator[bytes]:
        self.requests.append((start, length))
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            if self.fail_first:
                self.fail_first -= 1
                raise OSError("connection reset by test")
            if self.busy_first:
                self.busy_first -= 1
                raise SourceBusy(f"{self.name} is busy")
            pos = start
            while pos < start + length:
                if self.stall_after is not None and pos - start >= self.stall_after:
                    await trio.sleep_forever()
                await trio.sleep(self.delay)
                piece = bytearray(self.data[pos : min(pos + 16384, start + length)])
                if self.lie:
                    piece[0] ^= 0xFF
                pos += len(piece)
                self.sent += len(piece)
                yield bytes(piece)
        finally:
            self.in_flight -= 1


async def fetch_all(fetcher: Fetcher, bmap: BlobMap, *, warm: bool = False) -> BlobFetch | None:
    fetch = await fetcher.open(bmap, warm=warm)
    if fetch is None:
        return None
    with trio.fail_after(20):
        for i in range(bmap.count):
            await fetch.wait_chunk(i)
        await fetch.done.wait()
    if not warm:
        fetcher.release(fetch)
    return fetch


async def fetch_fails(fetcher: Fetcher, store: ChunkStore, bmap: BlobMap, match: str) -> None:
    """The blob's fetch fails with an error matching `match`, and nothing becomes visible."""
    fetch = await fetcher.open(bmap)
    assert fetch is not None
    with trio.fail_after(20), pytest.raises(Exception, match=match):
        await fetch.wait_chunk(0)
    fetcher.release(fetch)
    assert not store.has_blob(bmap.digest)


def engine(
    tmp_path: Path, nursery: trio.Nursery, sources: list[ChunkSource], **config: float
) -> tuple[Fetcher, ChunkStore, Metrics]:
    store, metrics = ChunkStore(tmp_path / "cache"), Metrics()
    fetcher = Fetcher(store, sources, nursery, metrics=metrics, config=FetchConfig(tick=0.02, **config))  # type: ignore[arg-type]
    return fetcher, store, metrics


def counter(metrics: Metrics, name: str, kind: str) -> float:
    value = metrics.registry.get_sample_value(f"p2pimg_{name}_total", {"source": kind})
    assert value is not None
    return value


async def test_spans_respect_size_segments_and_limits(tmp_path: Path, nursery: trio.Nursery) -> None:
    data, bmap = make_blob(50 * CHUNK + 123)
    origin = MemorySource(
        "origin", "origin", data, limit=3, max_span=4 * CHUNK, segment=8 * CHUNK, delay=0.001
    )
    # (Spans grow past max_span only for a source whose first bytes are slow to come: not here.)
    fetcher, store, metrics = engine(tmp_path, nursery, [origin], span_wait_share=1e9)
    await fetch_all(fetcher, bmap)
    assert store.blob_path(bmap.digest).read_bytes() == data
    assert origin.peak == 3
    covered = sorted(origin.requests)
    assert sum(length for _, length in covered) == len(data)  # each byte requested once
    for start, length in covered:
        assert start % CHUNK == 0 and length <= 4 * CHUNK
        assert start // (8 * CHUNK) == (start + length - 1) // (8 * CHUNK), "span crosses a segment"
    assert counter(metrics, "source_bytes", "origin") == len(data)
    assert counter(metrics, "source_requests", "origin") == len(covered)


async def test_peers_first_origin_only_for_what_no_peer_has(tmp_path: Path, nursery: trio.Nursery) -> None:
    data, bmap = make_blob(32 * CHUNK)
    peer = MemorySource("peer", "peer", data, holds=set(range(0, 20)))
    origin = MemorySource("origin", "origin", data)
    fetcher, store, metrics = engine(tmp_path, nursery, [origin, peer])
    await fetch_all(fetcher, bmap)
    assert store.blob_path(bmap.digest).read_bytes() == data
    assert counter(metrics, "source_bytes", "peer") == 20 * CHUNK
    assert counter(metrics, "source_bytes", "origin") == 12 * CHUNK


async def test_lying_source_never_reaches_the_cache(tmp_path: Path, nursery: trio.Nursery) -> None:
    data, bmap = make_blob(16 * CHUNK)
    liar = MemorySource("liar", "peer", data, lie=True)
    origin = MemorySource("origin", "origin", data)
    fetcher, store, metrics = engine(tmp_path, nursery, [origin, liar])
    await fetch_all(fetcher, bmap)
    assert store.blob_path(bmap.digest).read_bytes() == data
    assert counter(metrics, "verify_failures", "peer") >= 1
    assert counter(metrics, "source_bytes", "peer") == 0
    assert fetcher.stats["liar"].bad_chunks >= 1


async def test_failover_after_errors(tmp_path: Path, nursery: trio.Nursery) -> None:
    data, bmap = make_blob(8 * CHUNK)
    flaky = MemorySource("flaky", "origin", data, fail_first=2)
    fetcher, store, _ = engine(tmp_path, nursery, [flaky])
    await fetch_all(fetcher, bmap)
    assert store.blob_path(bmap.digest).read_bytes() == data
    assert fetcher.stats["flaky"].requests >= 3


async def test_gives_up_with_the_last_error(tmp_path: Path, nursery: trio.Nursery) -> None:
    data, bmap = make_blob(4 * CHUNK)
    broken = MemorySource("broken", "origin", data, lie=True)
    fetcher, store, _ = engine(tmp_path, nursery, [broken], attempts=2)
    await fetch_fails(fetcher, store, bmap, "giving up; last: chunk 0")


async def test_straggler_is_hedged(tmp_path: Path, nursery: trio.Nursery) -> None:
    data, bmap = make_blob(12 * CHUNK)
    stuck = MemorySource(
        "stuck", "peer", data, stall_after=CHUNK, max_span=12 * CHUNK, segment=64 * CHUNK, limit=1
    )
    origin = MemorySource("origin", "origin", data)
    fetcher, store, metrics = engine(tmp_path, nursery, [origin, stuck], stall_timeout=60)
    await fetch_all(fetcher, bmap)  # when the hedge is made is the core's (test_schedule.py)
    assert store.blob_path(bmap.digest).read_bytes() == data
    assert (metrics.registry.get_sample_value("p2pimg_fetch_hedges_total") or 0) >= 1
    assert counter(metrics, "source_bytes", "peer") == CHUNK
    # The stalled request was stopped once overtaken, and its peer backs off for a while.
    assert stuck.in_flight == 0 and fetcher.stats["stuck"].errors == 1


async def test_trickling_source_is_hedged_against_a_faster_one(tmp_path: Path, nursery: trio.Nursery) -> None:
    """A peer that keeps sending, but 100x slower than the origin, is a straggler all the same:
    compared with the fastest source that has the chunks, not with its own pace."""
    data, bmap = make_blob(8 * CHUNK)
    # 16 KiB every 0.6 s: a chunk every 2.4 s, so it never goes 4 s without progress.
    slow = MemorySource("slow", "peer", data, delay=0.6, max_span=8 * CHUNK, segment=64 * CHUNK, limit=1)
    origin = MemorySource("origin", "origin", data)
    fetcher, store, metrics = engine(tmp_path, nursery, [origin, slow], stall_timeout=60)
    fetcher.stats["origin"].throughput = 50e6  # learnt from earlier fetches
    await fetch_all(fetcher, bmap)
    assert store.blob_path(bmap.digest).read_bytes() == data
    assert (metrics.registry.get_sample_value("p2pimg_fetch_hedges_total") or 0) >= 1
    # The hedge took the chunks the trickle had not sent yet (without it: all 8 from the peer).
    assert counter(metrics, "source_bytes", "origin") >= 6 * CHUNK


async def test_stall_timeout_fails_over(tmp_path: Path, nursery: trio.Nursery) -> None:
    data, bmap = make_blob(4 * CHUNK)
    stuck = MemorySource("stuck", "origin", data, stall_after=0)
    fetcher, store, _ = engine(tmp_path, nursery, [stuck], stall_timeout=0.2, attempts=2)
    await fetch_fails(fetcher, store, bmap, "giving up")


async def test_last_reader_leaving_cancels_but_keeps_verified_chunks(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    data, bmap = make_blob(40 * CHUNK)
    slow = MemorySource("slow", "origin", data, limit=1, max_span=CHUNK, delay=0.01)
    fetcher, store, _ = engine(tmp_path, nursery, [slow])
    fetch = await fetcher.open(bmap)
    assert fetch is not None
    await fetch.wait_chunk(2)
    fetcher.release(fetch)
    with trio.fail_after(5):
        await fetch.done.wait()
    # Done means its requests have ended: the source is no longer being read from.
    assert slow.in_flight == 0 and slow.sent < len(data), "the fetch went on without readers"
    partial = store.open_partial(bmap)
    kept = partial.present_bytes()
    assert kept >= 3 * CHUNK
    partial.close()
    # The next reader resumes: only what is missing is requested again.
    before = slow.sent
    await fetch_all(fetcher, bmap)
    assert slow.sent - before == len(data) - kept
    assert store.blob_path(bmap.digest).read_bytes() == data


async def test_warm_outlives_its_readers(tmp_path: Path, nursery: trio.Nursery) -> None:
    data, bmap = make_blob(20 * CHUNK)
    slow = MemorySource("slow", "origin", data, limit=1, max_span=CHUNK, delay=0.002)
    fetcher, store, _ = engine(tmp_path, nursery, [slow])
    warm = await fetcher.open(bmap, warm=True)
    reader = await fetcher.open(bmap)
    assert warm is reader is not None
    fetcher.release(reader)
    with trio.fail_after(20):
        await warm.done.wait()
    assert warm.error is None and store.blob_path(bmap.digest).read_bytes() == data


async def test_many_readers_one_fetch(tmp_path: Path, nursery: trio.Nursery) -> None:
    data, bmap = make_blob(24 * CHUNK)
    origin = MemorySource("origin", "origin", data, delay=0.001)
    fetcher, store, _ = engine(tmp_path, nursery, [origin])
    async with trio.open_nursery() as readers:
        for _ in range(8):
            readers.start_soon(fetch_all, fetcher, bmap)
    assert origin.sent == len(data)


FAKE_PEERS = 8


def fake_peers(data: bytes, misbehaviour: str) -> list[MemorySource]:
    """LAN hosts that claim every chunk and then reset, stall after a few bytes, or send garbage."""
    return [
        MemorySource(
            f"fake{k}",
            "peer",
            data,
            fail_first=10**6 if misbehaviour == "reset" else 0,
            stall_after=100 if misbehaviour == "stall" else None,
            lie=misbehaviour == "garbage",
        )
        for k in range(FAKE_PEERS)
    ]


@pytest.mark.parametrize("misbehaviour", ["reset", "stall", "garbage"])
async def test_any_number_of_failing_peers_cannot_fail_a_pull(
    tmp_path: Path, nursery: trio.Nursery, misbehaviour: str
) -> None:
    """Eight peers that claim everything and never deliver: the pull completes from the origin,
    every byte verified; each fake peer, on probation (one request at a time until it delivers),
    is asked a few times at most and left holding no request."""
    data, bmap = make_blob(48 * CHUNK)
    origin = MemorySource("origin", "origin", data, delay=0.002)
    fakes = fake_peers(data, misbehaviour)
    fetcher, store, metrics = engine(tmp_path, nursery, [origin, *fakes], stall_timeout=60)
    await fetch_all(fetcher, bmap)
    assert store.blob_path(bmap.digest).read_bytes() == data
    assert counter(metrics, "source_bytes", "origin") == len(data)
    tried = [f for f in fakes if f.requests]
    assert tried, "no fake peer was asked: nothing was tested"
    for fake in fakes:
        stats = fetcher.stats[fake.name]
        assert fake.in_flight == 0 and stats.in_flight == 0  # stalled requests were stopped
        assert stats.delivered == 0 and not stats.proven
    # Not one request per chunk: a failed peer is not asked for that chunk again, and backs off.
    assert all(len(f.requests) <= 3 for f in fakes), [len(f.requests) for f in fakes]


async def test_peer_failures_do_not_use_up_the_origins_attempts(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The attempt limit counts the origin's failures only: an origin that fails twice (with
    attempts=3) still delivers, however many peers failed the same chunks before it."""
    data, bmap = make_blob(8 * CHUNK)
    origin = MemorySource("origin", "origin", data, fail_first=2)
    fetcher, store, _ = engine(tmp_path, nursery, [origin, *fake_peers(data, "reset")], attempts=3)
    await fetch_all(fetcher, bmap)
    assert store.blob_path(bmap.digest).read_bytes() == data


async def test_without_the_origin_failing_peers_end_the_fetch_with_a_reason(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """No origin to fall back on: once every peer holding a chunk has failed it, the fetch fails,
    saying so and quoting the last failure."""
    data, bmap = make_blob(4 * CHUNK)
    fetcher, store, _ = engine(tmp_path, nursery, list(fake_peers(data, "reset")))
    await fetch_fails(fetcher, store, bmap, "no usable source has chunk .*reset by test")


def test_a_peer_failing_again_and_again_is_dropped_for_longer_each_time() -> None:
    from p2pimg.fetch.policy import DROP_AFTER_ERRORS, DROP_BASE, SourceStats

    peer, origin = SourceStats("peer", "peer", 4), SourceStats("origin", "origin", 8)
    until = []
    for _ in range(DROP_AFTER_ERRORS + 2):
        for s in (peer, origin):
            s.started()
            s.failed(100.0)
        until.append(peer.unavailable_until - 100.0)
    assert until[: DROP_AFTER_ERRORS - 1] == sorted(until[: DROP_AFTER_ERRORS - 1]) and until[0] < 1
    assert until[DROP_AFTER_ERRORS - 1 :] == [DROP_BASE, 2 * DROP_BASE, 4 * DROP_BASE]
    assert origin.unavailable_until - 100.0 <= 8.0  # the origin backs off, is never dropped
    peer.started()
    peer.finished(CHUNK, 0.1, 0.01)
    assert peer.errors == 0  # a success clears the record


async def test_a_busy_peer_is_asked_again_later_not_dropped(tmp_path: Path, nursery: trio.Nursery) -> None:
    """429 is a polite "not now": the peer is left alone for a moment, its record stays clean,
    and it serves once it has room (here after five refusals, more than the drop threshold)."""
    data, bmap = make_blob(64 * CHUNK)
    peer = MemorySource("peer", "peer", data, busy_first=5, delay=0.001)
    origin = MemorySource("origin", "origin", data, delay=0.05)
    fetcher, store, metrics = engine(tmp_path, nursery, [origin, peer])
    await fetch_all(fetcher, bmap)
    assert store.blob_path(bmap.digest).read_bytes() == data
    assert counter(metrics, "source_bytes", "peer") > 0
    stats = fetcher.stats["peer"]
    assert stats.drops == 0 and stats.delivered > 0 and stats.in_flight == 0


class PollingSource(MemorySource):
    """Says what it holds only once asked (as a peer answers its inventory poll)."""

    asked = False

    async def prime(self, blob_map: BlobMap) -> None:
        self.asked = True

    def inventory(self, blob_map: BlobMap) -> bytes | None:
        return super().inventory(blob_map) if self.asked else None


async def test_a_peer_that_joins_mid_fetch_is_asked_too(tmp_path: Path, nursery: trio.Nursery) -> None:
    """A source that joins while a blob is being fetched (a peer just discovered) is asked what
    it holds and used for the rest, not only for the blobs that start after it came."""
    data, bmap = make_blob(16 * CHUNK)
    slow = MemorySource("origin", "origin", data, limit=1, max_span=CHUNK, delay=0.05)
    fetcher, store, metrics = engine(tmp_path, nursery, [slow])
    fetch = await fetcher.open(bmap)
    assert fetch is not None
    await fetch.wait_chunk(0)
    fetcher.add_source(PollingSource("late", "peer", data))
    await fetch_all(fetcher, bmap)  # joins the same fetch, to its end
    fetcher.release(fetch)
    assert store.blob_path(bmap.digest).read_bytes() == data
    assert counter(metrics, "source_bytes", "peer") >= 8 * CHUNK, "the late peer brought most of it"


async def test_chunks_that_do_not_add_up_to_the_digest_are_never_visible(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Each chunk matches its CID, but the map names another digest: the whole-blob hash, made
    while the chunks arrive, catches it, and the blob never becomes visible."""
    data, good = make_blob(6 * CHUNK)
    wrong = BlobMap(digest_of(data + b"x"), good.size, good.chunk_size, good.chunks)
    fetcher, store, _ = engine(tmp_path, nursery, [MemorySource("origin", "origin", data)])
    fetch = await fetcher.open(wrong)
    assert fetch is not None
    with trio.fail_after(20):
        await fetch.done.wait()
    fetcher.release(fetch)
    assert fetch.error is not None and "do not add up" in fetch.error.message
    assert not store.has_blob(wrong.digest)


@pytest.mark.parametrize("vouched", [False, True])
async def test_a_vouched_map_is_hashed_once_chunk_by_chunk(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, vouched: bool
) -> None:
    """A map a trusted root names (`vouched`) binds its chunk CIDs to the digest: once every
    chunk matched its CID, nothing reads the blob back for a whole-blob sha256. Any other map's
    blob is hashed whole, every byte once more."""
    data, bmap = make_blob(40 * CHUNK)
    bmap = replace(bmap, vouched=vouched)
    hashed: list[int] = []
    real = PartialBlob.hash_into

    def counting(self: PartialBlob, h: object, start: int, end: int, *, flush: bool = False) -> None:
        hashed.append(end - start if h is not None else 0)
        real(self, h, start, end, flush=flush)  # type: ignore[arg-type]

    monkeypatch.setattr(PartialBlob, "hash_into", counting)
    fetcher, store, _ = engine(tmp_path, nursery, [MemorySource("origin", "origin", data)])
    await fetch_all(fetcher, bmap)
    assert store.has_blob(bmap.digest)
    assert store.blob_path(bmap.digest).read_bytes() == data
    assert sum(hashed) == (0 if vouched else len(data))
