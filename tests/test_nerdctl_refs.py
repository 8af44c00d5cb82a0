"""Every command and action that takes a reference, given `ipfs/<CID>` of an image `nerdctl push
ipfs://` made: `warm` (and `--lan`), `cache pin`/`unpin`, the dashboard's warm, pin, unpin and
image list, and `export` (the image's own IPFS DAG, as nerdctl stored it, or a clear refusal).

The gateway is `_ipfs_gateway.IpfsGateway` serving the committed fixtures (tests/fixtures/nerdctl)
or an image pushed here with another chunking; commands run as processes, nodes in process.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from _ipfs_gateway import IpfsGateway
from _nerdctl_images import FIXTURES, NAMES, Image, fixture, pushed
from test_nerdctl_gateway import gateways, serving

from p2pimg.content.car import CarReader, iter_car, verify_block
from p2pimg.content.cid import Cid
from p2pimg.node.config import load_config
from p2pimg.node.node import Node
from p2pimg.node.warm import WarmProgress
from p2pimg.store.chunks import ChunkStore
from p2pimg.web.serve import serve


def run_cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pimg", *args, "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env={**os.environ, "P2PIMG_MDNS": "0"},
    )


async def cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return await trio.to_thread.run_sync(lambda: run_cli(*args, home=home))


def assert_cached(store: ChunkStore, image: Image) -> None:
    """Every blob whole and matching its digest, every manifest a block, byte for byte."""
    for digest in image.blobs():
        data = store.blob_path(digest).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
    for desc, data in image.manifests():
        assert store.get_block(Cid.from_digest(desc["digest"])) == data


def blob_bytes(image: Image) -> int:
    return sum(int(b["size"]) for b in image.blobs().values())


async def warmed(node: Node, ref: str) -> WarmProgress:
    job = node.warm.jobs[node.warm.start(ref)]
    with trio.fail_after(60):
        while job.state == "running":
            await trio.sleep(0.02)
    return job


# -- warm ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*NAMES, "odd"])
async def test_a_warm_job_fetches_every_manifest_and_blob(tmp_path: Path, name: str) -> None:
    # "odd": 3000-byte leaves under nodes of 5 links, a layout whose blobs are checked by digest.
    image = pushed(tmp_path, chunk_size=3000, max_links=5) if name == "odd" else fixture(name)
    with gateways(IpfsGateway(image.blocks)) as (gw,):
        async with serving(tmp_path / "home", [gw.url]) as it:
            job = await warmed(it.node, image.name)
            assert job.state == "done", job.error
            assert job.root == str(image.cid)
            assert job.blobs == job.done_blobs == len(image.blobs())
            assert job.bytes_total == job.bytes_done == blob_bytes(image)
            assert job.by_source.get("gateway", 0) > 0
            assert_cached(it.node.store, image)
            asked = len(gw.requests)
            again = await warmed(it.node, image.name)  # all there: nothing asked of anyone
            assert again.state == "done" and set(again.by_source) == {"cache"}
            assert len(gw.requests) == asked


async def test_a_raw_cid_that_names_no_image_fails_clearly(tmp_path: Path) -> None:
    image = fixture("single")
    with gateways(IpfsGateway(image.blocks)) as (gw,):
        async with serving(tmp_path / "home", [gw.url]) as it:
            job = await warmed(it.node, f"ipfs/{Cid.of_raw(b'never pushed')}")
            assert job.state == "failed" and job.exit_code == 3, job.error
            assert job.error is not None and "no image with CID" in job.error
            # A blob by its raw CID is a block, but not an image's descriptor.
            layer = next(iter(image.blobs()))
            job = await warmed(it.node, f"ipfs/{Cid.from_digest(layer)}")
            assert job.state == "failed" and "neither a p2pimg image root nor a nerdctl image" in str(
                job.error
            )


async def test_warm_pin_gc_and_unpin_from_the_command_line(tmp_path: Path) -> None:
    image = fixture("multi")
    home = tmp_path / "home"
    with gateways(IpfsGateway(image.blocks)) as (gw,):
        result = await cli("warm", image.name, "--ipfs-gateway", gw.url, "--no-mdns", home=home)
        assert result.returncode == 0, result.stderr
        assert f"this machine: warmed {image.name} ({image.cid}): {len(image.blobs())} blobs" in result.stdout
        assert "gateway" in result.stdout, result.stdout
        store = ChunkStore(home / "cache")
        assert_cached(store, image)
        asked = len(gw.requests)
        # Pinned from the cache: no gateway given, none asked.
        result = await cli("cache", "pin", image.name, home=home)
        assert result.returncode == 0, result.stderr
        assert f"pinned {image.name} ({image.cid}): {len(image.blobs())} blobs" in result.stderr
        assert len(gw.requests) == asked
    result = await cli("cache", "gc", "--max-size", "0", home=home)
    assert result.returncode == 0, result.stderr
    assert all(store.has_blob(d) for d in image.blobs()), "a pinned blob was evicted"
    listing = await cli("cache", "ls", home=home)
    assert listing.stdout.count("pinned") >= len(image.blobs())
    result = await cli("cache", "unpin", image.name, home=home)
    assert result.returncode == 0 and f"unpinned {image.name} ({image.cid})" in result.stderr
    result = await cli("cache", "gc", "--max-size", "0", home=home)
    assert result.returncode == 0 and not any(store.has_blob(d) for d in image.blobs())
    # Without a gateway and with nothing cached, the error says what is missing.
    result = await cli("warm", image.name, "--no-mdns", home=tmp_path / "bare")
    assert result.returncode != 0 and "no IPFS gateway is configured" in result.stderr, result.stderr


async def test_warm_lan_warms_the_peers_too(tmp_path: Path) -> None:
    image = fixture("single")
    with gateways(IpfsGateway(image.blocks)) as (gw,):
        async with serving(tmp_path / "b", [gw.url], peer_listener=True) as b:
            assert b.peer_url is not None
            home = tmp_path / "a"
            argv = ("warm", "--lan", image.name, "--ipfs-gateway", gw.url, "--peer", b.peer_url, "--no-mdns")
            result = await cli(*argv, home=home)
            assert result.returncode == 0, result.stderr
            assert f"peer {b.peer_url}: warmed {image.name}" in result.stdout, result.stdout
            assert_cached(ChunkStore(home / "cache"), image)
            assert_cached(b.node.store, image)


# -- the dashboard --------------------------------------------------------------------------------


async def test_the_dashboard_warms_pins_lists_and_unpins_it(tmp_path: Path, nursery: trio.Nursery) -> None:
    image = fixture("multi-amd64")
    with gateways(IpfsGateway(image.blocks)) as (gw,):
        config = load_config(
            home=str(tmp_path / "home"), listen="127.0.0.1:0", mdns=False, ipfs_gateways=[gw.url]
        )
        base = "http://" + await nursery.start(serve, config)
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            page = await client.get("/ui/")
            token = page.text.split('name="p2pimg-token" content="')[1].split('"')[0]

            async def post(path: str, ref: str) -> Any:
                sent = {"x-p2pimg-token": token}
                r = await client.post(path, json={"ref": ref}, headers=sent)
                assert r.status_code in (200, 202), r.text
                return r.json()

            job = (await post("/ui/api/warm", image.name))["id"]
            with trio.fail_after(60):
                while (status := (await client.get(f"/ui/api/warm/{job}")).json())["state"] == "running":
                    await trio.sleep(0.05)
            assert status["state"] == "done" and status["bytes"] == blob_bytes(image), status
            assert await post("/ui/api/pin", image.name) == {
                "root": str(image.cid),
                "blobs": len(image.blobs()),
            }
            listed = [
                i for i in (await client.get("/ui/api/images")).json()["images"] if i["name"] == image.name
            ]
            assert len(listed) == 1, listed
            assert {
                k: listed[0][k] for k in ("tag", "root", "kind", "pinned", "blobs", "size", "cached")
            } == {
                "tag": "latest",
                "root": str(image.cid),
                "kind": "cached",
                "pinned": True,
                "blobs": len(image.blobs()),
                "size": blob_bytes(image),
                "cached": blob_bytes(image),
            }
            assert await post("/ui/api/unpin", image.name) == {"roots": [str(image.cid)]}
            images = (await client.get("/ui/api/images")).json()["images"]
            assert image.name not in [i["name"] for i in images]  # only pinned ipfs/ refs are listed
    nursery.cancel_scope.cancel()


# -- export ---------------------------------------------------------------------------------------


def car_blocks(path: Path) -> tuple[tuple[Cid, ...], list[Cid]]:
    reader = CarReader()
    with path.open("rb") as f:
        got = list(iter_car(iter(lambda: f.read(100_000), b""), reader))
    for cid, data in got:
        verify_block(cid, data)
    return reader.roots, [cid for cid, _ in got]


@pytest.mark.parametrize("name", NAMES)
async def test_export_writes_the_dag_nerdctl_stored_from_the_cache(tmp_path: Path, name: str) -> None:
    image = fixture(name)
    home = tmp_path / "home"
    out = tmp_path / "image.car"
    with gateways(IpfsGateway(image.blocks)) as (gw,):
        result = await cli("warm", image.name, "--ipfs-gateway", gw.url, "--no-mdns", home=home)
        assert result.returncode == 0, result.stderr
        asked = len(gw.requests)
        # No gateway now: the cache holds every block of the image's DAG.
        result = await cli("export", image.name, str(out), "--no-mdns", home=home)
        assert result.returncode == 0, result.stderr
        assert len(gw.requests) == asked, "export asked the gateway"
    assert result.stdout.strip().splitlines()[-1] == str(image.cid)
    roots, cids = car_blocks(out)
    assert roots == (image.cid,) and cids[0] == image.cid
    assert len(cids) == len(set(cids)) and set(cids) == set(image.blocks)
    # Byte for byte the CAR of what nerdctl's push put into IPFS: the same blocks in the same order.
    assert out.read_bytes() == (FIXTURES / f"{name}.car").read_bytes()


async def test_export_without_warming_first_fetches_then_writes(tmp_path: Path) -> None:
    image = fixture("small-chunks")  # a three-level tree of 4 KiB leaves
    out = tmp_path / "image.car"
    with gateways(IpfsGateway(image.blocks)) as (gw,):
        argv = ("export", image.name, str(out), "--ipfs-gateway", gw.url, "--no-mdns")
        result = await cli(*argv, home=tmp_path / "home")
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == (FIXTURES / "small-chunks.car").read_bytes()


async def test_export_of_a_layout_whose_leaves_are_not_kept_is_refused(tmp_path: Path) -> None:
    image = pushed(tmp_path, chunk_size=3000, max_links=5)
    out = tmp_path / "image.car"
    out.write_bytes(b"an older file")
    with gateways(IpfsGateway(image.blocks)) as (gw,):
        argv = ("export", image.name, str(out), "--ipfs-gateway", gw.url, "--no-mdns")
        result = await cli(*argv, home=tmp_path / "home")
    assert result.returncode == 2, result.stderr
    assert "not raw blocks of one power-of-two size" in result.stderr, result.stderr
    assert "ipfs dag export" in result.stderr and "p2pimg publish docker://" in result.stderr
    assert out.read_bytes() == b"an older file"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # What it suggests instead works: publish it from the registry of a server, export that.
    with gateways(IpfsGateway(image.blocks)) as (gw,):
        async with serving(tmp_path / "server", [gw.url]) as it:
            host = it.client.base_url.netloc.decode()
            source = f"docker://{host}/{image.name}:latest"
            result = await cli("publish", source, "demo/odd:1", home=tmp_path / "other")
            assert result.returncode == 0, result.stderr
    result = await cli("export", "demo/odd:1", str(out), "--no-mdns", home=tmp_path / "other")
    assert result.returncode == 0, result.stderr
    roots, cids = car_blocks(out)
    assert roots == (Cid.parse(result.stdout.strip().splitlines()[-1]),) and len(cids) > len(image.blobs())
