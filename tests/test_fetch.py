"""The fetch path behind the registry: verification, streaming, singleflight, resume, retries."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
from _support import CHUNK, published_home, start_registry, wait_cached

from p2pimg.errors import OriginError
from p2pimg.fetch.resolver import Resolver
from p2pimg.metrics import Metrics
from p2pimg.ops.sample import SampleImage
from p2pimg.sources.origins import FileOrigin, blob_key
from p2pimg.sources.origins.base import BlobReader, ObjectInfo, Origin
from p2pimg.store.chunks import ChunkStore


class ProbeOrigin(Origin):
    """A real FileOrigin with a tap: counts bytes, injects failures, pauses mid-stream."""

    def __init__(self, inner: FileOrigin) -> None:
        self.inner = inner
        self.url = inner.url
        self.bytes_read: dict[str, int] = {}
        self.requests = 0
        self.heads = 0  # reads ahead (`read_head`), also counted in `requests`
        self.fail_next = 0
        self.pause_after: int | None = None  # bytes of a read after which it waits for `resume`
        self.resume = trio.Event()

    def read_range(self, key: str, offset: int, length: int) -> AsyncIterator[bytes]:
        return self._tap(key, self.inner.read_range(key, offset, length))

    def read_head(self, key: str, length: int) -> AsyncIterator[bytes]:
        self.heads += 1
        return self._tap(key, self.inner.read_head(key, length))

    async def _tap(self, key: str, reader: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        self.requests += 1
        if self.fail_next:
            self.fail_next -= 1
            raise OriginError("injected failure")
        sent = 0
        async with contextlib.aclosing(reader) as pieces:  # type: ignore[type-var]
            async for piece in pieces:
                if self.pause_after is not None and sent >= self.pause_after:
                    await self.resume.wait()
                self.bytes_read[key] = self.bytes_read.get(key, 0) + len(piece)
                sent += len(piece)
                yield piece

    async def get(self, key: str, *, max_size: int) -> bytes:
        return await self.inner.get(key, max_size=max_size)

    async def exists(self, key: str) -> bool:
        return await self.inner.exists(key)

    async def put_bytes(self, key: str, data: bytes) -> None:
        await self.inner.put_bytes(key, data)

    async def put_blob(self, key: str, open_reader: BlobReader, size: int) -> None:
        await self.inner.put_blob(key, open_reader, size)

    async def list(self, prefix: str) -> list[str]:
        return await self.inner.list(prefix)

    async def list_info(self, prefix: str) -> list[ObjectInfo]:
        return await self.inner.list_info(prefix)

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)


def big_layer(sample: SampleImage) -> tuple[str, bytes]:
    blobs = Path(sample.path) / "blobs" / "sha256"
    manifest = json.loads((blobs / sample.top_digest.removeprefix("sha256:")).read_bytes())
    digest = max(manifest["layers"], key=lambda d: d["size"])["digest"]
    return digest, (blobs / digest.removeprefix("sha256:")).read_bytes()


async def setup(
    tmp_path: Path,
    sample: SampleImage,
    nursery: trio.Nursery,
    store_dir: str = "cache",
    metrics: Metrics | None = None,
) -> tuple[ProbeOrigin, ChunkStore, str]:
    origin, _root = await published_home(tmp_path, sample)
    probe = ProbeOrigin(origin)
    store = ChunkStore(tmp_path / store_dir)
    url = await start_registry(nursery, store, probe, metrics=metrics)
    return probe, store, url


async def wait_served(metrics: Metrics, nbytes: int) -> None:
    """Until the registry has sent clients `nbytes` in all."""
    with trio.fail_after(10):
        while (metrics.registry.get_sample_value("p2pimg_served_bytes_total") or 0) < nbytes:
            await trio.sleep(0.01)


async def test_singleflight(tmp_path: Path, sample: SampleImage, nursery: trio.Nursery) -> None:
    metrics = Metrics()
    probe, store, url = await setup(tmp_path, sample, nursery, metrics=metrics)
    digest, data = big_layer(sample)
    probe.pause_after = CHUNK  # hold the fetch open so every client joins the same one
    results: list[bytes] = []

    async def pull() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=20) as c:
            results.append((await c.get(f"/v2/demo/app/blobs/{digest}")).content)

    async with trio.open_nursery() as clients:
        for _ in range(4):
            clients.start_soon(pull)
        await wait_served(metrics, 4 * CHUNK)  # each has its first chunk: all joined the one fetch
        probe.resume.set()
    assert results == [data] * 4
    assert probe.bytes_read[blob_key(digest)] == len(data)


async def test_streams_before_blob_complete(
    tmp_path: Path, sample: SampleImage, nursery: trio.Nursery
) -> None:
    probe, store, url = await setup(tmp_path, sample, nursery)
    digest, data = big_layer(sample)
    probe.pause_after = CHUNK
    async with (
        httpx.AsyncClient(base_url=url, timeout=20) as c,
        c.stream("GET", f"/v2/demo/app/blobs/{digest}") as r,
    ):
        assert r.status_code == 200
        pieces = r.aiter_raw()
        received = b""
        while len(received) < CHUNK:
            received += await pieces.__anext__()
        # The origin is paused: the client holds the first verified chunk of an incomplete blob.
        assert received[:CHUNK] == data[:CHUNK]
        assert not store.has_blob(digest)
        probe.resume.set()
        async for piece in pieces:
            received += piece
    assert received == data
    await wait_cached(store, digest)


async def test_resume_fetches_only_missing_chunks(
    tmp_path: Path, sample: SampleImage, nursery: trio.Nursery
) -> None:
    probe, store, url = await setup(tmp_path, sample, nursery)
    digest, data = big_layer(sample)
    root = await Resolver(store, probe).root(await Resolver(store, probe).resolve_tag("demo/app", "1"))
    bmap = await Resolver(store, probe).blob_map(root.blobs[digest], digest)
    # A previous process verified every other chunk, then died (no finalize, nothing closed).
    partial = store.open_partial(bmap)
    for i in range(0, bmap.count, 2):
        lo, hi = bmap.bounds(i)
        partial.write_chunk(i, data[lo:hi])
    kept = sum(hi - lo for i in range(0, bmap.count, 2) for lo, hi in [bmap.bounds(i)])
    async with httpx.AsyncClient(base_url=url, timeout=20) as c:
        assert (await c.get(f"/v2/demo/app/blobs/{digest}")).content == data
    assert probe.bytes_read[blob_key(digest)] == len(data) - kept
    await wait_cached(store, digest)


async def test_transient_origin_failures_are_retried(
    tmp_path: Path, sample: SampleImage, nursery: trio.Nursery
) -> None:
    probe, store, url = await setup(tmp_path, sample, nursery)
    digest, data = big_layer(sample)
    probe.fail_next = 2
    async with httpx.AsyncClient(base_url=url, timeout=20) as c:
        r = await c.get(f"/v2/demo/app/blobs/{digest}")
    assert r.status_code == 200 and r.content == data


def corrupt(origin_dir: Path, digest: str, offset: int) -> bytes:
    path = origin_dir / blob_key(digest)
    data = bytearray(path.read_bytes())
    original = bytes(data)
    data[offset] ^= 0xFF
    path.write_bytes(data)
    return original


@pytest.mark.parametrize("where", ["first", "later"])
async def test_corrupted_origin_never_reaches_client_or_cache(
    tmp_path: Path, sample: SampleImage, nursery: trio.Nursery, where: str
) -> None:
    probe, store, url = await setup(tmp_path, sample, nursery)
    digest, data = big_layer(sample)
    offset = 10 if where == "first" else 3 * CHUNK + 5
    original = corrupt(tmp_path / "origin", digest, offset)
    received = b""
    async with httpx.AsyncClient(base_url=url, timeout=20) as c:
        if where == "first":
            # Nothing verified yet: the client gets an error status, not a body.
            r = await c.get(f"/v2/demo/app/blobs/{digest}")
            assert r.status_code == 502
            assert "does not match" in r.json()["errors"][0]["message"]
        else:
            with pytest.raises(httpx.RemoteProtocolError):
                async with c.stream("GET", f"/v2/demo/app/blobs/{digest}") as r:
                    assert r.status_code == 200
                    async for piece in r.aiter_raw():
                        received += piece
            # What did arrive is a verified prefix, and it stops before the bad chunk.
            assert received == data[: len(received)]
            assert len(received) <= 3 * CHUNK
        assert not store.has_blob(digest)
        bmap_have = (store.root / "partial" / "sha256" / (digest[7:] + ".have")).read_bytes()
        assert bmap_have[offset // CHUNK] == 0
        # The origin is repaired: the same proxy now serves the blob, whole and correct.
        (tmp_path / "origin" / blob_key(digest)).write_bytes(original)
        r = await c.get(f"/v2/demo/app/blobs/{digest}")
        assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == digest[7:]
    await wait_cached(store, digest)


async def test_two_processes_share_one_home(
    tmp_path: Path, sample: SampleImage, nursery: trio.Nursery
) -> None:
    """Two independent fetchers (as two processes would be) fill one cache at once."""
    origin, _ = await published_home(tmp_path, sample)
    digest, data = big_layer(sample)
    probes = [ProbeOrigin(origin), ProbeOrigin(origin)]
    for p in probes:
        p.pause_after = 2 * CHUNK
    urls = [await start_registry(nursery, ChunkStore(tmp_path / "cache"), p) for p in probes]
    results: list[bytes] = []

    async def pull(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=20) as c:
            results.append((await c.get(f"/v2/demo/app/blobs/{digest}")).content)

    async with trio.open_nursery() as clients:
        for url in urls:
            clients.start_soon(pull, url)
        with trio.fail_after(10):  # both fetchers are under way (the first at least paused)
            while any(p.requests == 0 for p in probes):
                await trio.sleep(0.01)
        for p in probes:
            p.resume.set()
    assert results == [data, data]
    store = ChunkStore(tmp_path / "cache")
    await wait_cached(store, digest)
    assert hashlib.sha256(store.blob_path(digest).read_bytes()).hexdigest() == digest[7:]
    assert not list((tmp_path / "cache" / "tmp").iterdir())


class UnreachableOrigin(ProbeOrigin):
    """The origin's network is gone: every call fails as a connection error would."""

    async def read_range(self, key: str, offset: int, length: int) -> AsyncIterator[bytes]:
        raise OriginError("connection refused (test)")
        yield b""  # pragma: no cover - makes this an async generator

    async def get(self, key: str, *, max_size: int) -> bytes:
        raise OriginError("connection refused (test)")

    async def list(self, prefix: str) -> list[str]:
        raise OriginError("connection refused (test)")


async def test_cached_images_pull_while_the_origin_is_down(
    tmp_path: Path, sample: SampleImage, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    origin, _ = await published_home(tmp_path, sample)
    store = ChunkStore(tmp_path / "cache")
    url = await start_registry(nursery, store, origin)
    digest, data = big_layer(sample)
    async with httpx.AsyncClient(base_url=url, timeout=20) as c:
        assert (await c.get(f"/v2/demo/app/blobs/{digest}")).status_code == 200
        manifest = await c.get("/v2/demo/app/manifests/1")
    await wait_cached(store, digest)
    # A new proxy on the same cache, with the origin unreachable.
    down_url = await start_registry(nursery, store, UnreachableOrigin(origin))
    async with httpx.AsyncClient(base_url=down_url, timeout=20) as c:
        again = await c.get("/v2/demo/app/manifests/1")
        assert again.status_code == 200 and again.content == manifest.content
        assert (await c.get(f"/v2/demo/app/blobs/{digest}")).content == data
        assert (await c.get("/v2/demo/app/tags/list")).json()["tags"] == ["1"]
        # What was never cached fails clearly instead of hanging.
        other = next(d for d in json.loads(manifest.content)["layers"] if d["digest"] != digest)
        with trio.fail_after(15):
            r = await c.get(f"/v2/demo/app/blobs/{other['digest']}")
        assert r.status_code == 502 and "connection refused" in r.text
    assert "last verified record of demo/app:1" in caplog.text


async def test_a_nodes_first_look_at_an_image_fetches_its_blob_maps_and_config(
    tmp_path: Path, sample: SampleImage
) -> None:
    """Once a node reads an image's root (a client asked for its manifest), every blob map, and
    every small blob, is fetched at once in the background: the blob requests that follow do not
    each wait for the origin's round trip first."""
    from p2pimg.node.config import load_config
    from p2pimg.node.node import open_node

    origin, root_cid = await published_home(tmp_path, sample)
    config = load_config(home=str(tmp_path / "home"), origin=origin.root.as_uri(), mdns=False)
    async with open_node(config) as node:
        await node.resolver.manifest_for("demo/app", "1")
        root = await node.resolver.root(root_cid)
        assert len(root.blobs) >= 2
        with trio.fail_after(10):
            while any(e.map not in node.resolver._maps for e in root.blobs.values()):
                await trio.sleep(0.01)
        # Its small blobs (the config) are fetched too, before any client asks; big ones are not.
        small = {d for d, e in root.blobs.items() if e.size <= 256 << 10}
        assert small and small != set(root.blobs)
        with trio.fail_after(10):
            while not all(node.store.has_blob(d) for d in small):
                await trio.sleep(0.01)
        assert not any(node.store.has_blob(d) for d in set(root.blobs) - small)


def test_the_timeline_summary_finds_metadata_waits_and_idle_link() -> None:
    from bench.timeline import summarize

    events = [
        {"what": "client", "start": 10.0, "end": 10.2, "request": "GET /v2/demo/app/manifests/1"},
        {"what": "tag", "start": 10.0, "end": 10.05},
        {"what": "head", "start": 10.0, "end": 10.06},
        {"what": "block", "start": 10.05, "end": 10.1},
        {"what": "span", "start": 10.2, "end": 11.0, "source": "o", "first_byte": 0.05, "bytes": 2_000_000},
        {
            "what": "span",
            "start": 11.5,
            "end": 12.0,
            "source": "o",
            "first_byte": 0.07,
            "bytes": 0,
            "hedge": True,
        },
        {"what": "block", "start": 11.6, "end": 11.7},
        {"what": "ahead", "start": 10.01, "end": 11.0, "used": 1_500_000, "wasted": 0},
    ]
    got = summarize(events)
    assert got["first_span_after_s"] == 0.2
    assert got["metadata_round_trips_before_first_span"] == 3 and got["metadata_round_trips"] == 4
    assert got["spans"] == 2 and got["hedges"] == 1
    assert got["no_span_running_s"] == 0.5 and got["last_span_end_s"] == 2.0
    assert got["span_windows"] == [[0.2, 0.25, 1.0, 2.0], [1.5, 1.57, 2.0, 0.0]]
    assert got["client_windows"] == [[0.0, 0.2, "GET /v2/demo/app/manifests/1"]]
    assert got["read_ahead_windows"] == [[0.01, 1.0, 1.5, 0.0]]
    assert summarize([]) == {"events": 0}


async def test_only_a_root_a_trusted_tag_points_at_vouches_for_its_blob_maps(
    tmp_path: Path, sample: SampleImage
) -> None:
    """A root reached by CID alone does not vouch for its maps' digests (the blob is hashed
    whole before it is cached under its digest); once a tag record from the origin points at
    it, its maps are vouched for (hashed once, chunk by chunk), whichever was read first."""
    origin, root = await published_home(tmp_path, sample)
    by_cid = Resolver(ChunkStore(tmp_path / "a"), origin)
    image = await by_cid.root(root)
    blobs = list(image.blobs.items())
    assert blobs and not any([(await by_cid.blob_map(e, d)).vouched for d, e in blobs])
    assert await by_cid.resolve_tag("demo/app", "1") == root
    assert all([(await by_cid.blob_map(e, d)).vouched for d, e in blobs])
    by_tag = Resolver(ChunkStore(tmp_path / "b"), origin)
    assert await by_tag.resolve_tag("demo/app", "1") == root
    assert all([(await by_tag.blob_map(e, d)).vouched for d, e in (await by_tag.root(root)).blobs.items()])
