"""The peer listener as an IPFS trustless gateway, over HTTP, in process: format negotiation, CAR
responses and their scopes, the headers the spec requires, and every status it answers.

A node with a published two-platform image warmed into its cache serves /ipfs/<cid> on its peer
listener; what it answers is checked against the image's own blocks, every block verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio
from _support import published_home
from hypothesis import given
from hypothesis import strategies as st

from p2pimg.content import dagcbor
from p2pimg.content.car import CarReader, encode_varint, read_cid, verify_block
from p2pimg.content.cid import DAG_PB, Cid
from p2pimg.content.model import BlobMap, ImageRoot
from p2pimg.node.config import load_config
from p2pimg.node.node import Node, open_node
from p2pimg.ops.sample import LayerSpec, SampleImage, write_oci_layout
from p2pimg.web.carwalk import chunk_span
from p2pimg.web.gateway import parse_cid_text
from p2pimg.web.peerapi import PeerService
from p2pimg.web.server import serve_http

RAW = "application/vnd.ipld.raw"
CAR = "application/vnd.ipld.car"
CAR_TYPE = "application/vnd.ipld.car; version=1; order=dfs; dups=n"
MIB = 1 << 20


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> SampleImage:
    """Two platforms (an index over two manifests); per platform a 2.5 MiB layer (a blob too
    large to be an IPFS block), a 300 KiB one and an empty one."""
    return write_oci_layout(
        tmp_path_factory.mktemp("gw") / "layout",
        [LayerSpec(5 * MIB // 2, "none"), LayerSpec(300 << 10, "none"), LayerSpec(0)],
        tag="1",
        seed=11,
        platforms=("linux/amd64", "linux/arm64"),
    )


@dataclass
class Dag:
    """The image's DAG as this node holds it: every block by CID, and the parts by kind."""

    root: Cid
    image: ImageRoot
    maps: dict[str, tuple[Cid, BlobMap]]  # blob digest -> (map CID, map)
    blocks: dict[Cid, bytes]

    def chunk(self, bmap: BlobMap, i: int) -> bytes:
        return self.blocks[bmap.chunks[i]]


@dataclass
class Gw:
    node: Node
    peers: PeerService
    client: httpx.AsyncClient
    dag: Dag

    async def get(self, path: str, **kw: object) -> httpx.Response:
        return await self.client.get(path, **kw)  # type: ignore[arg-type]


def dag_of(node: Node, root: Cid, layout: Path) -> Dag:
    def block(cid: Cid) -> bytes:
        data = node.store.get_block(cid)
        assert data is not None, cid
        return data

    image = ImageRoot.from_node(dagcbor.decode(block(root)))
    blocks = {root: block(root)}
    for entry in image.manifests.values():
        blocks[entry.cid] = block(entry.cid)
    maps = {}
    for digest, entry in image.blobs.items():
        bmap = BlobMap.from_node(dagcbor.decode(block(entry.map)))
        maps[digest] = (entry.map, bmap)
        blocks[entry.map] = block(entry.map)
        data = (layout / "blobs" / "sha256" / digest[7:]).read_bytes()
        for i, cid in enumerate(bmap.chunks):
            lo, hi = bmap.bounds(i)
            blocks[cid] = data[lo:hi]
    return Dag(root, image, maps, blocks)


@contextlib.asynccontextmanager
async def gateway(
    tmp_path: Path, image: SampleImage, *, warm: bool = True, key: str | None = None
) -> AsyncIterator[Gw]:
    home = tmp_path / "home"
    _origin, root = await published_home(home, image)
    if key is not None:
        (home / "swarm.key").write_text(key)
    async with open_node(load_config(home=str(home), mdns=False)) as node:
        if warm:
            job = node.warm.jobs[node.warm.start(f"ipfs/{root}")]
            with trio.fail_after(30):
                while job.state == "running":
                    await trio.sleep(0.02)
            assert job.state == "done", job.error
        peers = PeerService.for_node(node)
        listeners = await node.nursery.start(serve_http, peers.handle, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        async with httpx.AsyncClient(base_url=url, timeout=10, trust_env=False) as client:
            dag = dag_of(node, root, image.path) if warm else Dag(root, None, {}, {})  # type: ignore[arg-type]
            yield Gw(node, peers, client, dag)
        node.nursery.cancel_scope.cancel()


@pytest.fixture
async def gw(tmp_path: Path, image: SampleImage) -> AsyncIterator[Gw]:
    async with gateway(tmp_path, image) as g:
        yield g


def read_car(body: bytes) -> tuple[CarReader, list[tuple[Cid, bytes]]]:
    reader = CarReader()
    blocks = reader.feed(body)
    reader.close()
    for cid, data in blocks:
        verify_block(cid, data)
    return reader, blocks


def big_and_small(dag: Dag) -> tuple[str, str]:
    """The digest of a blob over 2 MiB and of one under it."""
    big = next(d for d, (_, m) in dag.maps.items() if m.size > 2 * MIB)
    small = next(d for d, (_, m) in dag.maps.items() if 0 < m.size < MIB)
    return big, small


def cid_text(version: int, codec: int, hash_code: int, digest: bytes) -> str:
    import base64

    binary = bytes([version]) + encode_varint(codec) + encode_varint(hash_code) + encode_varint(len(digest))
    return "b" + base64.b32encode(binary + digest).decode().lower().rstrip("=")


# -- blocks ------------------------------------------------------------------------------------------


async def test_every_block_of_the_dag_is_served_raw_and_verifies(gw: Gw) -> None:
    for cid, data in gw.dag.blocks.items():
        r = await gw.get(f"/ipfs/{cid}?format=raw", headers={"accept": RAW})
        assert r.status_code == 200, (cid, r.text)
        assert r.content == data and cid.matches(r.content)


async def test_raw_block_headers(gw: Gw) -> None:
    root = gw.dag.root
    for method in ("GET", "HEAD"):
        r = await gw.client.request(method, f"/ipfs/{root}", params={"format": "raw"})
        assert r.status_code == 200
        h = r.headers
        assert h["content-type"] == RAW
        assert h["cache-control"] == "public, max-age=29030400, immutable"
        assert h["content-disposition"] == f'attachment; filename="{root}.bin"'
        assert h["x-content-type-options"] == "nosniff"
        assert h["etag"] == f'"{root}.raw"'
        assert h["x-ipfs-path"] == f"/ipfs/{root}" and h["x-ipfs-roots"] == str(root)
        assert h["vary"] == "Accept"
        assert h["content-length"] == str(len(gw.dag.blocks[root]))
        assert "content-location" not in h  # the URL named its format
        assert r.content == (gw.dag.blocks[root] if method == "GET" else b"")


async def test_accept_alone_chooses_and_says_where(gw: Gw) -> None:
    root = gw.dag.root
    r = await gw.get(f"/ipfs/{root}", headers={"accept": RAW})
    assert r.status_code == 200 and r.headers["content-type"] == RAW
    assert r.headers["content-location"] == f"/ipfs/{root}?format=raw"
    r = await gw.get(f"/ipfs/{root}?dag-scope=block", headers={"accept": f"{CAR}; version=1"})
    assert r.headers["content-type"] == CAR_TYPE
    assert r.headers["content-location"] == f"/ipfs/{root}?dag-scope=block&format=car"


@pytest.mark.parametrize(
    "accept", [None, "*/*", "application/*", "text/html,application/xhtml+xml,*/*;q=0.8"]
)
async def test_no_preference_is_a_raw_block(gw: Gw, accept: str | None) -> None:
    """What p2pimg's own peers and browsers get (a strict gateway would say 400 without Accept)."""
    headers = {} if accept is None else {"accept": accept}
    r = await gw.get(f"/ipfs/{gw.dag.root}", headers=headers)
    assert r.status_code == 200 and r.headers["content-type"] == RAW
    assert r.content == gw.dag.blocks[gw.dag.root]


@pytest.mark.parametrize(
    ("accept", "query", "expected"),
    [
        (f"{CAR};version=2, {RAW};q=0.5", "", RAW),  # CARv2 not served: the next choice
        (f"{RAW};q=0.1, {CAR};q=0.9", "", CAR_TYPE),  # q-values rank
        (f"{CAR}; order=unk", "", CAR_TYPE),  # unknown order answered as dfs
        (f"{CAR}; dups=y", "", CAR_TYPE),  # dups=y answered as dups=n, declared
        (f"{CAR}; order=dfs; dups=n", "", CAR_TYPE),
        (RAW, "format=car", CAR_TYPE),  # format wins over Accept
        (CAR, "format=raw", RAW),
        (f"{CAR}; version=2", "format=car&car-version=1", CAR_TYPE),  # car-* wins over Accept
        ("application/vnd.ipld.dag-json", "format=raw", RAW),
    ],
)
async def test_negotiation(gw: Gw, accept: str, query: str, expected: str) -> None:
    r = await gw.get(f"/ipfs/{gw.dag.root}?{query}&dag-scope=block", headers={"accept": accept})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == expected


@pytest.mark.parametrize(
    ("accept", "query", "status"),
    [
        (None, "format=dag-json", 406),
        (None, "format=dag-cbor", 406),
        (None, "format=tar", 406),
        (None, "format=ipns-record", 406),
        (None, "format=json", 406),
        ("application/vnd.ipld.dag-json", "", 406),
        ("application/vnd.ipfs.ipns-record", "", 406),
        ("application/x-tar, text/html", "", 406),
        (f"{CAR}; version=2", "", 406),
        (f"{CAR}; order=random", "", 406),
        (f"{RAW}; q=0", "", 406),
        (None, "format=car&car-version=2", 406),
        (None, "format=car&car-order=bfs", 406),
        (None, "format=car&car-dups=maybe", 406),
        (None, "format=nonsense", 400),
        (None, "format=car&dag-scope=everything", 400),
        (None, "format=car&entity-bytes=5", 400),
        (None, "format=car&entity-bytes=a:b", 400),
        (None, "format=car&entity-bytes=9:3", 400),
    ],
)
async def test_what_cannot_be_given(gw: Gw, accept: str | None, query: str, status: int) -> None:
    headers = {} if accept is None else {"accept": accept}
    for method in ("GET", "HEAD"):
        r = await gw.client.request(method, f"/ipfs/{gw.dag.root}?{query}", headers=headers)
        assert r.status_code == status, (method, r.text)
        assert r.headers["content-type"].startswith("text/plain")
        if method == "GET":
            assert r.text.strip()


# -- CAR responses -----------------------------------------------------------------------------------


async def test_car_of_the_whole_image(gw: Gw) -> None:
    """dag-scope=all (the default): every block of the DAG once, verified, depth-first."""
    dag = gw.dag
    r = await gw.get(f"/ipfs/{dag.root}?format=car")
    assert r.status_code == 200
    h = r.headers
    assert h["content-type"] == CAR_TYPE
    assert h["content-disposition"] == f'attachment; filename="{dag.root}.car"'
    assert h["cache-control"] == "public, max-age=29030400, immutable"
    assert h["x-content-type-options"] == "nosniff" and h["vary"] == "Accept"
    assert h["etag"] == f'W/"{dag.root}.car.all.dfs.n"' and h["x-ipfs-path"] == f"/ipfs/{dag.root}"
    reader, blocks = read_car(r.content)
    assert reader.roots == (dag.root,) and reader.version == 1
    cids = [cid for cid, _ in blocks]
    assert len(cids) == len(set(cids)) == len(dag.blocks)  # each once (dups=n)
    assert dict(blocks) == dag.blocks
    # Depth-first: the root, then each blob map followed by its chunks, then the manifests.
    assert cids[0] == dag.root
    for map_cid, bmap in dag.maps.values():
        at = cids.index(map_cid)
        fresh = [c for c in dict.fromkeys(bmap.chunks) if cids.index(c) > at]
        assert cids[at + 1 : at + 1 + len(fresh)] == fresh
    head = await gw.client.head(f"/ipfs/{dag.root}?format=car")
    assert head.status_code == 200 and head.content == b"" and head.headers["content-type"] == CAR_TYPE


async def test_car_scopes(gw: Gw) -> None:
    dag = gw.dag
    big, _small = big_and_small(dag)
    map_cid, bmap = dag.maps[big]

    async def car(cid: Cid, query: str) -> list[Cid]:
        r = await gw.get(f"/ipfs/{cid}?format=car&{query}")
        assert r.status_code == 200, r.text
        reader, blocks = read_car(r.content)
        assert reader.roots == (cid,)
        assert all(data == dag.blocks[c] for c, data in blocks)
        return [c for c, _ in blocks]

    assert await car(dag.root, "dag-scope=block") == [dag.root]
    # The entity of an image root: its structure without its layer bytes.
    structure = [dag.root, *(m for m, _ in dag.maps.values()), *(e.cid for e in dag.image.manifests.values())]
    assert sorted(await car(dag.root, "dag-scope=entity"), key=str) == sorted(set(structure), key=str)
    # The entity of a blob map: the whole blob, like a UnixFS file.
    assert await car(map_cid, "dag-scope=entity") == [map_cid, *dict.fromkeys(bmap.chunks)]
    assert await car(map_cid, "dag-scope=all") == [map_cid, *dict.fromkeys(bmap.chunks)]
    assert await car(map_cid, "dag-scope=block") == [map_cid]
    # entity-bytes: the chunks holding those bytes (inclusive offsets, negative from the end).
    c = bmap.chunk_size
    assert await car(map_cid, f"entity-bytes={c}:{2 * c}") == [map_cid, bmap.chunks[1], bmap.chunks[2]]
    assert await car(map_cid, "entity-bytes=-1:*") == [map_cid, bmap.chunks[-1]]
    assert await car(map_cid, f"entity-bytes=0:{c - 1}") == [map_cid, bmap.chunks[0]]
    assert await car(map_cid, f"entity-bytes={bmap.size + 10}:*") == [map_cid]  # outside: the map
    # A raw block is its own entity, and all of its DAG.
    for scope in ("block", "entity", "all"):
        assert await car(bmap.chunks[3], f"dag-scope={scope}") == [bmap.chunks[3]]
    r = await gw.get(f"/ipfs/{map_cid}?format=car&dag-scope=entity&entity-bytes=0:9")
    assert r.headers["etag"] == f'W/"{map_cid}.car.entity.0-9.dfs.n"'


async def test_a_missing_block_cuts_the_car(gw: Gw) -> None:
    """The root is here (200), a blob further down is not: the stream stops there, cut short,
    so the client cannot take it for a whole CAR."""
    big, _small = big_and_small(gw.dag)
    assert gw.node.store.remove_blob(big)
    with pytest.raises(httpx.RemoteProtocolError):
        await gw.get(f"/ipfs/{gw.dag.root}?format=car")
    map_cid, bmap = gw.dag.maps[big]
    r = await gw.get(f"/ipfs/{map_cid}?format=car&dag-scope=block")  # the map alone is here
    assert r.status_code == 200 and read_car(r.content)[1] == [(map_cid, gw.dag.blocks[map_cid])]
    assert (await gw.get(f"/ipfs/{bmap.chunks[0]}?format=raw")).status_code == 404


# -- statuses ----------------------------------------------------------------------------------------


def well_formed_absent() -> dict[str, str]:
    d = hashlib.sha256(b"nothing here").digest()
    return {
        "raw": str(Cid.of_raw(b"nothing here")),
        "dag-cbor": str(Cid.of_dag_cbor(b"nothing here")),
        "dag-pb": str(Cid(DAG_PB, d)),
        "CIDv0": "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG",
        "sha2-512": cid_text(1, 0x55, 0x13, bytes(64)),
        "blake3": cid_text(1, 0x55, 0x1E, bytes(32)),
        "dag-json codec": cid_text(1, 0x0129, 0x12, d),
        "unknown codec": cid_text(1, 0x3FFF, 0x12, d),
        "base58btc CIDv1": "zb2rhe5P4gXftAwvA4eXQ5HJwsER2owDyS9sKaQRRVQPn93bA",
        "base16 CIDv1": "f01551220" + d.hex(),
    }


@pytest.mark.parametrize("kind", list(well_formed_absent()))
async def test_any_well_formed_cid_not_held_is_404(gw: Gw, kind: str) -> None:
    text = well_formed_absent()[kind]
    for query in ("format=raw", "format=car"):
        for method in ("GET", "HEAD"):
            r = await gw.client.request(method, f"/ipfs/{text}?{query}")
            assert r.status_code == 404, (kind, query, method, r.text)
    r = await gw.get(f"/ipfs/{text}?format=raw", headers={"cache-control": "only-if-cached"})
    assert r.status_code == 412


@pytest.mark.parametrize(
    "text",
    [
        "notacid",
        "bafy!!!",
        "b",
        "Qm" + "1" * 44,  # looks like a CIDv0, is not one
        "z" + "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG",  # a CIDv0 in multibase
        cid_text(2, 0x55, 0x12, bytes(32)),  # CIDv2 does not exist
        cid_text(1, 0x55, 0x12, bytes(32))[:-4],  # cut short
        "b" + "a" * 600,
        "bafkqaaa\u00e9",
    ],
)
async def test_a_malformed_cid_is_400(gw: Gw, text: str) -> None:
    r = await gw.get(f"/ipfs/{text}?format=raw")
    assert r.status_code == 400 and "invalid CID" in r.text
    assert r.headers["content-type"].startswith("text/plain")


async def test_the_identity_probe(gw: Gw) -> None:
    for method in ("GET", "HEAD"):
        r = await gw.client.request(method, "/ipfs/bafkqaaa", headers={"accept": RAW})
        assert r.status_code == 200 and r.content == b"" and r.headers["content-length"] == "0"
        r = await gw.client.request(method, "/ipfs/bafkqaaa?format=raw")
        assert r.status_code == 200 and r.content == b""
    r = await gw.get("/ipfs/bafkqaaa?format=car")
    assert r.status_code == 200 and r.headers["content-type"] == CAR_TYPE
    reader, blocks = read_car(r.content)
    assert reader.root_cids == (bytes([1, 0x55, 0, 0]),) and blocks == []
    # Any identity CID holds its data.
    hello = cid_text(1, 0x55, 0x00, b"hello")
    assert (await gw.get(f"/ipfs/{hello}?format=raw")).content == b"hello"


async def test_nothing_over_2_mib_is_a_block(gw: Gw) -> None:
    big, small = big_and_small(gw.dag)
    for query in ("format=raw", "format=car", "format=car&dag-scope=block"):
        for method in ("GET", "HEAD"):
            r = await gw.client.request(method, f"/ipfs/{Cid.from_digest(big)}?{query}")
            assert r.status_code == 403, (query, method)
    r = await gw.get(f"/ipfs/{Cid.from_digest(big)}")
    assert f"/p2pimg/v1/blobs/{big}" in r.text
    assert (await gw.get(f"/p2pimg/v1/blobs/{big}")).status_code == 200  # whole blobs stay there
    r = await gw.get(f"/ipfs/{Cid.from_digest(small)}?format=raw")  # a blob that fits is a block
    assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == small[7:]


async def test_conditional_requests_and_paths(gw: Gw) -> None:
    root = gw.dag.root
    r = await gw.get(f"/ipfs/{root}?format=raw", headers={"if-none-match": f'"{root}.raw"'})
    assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == f'"{root}.raw"'
    r = await gw.get(f"/ipfs/{root}?format=car", headers={"if-none-match": f'W/"{root}.car.all.dfs.n"'})
    assert r.status_code == 304
    r = await gw.get(f"/ipfs/{root}?format=raw", headers={"if-none-match": '"other"'})
    assert r.status_code == 200
    r = await gw.get(f"/ipfs/{root}?format=raw", headers={"cache-control": "only-if-cached"})
    assert r.status_code == 200  # held: answered
    assert (await gw.get(f"/ipfs/{root}/manifests?format=raw")).status_code == 400
    assert (await gw.get(f"/ipfs/{root}/manifests?format=car")).status_code == 501
    assert (await gw.get("/ipfs/")).status_code == 400


async def test_private_content_looks_absent_without_a_swarm_key(gw: Gw) -> None:
    big, small = big_and_small(gw.dag)
    map_cid, bmap = gw.dag.maps[small]
    gw.node.store.mark_private(small[7:])
    absent = await gw.get(f"/ipfs/{Cid.of_raw(b'absent')}?format=raw")
    for cid in (Cid.from_digest(small), bmap.chunks[0]):
        r = await gw.get(f"/ipfs/{cid}?format=raw")
        assert (r.status_code, r.text.replace(str(cid), "X")) == (
            404,
            absent.text.replace(str(Cid.of_raw(b"absent")), "X"),
        )
    with pytest.raises(httpx.RemoteProtocolError):  # its chunks are not shown inside a CAR either
        await gw.get(f"/ipfs/{map_cid}?format=car")


async def test_the_swarm_key_keeps_its_rule(tmp_path: Path, image: SampleImage) -> None:
    """With a key, /ipfs/ answers only requests that prove it, the probe included."""
    async with gateway(tmp_path, image, warm=False, key=os.urandom(16).hex()) as g:
        for path in ("/ipfs/bafkqaaa", f"/ipfs/{g.dag.root}?format=car"):
            assert (await g.get(path)).status_code == 401


async def test_a_unixfs_file_held_here_is_walked_by_its_links(gw: Gw) -> None:
    """dag-pb blocks (UnixFS files other IPFS software added) are walked too: a file's CAR, for
    `all` and for `entity` alike, is its root and every block below it, each once."""
    from p2pimg.content.unixfs import import_file

    data = bytes(range(256)) * 200 + os.urandom(30_000)  # repeated chunks: sent once (dups=n)
    blocks = list(import_file([data], chunk_size=4096, max_links=4))
    root = blocks[-1][0]
    assert root.codec == DAG_PB
    for cid, block in blocks:
        gw.node.store.put_block(cid, block)
    distinct = dict(blocks)
    for scope in ("all", "entity"):
        r = await gw.get(f"/ipfs/{root}?format=car&dag-scope={scope}")
        assert r.status_code == 200
        reader, got = read_car(r.content)
        assert reader.roots == (root,) and got[0][0] == root
        assert dict(got) == distinct and len(got) == len(distinct)
    r = await gw.get(f"/ipfs/{root}?format=car&dag-scope=block")
    assert [c for c, _ in read_car(r.content)[1]] == [root]
    r = await gw.get(f"/ipfs/{root}?format=raw")
    assert r.status_code == 200 and r.content == distinct[root]


async def test_entity_bytes_of_a_unixfs_file_are_the_blocks_that_prove_them(gw: Gw) -> None:
    """`entity-bytes` on a UnixFS file: the root, the nodes on the way down and the leaves holding
    the range, nothing else (the spec's minimal set), each block once; the range's bytes can be
    read from them, also when a subtree repeats and each occurrence holds another part of it."""
    from p2pimg.content.unixfs import FileLeaf, FileNode, expand_file, import_file

    pattern = os.urandom(16 << 10)  # four distinct leaves, twice: the same subtree twice
    data = pattern * 2 + bytes(40 << 10) + os.urandom(9000)
    blocks = dict(import_file([data], chunk_size=4096, max_links=4))
    root, size = list(blocks)[-1], len(data)
    for cid, block in blocks.items():
        gw.node.store.put_block(cid, block)

    def walk(have: dict[Cid, bytes], first: int, last: int) -> tuple[set[Cid], bytes]:
        """The blocks a client needs for bytes [first, last] and those bytes, read from `have`."""
        needed, parts = {root}, []

        def visit(node: FileNode) -> None:
            for child in expand_file(node, have[node.cid]):
                if child.offset > last or child.offset + (child.size or 0) <= first:
                    continue
                if isinstance(child, FileNode):
                    needed.add(child.cid)
                    visit(child)
                elif isinstance(child, FileLeaf):
                    needed.add(child.cid)
                    parts.append((child.offset, have[child.cid] if child.inline is None else child.inline))

        visit(FileNode(root, 0, size))
        joined = b"".join(p for _, p in parts)
        return needed, joined[first - parts[0][0] : last + 1 - parts[0][0]]

    ranges = {
        "0:0": (0, 0),
        f"{8192}:{4096 * 5 + 10}": (8192, 4096 * 5 + 10),  # the end of one copy, the start of the next
        "20000:60000": (20000, 60000),
        "-1:*": (size - 1, size - 1),
        "499:-1000": (499, size - 1000),
        "-20000:-5000": (size - 20000, size - 5000),
        "0:*": (0, size - 1),
    }
    for text, (first, last) in ranges.items():
        r = await gw.get(f"/ipfs/{root}?format=car&dag-scope=entity&entity-bytes={text}")
        assert r.status_code == 200 and r.headers["etag"].startswith(f'W/"{root}.car.entity.')
        reader, got = read_car(r.content)
        cids = [c for c, _ in got]
        assert cids[0] == root and len(cids) == len(set(cids)), text
        needed, _ = walk(blocks, first, last)
        assert set(cids) == needed, text
        assert walk(dict(got), first, last)[1] == data[first : last + 1], text
    # None of the file's bytes: the root alone (the spec's dag-scope=block equivalent).
    r = await gw.get(f"/ipfs/{root}?format=car&entity-bytes={size + 10}:*")
    assert [c for c, _ in read_car(r.content)[1]] == [root]


async def test_a_subtree_linked_thousands_of_times_is_walked_once_per_range_end(gw: Gw) -> None:
    """A 16 MiB file of three blocks (root -> 4096 x node -> 4096 x the same 1-byte leaf): a range
    across it is those three blocks, found without expanding the node once per link."""
    from p2pimg.content.unixfs import DataType, PbLink, PbNode, UnixfsData, encode_pb_node, encode_unixfs

    def node(child: Cid, size: int, n: int) -> tuple[Cid, bytes]:
        fs = UnixfsData(DataType.FILE, None, size * n, (size,) * n)
        block = encode_pb_node(PbNode((PbLink(child, "", size),) * n, encode_unixfs(fs)))
        return Cid.of_dag_pb(block), block

    leaf = Cid.of_raw(b"x")
    middle, middle_block = node(leaf, 1, 4096)
    root, root_block = node(middle, 4096, 4096)
    for cid, block in ((leaf, b"x"), (middle, middle_block), (root, root_block)):
        gw.node.store.put_block(cid, block)
    with trio.fail_after(10):
        r = await gw.get(f"/ipfs/{root}?format=car&entity-bytes=1000:-1000")
    assert [c for c, _ in read_car(r.content)[1]] == [root, middle, leaf]


# -- the pure parts, over any input ------------------------------------------------------------------


@given(st.text(max_size=120) | st.binary(max_size=80).map(lambda b: "b" + b.hex()))
def test_any_text_is_a_cid_or_a_400(text: str) -> None:
    try:
        parts, binary = parse_cid_text(text)
    except Exception as exc:
        assert getattr(exc, "status", None) == 400, repr(exc)
    else:
        assert read_cid(binary, 0, len(binary))[0] == parts


@given(
    st.integers(min_value=0, max_value=1 << 24),
    st.sampled_from([4096, 65536, 1 << 20]),
    st.integers(min_value=-(1 << 25), max_value=1 << 25),
    st.none() | st.integers(min_value=-(1 << 25), max_value=1 << 25),
)
def test_entity_bytes_select_the_chunks_holding_the_range(
    size: int, chunk: int, start: int, end: int | None
) -> None:
    count = -(-size // chunk)
    bmap = BlobMap(
        "sha256:" + "ab" * 32, size, chunk, tuple(Cid.of_raw(bytes([i % 256, i >> 8])) for i in range(count))
    )
    first = max(0, size + start if start < 0 else start)
    last = size - 1 if end is None else min(size - 1, size + end if end < 0 else end)
    wanted = {
        i for i in range(count) if first <= last and bmap.bounds(i)[0] <= last and bmap.bounds(i)[1] > first
    }
    assert set(chunk_span(bmap, (start, end))) == wanted
    assert list(chunk_span(bmap, None)) == list(range(count))
