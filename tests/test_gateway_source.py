"""The IPFS gateway source (`sources/gateway.py`) against gateways that bend the trustless gateway
spec (https://specs.ipfs.tech/http-gateways/trustless-gateway/) as far as it lets them, or further:
CARs in any order with duplicates and blocks nobody asked for, compressed answers, a gateway that
refused CARs once; and what a blob costs the gateway: about its size, span after span.

The gateways are `_ipfs_gateway.IpfsGateway` (written from the spec) and another node's peer
listener, over HTTP on loopback, in process.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import httpx
import pytest
import trio
from _ipfs_gateway import IpfsGateway
from _nerdctl_images import REPO, Image
from test_nerdctl_gateway import gateways, pull, serving, wait_cached

from p2pimg.content.cid import DAG_PB
from p2pimg.content.model import BlobMap
from p2pimg.content.unixfs import import_file
from p2pimg.errors import OriginError
from p2pimg.fetch.nerdctl import FileBlob, NerdctlImages
from p2pimg.ops.sample import LayerSpec, write_oci_layout
from p2pimg.sources.gateway import Gateways
from p2pimg.store.chunks import ChunkStore

# Zero-filled 4 KiB leaves repeat; 4 links per node make a deep tree.
DATA = bytes(40 << 10) + bytes(range(256)) * 64 + bytes(12 << 10) + bytes(range(255, -1, -1)) * 40
BLOCKS = dict(import_file([DATA], chunk_size=4096, max_links=4))
ROOT = list(BLOCKS)[-1]
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()
SPANS = [(0, len(DATA)), (4096, 45056), (4000, 4200), (40000, 50000), (len(DATA) - 8192, len(DATA))]


async def span(gws: Gateways, bmap: BlobMap, start: int, end: int) -> bytes:
    return b"".join([p async for p in gws.sources[0].read_span(bmap, start, end - start)])


@pytest.mark.parametrize("once", [False, True], ids=["dups=y", "dups=n"])
async def test_a_car_in_any_order_with_duplicates_and_unasked_blocks(tmp_path: Path, once: bool) -> None:
    # The gateway sends each span's blocks reversed (its leaves after their turn), each twice,
    # between an unrelated block, one whose bytes do not match its CID, an identity block and a
    # sha2-512 one: the needed blocks are verified and kept until their turn, the rest ignored,
    # and every span is read from its one CAR (no block asked for by itself).
    assert ROOT.codec == DAG_PB
    with gateways(IpfsGateway(BLOCKS, scramble=True, once=once)) as (gw,):
        async with httpx.AsyncClient() as client:
            gws = Gateways([gw.url], client)
            images = NerdctlImages(ChunkStore(tmp_path / "cache"), gws, chunk_size=16 << 10)
            bmap = await images.blob_map(FileBlob(len(DATA), ROOT), DIGEST)
            asked = len(gw.requests)
            for start, end in SPANS:
                assert await span(gws, bmap, start, end) == DATA[start:end], (start, end)
            spans = gw.requests[asked:]
            assert spans and all(r.format == "car" for r in spans), [r.format for r in spans]
            assert gws.sources[0].gateway.offers_car


async def test_compressed_answers_are_refused_unread(tmp_path: Path) -> None:
    # `accept-encoding: identity` is asked; a gateway that compresses anyway is refused from its
    # Content-Encoding, before any byte is decompressed (blocks and CARs alike).
    leaf = next(c for c in BLOCKS if c.codec != DAG_PB)
    with gateways(IpfsGateway(BLOCKS, gzip=True), IpfsGateway(BLOCKS)) as (gz, plain):
        async with httpx.AsyncClient() as client:
            gateway = Gateways([gz.url], client).sources[0].gateway
            with pytest.raises(OriginError, match="Content-Encoding gzip"):
                await gateway.block(leaf)
            with pytest.raises(OriginError, match="Content-Encoding gzip"):
                _ = [b async for b in gateway.car(ROOT, 0, 100, lambda _cid: True)]
            assert await Gateways([plain.url], client).sources[0].gateway.block(leaf) == BLOCKS[leaf]


async def test_a_gateway_that_refused_a_car_is_asked_for_cars_again_later(tmp_path: Path) -> None:
    with gateways(IpfsGateway(BLOCKS, car=False)) as (gw,):
        async with httpx.AsyncClient() as client:
            gws = Gateways([gw.url], client)
            gateway = gws.sources[0].gateway
            images = NerdctlImages(ChunkStore(tmp_path / "cache"), gws, chunk_size=16 << 10)
            bmap = await images.blob_map(FileBlob(len(DATA), ROOT), DIGEST)

            def cars() -> int:
                return sum(r.format == "car" for r in gw.requests)

            assert await span(gws, bmap, 0, 20000) == DATA[:20000]
            assert cars() == 1 and gateway.offers_car is False  # refused (406): read block by block
            assert await span(gws, bmap, 20000, 40000) == DATA[20000:40000]
            assert cars() == 1  # not asked again right away
            gw.car = True  # the gateway was upgraded; once `car_retry` has passed, it is asked again
            gateway.car_retry = 0
            assert await span(gws, bmap, 40000, len(DATA)) == DATA[40000:]
            assert cars() == 2 and gateway.offers_car is True
            assert await span(gws, bmap, 0, 20000) == DATA[:20000]
            assert cars() == 3


def big_image(tmp_path: Path) -> Image:
    """An image with a 12 MiB layer pushed with Kubo's defaults (256 KiB raw leaves)."""
    if str(REPO) not in sys.path:
        sys.path.append(str(REPO))
    from tools.nerdctl_fixture import push

    layout = tmp_path / "layout"
    write_oci_layout(layout, [LayerSpec(12 << 20, "none")], seed=5)
    pushed = push(layout)
    return Image(pushed.image_cid, dict(pushed.blocks), pushed.top)


async def test_a_blob_through_another_nodes_peer_listener_costs_about_its_size(tmp_path: Path) -> None:
    # Node B uses node A's peer listener as its gateway. It asks each 4 MiB span of the layer
    # with entity-bytes; A sends the nodes on the way and the span's leaves only (not the file
    # from its start up to the span), so the blob costs A about its size.
    image = big_image(tmp_path)
    layer = max(image.blobs().values(), key=lambda b: b["size"])
    assert image.file_cid(layer).codec == DAG_PB and layer["size"] > 12 << 20  # a tar of the bytes
    with gateways(IpfsGateway(image.blocks)) as (gw,):
        async with serving(tmp_path / "a", [gw.url], peer_listener=True) as a:
            with trio.fail_after(60):
                await pull(a.client, image)
            await wait_cached(a.node, list(image.blobs()))
            assert a.peer_url is not None
            sent = a.node.metrics.registry.get_sample_value
            before = sent("p2pimg_peer_served_bytes_total") or 0
            async with serving(tmp_path / "b", [a.peer_url]) as b:
                with trio.fail_after(60):
                    await pull(b.client, image)
                total = sum(b["size"] for b in image.blobs().values())
                cost = (sent("p2pimg_peer_served_bytes_total") or 0) - before
                assert total <= cost <= total * 1.05 + (64 << 10), (cost, total)
