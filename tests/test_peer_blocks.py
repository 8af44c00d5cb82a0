"""`GET /p2pimg/v1/blocks/<cid>` on the peer listener: p2pimg's own blocks beyond the 2 MiB an IPFS
gateway may send (manifests up to 4 MiB, roots and blob maps up to 8 MiB), which a node asks its
peers for when its origin cannot give them (`Swarm.block`). In process, over HTTP on loopback:
the endpoint's answers, its rules (private content, the swarm key), and a pull with the origin
down of an image whose manifest is over 2 MiB, every block of it from a peer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from p2pimg.content import dagcbor
from p2pimg.content.cid import Cid
from p2pimg.content.model import ImageRoot
from p2pimg.node.config import load_config
from p2pimg.node.node import Node, open_node
from p2pimg.ops.publish import publish
from p2pimg.ops.sample import LayerSpec, write_oci_layout
from p2pimg.sources.origins import FileOrigin
from p2pimg.web.peerapi import PeerService
from p2pimg.web.registry import Registry
from p2pimg.web.server import serve_connection, serve_http

MIB = 1 << 20
RAW = "application/vnd.ipld.raw"


@dataclass(frozen=True)
class BigImage:
    layout: Path
    manifest: bytes  # over 2 MiB: a padding annotation

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.manifest).hexdigest()

    def blob(self, digest: str) -> bytes:
        return (self.layout / "blobs" / "sha256" / digest[7:]).read_bytes()

    def blobs(self) -> list[str]:
        doc = json.loads(self.manifest)
        return [d["digest"] for d in [doc["config"], *doc["layers"]]]


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> BigImage:
    layout = tmp_path_factory.mktemp("big") / "layout"
    write_oci_layout(layout, [LayerSpec(600 << 10, "none"), LayerSpec(100 << 10)], tag="1", seed=21)
    index = json.loads((layout / "index.json").read_bytes())
    entry = index["manifests"][0]
    manifest = json.loads((layout / "blobs" / "sha256" / entry["digest"][7:]).read_bytes())
    manifest["annotations"] = {"org.example.padding": "x" * (5 * MIB // 2)}
    data = json.dumps(manifest).encode()
    image = BigImage(layout, data)
    (layout / "blobs" / "sha256" / image.digest[7:]).write_bytes(data)
    entry.update(digest=image.digest, size=len(data))
    (layout / "index.json").write_text(json.dumps(index))
    return image


@dataclass
class Peer:
    node: Node
    url: str
    root: Cid
    client: httpx.AsyncClient


@contextlib.asynccontextmanager
async def peer_with(tmp: Path, image: BigImage, *, key: str | None = None) -> AsyncIterator[Peer]:
    """A node that published the image to its origin and warmed it, with its peer listener."""
    origin = FileOrigin(tmp / "origin")
    root = (await publish(f"oci:{image.layout}:1", "demo/big", "1", origin, chunk_size=64 << 10)).root
    home = tmp / "a"
    home.mkdir()
    if key is not None:
        (home / "swarm.key").write_text(key)
    async with open_node(load_config(home=str(home), origin=origin.root.as_uri(), mdns=False)) as node:
        job = node.warm.jobs[node.warm.start(f"ipfs/{root}")]
        with trio.fail_after(30):
            while job.state == "running":
                await trio.sleep(0.02)
        assert job.state == "done", job.error
        service = PeerService.for_node(node)
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        node.nursery.start_soon(
            trio.serve_listeners, serve_connection(service.handle, gate=service.gate), listeners
        )
        url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        async with httpx.AsyncClient(base_url=url, timeout=10, trust_env=False) as client:
            yield Peer(node, url, root, client)
        node.nursery.cancel_scope.cancel()


async def test_blocks_over_2_mib_are_served_on_their_own_path(tmp_path: Path, big: BigImage) -> None:
    async with peer_with(tmp_path, big) as a:
        manifest = Cid.from_digest(big.digest)
        r = await a.client.get(f"/ipfs/{manifest}?format=raw")
        assert r.status_code == 403, "the IPFS gateway sends no block over 2 MiB"
        r = await a.client.get(f"/p2pimg/v1/blocks/{manifest}")
        assert r.status_code == 200 and r.content == big.manifest
        assert r.headers["content-type"] == RAW and int(r.headers["content-length"]) == len(big.manifest)
        r = await a.client.head(f"/p2pimg/v1/blocks/{manifest}")
        assert r.status_code == 200 and int(r.headers["content-length"]) == len(big.manifest)
        # Every other block of the image too: its root, blob maps, chunks, small blobs whole.
        root = ImageRoot.from_node(dagcbor.decode(a.node.store.get_block(a.root) or b""))
        wanted = [a.root, *(e.map for e in root.blobs.values()), Cid.from_digest(big.blobs()[0])]
        for cid in wanted:
            r = await a.client.get(f"/p2pimg/v1/blocks/{cid}")
            assert r.status_code == 200 and cid.matches(r.content), cid
        absent = await a.client.get(f"/p2pimg/v1/blocks/{Cid.of_raw(b'absent')}")
        assert absent.status_code == 404
        assert (await a.client.get(f"/p2pimg/v1/blocks/{Cid.of_dag_pb(b'x')}")).status_code == 404
        assert (await a.client.get("/p2pimg/v1/blocks/notacid")).status_code == 400
        # Private content (fetched with upstream credentials) looks absent without a swarm key.
        a.node.store.mark_private(big.digest[7:])
        r = await a.client.get(f"/p2pimg/v1/blocks/{manifest}")
        assert (r.status_code, r.text.replace(str(manifest), "X")) == (
            404,
            absent.text.replace(str(Cid.of_raw(b"absent")), "X"),
        )


async def test_the_swarm_key_keeps_its_rule(tmp_path: Path, big: BigImage) -> None:
    async with peer_with(tmp_path, big, key=os.urandom(16).hex()) as a:
        r = await a.client.get(f"/p2pimg/v1/blocks/{a.root}")
        assert r.status_code == 401


@pytest.mark.parametrize("keyed", [False, True], ids=["open", "swarm-key"])
async def test_origin_down_pull_of_a_manifest_over_2_mib_from_a_peer(
    tmp_path: Path, big: BigImage, keyed: bool
) -> None:
    """B never saw the image and its origin has nothing: the root, the 2.5 MiB manifest, the blob
    maps and every chunk come from A, each checked against its CID."""
    key = os.urandom(16).hex() if keyed else None
    async with peer_with(tmp_path, big, key=key) as a:
        home = tmp_path / "b"
        home.mkdir()
        if key is not None:
            (home / "swarm.key").write_text(key)
        down = (tmp_path / "gone").as_uri()  # an origin without a single object
        config = load_config(home=str(home), origin=down, mdns=False, peers=[a.url])
        async with open_node(config) as b:
            registry = Registry(b.store, b.resolver, b.fetcher, b.metrics, b.mirror)
            listeners = await b.nursery.start(serve_http, registry.handle, "127.0.0.1", 0)
            port = listeners[0].socket.getsockname()[1]
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
                name = f"ipfs/{a.root}"
                with trio.fail_after(60):
                    r = await client.get(f"/v2/{name}/manifests/latest")
                    assert r.status_code == 200, r.text
                    assert r.content == big.manifest and r.headers["docker-content-digest"] == big.digest
                    for digest in big.blobs():
                        r = await client.get(f"/v2/{name}/blobs/{digest}")
                        assert r.status_code == 200 and r.content == big.blob(digest), r.text
            received = b.metrics.registry.get_sample_value
            total = sum(len(big.blob(d)) for d in big.blobs())
            assert received("p2pimg_source_bytes_total", {"source": "peer"}) == total
            assert not received("p2pimg_source_bytes_total", {"source": "origin"})
            b.nursery.cancel_scope.cancel()
