"""An upstream registry behind the one source interface: the fetch engine takes a blob's chunks
from a real `docker-registry` like from any other source, verifying each against the blob map."""

from __future__ import annotations

import json
from pathlib import Path

import trio
from conftest import PushReference, Registry, SampleCache

from p2pimg.content.cid import Cid
from p2pimg.content.model import BlobMap
from p2pimg.fetch.engine import FetchConfig, Fetcher
from p2pimg.sources.upstream.client import UpstreamClient
from p2pimg.sources.upstream.source import UpstreamSource
from p2pimg.store.chunks import ChunkStore

CHUNK = 64 << 10


def blob_map(digest: str, data: bytes) -> BlobMap:
    chunks = tuple(Cid.of_raw(data[i : i + CHUNK]) for i in range(0, len(data), CHUNK))
    return BlobMap(digest, len(data), CHUNK, chunks)


async def test_engine_fetches_verified_chunks_from_an_upstream(
    registry: Registry, push_reference: PushReference, samples: SampleCache, tmp_path: Path
) -> None:
    sample = samples.one_layer
    push_reference(sample)
    layer = json.loads(sample.top_manifest()[1])["layers"][0]["digest"]
    data = sample.blob(layer)
    assert len(data) > 2 * CHUNK, "the layer spans several chunks"
    store = ChunkStore(tmp_path / "cache")
    async with UpstreamClient(registry.url) as client, trio.open_nursery() as nursery:
        source = UpstreamSource(client, max_span=2 * CHUNK)
        source.learn(layer, sample.repo)
        fetcher = Fetcher(store, [source], nursery, config=FetchConfig(tick=0.05))
        bmap = blob_map(layer, data)
        fetch = await fetcher.open(bmap)
        assert fetch is not None
        with trio.fail_after(30):
            for i in range(bmap.count):
                await fetch.wait_chunk(i)
            await fetch.done.wait()
        fetcher.release(fetch)
        assert fetch.error is None and fetch.received == {"upstream": len(data)}
        assert store.blob_path(layer).read_bytes() == data

        # A map that does not match what the registry sends fails: nothing unverified is kept.
        forged = bytes([data[0] ^ 1]) + data[1:]
        wrong = BlobMap(layer, len(data), CHUNK, blob_map(layer, forged).chunks)
        store2 = ChunkStore(tmp_path / "cache2")
        fetcher2 = Fetcher(store2, [source], nursery, config=FetchConfig(tick=0.05, attempts=2))
        fetch = await fetcher2.open(wrong)
        assert fetch is not None
        with trio.fail_after(30):
            await fetch.done.wait()
        fetcher2.release(fetch)
        assert fetch.error is not None and "giving up" in fetch.error.message
        assert not store2.has_blob(layer)
        nursery.cancel_scope.cancel()


async def test_an_upstream_holds_only_what_it_was_told_where_to_find(
    registry: Registry, tmp_path: Path
) -> None:
    async with UpstreamClient(registry.url) as client:
        source = UpstreamSource(client)
        bmap = BlobMap("sha256:" + "00" * 32, 1, CHUNK, (Cid.of_raw(b"x"),))
        assert source.inventory(bmap) is None
        source.learn(bmap.digest, "some/repo")
        assert source.inventory(bmap) == b""
