"""`p2pimg cache ls|gc|verify|pin|unpin`, `warm --pin` and the size enforcer of a running node."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from _support import CHUNK, Node, wait_cached

from p2pimg.content.cid import Cid
from p2pimg.content.model import ImageRoot
from p2pimg.errors import InvalidInput
from p2pimg.fetch.resolver import Resolver
from p2pimg.node.config import load_config
from p2pimg.node.node import open_node
from p2pimg.store import cache
from p2pimg.store.chunks import ChunkStore

HOUR = 3600.0


def run_cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pimg", *args, "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "P2PIMG_MDNS": "0"},
    )


async def cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return await trio.to_thread.run_sync(lambda: run_cli(*args, home=home))


async def image(node: Node) -> tuple[Resolver, ImageRoot]:
    resolver = Resolver(node.store, node.origin)
    return resolver, await resolver.root(node.root)


async def pull(node: Node, digests: list[str]) -> None:
    for digest in digests:
        r = await node.client.get(f"/v2/demo/app/blobs/{digest}")
        assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == digest[7:]
        await wait_cached(node.store, digest)


def set_used(store: ChunkStore, digest: str, when: float) -> None:
    os.utime(store.blob_path(digest), (when, when))


async def test_ls_shows_blobs_partials_and_totals(node: Node) -> None:
    resolver, root = await image(node)
    big = max(root.blobs, key=lambda d: root.blobs[d].size)
    others = [d for d in root.blobs if d != big]
    await pull(node, others)
    bmap = await resolver.blob_map(root.blobs[big], big)
    assert bmap.count >= 3 and bmap.chunk_size == CHUNK
    partial = node.store.open_partial(bmap)
    data = (node.origin.root / "p2pimg" / "blobs" / "sha256" / big[7:]).read_bytes()
    for i in (0, bmap.count - 1):  # the first chunk, and the short last one
        start, end = bmap.bounds(i)
        partial.write_chunk(i, data[start:end])
    partial.close()
    verified = CHUNK + (bmap.size - bmap.bounds(bmap.count - 1)[0])

    r = await cli("cache", "ls", home=node.home)
    assert r.returncode == 0, r.stderr
    assert f"complete blobs: {len(others)}" in r.stdout
    for d in others:
        line = next(line for line in r.stdout.splitlines() if d in line)
        assert str(root.blobs[d].size) in line and line.rstrip().endswith("-")  # not pinned
    assert f"{big}  verified {verified} of {bmap.size} bytes" in r.stdout
    state = cache.scan(node.store)
    assert state.blob_bytes == sum(root.blobs[d].size for d in others)
    assert f"total: {state.total} bytes" in r.stdout


async def test_gc_evicts_lru_unpinned_and_counts_only_cache_files(node: Node) -> None:
    resolver, root = await image(node)
    digests = sorted(root.blobs, key=lambda d: root.blobs[d].size, reverse=True)
    assert len(digests) >= 3
    await pull(node, digests)
    store, now = node.store, time.time()
    # LRU order: digests[0] (pinned) oldest, then digests[1], then the rest, newest last.
    for age, d in enumerate(digests):
        set_used(store, d, now - 10 * HOUR + age * 60)
    pinned = digests[0]
    (store.root / "pins").mkdir(exist_ok=True)
    (store.root / "pins" / str(node.root)).write_text(f"# ref demo/app:1\n{pinned}\n")
    # Not p2pimg's: a big file in the home, a stray file and a symlink in the cache.
    unrelated = node.home / "big-unrelated.bin"
    unrelated.write_bytes(os.urandom(4 << 20))
    stray = store.root / "blobs" / "sha256" / "notes.txt"
    stray.write_text("keep me")
    (store.root / "blocks" / "link").symlink_to(unrelated)
    # Abandoned leftovers, and a fresh partial that may belong to a running fetch.
    stale_tmp = store.root / "tmp" / "w-stale"
    stale_tmp.write_bytes(b"x" * 1000)
    os.utime(stale_tmp, (now - 20 * HOUR, now - 20 * HOUR))  # older than every blob
    fresh = store.root / "partial" / "sha256" / f"{'ab' * 32}.data"
    fresh.write_bytes(b"y" * 5000)

    state = cache.scan(store)
    assert state.total < 4 << 20  # the unrelated file is not counted
    assert state.blob_bytes == sum(root.blobs[d].size for d in digests)
    # Room for everything but digests[1] (the oldest unpinned blob) and the stale tmp file.
    limit = state.total - root.blobs[digests[1]].size - 1000
    r = await cli("cache", "gc", "--max-size", str(limit), home=node.home)
    assert r.returncode == 0, r.stderr
    assert f"removed blob {digests[1]}" in r.stdout and "removed tmp w-stale" in r.stdout
    assert len(r.stdout.splitlines()) == 2
    assert not store.has_blob(digests[1]) and not stale_tmp.exists()
    assert all(store.has_blob(d) for d in digests if d != digests[1])
    assert unrelated.stat().st_size == 4 << 20 and stray.exists() and fresh.exists()

    r = await cli("cache", "gc", "--max-size", "0", home=node.home)
    assert r.returncode == 0, r.stderr
    assert store.has_blob(pinned) and fresh.exists() and stray.exists() and unrelated.exists()
    assert [d for d in digests if store.has_blob(d)] == [pinned]
    removed = [line.split()[2] for line in r.stdout.splitlines()]
    assert removed == digests[2:]  # least recently used first
    assert "pinned" in r.stderr


async def test_verify_removes_corrupt_blob_and_block_then_refetches(node: Node) -> None:
    resolver, root = await image(node)
    digest = max(root.blobs, key=lambda d: root.blobs[d].size)
    await pull(node, list(root.blobs))
    assert (await cli("cache", "verify", home=node.home)).returncode == 0
    path = node.store.blob_path(digest)
    with open(path, "r+b") as f:  # flip one bit in the middle
        f.seek(root.blobs[digest].size // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))
    block = node.store.root / "blocks" / str(root.blobs[digest].map)
    block.write_bytes(block.read_bytes() + b"\0")

    r = await cli("cache", "verify", home=node.home)
    assert r.returncode == 1
    assert f"removed corrupt blob {digest}" in r.stdout
    assert f"removed corrupt block {root.blobs[digest].map}" in r.stdout
    assert not path.exists() and not block.exists()
    assert (await cli("cache", "verify", home=node.home)).returncode == 0

    # The next pull (same running registry) fetches and verifies the blob again.
    r2 = await node.client.get(f"/v2/demo/app/blobs/{digest}")
    assert r2.status_code == 200 and hashlib.sha256(r2.content).hexdigest() == digest[7:]
    await wait_cached(node.store, digest)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest[7:]


async def test_pin_unpin_round_trip_and_errors(node: Node) -> None:
    _resolver, root = await image(node)
    pin_file = node.store.root / "pins" / str(node.root)
    r = await cli("cache", "pin", "demo/app:1", home=node.home)
    assert r.returncode == 0, r.stderr
    assert str(node.root) in r.stderr
    assert cache.pinned_digests(node.store) == set(root.blobs)
    assert not list((node.store.root / "tmp").iterdir())  # written by rename
    await pull(node, list(root.blobs))
    r = await cli("cache", "ls", home=node.home)
    assert r.stdout.count("pinned") == len(root.blobs) + 1  # every blob, and the total line
    r = await cli("cache", "gc", "--max-size", "0", home=node.home)
    assert r.returncode == 0 and r.stdout == ""
    assert (await cli("cache", "unpin", "demo/app:1", home=node.home)).returncode == 0
    assert not pin_file.exists()
    r = await cli("cache", "unpin", "demo/app:1", home=node.home)
    assert r.returncode == 3 and "is not pinned" in r.stderr

    assert (await cli("cache", "pin", f"ipfs/{node.root}", home=node.home)).returncode == 0
    assert pin_file.exists()
    assert (await cli("cache", "unpin", f"ipfs/{node.root}", home=node.home)).returncode == 0
    assert not pin_file.exists()

    r = await cli("cache", "pin", "demo/nope:1", home=node.home)
    assert r.returncode == 3 and r.stderr.startswith("p2pimg: error:"), r.stderr
    other = Cid.of_dag_cbor(b"\xa0")
    r = await cli("cache", "pin", f"ipfs/{other}", home=node.home)
    assert r.returncode == 3, r.stderr
    r = await cli("cache", "pin", "ipfs/not-a-cid", home=node.home)
    assert r.returncode == 2, r.stderr
    r = await cli("cache", "gc", "--max-size", "12Q", home=node.home)
    assert r.returncode == 2 and "invalid size" in r.stderr, r.stderr
    for bad in ("-5", "1.5G", ""):
        with pytest.raises(InvalidInput, match="invalid size"):
            cache.parse_limit(bad)
    r = await cli("serve", "--cache-max", "lots", home=node.home)
    assert r.returncode == 2 and "invalid size" in r.stderr


async def test_warm_pin(node: Node) -> None:
    _resolver, root = await image(node)
    r = await cli("warm", "--pin", "demo/app:1", home=node.home)
    assert r.returncode == 0, r.stderr
    assert all(node.store.has_blob(d) for d in root.blobs)
    assert cache.pins(node.store) == {str(node.root): ("demo/app:1", set(root.blobs))}


async def test_enforcer_spares_pinned_and_busy_blobs(node: Node) -> None:
    _resolver, root = await image(node)
    digests = sorted(root.blobs, key=lambda d: root.blobs[d].size, reverse=True)
    await pull(node, digests)
    pinned, busy = digests[0], digests[1]
    (node.store.root / "pins" / str(node.root)).parent.mkdir(exist_ok=True)
    (node.store.root / "pins" / str(node.root)).write_text(f"{pinned}\n")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: cache.enforce_limit(node.store, 0, lambda d: d == busy, every=0.05))
        with trio.fail_after(5):
            while any(node.store.has_blob(d) for d in digests[2:]):
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    assert node.store.has_blob(pinned) and node.store.has_blob(busy)


async def test_node_with_cache_max_enforces_it(node: Node) -> None:
    _resolver, root = await image(node)
    await pull(node, list(root.blobs))
    config = load_config(home=str(node.home), cache_max="0")
    assert config.cache_max == 0
    async with open_node(config):
        with trio.fail_after(5):
            while any(node.store.has_blob(d) for d in root.blobs):
                await trio.sleep(0.02)
