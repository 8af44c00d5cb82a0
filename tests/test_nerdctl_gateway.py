"""Images `nerdctl push ipfs://` put into IPFS, pulled by CID through the registry API from IPFS
trustless gateways (`serve --ipfs-gateway`), in process, over HTTP on loopback.

The gateways are `_ipfs_gateway.IpfsGateway`, written from the spec, serving the blocks of the
committed fixtures (tests/fixtures/nerdctl) or of an image pushed here with other chunking. Each
pull is checked digest for digest against what nerdctl wrote; then a gateway that lies, one that
stalls, one that sends no CARs, a block missing everywhere, and tags other than `latest`.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio
from _ipfs_gateway import IpfsGateway
from _nerdctl_images import NAMES, Image, fixture, pushed

from p2pimg.cli.commands import _config
from p2pimg.cli.main import build_parser
from p2pimg.content.cid import DAG_PB, RAW, Cid
from p2pimg.content.model import BlobMap
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
from p2pimg.errors import InvalidInput
from p2pimg.fetch.nerdctl import FileBlob, NerdctlImages, checked_map
from p2pimg.node.config import load_config
from p2pimg.node.node import Node, open_node
from p2pimg.sources.gateway import Gateways, Piece
from p2pimg.store.chunks import ChunkStore
from p2pimg.web.peerapi import PeerService
from p2pimg.web.registry import Registry
from p2pimg.web.server import serve_connection, serve_http


@contextlib.contextmanager
def gateways(*made: IpfsGateway) -> Iterator[list[IpfsGateway]]:
    for gw in made:
        gw.start()
    try:
        yield list(made)
    finally:
        for gw in made:
            gw.stop()


@dataclass
class Serving:
    node: Node
    client: httpx.AsyncClient
    peer_url: str | None = None


@contextlib.asynccontextmanager
async def serving(
    home: Path, urls: Sequence[str], *, peers: Sequence[str] = (), peer_listener: bool = False
) -> AsyncIterator[Serving]:
    """A node with these gateways and peers, its registry listener (and peer listener), and a
    client of its registry."""
    config = load_config(home=str(home), mdns=False, ipfs_gateways=list(urls), peers=list(peers))
    async with open_node(config) as node:
        registry = Registry(node.store, node.resolver, node.fetcher, node.metrics, node.mirror)
        listeners = await node.nursery.start(serve_http, registry.handle, "127.0.0.1", 0)
        host, port = listeners[0].socket.getsockname()[:2]
        peer_url = None
        if peer_listener:
            service = PeerService.for_node(node)
            peer_listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            handler = serve_connection(service.handle, gate=service.gate)
            node.nursery.start_soon(trio.serve_listeners, handler, peer_listeners)
            peer_url = f"http://127.0.0.1:{peer_listeners[0].socket.getsockname()[1]}"
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=60) as client:
            yield Serving(node, client, peer_url)
        node.nursery.cancel_scope.cancel()


async def pull(client: httpx.AsyncClient, image: Image) -> None:
    """What a client does: the top by tag, every manifest by digest, every blob; all checked
    byte for byte against what nerdctl wrote."""
    name = f"ipfs/{image.cid}"
    r = await client.get(f"/v2/{name}/manifests/latest")
    assert r.status_code == 200, r.text
    assert r.headers["docker-content-digest"] == image.top["digest"]
    assert r.headers["content-type"] == image.top["mediaType"]
    for desc, data in image.manifests():
        r = await client.get(f"/v2/{name}/manifests/{desc['digest']}")
        assert r.status_code == 200, r.text
        assert r.content == data and r.headers["content-type"] == desc["mediaType"]
    for digest, desc in image.blobs().items():
        r = await client.get(f"/v2/{name}/blobs/{digest}")
        assert r.status_code == 200, r.text
        assert "sha256:" + hashlib.sha256(r.content).hexdigest() == digest
        assert len(r.content) == desc["size"]


async def wait_cached(node: Node, digests: Sequence[str]) -> None:
    """The last chunk reaches the client before the whole-blob check renames the blob into place."""
    with trio.fail_after(10):
        while not all(node.store.has_blob(d) for d in digests):
            await trio.sleep(0.01)


@pytest.mark.parametrize("name", NAMES)
async def test_each_fixture_pulls_digest_for_digest_then_from_the_cache(tmp_path: Path, name: str) -> None:
    image = fixture(name)
    with gateways(IpfsGateway(image.blocks)) as (gw,):
        async with serving(tmp_path / "home", [gw.url]) as it:
            node, client = it.node, it.client
            with trio.fail_after(60):
                await pull(client, image)
            await wait_cached(node, list(image.blobs()))
            assert gw.requests, "the gateway was not asked"
            multi_leaf = [d for d, b in image.blobs().items() if image.file_cid(b).codec == DAG_PB]
            if multi_leaf:  # the blobs of several leaves came as CARs of spans
                assert any(r.format == "car" and "entity-bytes" in r.query for r in gw.requests)
            for digest in image.blobs():  # Kubo's chunking: the leaves are chunks, found by CID
                entry = await node.resolver.blob_for(f"ipfs/{image.cid}", digest)
                bmap = await node.resolver.blob_map(entry, digest)
                assert bmap.checked and all(node.chunk_index.find(c) for c in bmap.chunks)
            asked = len(gw.requests)
            await pull(client, image)
            assert len(gw.requests) == asked, "a second pull asked the gateway again"


@pytest.mark.parametrize("car", [True, False], ids=["car", "blocks-only"])
async def test_other_chunkings_are_walked_and_checked_by_digest(tmp_path: Path, car: bool) -> None:
    # 3000-byte leaves (not a power of two) under nodes of 5 links: no leaf can be a chunk, so the
    # blob map is unchecked: every block is checked by its CID, the blob by its digest.
    image = pushed(tmp_path, chunk_size=3000, max_links=5)
    with gateways(IpfsGateway(image.blocks, car=car)) as (gw,):
        async with serving(tmp_path / "home", [gw.url]) as it:
            node, client = it.node, it.client
            with trio.fail_after(60):
                await pull(client, image)
            await wait_cached(node, list(image.blobs()))
            for digest, desc in image.blobs().items():
                bmap = await node.resolver.blob_map(
                    await node.resolver.blob_for(f"ipfs/{image.cid}", digest), digest
                )
                assert bmap.checked == (image.file_cid(desc).codec == RAW)
            cars = [r for r in gw.requests if r.format == "car"]
            if car:
                assert cars and gw.requests
            else:  # refused (406) for the spans asked at once at first, then block by block
                assert 1 <= len(cars) <= len(image.blobs())
                assert node.resolver.nerdctl is not None
                assert all(not s.gateway.offers_car for s in node.resolver.nerdctl.gateways.sources)


async def test_a_lying_gateway_is_penalised_and_the_pull_completes_from_an_honest_one(tmp_path: Path) -> None:
    image = fixture("single")
    with gateways(IpfsGateway(image.blocks, lie=True), IpfsGateway(image.blocks)) as (liar, honest):
        async with serving(tmp_path / "home", [liar.url, honest.url]) as it:
            node, client = it.node, it.client
            with trio.fail_after(60):
                await pull(client, image)
            stats = node.fetcher.stats[f"gateway {liar.url}"]
            assert liar.requests and stats.bad_chunks >= 1
            assert node.fetcher.stats[f"gateway {honest.url}"].bad_chunks == 0
            # Nothing the liar sent was kept: every cached block still matches its CID.
            await wait_cached(node, list(image.blobs()))
            for digest in image.blobs():
                data = node.store.blob_path(digest).read_bytes()
                assert "sha256:" + hashlib.sha256(data).hexdigest() == digest


async def test_a_stalling_gateway_is_passed_over(tmp_path: Path) -> None:
    image = fixture("small-chunks")
    with gateways(IpfsGateway(image.blocks, stall=True), IpfsGateway(image.blocks)) as (stuck, honest):
        async with serving(tmp_path / "home", [stuck.url, honest.url]) as it:
            client = it.client
            with trio.fail_after(60):
                await pull(client, image)
            assert stuck.requests and honest.requests


async def test_a_block_missing_everywhere_is_a_clear_error_and_nothing_is_cached(tmp_path: Path) -> None:
    image = fixture("single")
    layer = max(image.blobs().values(), key=lambda b: b["size"])  # a dag-pb file of two leaves
    leaves = [leaf.cid for leaf in walk_file(image.file_cid(layer), image.blocks.__getitem__)]
    missing = {leaves[0]}  # the first: the registry has sent nothing yet, so it answers an error
    made = (IpfsGateway(image.blocks, missing=missing), IpfsGateway(image.blocks, missing=missing, car=False))
    with gateways(*made) as gws:
        async with serving(tmp_path / "home", [g.url for g in gws]) as it:
            node, client = it.node, it.client
            name = f"ipfs/{image.cid}"
            r = await client.get(f"/v2/{name}/manifests/latest")
            assert r.status_code == 200
            with trio.fail_after(60):
                r = await client.get(f"/v2/{name}/blobs/{layer['digest']}")
            assert r.status_code in (404, 502), r.text
            assert r.json()["errors"][0]["code"] == "BLOB_UNKNOWN" and str(leaves[0]) in r.text, r.text
            assert not node.store.has_blob(layer["digest"])
            # An image whose descriptor no gateway holds: no such image.
            unknown = Cid.of_raw(b"not pushed anywhere")
            r = await client.get(f"/v2/ipfs/{unknown}/manifests/latest")
            assert r.status_code == 404 and r.json()["errors"][0]["code"] == "NAME_UNKNOWN"
            assert node.store.get_block(unknown) is None


async def test_only_the_latest_tag(tmp_path: Path) -> None:
    image = fixture("multi")
    with gateways(IpfsGateway(image.blocks)) as (gw,):
        async with serving(tmp_path / "home", [gw.url]) as it:
            client = it.client
            name = f"ipfs/{image.cid}"
            r = await client.get(f"/v2/{name}/tags/list")
            assert r.status_code == 200 and r.json() == {"name": name, "tags": ["latest"]}
            for tag in ("v1", "1.0", "main"):
                r = await client.get(f"/v2/{name}/manifests/{tag}")
                assert r.status_code == 404 and r.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
            r = await client.head(f"/v2/{name}/manifests/latest")
            assert r.status_code == 200 and r.headers["docker-content-digest"] == image.top["digest"]


@pytest.mark.parametrize("chunking", ["kubo", "odd"])
async def test_a_lan_peer_that_pulled_it_serves_it_and_the_gateway_is_not_asked(
    tmp_path: Path, chunking: str
) -> None:
    # Kubo's chunking: chunks by CID; 3000-byte leaves: the blob by its digest alone.
    image = fixture("single") if chunking == "kubo" else pushed(tmp_path, chunk_size=3000, max_links=5)
    with gateways(IpfsGateway(image.blocks)) as (gw,):
        async with serving(tmp_path / "a", [gw.url], peer_listener=True) as a:
            with trio.fail_after(60):
                await pull(a.client, image)
            await wait_cached(a.node, list(image.blobs()))
            asked = len(gw.requests)
            assert a.peer_url is not None
            # The second node knows no gateway at all: the image's blocks (its descriptor,
            # manifests, the layers' dag-pb nodes) and its blobs can only come from the first.
            async with serving(tmp_path / "b", [], peers=[a.peer_url]) as b:
                with trio.fail_after(60):
                    await pull(b.client, image)
                assert len(gw.requests) == asked
                received = b.node.metrics.registry.get_sample_value
                assert (received("p2pimg_source_bytes_total", {"source": "peer"}) or 0) > 0
                assert received("p2pimg_source_bytes_total", {"source": "gateway"}) == 0


def inline_file(data: bytes, leaf: int) -> tuple[Cid, dict[Cid, bytes]]:
    """A UnixFS file whose leaves are dag-pb nodes carrying their data inline (as `ipfs add`
    without raw leaves makes them), under one root that carries the first bytes itself too."""
    blocks: dict[Cid, bytes] = {}
    head, rest = data[:100], data[100:]
    links, sizes = [], []
    for at in range(0, len(rest), leaf):
        part = rest[at : at + leaf]
        node = encode_pb_node(PbNode((), encode_unixfs(UnixfsData(DataType.FILE, part, len(part)))))
        cid = Cid.of_dag_pb(node)
        blocks[cid] = node
        links.append(PbLink(cid, "", len(node)))
        sizes.append(len(part))
    root_data = UnixfsData(DataType.FILE, head, len(data), tuple(sizes))
    root = encode_pb_node(PbNode(tuple(links), encode_unixfs(root_data)))
    blocks[Cid.of_dag_pb(root)] = root
    return Cid.of_dag_pb(root), blocks


@pytest.mark.parametrize("car", [True, False], ids=["car", "blocks-only"])
async def test_leaves_with_inline_data_are_read_span_by_span(tmp_path: Path, car: bool) -> None:
    data = bytes(range(256)) * 200  # 51200 bytes, leaves of 5000 after 100 in the root itself
    root, blocks = inline_file(data, 5000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with gateways(IpfsGateway(blocks, car=car)) as (gw,):
        async with httpx.AsyncClient() as client:
            gws = Gateways([gw.url], client)
            images = NerdctlImages(ChunkStore(tmp_path / "cache"), gws, chunk_size=16 << 10)
            bmap = await images.blob_map(FileBlob(len(data), root), digest)
            assert not bmap.checked and gws.sources[0].inventory(bmap) == b""
            for start, end in [(0, len(data)), (0, 100), (90, 5200), (16384, 32768), (51000, 51200)]:
                got = b"".join([p async for p in gws.sources[0].read_span(bmap, start, end - start)])
                assert got == data[start:end], (start, end)
            assert gws.sources[0].gateway.offers_car is car  # a CAR was asked for, and given or refused


def test_gateways_from_the_flag_the_environment_and_config_toml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text('ipfs_gateways = ["http://127.0.0.1:8080/"]\n')
    assert load_config(home=str(home)).ipfs_gateways == ("http://127.0.0.1:8080",)
    monkeypatch.setenv("P2PIMG_IPFS_GATEWAYS", "http://a.example, https://b.example")
    assert load_config(home=str(home)).ipfs_gateways == ("http://a.example", "https://b.example")
    args = build_parser().parse_args(["serve", "--home", str(home), "--ipfs-gateway", "http://c.example"])
    assert _config(args).ipfs_gateways == ("http://c.example",)
    monkeypatch.setenv("P2PIMG_IPFS_GATEWAYS", "c.example")
    with pytest.raises(InvalidInput, match="IPFS gateways"):
        load_config(home=str(home))


@pytest.mark.parametrize("chunking", ["kubo", "odd"])
async def test_another_nodes_peer_listener_is_a_gateway_too(tmp_path: Path, chunking: str) -> None:
    # The peer listener answers as a trustless gateway (web/gateway.py): a node that is given it
    # with --ipfs-gateway (not as a peer) pulls through it, CARs of spans included. With any
    # layout of raw leaves: A finds a leaf by CID at its offset in the blob (3000-byte leaves are
    # no chunks of any map), after checking the bytes there.
    image = fixture("single") if chunking == "kubo" else pushed(tmp_path, chunk_size=3000, max_links=5)
    with gateways(IpfsGateway(image.blocks)) as (gw,):
        async with serving(tmp_path / "a", [gw.url], peer_listener=True) as a:
            with trio.fail_after(60):
                await pull(a.client, image)
            await wait_cached(a.node, list(image.blobs()))
            asked = len(gw.requests)
            assert a.peer_url is not None
            async with serving(tmp_path / "b", [a.peer_url]) as b:
                with trio.fail_after(60):
                    await pull(b.client, image)
                assert len(gw.requests) == asked
                received = b.node.metrics.registry.get_sample_value
                assert (received("p2pimg_source_bytes_total", {"source": "gateway"}) or 0) > 0
                assert b.node.resolver.nerdctl is not None
                assert [s.gateway.offers_car for s in b.node.resolver.nerdctl.gateways.sources] == [True]


@pytest.mark.parametrize("once", [False, True], ids=["dups=y", "dups=n"])
async def test_repeated_leaves_come_once_or_every_time(tmp_path: Path, once: bool) -> None:
    # Zero-filled 4 KiB leaves repeat: a gateway that sends each block once (dups=n) still gives
    # every span its bytes, from the copies kept while the span is read.
    data = bytes(40 << 10) + bytes(range(256)) * 64 + bytes(12 << 10)
    blocks = dict(import_file([data], chunk_size=4096, max_links=4))
    root = list(blocks)[-1]
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with gateways(IpfsGateway(blocks, once=once)) as (gw,):
        async with httpx.AsyncClient() as client:
            gws = Gateways([gw.url], client)
            images = NerdctlImages(ChunkStore(tmp_path / "cache"), gws, chunk_size=16 << 10)
            bmap = await images.blob_map(FileBlob(len(data), root), digest)
            assert bmap.checked and bmap.chunk_size == 4096 and len(set(bmap.chunks)) < len(bmap.chunks)
            for start, end in [(0, len(data)), (4096, 45056), (len(data) - 8192, len(data))]:
                got = b"".join([p async for p in gws.sources[0].read_span(bmap, start, end - start)])
                assert got == data[start:end], (start, end)
            assert gws.sources[0].gateway.offers_car


def test_which_layouts_are_chunks() -> None:
    digest = "sha256:" + "0" * 64

    def raw(*sizes: int) -> list[Piece]:
        pieces, at = [], 0
        for i, size in enumerate(sizes):
            pieces.append(Piece(Cid.of_raw(bytes([i])), at, size))
            at += size
        return pieces

    assert checked_map(digest, 100, raw(100)) == BlobMap(digest, 100, 4096, (Cid.of_raw(b"\0"),))
    assert checked_map(digest, 300 << 10, raw(300 << 10)).chunk_size == 512 << 10  # type: ignore[union-attr]
    assert checked_map(digest, 20000, raw(8192, 8192, 3616)).chunk_size == 8192  # type: ignore[union-attr]
    assert checked_map(digest, 0, []) == BlobMap(digest, 0, 4096, ())
    assert checked_map(digest, 9000, raw(3000, 3000, 3000)) is None  # not a power of two
    assert checked_map(digest, 12288, raw(8192, 4096)) is not None  # a shorter last leaf
    assert checked_map(digest, 12288, raw(4096, 8192)) is None  # a longer last leaf
    assert checked_map(digest, 6144, raw(2048, 2048, 2048)) is None  # below 4 KiB
    inline = [Piece(Cid.of_dag_pb(b"x"), 0, 8192, inline=True)]
    assert checked_map(digest, 8192, inline) is None
