"""Managing the local cache: listing, size-limited LRU eviction, re-verification and pins.

Only p2pimg's own files under `$P2PIMG_HOME/cache` are counted or removed: regular files named
as the store names them in `blobs/sha256/`, `partial/sha256/`, `blocks/`, `tmp/`, `tags/` and
`pins/`. Anything else (a symlink, a stray file, the rest of the home) is neither counted nor
touched.

Eviction removes, least recently used first, complete blobs that are not pinned and not being
fetched, and partial blobs and staging files untouched for an hour (a fetch writes its partial
files as chunks arrive, so a partial that old belongs to no running fetch). Blocks, tags and pins
are small and never evicted. Removing a blob that a client is reading is safe: the reader keeps
its descriptor, and the next use fetches and verifies the blob again.

Pins: `pins/<root CID>` lists the digests of every blob of an image, one per line, written
atomically; pinned blobs are never evicted.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import trio

from p2pimg.content.cid import Cid, parse_digest
from p2pimg.content.model import parse_size
from p2pimg.errors import DigestInvalid, InvalidInput
from p2pimg.store.chunks import ChunkStore

log = logging.getLogger(__name__)

STALE_AFTER = 3600.0  # partial blobs and staging files untouched this long are abandoned
ENFORCE_EVERY = 30.0
_HEX = re.compile(r"[0-9a-f]{64}")
_PARTIAL = re.compile(r"([0-9a-f]{64})\.(data|have)")
_READ_PIECE = 1 << 20


@dataclass(frozen=True)
class BlobInfo:
    digest: str
    size: int
    last_used: float
    pinned: bool


@dataclass
class PartialInfo:
    digest: str
    size: int = 0  # blob size (the .data file's length)
    disk: int = 0  # bytes the partial's files take
    verified: int = 0  # bytes of chunks recorded as verified
    last_used: float = 0.0
    paths: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class OtherFile:
    path: Path
    size: int
    mtime: float


@dataclass
class CacheState:
    blobs: list[BlobInfo] = field(default_factory=list)
    partials: list[PartialInfo] = field(default_factory=list)
    blocks: list[OtherFile] = field(default_factory=list)
    tmp: list[OtherFile] = field(default_factory=list)
    meta: list[OtherFile] = field(default_factory=list)  # tags and pins

    @property
    def blob_bytes(self) -> int:
        return sum(b.size for b in self.blobs)

    @property
    def partial_bytes(self) -> int:
        return sum(p.disk for p in self.partials)

    @property
    def total(self) -> int:
        return (
            self.blob_bytes
            + self.partial_bytes
            + sum(f.size for f in self.blocks)
            + sum(f.size for f in self.tmp)
            + sum(f.size for f in self.meta)
        )


@dataclass(frozen=True)
class Removed:
    kind: str  # blob | partial | tmp | block
    name: str
    size: int


@dataclass
class GcResult:
    before: int
    after: int
    limit: int
    removed: list[Removed]

    @property
    def fits(self) -> bool:
        return self.after <= self.limit


def parse_limit(value: str) -> int:
    size = parse_size(value)
    if size < 0:
        raise InvalidInput(f"invalid size {value!r}: must not be negative")
    return size


def human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# -- scanning ------------------------------------------------------------------------------


def _files(directory: Path) -> Iterator[tuple[os.DirEntry[str], os.stat_result]]:
    """Regular files directly in `directory` (symlinks and subdirectories are not ours to count)."""
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # removed while we looked
        if stat.S_ISREG(st.st_mode):
            yield entry, st


def _last_used(st: os.stat_result) -> float:
    # atime when the file system keeps it (relatime still moves it forward past mtime), else mtime,
    # which ChunkStore.touch() sets on use.
    return max(st.st_atime, st.st_mtime)


_CID_NAME = re.compile(r"b[a-z2-7]{20,120}")


def _is_cid(name: str) -> bool:
    """A file name of the cache's own, a CID as it writes them (base32 CIDv1)? A pattern, not a
    parse: a scan looks at every block, and parsing each CID took most of a scan's time (2 s for
    10,000 blocks). Only what a scan counts depends on it; `verify` parses every name it checks."""
    return bool(_CID_NAME.fullmatch(name))


def _verified_bytes(size: int, have: bytes) -> int:
    """Bytes of the chunks a `.have` file records, derived without the blob map: the chunk size is
    the one power of two that cuts `size` bytes into `len(have)` chunks."""
    count = len(have)
    if count == 0 or size <= 0:
        return 0
    if count == 1:
        return size if have[0] == 1 else 0
    chunk = 1
    while (size + chunk - 1) // chunk > count:
        chunk <<= 1
    if (size + chunk - 1) // chunk != count:
        return 0  # not a layout the store writes
    done = sum(1 for flag in have if flag == 1) * chunk
    if have[-1] == 1:
        done -= count * chunk - size  # the last chunk is short
    return done


def pins(store: ChunkStore) -> dict[str, tuple[str, set[str]]]:
    """root CID -> (the ref it was pinned as, the digests it pins)."""
    found: dict[str, tuple[str, set[str]]] = {}
    for entry, _st in _files(store.root / "pins"):
        if not _is_cid(entry.name):
            continue
        try:
            text = Path(entry.path).read_text()
        except (OSError, UnicodeDecodeError):
            continue
        ref, digests = "", set()
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("# ref "):
                ref = line.removeprefix("# ref ")
            elif line and not line.startswith("#"):
                with contextlib.suppress(DigestInvalid):
                    digests.add("sha256:" + parse_digest(line))
        found[entry.name] = (ref, digests)
    return found


def pinned_digests(store: ChunkStore) -> set[str]:
    return set().union(*(digests for _ref, digests in pins(store).values()))


def scan(store: ChunkStore) -> CacheState:
    """Everything p2pimg keeps in a cache, with sizes and last use (blocking: run in a thread)."""
    state = CacheState()
    pinned = pinned_digests(store)
    for entry, st in _files(store.root / "blobs" / "sha256"):
        if _HEX.fullmatch(entry.name):
            digest = "sha256:" + entry.name
            state.blobs.append(BlobInfo(digest, st.st_size, _last_used(st), digest in pinned))
    partials: dict[str, PartialInfo] = {}
    for entry, st in _files(store.root / "partial" / "sha256"):
        m = _PARTIAL.fullmatch(entry.name)
        if m is None:
            continue
        info = partials.setdefault(m.group(1), PartialInfo("sha256:" + m.group(1)))
        info.paths.append(Path(entry.path))
        info.last_used = max(info.last_used, st.st_mtime)
        if m.group(2) == "data":
            info.size = st.st_size
            info.disk += min(st.st_size, st.st_blocks * 512)  # sparse until its chunks arrive
        else:
            info.disk += st.st_size
    for info in partials.values():
        with contextlib.suppress(OSError):
            have = (store.root / "partial" / "sha256" / f"{info.digest[7:]}.have").read_bytes()
            info.verified = _verified_bytes(info.size, have)
    state.partials = sorted(partials.values(), key=lambda p: p.digest)
    state.blocks = [
        OtherFile(Path(e.path), st.st_size, st.st_mtime)
        for e, st in _files(store.root / "blocks")
        if _is_cid(e.name)
    ]
    state.tmp = [OtherFile(Path(e.path), st.st_size, st.st_mtime) for e, st in _files(store.root / "tmp")]
    state.meta = [
        OtherFile(Path(e.path), st.st_size, st.st_mtime)
        for e, st in _files(store.root / "pins")
        if _is_cid(e.name)
    ]
    for dirpath, _dirs, _names in os.walk(store.root / "tags"):
        state.meta += [OtherFile(Path(e.path), st.st_size, st.st_mtime) for e, st in _files(Path(dirpath))]
    state.blobs.sort(key=lambda b: b.digest)
    return state


# -- eviction ------------------------------------------------------------------------------


def collect(
    store: ChunkStore,
    limit: int,
    *,
    state: CacheState | None = None,
    busy: Callable[[str], bool] = lambda _digest: False,
    now: float | None = None,
) -> GcResult:
    """Evict, least recently used first, until the cache fits `limit` bytes: unpinned complete
    blobs `busy` does not claim, and partial blobs and staging files untouched for an hour.

    No await inside: in a trio task, `busy` (an active fetch) is checked right before each unlink.
    """
    state = state if state is not None else scan(store)
    now = time.time() if now is None else now
    stale = now - STALE_AFTER
    candidates: list[tuple[float, Removed, Callable[[], bool]]] = []
    for blob in state.blobs:
        if not blob.pinned:
            candidates.append(
                (
                    blob.last_used,
                    Removed("blob", blob.digest, blob.size),
                    functools.partial(store.remove_blob, blob.digest),
                )
            )
    for partial in state.partials:
        if partial.last_used < stale:
            candidates.append(
                (
                    partial.last_used,
                    Removed("partial", partial.digest, partial.disk),
                    functools.partial(_unlink_all, partial.paths),
                )
            )
    for f in state.tmp:
        if f.mtime < stale:
            candidates.append(
                (f.mtime, Removed("tmp", f.path.name, f.size), functools.partial(_unlink_all, [f.path]))
            )
    candidates.sort(key=lambda c: c[0])
    total = before = state.total
    removed: list[Removed] = []
    for _used, item, remove in candidates:
        if total <= limit:
            break
        if item.kind in ("blob", "partial") and busy(item.name):
            continue
        if remove():
            removed.append(item)
            total -= item.size
    return GcResult(before, total, limit, removed)


def _unlink_all(paths: list[Path]) -> bool:
    gone = False
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            gone = True
    return gone


async def enforce_limit(
    store: ChunkStore,
    limit: int,
    busy: Callable[[str], bool],
    *,
    every: float = ENFORCE_EVERY,
    evicted: Callable[[Removed], object] = lambda _r: None,
) -> None:
    """Keep a running node's cache under `limit` bytes, checking every `every` seconds (forever);
    `evicted` hears of every file removed."""
    while True:
        try:
            state = await trio.to_thread.run_sync(scan, store)
            if state.total > limit:
                result = collect(store, limit, state=state, busy=busy)
                for item in result.removed:
                    evicted(item)
                for item in result.removed:
                    log.info("evicted %s %s (%d bytes)", item.kind, item.name, item.size)
                if result.removed:
                    log.warning(
                        "cache over its limit of %s: evicted %d files (%s); now %s",
                        human(limit),
                        len(result.removed),
                        human(sum(i.size for i in result.removed)),
                        human(result.after),
                    )
                if not result.fits:
                    log.warning(
                        "cache is %s, over its limit of %s: the rest is pinned, being fetched or metadata",
                        human(result.after),
                        human(limit),
                    )
        except OSError as exc:
            log.warning("cache size check failed: %s", exc)
        await trio.sleep(every)


# -- verification --------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    flags = os.O_RDONLY | getattr(os, "O_NOATIME", 0)  # verifying is not a use
    try:
        fd = os.open(path, flags)
    except PermissionError:  # O_NOATIME needs the file's owner
        fd = os.open(path, os.O_RDONLY)
    h = hashlib.sha256()
    try:
        while piece := os.read(fd, _READ_PIECE):
            h.update(piece)
    finally:
        os.close(fd)
    return h.hexdigest()


def verify(store: ChunkStore, report: Callable[[Removed], None] = lambda _r: None) -> list[Removed]:
    """Re-hash every complete blob (sha256 = its name) and every block (its CID); remove what
    does not match and return it. A removed blob is fetched and verified again on next use."""
    removed: list[Removed] = []

    def drop(item: Removed, path: Path) -> None:
        if _unlink_all([path]):
            removed.append(item)
            report(item)

    for entry, st in _files(store.root / "blobs" / "sha256"):
        if _HEX.fullmatch(entry.name):
            try:
                ok = _sha256_file(Path(entry.path)) == entry.name
            except FileNotFoundError:
                continue
            if not ok:
                drop(Removed("blob", "sha256:" + entry.name, st.st_size), Path(entry.path))
    for entry, st in _files(store.root / "blocks"):
        try:
            cid = Cid.parse(entry.name)
        except Exception:  # DigestInvalid, or whatever the multiformats parser raises on a foreign name
            continue
        try:
            data = Path(entry.path).read_bytes()
        except FileNotFoundError:
            continue
        if not cid.matches(data):
            drop(Removed("block", entry.name, st.st_size), Path(entry.path))
    return removed
