"""The cache's promises: nothing unverified visible, claims re-checked after a crash, atomic blobs."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

from p2pimg.content.cid import Cid, digest_of
from p2pimg.content.model import BlobMap
from p2pimg.errors import VerificationError
from p2pimg.store.chunks import ChunkStore

CHUNK = 4096


def make_blob(size: int, seed: int = 1) -> tuple[bytes, BlobMap]:
    data = random.Random(seed).randbytes(size)
    chunks = tuple(Cid.of_raw(data[i : i + CHUNK]) for i in range(0, size, CHUNK))
    return data, BlobMap(digest_of(data), size, CHUNK, chunks)


def fill(store: ChunkStore, bmap: BlobMap, data: bytes, indices: range | list[int]) -> None:
    partial = store.open_partial(bmap)
    for i in indices:
        lo, hi = bmap.bounds(i)
        partial.write_chunk(i, data[lo:hi])
    partial.close()


def test_chunk_that_does_not_match_is_refused(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    data, bmap = make_blob(5 * CHUNK + 10)
    partial = store.open_partial(bmap)
    with pytest.raises(VerificationError):
        partial.write_chunk(1, b"\x00" * CHUNK)
    with pytest.raises(VerificationError):
        partial.write_chunk(5, data[5 * CHUNK : -1])  # short
    assert partial.missing() == list(range(6))
    assert os.pread(partial.fd, CHUNK, CHUNK) == b"\x00" * CHUNK  # nothing was written


def test_claims_are_reverified_after_a_crash(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    data, bmap = make_blob(8 * CHUNK)
    fill(store, bmap, data, range(0, 8, 2))
    hexd = bmap.digest[7:]
    # A crash lost chunk 2's data after its claim was written; a bit flipped in chunk 4.
    with open(tmp_path / "partial" / "sha256" / f"{hexd}.data", "r+b") as f:
        f.seek(2 * CHUNK)
        f.write(b"\x00" * CHUNK)
        f.seek(4 * CHUNK + 7)
        f.write(bytes([data[4 * CHUNK + 7] ^ 1]))
    # And a claim for chunk 5, whose data never arrived.
    with open(tmp_path / "partial" / "sha256" / f"{hexd}.have", "r+b") as f:
        f.seek(5)
        f.write(b"\x01")
    partial = ChunkStore(tmp_path).open_partial(bmap)
    assert partial.missing() == [1, 2, 3, 4, 5, 7]
    for i in partial.missing():
        lo, hi = bmap.bounds(i)
        partial.write_chunk(i, data[lo:hi])
    path = partial.finalize()
    assert path.read_bytes() == data and store.has_blob(bmap.digest)
    assert not (tmp_path / "partial" / "sha256" / f"{hexd}.data").exists()
    assert not (tmp_path / "partial" / "sha256" / f"{hexd}.have").exists()


def test_blob_invisible_until_complete_and_checked(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    data, bmap = make_blob(3 * CHUNK + 1)
    fill(store, bmap, data, [0, 1, 2])
    assert not store.has_blob(bmap.digest)
    partial = store.open_partial(bmap)
    with pytest.raises(Exception, match="not complete"):
        partial.finalize()
    assert not store.has_blob(bmap.digest)
    partial.write_chunk(3, data[-1:])
    partial.finalize()
    assert hashlib.sha256(store.blob_path(bmap.digest).read_bytes()).hexdigest() == bmap.digest[7:]


def test_lying_blob_map_never_becomes_visible(tmp_path: Path) -> None:
    """Chunks that each match their CIDs but do not add up to the blob map's digest."""
    store = ChunkStore(tmp_path)
    data, good = make_blob(2 * CHUNK)
    liar = BlobMap(digest_of(b"something else"), good.size, CHUNK, good.chunks)
    fill(store, liar, data, [0, 1])
    partial = store.open_partial(liar)
    with pytest.raises(VerificationError, match="do not add up"):
        partial.finalize()
    assert not store.has_blob(liar.digest)
    assert not list((tmp_path / "partial" / "sha256").iterdir())


def test_zero_length_blob(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    _, bmap = make_blob(0)
    assert bmap.count == 0
    store.open_partial(bmap).finalize()
    assert store.blob_path(bmap.digest).read_bytes() == b""


def test_two_stores_same_home_finalize_once(tmp_path: Path) -> None:
    data, bmap = make_blob(4 * CHUNK)
    a, b = ChunkStore(tmp_path).open_partial(bmap), ChunkStore(tmp_path).open_partial(bmap)
    for i in range(4):
        lo, hi = bmap.bounds(i)
        a.write_chunk(i, data[lo:hi])
        b.write_chunk(i, data[lo:hi])
    a.finalize()
    b.finalize()  # the other process finished first: not an error, same result
    assert ChunkStore(tmp_path).blob_path(bmap.digest).read_bytes() == data
    assert not list((tmp_path / "partial" / "sha256").iterdir())


def test_blocks_are_verified_both_ways(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    cid = Cid.of_raw(b"manifest bytes")
    with pytest.raises(VerificationError):
        store.put_block(cid, b"other bytes")
    store.put_block(cid, b"manifest bytes")
    assert store.get_block(cid) == b"manifest bytes"
    (tmp_path / "blocks" / str(cid)).write_bytes(b"rotted")
    assert store.get_block(cid) is None  # a damaged block is dropped, never returned
    assert not (tmp_path / "blocks" / str(cid)).exists()
