"""Hostile nerdctl images: a descriptor that claims a real blob's digest with another blob's
leaves, DAGs that name far more blocks than they hold, and what a node serves afterwards to its
registry clients, its LAN peers and IPFS clients. In process, real nodes over HTTP on loopback.
"""

from __future__ import annotations

import hashlib
import json
import time
import tracemalloc
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from _ipfs_gateway import IpfsGateway
from _nerdctl_images import Image, fixture
from test_nerdctl_gateway import gateways, pull, serving, wait_cached

from p2pimg.content.car import CarReader
from p2pimg.content.cid import Cid
from p2pimg.content.unixfs import (
    DataType,
    PbLink,
    PbNode,
    UnixfsData,
    encode_pb_node,
    encode_unixfs,
    import_file,
    walk_file,
)
from p2pimg.errors import BlockInvalid
from p2pimg.fetch import nerdctl
from p2pimg.fetch.nerdctl import FileBlob, FileMap, NerdctlImages
from p2pimg.sources.gateway import Gateways, IpfsFiles
from p2pimg.store.chunks import ChunkStore


class Builder:
    """Blocks of a hand-made nerdctl image."""

    def __init__(self) -> None:
        self.blocks: dict[Cid, bytes] = {}

    def file(self, data: bytes, chunk_size: int = 256 << 10) -> Cid:
        last = None
        for cid, block in import_file([data], chunk_size=chunk_size):
            self.blocks[cid] = block
            last = cid
        assert last is not None
        return last

    def node(self, links: list[tuple[Cid, int]]) -> Cid:
        sizes = tuple(s for _, s in links)
        data = encode_unixfs(UnixfsData(DataType.FILE, filesize=sum(sizes), blocksizes=sizes))
        block = encode_pb_node(PbNode(tuple(PbLink(c, "", s) for c, s in links), data))
        cid = Cid.of_dag_pb(block)
        self.blocks[cid] = block
        return cid

    def image(self, layer: dict[str, Any], *, descriptor_chunk: int = 256 << 10) -> Image:
        cfg = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}}).encode()
        cfg_desc = self.desc("application/vnd.oci.image.config.v1+json", cfg)
        man = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": cfg_desc,
                "layers": [layer],
            }
        ).encode()
        top = self.desc("application/vnd.oci.image.manifest.v1+json", man)
        cid = self.file(json.dumps(top).encode(), chunk_size=descriptor_chunk)
        return Image(cid, self.blocks, top)

    def desc(self, media_type: str, data: bytes) -> dict[str, Any]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        return {
            "mediaType": media_type,
            "digest": digest,
            "size": len(data),
            "urls": [f"ipfs://{self.file(data)}"],
        }


def poisoned() -> tuple[Image, Image, str, list[Cid], list[Cid]]:
    """Fixture `multi`, and an image whose layer claims the digest D of one of multi's layers with
    a file made of the leaves of another of its layers, E (same size): (multi, hostile, D, D's
    leaves, E's leaves)."""
    multi = fixture("multi")
    layers = [(d, b) for d, b in multi.blobs().items() if b["size"] > 100_000]
    (d, d_desc), (_e, e_desc) = layers[:2]
    d_leaves = list(walk_file(multi.file_cid(d_desc), multi.blocks.__getitem__))
    e_leaves = list(walk_file(multi.file_cid(e_desc), multi.blocks.__getitem__))
    build = Builder()
    build.blocks.update(multi.blocks)
    file = build.node([(leaf.cid, leaf.size) for leaf in e_leaves])
    layer = {
        "mediaType": d_desc["mediaType"],
        "digest": d,
        "size": d_desc["size"],
        "urls": [f"ipfs://{file}"],
    }
    hostile = build.image(layer)
    return multi, hostile, d, [leaf.cid for leaf in d_leaves], [leaf.cid for leaf in e_leaves]


async def read_maps(node: Any, image: Image) -> None:
    """What a node does on an image's first look: every blob's map."""
    for digest in image.blobs():
        entry = await node.resolver.blob_for(image.name, digest)
        await node.resolver.blob_map(entry, digest)


async def get_blob(client: httpx.AsyncClient, image: Image, digest: str) -> bytes | None:
    """The blob's body, or None when the answer is an error or a cut body."""
    try:
        r = await client.get(f"/v2/{image.name}/blobs/{digest}")
    except httpx.HTTPError:  # cut: the last chunk never came
        return None
    return r.content if r.status_code == 200 else None


async def test_a_false_claim_serves_no_wrong_block_by_cid(tmp_path: Path) -> None:
    multi, hostile, d, d_leaves, e_leaves = poisoned()
    with gateways(IpfsGateway(hostile.blocks)) as (gw,):
        async with serving(tmp_path / "a", [gw.url], peer_listener=True) as a:
            with trio.fail_after(60):
                assert await get_blob(a.client, multi, d) is not None
                await wait_cached(a.node, [d])
                r = await a.client.get(f"/v2/{hostile.name}/manifests/latest")
                assert r.status_code == 200
                await read_maps(a.node, hostile)
            async with httpx.AsyncClient(base_url=a.peer_url or "", timeout=30) as peer:
                # E's leaves are claimed inside D, which is here: their bytes are not E's.
                for cid in e_leaves:
                    r = await peer.get(f"/ipfs/{cid}?format=raw")
                    assert r.status_code == 404, (cid, r.status_code)
                for cid in d_leaves:  # D's own leaves are, checked
                    r = await peer.get(f"/ipfs/{cid}?format=raw")
                    assert r.status_code == 200 and cid.matches(r.content)
                # The false map, kept as a block: its CAR stops before a chunk it cannot vouch for.
                assert a.node.resolver.nerdctl is not None
                maps = a.node.resolver.nerdctl._maps.values()
                (bmap,) = [m for m in maps if m.digest == d and m.chunks == tuple(e_leaves)]
                map_cid = Cid.of_dag_cbor(bmap.encode())
                body = bytearray()
                try:
                    async with peer.stream("GET", f"/ipfs/{map_cid}?format=car") as r:
                        assert r.status_code == 200
                        async for piece in r.aiter_bytes():
                            body += piece
                except httpx.HTTPError:
                    pass  # cut, as the spec says a gateway that already answered 200 must
                blocks = list(CarReader().feed(bytes(body)))
                assert blocks and all(cid.matches(block) for cid, block in blocks)
                assert not any(cid in e_leaves for cid, _ in blocks)


@pytest.mark.parametrize("order", ["hostile-first", "together"])
async def test_an_honest_pull_succeeds_after_a_false_claim(tmp_path: Path, order: str) -> None:
    multi, hostile, d, _d_leaves, _e_leaves = poisoned()
    with gateways(IpfsGateway(hostile.blocks)) as (gw,):
        async with serving(tmp_path / "b", [gw.url]) as b:
            with trio.fail_after(60):
                r = await b.client.get(f"/v2/{hostile.name}/manifests/latest")
                assert r.status_code == 200
                await read_maps(b.node, hostile)
                if order == "hostile-first":
                    # The false blob is never handed out whole under D: its last chunk waits
                    # for the digest check, which fails.
                    assert await get_blob(b.client, hostile, d) is None
                    await pull(b.client, multi)
                else:
                    got: list[bytes | None] = []

                    async def false() -> None:
                        got.append(await get_blob(b.client, hostile, d))

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(false)
                        nursery.start_soon(pull, b.client, multi)
                    assert got == [None] or (
                        got[0] is not None and hashlib.sha256(got[0]).hexdigest() == d[7:]
                    )
                await wait_cached(b.node, list(multi.blobs()))
            assert hashlib.sha256(b.node.store.blob_path(d).read_bytes()).hexdigest() == d[7:]


async def test_a_false_claim_read_after_a_pull_started_does_not_change_what_it_reads(tmp_path: Path) -> None:
    # Two maps for D: each its own (digest, file), and the gateway sources keep the layout of the
    # map whose fetch started.
    multi, hostile, d, d_leaves, e_leaves = poisoned()
    with gateways(IpfsGateway(hostile.blocks)) as (gw,):
        async with serving(tmp_path / "c", [gw.url]) as c:
            honest = await c.node.resolver.blob_map(await c.node.resolver.blob_for(multi.name, d), d)
            false = await c.node.resolver.blob_map(await c.node.resolver.blob_for(hostile.name, d), d)
            assert isinstance(honest, FileMap) and isinstance(false, FileMap)
            assert honest != false and honest.chunks == tuple(d_leaves) and false.chunks == tuple(e_leaves)
            fetch = await c.node.fetcher.open(honest, warm=True)
            assert fetch is not None
            with trio.fail_after(60):
                await fetch.wait_chunk(0)
            # Checked by its CID, but that CID is not bound to D by anyone: no peer gets it by D
            # before the digest check (the complete blob, after it).
            assert not fetch.shareable(0) and c.node.fetcher.availability(d) is None
            assert c.node.resolver.nerdctl is not None
            files = c.node.resolver.nerdctl.gateways.files
            assert files.get(d) is honest.layout
            await c.node.resolver.blob_map(await c.node.resolver.blob_for(hostile.name, d), d)
            assert files.get(d) is honest.layout
            with trio.fail_after(60):
                await fetch.done.wait()
            assert fetch.error is None and c.node.store.has_blob(d)


def bomb(outer: int, inner: int) -> tuple[Cid, int, dict[Cid, bytes]]:
    """Three small blocks naming outer * inner one-byte leaves: root -> outer x N, N -> inner x
    the same leaf."""
    build = Builder()
    leaf = Cid.of_raw(b"a")
    build.blocks[leaf] = b"a"
    n = build.node([(leaf, 1)] * inner)
    root = build.node([(n, inner)] * outer)
    return root, outer * inner, build.blocks


@pytest.mark.parametrize(("outer", "inner"), [(4096, 1024), (1024, 1024), (257, 1024)])
async def test_a_dag_bomb_is_refused_quickly_in_bounded_memory(
    tmp_path: Path, outer: int, inner: int
) -> None:
    root, size, blocks = bomb(outer, inner)
    with gateways(IpfsGateway(blocks)) as (gw,):
        async with httpx.AsyncClient() as client:
            images = NerdctlImages(
                ChunkStore(tmp_path / "cache"), Gateways([gw.url], client), chunk_size=1 << 20
            )
            tracemalloc.start()
            began = time.monotonic()
            try:
                with pytest.raises(BlockInvalid, match="more than"):
                    await images.blob_map(FileBlob(size, root), "sha256:" + "ab" * 32)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            took = time.monotonic() - began
    # Each distinct node read once and its children counted as often as it occurs: refused
    # before anything is listed (it was over 1 GB, and 37 s of CPU, for the first shape).
    assert peak < 32 << 20, peak
    assert took < 5, took


async def test_the_layouts_kept_are_bounded_by_their_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nerdctl, "_KEPT_PIECES", 100)
    monkeypatch.setattr(IpfsFiles, "kept_pieces", 100)
    build = Builder()
    files = []
    for i in range(6):
        data = bytes([i]) * (40 * 4096)  # 40 leaves of 4 KiB
        files.append(
            (build.file(data, chunk_size=4096), len(data), "sha256:" + hashlib.sha256(data).hexdigest())
        )
    with gateways(IpfsGateway(build.blocks)) as (gw,):
        async with httpx.AsyncClient() as client:
            gws = Gateways([gw.url], client)
            images = NerdctlImages(ChunkStore(tmp_path / "cache"), gws, chunk_size=1 << 20)
            for cid, size, digest in files:
                await images.blob_map(FileBlob(size, cid), digest)
                images.started(await images.blob_map(FileBlob(size, cid), digest))
                assert images._kept_pieces <= 100 and gws.files._pieces <= 100
            assert len(images._maps) == 2
            # The newest is always kept, however large.
            assert gws.files.get(files[-1][2]) is not None and gws.files.get(files[0][2]) is None


async def test_an_image_cid_that_is_dag_pb(tmp_path: Path) -> None:
    # An adder that chunks the descriptor's JSON (here in 64-byte leaves) makes the image CID a
    # dag-pb node: `ipfs/bafybei...` names it.
    build = Builder()
    layer = build.desc("application/vnd.oci.image.layer.v1.tar", bytes(range(256)) * 40)
    image = build.image(layer, descriptor_chunk=64)
    assert str(image.cid).startswith("bafybei")
    with gateways(IpfsGateway(image.blocks)) as (gw,):
        async with serving(tmp_path / "d", [gw.url]) as d:
            with trio.fail_after(60):
                await pull(d.client, image)
            r = await d.client.get(f"/v2/{image.name}/tags/list")
            assert r.status_code == 200 and r.json()["tags"] == ["latest"]
