"""The local content-addressed cache under `$P2PIMG_HOME/cache`.

Rule 1: nothing unverified is ever visible. Chunks are checked against their CID before they are
written; a whole blob becomes visible under `blobs/` only after its sha256 matched and it was
fsynced, by an atomic rename; blocks and tag records are checked, then written by rename.

Layout::

    blobs/sha256/<hex>           complete, verified blobs (served with sendfile)
    partial/sha256/<hex>.data    a blob being fetched: verified chunks at their offsets
    partial/sha256/<hex>.have    one byte per chunk, 1 = that chunk in .data is verified
    blocks/<cid>                 DAG-CBOR blocks and raw manifest blocks, verified
    tags/<name>/<tag>            last tag record seen from the origin
    tmp/                         staging for atomic renames (same file system)

Crash safety without an fsync per chunk: `.have` is only a claim. A process that opens a partial
blob re-verifies every claimed chunk before trusting it, so a crash that persisted a `.have` byte
but not its data costs one re-fetch, never a wrong byte. Two processes sharing a home may write
the same chunk at once: both write the same verified bytes at the same offset, and the final
rename is atomic, so either order leaves a consistent cache.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from p2pimg.content import dagcbor
from p2pimg.content.cid import DAG_CBOR, Cid, parse_digest
from p2pimg.content.model import BlobMap, TagRecord, check_name, check_tag
from p2pimg.errors import CacheError, P2pimgError, VerificationError

_READ_PIECE = 1 << 20


@contextlib.contextmanager
def _cache_io(what: str) -> Iterator[None]:
    """Turn OS errors from cache writes into one clear CacheError."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise CacheError(f"cache disk is full while writing {what}") from exc
        raise CacheError(f"cache write failed for {what}: {exc.strerror or exc}") from exc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_sha256_hex(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


class ChunkStore:
    """Content-addressed cache of blobs, chunks of partial blobs, blocks and tag records."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._blobs = root / "blobs" / "sha256"
        self._partial = root / "partial" / "sha256"
        self._blocks = root / "blocks"
        self._tags = root / "tags"
        self._tmp = root / "tmp"
        self._private = root / "private"
        for d in (self._blobs, self._partial, self._blocks, self._tags, self._tmp, self._private):
            d.mkdir(parents=True, exist_ok=True)

    # -- atomic writes -------------------------------------------------------------------

    def _write_atomic(self, dest: Path, data: bytes, what: str) -> None:
        with _cache_io(what):
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self._tmp, prefix="w-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, dest)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise

    def write_small(self, dest: Path, data: bytes) -> None:
        """An atomic write of a small file under the cache (caller builds `dest` from checked parts)."""
        try:
            inside = dest.relative_to(self.root).parts
        except ValueError:
            inside = ("..",)
        if not inside or ".." in inside:  # lexically below the root, and no step back up
            raise CacheError(f"refusing to write outside the cache: {dest}")
        self._write_atomic(dest, data, dest.name)

    # -- complete blobs ------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self._blobs / parse_digest(digest)

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def has_partial(self, digest: str) -> bool:
        """Whether part of the blob was fetched before (a fetch resumes from it)."""
        return (self._partial / f"{parse_digest(digest)}.have").is_file()

    def touch(self, digest: str, *, every: float = 60.0) -> None:
        """Record that a complete blob was just used (its times drive LRU eviction). Cheap: one
        stat, and a utime at most once per `every` seconds per blob; a missing blob is ignored."""
        path = self.blob_path(digest)
        with contextlib.suppress(OSError):
            st = os.stat(path)
            if time.time() - max(st.st_atime, st.st_mtime) >= every:
                os.utime(path)

    def remove_blob(self, digest: str) -> bool:
        """Drop a complete blob (an open reader keeps its descriptor); False if it was not there."""
        try:
            os.unlink(self.blob_path(digest))
        except FileNotFoundError:
            return False
        return True

    # -- private content -------------------------------------------------------------------

    def mark_private(self, sha256_hex: str) -> None:
        """Remember that content (a blob, a manifest, a blob map: by the sha-256 of its bytes) came
        with the user's upstream credentials: peers get it only when a swarm key guards them."""
        if not _is_sha256_hex(sha256_hex):
            raise ValueError(f"not a sha-256 hex digest: {sha256_hex[:80]!r}")
        path = self._private / sha256_hex
        if not path.exists():
            self._write_atomic(path, b"", "private mark")

    def is_private(self, sha256_hex: str) -> bool:
        return _is_sha256_hex(sha256_hex) and (self._private / sha256_hex).exists()

    # -- blocks ----------------------------------------------------------------------------

    def get_block(self, cid: Cid) -> bytes | None:
        """A cached block, re-checked against its CID (a damaged one is dropped)."""
        path = self._blocks / str(cid)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if not cid.matches(data):
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        return data

    def complete_blob_maps(self) -> Iterator[BlobMap]:
        """The blob maps among the cached blocks whose blobs are complete here (what a restarted
        node can serve chunk by chunk); blocks that do not parse as blob maps are skipped."""
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self._blocks):
                try:
                    cid = Cid.parse(entry.name)
                    if cid.codec != DAG_CBOR:
                        continue
                    data = self.get_block(cid)
                    bmap = BlobMap.from_node(dagcbor.decode_verified(data, cid)) if data else None
                except P2pimgError:
                    continue
                if bmap is not None and self.has_blob(bmap.digest):
                    yield bmap

    def put_block(self, cid: Cid, data: bytes) -> None:
        if not cid.matches(data):
            raise VerificationError(f"block does not match {cid}")
        path = self._blocks / str(cid)
        if not path.exists():
            self._write_atomic(path, data, f"block {cid}")

    # -- tag records -----------------------------------------------------------------------

    def _tag_path(self, name: str, tag: str) -> Path:
        return self._tags / check_name(name) / check_tag(tag)

    def get_tag_record(self, name: str, tag: str) -> TagRecord | None:
        try:
            return TagRecord.decode(self._tag_path(name, tag).read_bytes(), name=name, tag=tag)
        except FileNotFoundError:
            return None
        except Exception:  # a damaged record is as good as none: the origin has the truth
            return None

    def cached_tags(self, name: str) -> list[str]:
        """Tags of `name` whose records this cache has seen."""
        try:
            return sorted(p.name for p in (self._tags / check_name(name)).iterdir() if p.is_file())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def put_tag_record(self, record: TagRecord) -> None:
        current = self.get_tag_record(record.name, record.tag)
        if current is not None and current.seq >= record.seq:
            return  # never downgrade, and an unchanged record costs no write
        self._write_atomic(self._tag_path(record.name, record.tag), record.encode(), "tag record")

    # -- partial blobs ---------------------------------------------------------------------

    def open_partial(self, blob_map: BlobMap) -> PartialBlob:
        return PartialBlob(self, blob_map)


class PartialBlob:
    """A blob being assembled chunk by chunk; finalize() makes it a visible, verified blob.

    All methods block (disk I/O, hashing): call them from a worker thread in async code.
    """

    def __init__(self, store: ChunkStore, blob_map: BlobMap) -> None:
        self.store = store
        self.map = blob_map
        hexd = parse_digest(blob_map.digest)
        self.final_path = store._blobs / hexd
        self.data_path = store._partial / f"{hexd}.data"
        self.have_path = store._partial / f"{hexd}.have"
        self.have = bytearray(blob_map.count)
        self._data_fd = -1
        self._have_fd = -1
        if self.final_path.is_file():
            self.have = bytearray(b"\x01" * blob_map.count)
            self._data_fd = os.open(self.final_path, os.O_RDONLY)
            return
        with _cache_io(f"partial blob {blob_map.digest}"):
            self._data_fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT, 0o644)
            self._have_fd = os.open(self.have_path, os.O_RDWR | os.O_CREAT, 0o644)
            if os.fstat(self._data_fd).st_size != blob_map.size:
                os.ftruncate(self._data_fd, blob_map.size)
            if os.fstat(self._have_fd).st_size != blob_map.count:
                os.ftruncate(self._have_fd, blob_map.count)
        try:
            self._check_room()  # before re-hashing the claims of a blob that cannot fit anyway
        except CacheError:
            self.close()
            raise
        self._recover()

    def _check_room(self) -> None:
        """Refuse a blob the cache's file system cannot hold: the client gets a clear error
        before any byte is sent, instead of a body cut when the disk fills up. (Several fetches
        at once can still fill it mid-blob: write_chunk reports that as a CacheError too.)"""
        with _cache_io(f"partial blob {self.map.digest}"):
            # What the (sparse) data file holds already needs no more room.
            needed = self.map.size - os.fstat(self._data_fd).st_blocks * 512
            vfs = os.fstatvfs(self._data_fd)
        free = vfs.f_frsize * (vfs.f_bfree if os.geteuid() == 0 else vfs.f_bavail)
        if needed > free:
            raise CacheError(
                f"cache disk is full: blob {self.map.digest} needs {needed / 2**20:.1f} MiB "
                f"more, {free / 2**20:.1f} MiB free in {self.store.root}"
            )

    def _recover(self) -> None:
        """Trust a `.have` claim only after re-hashing the chunk it vouches for."""
        claimed = os.pread(self._have_fd, self.map.count, 0)
        if not self.map.checked:
            # Nothing can vouch for a chunk of an unchecked map but the whole digest, and who sent
            # it is not on disk: such a blob starts again.
            os.pwrite(self._have_fd, bytes(self.map.count), 0)
            return
        for i, flag in enumerate(claimed):
            if flag != 1:
                continue
            start, end = self.map.bounds(i)
            if self.map.chunks[i].matches(os.pread(self._data_fd, end - start, start)):
                self.have[i] = 1
            else:
                os.pwrite(self._have_fd, b"\x00", i)

    @property
    def fd(self) -> int:
        """A descriptor of the blob's data; valid across finalize() (same inode)."""
        return self._data_fd

    @property
    def complete(self) -> bool:
        return 0 not in self.have  # memchr: cheap enough to ask after every chunk

    def missing(self) -> list[int]:
        return [i for i, flag in enumerate(self.have) if not flag]

    def present_bytes(self) -> int:
        return sum(
            end - start for i in range(self.map.count) if self.have[i] for start, end in [self.map.bounds(i)]
        )

    def write_chunk(self, index: int, data: bytes | bytearray | memoryview) -> None:
        """Verify chunk `index` and record it; raises VerificationError on a mismatch."""
        start, end = self.map.bounds(index)
        if len(data) != end - start or (self.map.checked and not self.map.chunks[index].matches(data)):
            raise VerificationError(
                f"chunk {index} of {self.map.digest} does not match {self.map.chunks[index]}"
            )
        if self.have[index]:
            return
        with _cache_io(f"chunk {index} of {self.map.digest}"):
            # A write to a nearly full disk can be short, and only the next one fails (ENOSPC):
            # a chunk is claimed only once all of it is written.
            view, done = memoryview(data), 0
            while done < len(view):
                written = os.pwrite(self._data_fd, view[done:], start + done)
                if written <= 0:
                    raise OSError(errno.EIO, "the cache file system took no bytes of a write")
                done += written
            if self._have_fd >= 0:
                os.pwrite(self._have_fd, b"\x01", index)
        self.have[index] = 1

    def hash_into(self, h: hashlib._Hash | None, start: int, end: int, *, flush: bool = False) -> None:
        """Feed bytes [start, end) of the blob as on disk to `h` (None: nothing to hash); with
        `flush`, then push what is written of the file to the disk (so the final fsync has
        little left to wait for)."""
        offset = start
        while h is not None and offset < end:
            piece = os.pread(self._data_fd, min(_READ_PIECE, end - offset), offset)
            if not piece:
                raise CacheError(f"blob {self.map.digest} is shorter on disk than its size")
            h.update(piece)
            offset += len(piece)
        if flush:
            with _cache_io(f"blob {self.map.digest}"):
                os.fdatasync(self._data_fd)

    def finalize(self, hashed: str | None = None, *, vouched: bool = False) -> Path:
        """Check the whole blob's digest, then make it visible atomically. `hashed`: the digest
        of the bytes on disk as computed while they arrived (`hash_into`), else it is read back;
        `vouched` (a map a trusted root names, every chunk matched its CID): not checked again."""
        if self.final_path.is_file():
            self._remove_files()  # a stale partial left beside a finished blob
            return self.final_path
        if not self.complete:
            raise CacheError(f"blob {self.map.digest} is not complete")
        if hashed is None and not vouched:
            h = hashlib.sha256()
            self.hash_into(h, 0, self.map.size)
            hashed = "sha256:" + h.hexdigest()
        if not vouched and hashed != self.map.digest:
            if not self.map.checked:
                # Whose bytes were wrong is for the caller to find out (`chunk_hashes`, `reset`).
                raise VerificationError(f"the bytes received for {self.map.digest} do not match that digest")
            # Every chunk matched its CID, so the blob map itself lies about this digest.
            self.discard()
            raise VerificationError(f"chunks of {self.map.digest} do not add up to that digest")
        with _cache_io(f"blob {self.map.digest}"):
            os.fsync(self._data_fd)
            try:
                os.replace(self.data_path, self.final_path)
            except FileNotFoundError:
                # Another process sharing the home finalized the same blob first.
                if not self.final_path.is_file():
                    raise
            _fsync_dir(self.final_path.parent)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.have_path)
        return self.final_path

    def _remove_files(self) -> None:
        for p in (self.data_path, self.have_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)

    def chunk_hashes(self, indices: list[int]) -> dict[int, bytes]:
        """The sha256 of each chunk named, as it is on disk now."""
        hashes = {}
        for i in indices:
            start, end = self.map.bounds(i)
            hashes[i] = hashlib.sha256(os.pread(self._data_fd, end - start, start)).digest()
        return hashes

    def reset(self) -> None:
        """Forget every chunk, keeping the files (and so every descriptor of them) in place."""
        with _cache_io(f"partial blob {self.map.digest}"):
            if self._have_fd >= 0:
                os.pwrite(self._have_fd, bytes(self.map.count), 0)
        self.have = bytearray(self.map.count)

    def discard(self) -> None:
        """Forget every chunk of this partial blob."""
        self._remove_files()
        self.have = bytearray(self.map.count)

    def close(self) -> None:
        for fd in (self._data_fd, self._have_fd):
            if fd >= 0:
                os.close(fd)
        self._data_fd = self._have_fd = -1
