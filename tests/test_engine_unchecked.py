"""Blobs only their digest checks (mirrored upstream blobs, `BlobMap.unchecked`) in the fetch
engine: peers' bytes cannot be checked chunk by chunk, so a wrong blob is found by its digest,
fetched again from the upstream alone, and each peer whose bytes differ from the upstream's is
banned; nothing wrong becomes visible, and peers hear only of chunks the node fetched itself."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import pytest
import trio
from test_engine import CHUNK, MemorySource, counter, engine, fetch_all

from p2pimg.content.cid import digest_of
from p2pimg.content.model import BlobMap
from p2pimg.fetch.engine import HAVE
from p2pimg.store.chunks import ChunkStore


def unchecked_blob(size: int, seed: int = 7) -> tuple[bytes, BlobMap]:
    data = random.Random(seed).randbytes(size)
    return data, BlobMap.unchecked(digest_of(data), size, CHUNK)


def cached(store: ChunkStore, bmap: BlobMap) -> bytes:
    return store.blob_path(bmap.digest).read_bytes()


async def test_a_peer_sending_wrong_bytes_is_banned_and_the_upstream_refetched(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    data, bmap = unchecked_blob(10 * CHUNK)
    liar = MemorySource("peer liar", "peer", data, lie=True)
    upstream = MemorySource("upstream", "upstream", data)
    fetcher, store, metrics = engine(tmp_path, nursery, [liar, upstream])
    fetch = await fetch_all(fetcher, bmap)
    assert fetch is not None and fetch.error is None
    assert cached(store, bmap) == data
    assert liar.sent > 0, "the liar was never asked: nothing was tested"
    assert fetcher.stats["peer liar"].banned
    assert fetch.round == 1 and fetch.changed  # the digest failed once, then the upstream's bytes
    assert upstream.sent >= len(data)
    assert counter(metrics, "verify_failures", "peer") == 1


async def test_an_honest_peer_is_not_blamed_for_a_liars_bytes(tmp_path: Path, nursery: trio.Nursery) -> None:
    data, bmap = unchecked_blob(16 * CHUNK)
    half = set(range(8))
    honest = MemorySource("peer honest", "peer", data, holds=half, max_span=CHUNK)
    liar = MemorySource("peer liar", "peer", data, holds=set(range(8, 16)), lie=True, max_span=CHUNK)
    upstream = MemorySource("upstream", "upstream", data)
    fetcher, store, _ = engine(tmp_path, nursery, [honest, liar, upstream])
    fetch = await fetch_all(fetcher, bmap)
    assert fetch is not None and fetch.error is None and cached(store, bmap) == data
    assert honest.sent > 0 and liar.sent > 0
    assert fetcher.stats["peer liar"].banned and not fetcher.stats["peer honest"].banned
    assert fetch.changed <= set(range(8, 16))


async def test_a_wrong_upstream_blob_fails_and_nothing_is_kept(tmp_path: Path, nursery: trio.Nursery) -> None:
    data, bmap = unchecked_blob(6 * CHUNK)
    upstream = MemorySource("upstream", "upstream", data, lie=True)
    fetcher, store, metrics = engine(tmp_path, nursery, [upstream])
    fetch = await fetcher.open(bmap)
    assert fetch is not None
    with trio.fail_after(20):
        await fetch.done.wait()
    fetcher.release(fetch)
    assert fetch.error is not None and "do not match that digest" in fetch.error.message
    assert not store.has_blob(bmap.digest)
    assert counter(metrics, "verify_failures", "upstream") == 1


async def test_peers_hear_only_of_chunks_fetched_first_hand(tmp_path: Path, nursery: trio.Nursery) -> None:
    """Before its digest matched, a node passes on what it fetched from the upstream itself,
    never what a peer sent it (that peer may lie, and the blame would land on this node)."""
    data, bmap = unchecked_blob(8 * CHUNK)
    gate = trio.Event()

    class Held(MemorySource):
        async def read_span(self, blob_map: BlobMap, start: int, length: int):  # type: ignore[no-untyped-def]
            if start >= 7 * CHUNK:
                await gate.wait()  # the last chunk waits, so the blob stays incomplete
            async with contextlib.aclosing(super().read_span(blob_map, start, length)) as pieces:
                async for piece in pieces:
                    yield piece

    peer = MemorySource("peer p", "peer", data, holds=set(range(4)), max_span=CHUNK)
    upstream = Held("upstream", "upstream", data, max_span=CHUNK)
    fetcher, _, _ = engine(tmp_path, nursery, [peer, upstream])
    fetch = await fetcher.open(bmap)
    assert fetch is not None
    with trio.fail_after(20):
        for i in range(7):
            await fetch.wait_chunk(i)
    states = fetcher.availability(bmap.digest)
    assert states is not None and len(states) == 8
    from_peer = {i for i in range(7) if not fetch.firsthand[i]}
    assert from_peer and from_peer <= set(range(4))
    for i in range(7):
        assert (states[i] == HAVE) == (i not in from_peer), f"chunk {i}: {states[i]}"
        assert fetch.shareable(i) == (i not in from_peer)
    gate.set()
    with trio.fail_after(20):
        await fetch.done.wait()
    fetcher.release(fetch)
    assert fetch.error is None and fetcher.availability(bmap.digest) == b""


def test_an_unchecked_partial_blob_trusts_no_claim_after_a_restart(tmp_path: Path) -> None:
    data, bmap = unchecked_blob(4 * CHUNK)
    store = ChunkStore(tmp_path / "cache")
    partial = store.open_partial(bmap)
    partial.write_chunk(0, data[:CHUNK])
    partial.close()
    again = store.open_partial(bmap)
    try:
        assert again.missing() == [0, 1, 2, 3]
    finally:
        again.close()


def test_an_unchecked_map_is_never_encoded() -> None:
    _, bmap = unchecked_blob(CHUNK)
    assert bmap.count == 1 and not bmap.checked
    with pytest.raises(ValueError, match="no chunk CIDs"):
        bmap.encode()


async def test_the_nodes_own_origin_is_not_asked_for_a_mirrored_blob(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """An origin holds what was published to it: a blob without chunk CIDs (an upstream's) is
    not asked of it, so its misses neither cost round trips nor use up the blob's attempts."""
    from p2pimg.sources.base import OriginSource
    from p2pimg.sources.origins import FileOrigin

    data, bmap = unchecked_blob(4 * CHUNK)
    origin = OriginSource(FileOrigin(tmp_path / "origin"))
    upstream = MemorySource("upstream", "upstream", data, fail_first=2)
    fetcher, store, _ = engine(tmp_path, nursery, [origin, upstream])
    fetch = await fetch_all(fetcher, bmap)
    assert fetch is not None and fetch.error is None and cached(store, bmap) == data
    assert fetcher.stats[origin.name].requests == 0
    assert len(upstream.requests) == 3  # two failures, then the blob: within the attempts
