"""Reading a blob's first bytes ahead of its map (`p2pimg/sources/readahead.py`): alone, against
a real file origin, and through a fresh node's registry."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
from _support import published_home, start_registry, wait_cached

from p2pimg.content.model import BlobMap
from p2pimg.errors import InvalidInput
from p2pimg.fetch.engine import Fetcher
from p2pimg.fetch.resolver import Resolver
from p2pimg.metrics import Metrics
from p2pimg.ops.sample import SampleImage
from p2pimg.sources.base import ChunkSource, OriginSource
from p2pimg.sources.origins import FileOrigin, blob_key
from p2pimg.sources.readahead import ReadAhead
from p2pimg.store.chunks import ChunkStore

DIGEST = "sha256:" + "ab" * 32
READ_AHEAD = "p2pimg_read_ahead_bytes_total"


class TapOrigin(FileOrigin):
    """A real FileOrigin that notes every read: ("head"|"range", key, offset, length), and how
    many reads are open now."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads: list[tuple[str, str, int, int]] = []
        self.open = 0

    def read_range(self, key: str, offset: int, length: int) -> AsyncIterator[bytes]:
        self.reads.append(("range", key, offset, length))
        return self._count(super().read_range(key, offset, length))

    def read_head(self, key: str, length: int) -> AsyncIterator[bytes]:
        self.reads.append(("head", key, 0, length))
        return self._count(super().read_head(key, length))

    async def _count(self, reader: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        self.open += 1
        try:
            async with contextlib.aclosing(reader) as pieces:  # type: ignore[type-var]
                async for piece in pieces:
                    yield piece
        finally:
            self.open -= 1

    def blob_reads(self, digest: str) -> list[tuple[str, int, int]]:
        return [(kind, offset, length) for kind, key, offset, length in self.reads if key == blob_key(digest)]


def put_blob(root: Path, data: bytes, digest: str = DIGEST) -> None:
    path = root / blob_key(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


async def drain(reader: AsyncIterator[bytes] | None) -> bytes:
    assert reader is not None, "no read ahead to take"
    return b"".join([bytes(piece) async for piece in reader])


async def until(check: object, timeout: float = 10) -> None:
    """Until `check()` holds (state, polled; bounded in time)."""
    with trio.fail_after(timeout):
        while not check():  # type: ignore[operator]
            await trio.sleep(0.005)


# -- the read ahead alone ------------------------------------------------------------------------


async def test_a_span_takes_what_came_ahead_and_asks_nothing_more(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    data = os.urandom(300_000)
    origin = TapOrigin(tmp_path)
    put_blob(tmp_path, data)
    ahead = ReadAhead(origin, length=len(data))
    assert ahead.start(nursery, DIGEST)
    assert not ahead.start(nursery, DIGEST)  # one read ahead per blob
    assert await drain(ahead.take(DIGEST, 0, len(data))) == data
    assert origin.blob_reads(DIGEST) == [("head", 0, len(data))]
    assert ahead.used == len(data)
    await until(lambda: not ahead.active(DIGEST) and origin.open == 0)
    assert ahead.wasted == 0


async def test_a_longer_span_reads_the_rest_from_the_origin(tmp_path: Path, nursery: trio.Nursery) -> None:
    data = os.urandom(300_000)
    origin = TapOrigin(tmp_path)
    put_blob(tmp_path, data)
    ahead = ReadAhead(origin, length=100_000)
    ahead.start(nursery, DIGEST)
    assert await drain(ahead.take(DIGEST, 0, 250_000)) == data[:250_000]
    assert origin.blob_reads(DIGEST) == [("head", 0, 100_000), ("range", 100_000, 150_000)]


async def test_the_next_span_goes_on_where_the_last_ended(tmp_path: Path, nursery: trio.Nursery) -> None:
    data = os.urandom(300_000)
    origin = TapOrigin(tmp_path)
    put_blob(tmp_path, data)
    ahead = ReadAhead(origin, length=len(data))
    ahead.start(nursery, DIGEST)
    assert ahead.take(DIGEST, 1000, 1000) is None  # not where the read ahead is
    assert await drain(ahead.take(DIGEST, 0, 120_000)) == data[:120_000]
    assert ahead.take(DIGEST, 0, 1000) is None  # those bytes were handed on already
    assert await drain(ahead.take(DIGEST, 120_000, 180_000)) == data[120_000:]
    assert origin.blob_reads(DIGEST) == [("head", 0, len(data))]


async def test_a_shorter_blob_is_read_whole(tmp_path: Path, nursery: trio.Nursery) -> None:
    data = os.urandom(5000)
    origin = TapOrigin(tmp_path)
    put_blob(tmp_path, data)
    ahead = ReadAhead(origin, length=1 << 20)
    ahead.start(nursery, DIGEST)
    assert await drain(ahead.take(DIGEST, 0, len(data))) == data
    assert origin.blob_reads(DIGEST) == [("head", 0, 1 << 20)]


async def test_what_nobody_takes_is_dropped_after_keep(tmp_path: Path, nursery: trio.Nursery) -> None:
    data = os.urandom(200_000)
    origin = TapOrigin(tmp_path)
    put_blob(tmp_path, data)
    ahead = ReadAhead(origin, length=len(data), keep=0.3)
    ahead.start(nursery, DIGEST)
    await until(lambda: not ahead.active(DIGEST))
    assert ahead.wasted == len(data) and ahead.used == 0
    assert ahead.take(DIGEST, 0, len(data)) is None
    assert origin.open == 0


async def test_held_bytes_are_bounded(tmp_path: Path, nursery: trio.Nursery) -> None:
    data = os.urandom(4 << 20)
    origin = TapOrigin(tmp_path)
    put_blob(tmp_path, data)
    piece = 256 << 10  # FileOrigin's read size
    ahead = ReadAhead(origin, length=len(data), hold=300 << 10)
    ahead.start(nursery, DIGEST)
    read = ahead._reads[DIGEST]
    await until(lambda: read.held >= ahead.hold)
    for _ in range(20):  # the read has stopped: no more comes however long it waits
        await trio.sleep(0)
    assert read.held < ahead.hold + piece and not read.ended
    assert await drain(ahead.take(DIGEST, 0, len(data))) == data  # then all of it, in order
    assert origin.blob_reads(DIGEST) == [("head", 0, len(data))]


async def test_at_most_so_many_blobs_at_once(tmp_path: Path, nursery: trio.Nursery) -> None:
    origin = TapOrigin(tmp_path)
    digests = [f"sha256:{i:02x}" + "00" * 31 for i in range(3)]
    for digest in digests:
        put_blob(tmp_path, os.urandom(1000), digest)
    ahead = ReadAhead(origin, length=1000, most=2)
    assert [ahead.start(nursery, d) for d in digests] == [True, True, False]


async def test_a_failed_read_leaves_the_span_to_the_origin(tmp_path: Path, nursery: trio.Nursery) -> None:
    origin = TapOrigin(tmp_path)
    ahead = ReadAhead(origin, length=1000)
    ahead.start(nursery, DIGEST)  # no such blob in the origin
    await until(lambda: not ahead.active(DIGEST))
    assert ahead.take(DIGEST, 0, 1000) is None


async def test_a_read_that_fails_midway_is_finished_by_the_span(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(600_000)
    origin = TapOrigin(tmp_path)
    put_blob(tmp_path, data)
    real = FileOrigin.read_head

    async def cut(self: FileOrigin, key: str, length: int) -> AsyncIterator[bytes]:
        async with contextlib.aclosing(real(self, key, length)) as pieces:  # type: ignore[type-var]
            async for piece in pieces:
                yield piece
                raise InvalidInput("connection reset")  # after the first piece

    monkeypatch.setattr(FileOrigin, "read_head", cut)
    ahead = ReadAhead(origin, length=len(data))
    ahead.start(nursery, DIGEST)
    await until(lambda: ahead._reads[DIGEST].ended)
    assert await drain(ahead.take(DIGEST, 0, len(data))) == data
    assert origin.blob_reads(DIGEST)[-1] == ("range", 256 << 10, len(data) - (256 << 10))


async def test_a_span_that_stops_ends_the_read(tmp_path: Path, nursery: trio.Nursery) -> None:
    data = os.urandom(2 << 20)
    origin = TapOrigin(tmp_path)
    put_blob(tmp_path, data)
    ahead = ReadAhead(origin, length=len(data), hold=300 << 10)
    ahead.start(nursery, DIGEST)
    reader = ahead.take(DIGEST, 0, len(data))
    assert reader is not None
    assert await anext(reader) == data[: 256 << 10]
    await reader.aclose()  # the engine cancelled the span
    await until(lambda: not ahead.active(DIGEST) and origin.open == 0)


async def test_drop_stops_the_read(tmp_path: Path, nursery: trio.Nursery) -> None:
    put_blob(tmp_path, os.urandom(1 << 20))
    origin = TapOrigin(tmp_path)
    ahead = ReadAhead(origin, length=1 << 20, hold=64 << 10)
    ahead.start(nursery, DIGEST)
    ahead.drop(DIGEST)
    await until(lambda: not ahead.active(DIGEST) and origin.open == 0)


# -- through a fresh node ---------------------------------------------------------------------


async def fresh_node(
    tmp_path: Path, sample: SampleImage, nursery: trio.Nursery, metrics: Metrics | None = None
) -> tuple[TapOrigin, ChunkStore, str, str, bytes]:
    await published_home(tmp_path, sample)
    origin = TapOrigin(tmp_path / "origin")
    store = ChunkStore(tmp_path / "cache")
    url = await start_registry(nursery, store, origin, metrics=metrics)
    blobs = Path(sample.path) / "blobs" / "sha256"
    manifest = json.loads((blobs / sample.top_digest.removeprefix("sha256:")).read_bytes())
    digest = max(manifest["layers"], key=lambda d: d["size"])["digest"]
    return origin, store, url, digest, (blobs / digest.removeprefix("sha256:")).read_bytes()


def wasted(metrics: Metrics) -> float:
    """Bytes of reads ahead that were dropped (counted when a read ahead ends)."""
    return metrics.registry.get_sample_value(READ_AHEAD, {"outcome": "wasted"}) or 0


async def test_a_fresh_node_reads_a_blob_ahead_of_its_map(
    tmp_path: Path, sample: SampleImage, nursery: trio.Nursery
) -> None:
    origin, store, url, digest, data = await fresh_node(tmp_path, sample, nursery)
    async with httpx.AsyncClient(base_url=url, timeout=20) as c:
        r = await c.get(f"/v2/demo/app/blobs/{digest}")
    assert r.status_code == 200 and r.content == data
    reads = origin.blob_reads(digest)
    assert reads[0][0] == "head" and all(kind == "range" and offset > 0 for kind, offset, _ in reads[1:])
    await wait_cached(store, digest)


async def test_bytes_read_ahead_are_checked_like_any_other(
    tmp_path: Path, sample: SampleImage, nursery: trio.Nursery
) -> None:
    origin, store, url, digest, data = await fresh_node(tmp_path, sample, nursery)
    bad = bytearray(data)
    bad[10] ^= 0xFF
    (tmp_path / "origin" / blob_key(digest)).write_bytes(bad)
    async with httpx.AsyncClient(base_url=url, timeout=20) as c:
        r = await c.get(f"/v2/demo/app/blobs/{digest}")
    assert r.status_code == 502 and "does not match" in r.json()["errors"][0]["message"]
    assert origin.blob_reads(digest)[0][0] == "head"
    assert not store.has_blob(digest)


async def test_a_read_ahead_only_for_a_get_of_a_blob_not_known_yet(
    tmp_path: Path, sample: SampleImage, nursery: trio.Nursery
) -> None:
    origin, store, url, digest, data = await fresh_node(tmp_path, sample, nursery)
    async with httpx.AsyncClient(base_url=url, timeout=20) as c:
        assert (await c.head(f"/v2/demo/app/blobs/{digest}")).status_code == 200  # no body wanted
        assert not origin.blob_reads(digest)
        assert (await c.get(f"/v2/demo/app/blobs/{digest}")).content == data
        await wait_cached(store, digest)
        assert (await c.get(f"/v2/demo/app/blobs/{digest}")).content == data  # from the cache
    assert [kind for kind, _, _ in origin.blob_reads(digest)].count("head") == 1


async def test_the_resolver_knows_a_blob_once_its_map_is_here(tmp_path: Path, sample: SampleImage) -> None:
    origin, _root = await published_home(tmp_path, sample)
    resolver = Resolver(ChunkStore(tmp_path / "cache"), origin)
    digest = next(iter((await resolver.root(_root)).blobs))
    assert not resolver.knows_blob("demo/app", digest)
    entry = await resolver.blob_for("demo/app", digest)  # the name is looked up; the map is not read
    assert not resolver.knows_blob("demo/app", digest)
    await resolver.blob_map(entry, digest)
    assert resolver.knows_blob("demo/app", digest)
    assert resolver.knows_blob(f"ipfs/{_root}", digest)
    assert not resolver.knows_blob("demo/other", digest)
    # Names whose blobs are not the origin's to read ahead: a raw-codec CID (an image nerdctl
    # pushed), a name that is no CID at all (the request fails anyway).
    raw = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
    assert resolver.knows_blob(f"ipfs/{raw}", digest)
    assert resolver.knows_blob("ipfs/not-a-cid", digest)


async def test_an_unknown_blob_drops_its_read_ahead(
    tmp_path: Path, sample: SampleImage, nursery: trio.Nursery
) -> None:
    metrics = Metrics()
    origin, store, url, digest, data = await fresh_node(tmp_path, sample, nursery, metrics)
    put_blob(tmp_path / "origin", os.urandom(4 << 20))  # in the origin, but not part of demo/app
    async with httpx.AsyncClient(base_url=url, timeout=20) as c:
        r = await c.get(f"/v2/demo/app/blobs/{DIGEST}")
    assert r.status_code == 404 and r.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert origin.blob_reads(DIGEST) == [("head", 0, 16 << 20)]
    await until(lambda: wasted(metrics) > 0 and origin.open == 0, timeout=2)  # at once, not after 5 s


async def test_a_bad_range_drops_its_read_ahead(
    tmp_path: Path, sample: SampleImage, nursery: trio.Nursery
) -> None:
    metrics = Metrics()
    origin, store, url, digest, data = await fresh_node(tmp_path, sample, nursery, metrics)
    async with httpx.AsyncClient(base_url=url, timeout=20) as c:
        r = await c.get(f"/v2/demo/app/blobs/{digest}", headers={"Range": f"bytes={len(data) + 10}-"})
    assert r.status_code == 416
    assert [kind for kind, _, _ in origin.blob_reads(digest)] == ["head"]
    await until(lambda: wasted(metrics) == len(data), timeout=2)  # dropped at once, not after 5 s
    assert not store.has_partial(digest)


async def test_a_failing_request_drops_only_its_own_read_ahead(
    tmp_path: Path, sample: SampleImage, nursery: trio.Nursery
) -> None:
    """Two clients ask for one blob; the second asks for a range past its end. The first one's
    read ahead is the one its fetch takes, whatever the second request does."""
    metrics = Metrics()
    origin, store, url, digest, data = await fresh_node(tmp_path, sample, nursery, metrics)
    got: dict[str, httpx.Response] = {}
    async with httpx.AsyncClient(base_url=url, timeout=20) as c:

        async def get(who: str, headers: dict[str, str]) -> None:
            got[who] = await c.get(f"/v2/demo/app/blobs/{digest}", headers=headers)

        async with trio.open_nursery() as clients:
            clients.start_soon(get, "whole", {})
            await until(lambda: origin.blob_reads(digest))  # its read ahead has begun
            clients.start_soon(get, "past the end", {"Range": f"bytes={len(data) + 10}-"})
    assert got["whole"].status_code == 200 and got["whole"].content == data
    assert got["past the end"].status_code == 416
    assert [kind for kind, _, _ in origin.blob_reads(digest)] == ["head"]  # its bytes all came ahead
    await until(lambda: metrics.registry.get_sample_value(READ_AHEAD, {"outcome": "used"}) == len(data))
    assert wasted(metrics) == 0


class SilentPeer(ChunkSource):
    """A LAN peer that holds nothing (only its presence matters here)."""

    name = "peer 10.0.0.2:5051"
    kind = "peer"

    def inventory(self, blob_map: BlobMap) -> bytes | None:
        return None

    def read_span(self, blob_map: BlobMap, start: int, length: int) -> AsyncIterator[bytes]:
        raise AssertionError("never asked")


async def test_no_read_ahead_with_peers(tmp_path: Path, nursery: trio.Nursery) -> None:
    """With peers the swarm may bring a blob's start, and the origin's share of it may lie
    elsewhere: nothing is read ahead from the origin."""
    origin = TapOrigin(tmp_path / "origin")
    put_blob(tmp_path / "origin", os.urandom(1000))
    store = ChunkStore(tmp_path / "cache")
    alone, swarmed = OriginSource(origin), OriginSource(origin)
    alone.ahead.keep = 0.2
    Fetcher(store, [alone], nursery).read_ahead(DIGEST)
    Fetcher(store, [swarmed, SilentPeer()], nursery).read_ahead(DIGEST)
    assert alone.ahead.active(DIGEST) and not swarmed.ahead.active(DIGEST)
    await until(lambda: not alone.ahead.active(DIGEST))  # taken by nobody: dropped after `keep`
    assert origin.blob_reads(DIGEST) == [("head", 0, 16 << 20)]
