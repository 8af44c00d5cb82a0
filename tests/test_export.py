"""`p2pimg export REF FILE.car`, run as a command: the CAR holds the image's whole DAG, each block
once and verified, rooted at the image's root CID; written atomically, or not at all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from _support import published_home

from p2pimg.content import dagcbor
from p2pimg.content.car import CarReader, iter_car, verify_block
from p2pimg.content.cid import Cid
from p2pimg.content.model import BlobMap, ImageRoot
from p2pimg.node.config import load_config
from p2pimg.node.node import open_node
from p2pimg.ops.publish import publish
from p2pimg.ops.sample import LayerSpec, SampleImage, write_oci_layout
from p2pimg.sources.origins import FileOrigin
from p2pimg.web.peerapi import PeerService
from p2pimg.web.registry import Registry
from p2pimg.web.serve import local_control
from p2pimg.web.server import serve_http


def run_cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pimg", *args, "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "P2PIMG_MDNS": "0"},
    )


async def cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return await trio.to_thread.run_sync(lambda: run_cli(*args, home=home))


def dag_blocks(home: Path, root: Cid, layout: Path) -> dict[Cid, bytes]:
    """Every block of the image's DAG, read from the origin and the layout it was published from."""
    blocks_dir = home / "origin" / "p2pimg" / "blocks"
    blocks = {root: (blocks_dir / str(root)).read_bytes()}
    image = ImageRoot.from_node(dagcbor.decode(blocks[root]))
    for entry in image.manifests.values():
        blocks[entry.cid] = (blocks_dir / str(entry.cid)).read_bytes()
    for digest, entry in image.blobs.items():
        blocks[entry.map] = (blocks_dir / str(entry.map)).read_bytes()
        bmap = BlobMap.from_node(dagcbor.decode(blocks[entry.map]))
        data = (layout / "blobs" / "sha256" / digest[7:]).read_bytes()
        for i, cid in enumerate(bmap.chunks):
            lo, hi = bmap.bounds(i)
            blocks[cid] = data[lo:hi]
    return blocks


def check_car(path: Path, root: Cid, expected: dict[Cid, bytes]) -> None:
    reader = CarReader()
    with path.open("rb") as f:
        got = list(iter_car(iter(lambda: f.read(100_000), b""), reader))
    assert reader.roots == (root,) and reader.version == 1
    for cid, data in got:
        verify_block(cid, data)
    cids = [cid for cid, _ in got]
    assert len(cids) == len(set(cids)), "a block is in the CAR twice"
    assert set(cids) == set(expected), "the CAR does not hold exactly the image's DAG"
    assert cids[0] == root


@pytest.mark.parametrize("by", ["tag", "cid"])
async def test_export_writes_the_whole_dag(tmp_path: Path, sample: SampleImage, by: str) -> None:
    home = tmp_path / "home"
    _origin, root = await published_home(home, sample)
    ref = "demo/app:1" if by == "tag" else f"ipfs/{root}"
    out = tmp_path / "image.car"
    result = await cli("export", ref, str(out), home=home)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(root)
    check_car(out, root, dag_blocks(home, root, sample.path))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
    # Again, from a warm cache, over the file it wrote: the same bytes.
    first = out.read_bytes()
    assert (await cli("export", ref, str(out), home=home)).returncode == 0
    assert out.read_bytes() == first


async def test_export_through_the_server_of_the_home(
    tmp_path: Path, sample: SampleImage, nursery: trio.Nursery
) -> None:
    """With a server running on the same home, the image is fetched through it (its warm job)."""
    home = tmp_path / "home"
    _origin, root = await published_home(home, sample)
    async with open_node(load_config(home=str(home), mdns=False)) as node:
        registry = Registry(node.store, node.resolver, node.fetcher, node.metrics, node.mirror)
        peers = PeerService.for_node(node)
        listeners = await node.nursery.start(serve_http, local_control(node, registry, peers), "127.0.0.1", 0)
        port = listeners[0].socket.getsockname()[1]
        (home / "serve.json").write_text(json.dumps({"pid": os.getpid(), "registry": f"127.0.0.1:{port}"}))
        out = tmp_path / "image.car"
        result = await cli("export", "demo/app:1", str(out), home=home)
        assert result.returncode == 0, result.stderr
        assert "through the server of this home" in result.stderr
        assert node.warm.jobs, "the server ran no warm job"
        check_car(out, root, dag_blocks(home, root, sample.path))
        node.nursery.cancel_scope.cancel()


async def test_a_failed_export_leaves_the_file_as_it_was(tmp_path: Path, sample: SampleImage) -> None:
    home = tmp_path / "home"
    origin, _root = await published_home(home, sample)
    out = tmp_path / "image.car"
    out.write_bytes(b"an older file")
    result = await cli("export", "demo/app:2", str(out), home=home)
    assert result.returncode == 3, result.stderr  # not found
    assert "demo/app:2" in result.stderr
    # Chunks over 2 MiB are blocks no IPFS node takes: refused, nothing written.
    big = write_oci_layout(tmp_path / "big", [LayerSpec(3 << 20, "none")], tag="1", seed=3)
    await publish(f"oci:{big.path}:1", "demo/big", "1", origin, chunk_size=4 << 20)
    result = await cli("export", "demo/big:1", str(out), home=home)
    assert result.returncode == 2 and "chunks of 4 MiB, over the block limit" in result.stderr, result.stderr
    assert out.read_bytes() == b"an older file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "home", "image.car"]
    result = await cli("export", "demo/app:1", str(tmp_path), home=home)  # a directory
    assert result.returncode == 2, result.stderr


async def test_export_of_a_missing_origin_object_fails_cleanly(tmp_path: Path, sample: SampleImage) -> None:
    home = tmp_path / "home"
    origin, root = await published_home(home, sample)
    assert isinstance(origin, FileOrigin)
    blobs = home / "origin" / "p2pimg" / "blobs" / "sha256"
    victim = max(blobs.iterdir(), key=lambda p: p.stat().st_size)
    victim.unlink()
    out = tmp_path / "image.car"
    result = await cli("export", f"ipfs/{root}", str(out), home=home)
    assert result.returncode != 0 and not out.exists(), result.stderr
