"""Offline generator of deterministic sample container images (OCI layouts and docker archives)."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import random
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

__all__ = ["LayerSpec", "SampleImage", "write_docker_archive", "write_oci_layout"]

# Every timestamp in generated images is pinned so that output is byte-identical across runs.
_EPOCH = 1_700_000_000
_CREATED = "2023-11-14T22:13:20Z"  # _EPOCH as RFC 3339
_CHUNK = 1 << 20
_FILE_MODE = 0o644
_REF_NAME = "org.opencontainers.image.ref.name"

_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

# media -> (index, manifest, config, layer for "none", layer for "gzip")
_MEDIA_TYPES: dict[str, tuple[str, str, str, str, str]] = {
    "oci": (_OCI_INDEX, _OCI_MANIFEST, _OCI_CONFIG, _OCI_LAYER, _OCI_LAYER_GZIP),
    "docker": (_DOCKER_LIST, _DOCKER_MANIFEST, _DOCKER_CONFIG, _DOCKER_LAYER, _DOCKER_LAYER_GZIP),
}


@dataclass(frozen=True)
class LayerSpec:
    """Shape of one generated layer: payload size, compression and file count."""

    size: int
    compression: str = "gzip"
    files: int = 1

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError(f"layer size must be >= 0, got {self.size}")
        if self.compression not in ("gzip", "none"):
            raise ValueError(f"compression must be 'gzip' or 'none', got {self.compression!r}")
        if self.files < 1:
            raise ValueError(f"a layer needs at least one payload file, got {self.files}")


@dataclass(frozen=True)
class SampleImage:
    """Where a sample image was written and which blobs it consists of."""

    path: Path
    top_digest: str
    blob_digests: list[str]
    total_bytes: int


@dataclass(frozen=True)
class _Blob:
    digest: str
    size: int


@dataclass(frozen=True)
class _Layer:
    blob: _Blob
    diff_id: str
    path: Path


@dataclass(frozen=True)
class _Platform:
    os: str
    architecture: str
    variant: str | None

    @classmethod
    def parse(cls, text: str) -> _Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"platform must look like os/arch[/variant], got {text!r}")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def as_dict(self) -> dict[str, str]:
        d = {"os": self.os, "architecture": self.architecture}
        if self.variant is not None:
            d["variant"] = self.variant
        return d


class _HashingSink(io.BufferedIOBase):
    """Write-only stream that hashes and counts what passes through to `out`."""

    def __init__(self, out: IO[bytes] | gzip.GzipFile) -> None:
        super().__init__()
        self._out = out
        self._hash = hashlib.sha256()
        self._count = 0

    def writable(self) -> bool:
        return True

    def write(self, b: ReadableBuffer, /) -> int:
        view = memoryview(b).cast("B")
        self._hash.update(view)
        self._out.write(view)
        self._count += view.nbytes
        return view.nbytes

    # tarfile asks for the position when it starts writing an archive.
    def tell(self) -> int:
        return self._count

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()

    @property
    def count(self) -> int:
        return self._count


class _RandomReader:
    """File-like source of `size` pseudo-random bytes, produced in 1 MiB pieces on demand."""

    def __init__(self, seed: int, size: int) -> None:
        self._rng = random.Random(seed)
        self._left = size
        self._buf = b""

    def read(self, n: int = -1, /) -> bytes:
        if n < 0:
            n = self._left
        n = min(n, self._left)
        # Always draw whole pieces so the bytes do not depend on how the caller sizes its reads.
        while len(self._buf) < n:
            self._buf += self._rng.randbytes(min(_CHUNK, self._left - len(self._buf)))
        out, self._buf = self._buf[:n], self._buf[n:]
        self._left -= n
        return out


def _derive_seed(*parts: object) -> int:
    """Stable 64-bit seed from arbitrary JSON-able parts (Python's hash() is salted per process)."""
    text = json.dumps(parts, separators=(",", ":")).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big")


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


def _tarinfo(name: str, size: int = 0, *, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = _EPOCH
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    if directory:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    else:
        info.mode = 0o644
    return info


def _write_layer_tar(sink: _HashingSink, spec: LayerSpec, seed: int, index: int) -> None:
    """Write the uncompressed layer tar for `spec` into `sink`."""
    top = f"data/layer-{index}"
    note = f"p2pimg sample layer {index}: {spec.size} bytes in {spec.files} file(s), seed {seed}\n"
    note_bytes = note.encode()
    base, extra = divmod(spec.size, spec.files)
    with tarfile.TarFile(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT, copybufsize=_CHUNK) as tar:
        tar.addfile(_tarinfo("data", directory=True))
        tar.addfile(_tarinfo(top, directory=True))
        tar.addfile(_tarinfo(f"{top}/README.txt", len(note_bytes)), io.BytesIO(note_bytes))
        for n in range(spec.files):
            size = base + (1 if n < extra else 0)
            reader = _RandomReader(_derive_seed(seed, index, n), size)
            tar.addfile(_tarinfo(f"{top}/file-{n}.bin", size), reader)


def _mkstemp(directory: Path) -> tuple[int, Path]:
    fd, name = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    # mkstemp creates 0600 files; blobs must be readable by whoever serves the layout.
    os.fchmod(fd, _FILE_MODE)
    return fd, Path(name)


@contextlib.contextmanager
def _temp_file(directory: Path) -> Iterator[tuple[Path, IO[bytes]]]:
    """Open a scratch file in `directory` and remove it unless the caller renamed it away."""
    fd, path = _mkstemp(directory)
    try:
        with os.fdopen(fd, "wb") as f:
            yield path, f
    finally:
        path.unlink(missing_ok=True)


def _produce_layer(directory: Path, spec: LayerSpec, seed: int, index: int) -> _Layer:
    """Stream one layer into a temp file in `directory`; return its digests and temp path."""
    fd, path = _mkstemp(directory)
    try:
        with os.fdopen(fd, "wb") as f:
            stored = _HashingSink(f)
            if spec.compression == "gzip":
                # filename="" and mtime=0 keep the gzip header free of run-specific data.
                with gzip.GzipFile(filename="", mode="wb", fileobj=stored, compresslevel=0, mtime=0) as gz:
                    raw = _HashingSink(gz)
                    _write_layer_tar(raw, spec, seed, index)
            else:
                raw = stored
                _write_layer_tar(raw, spec, seed, index)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return _Layer(_Blob(stored.digest, stored.count), raw.digest, path)


class _BlobStore:
    """blobs/sha256 directory of an OCI layout; remembers what this run wrote, in order."""

    def __init__(self, layout: Path) -> None:
        self.dir = layout / "blobs" / "sha256"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._written: dict[str, int] = {}

    def _record(self, blob: _Blob) -> None:
        self._written.setdefault(blob.digest, blob.size)

    def put_file(self, temp: Path, blob: _Blob) -> None:
        os.replace(temp, self.dir / blob.digest.removeprefix("sha256:"))
        self._record(blob)

    def put_bytes(self, data: bytes) -> _Blob:
        blob = _Blob("sha256:" + hashlib.sha256(data).hexdigest(), len(data))
        with _temp_file(self.dir) as (temp, f):
            f.write(data)
            f.close()
            self.put_file(temp, blob)
        return blob

    def put_layer(self, spec: LayerSpec, seed: int, index: int) -> _Layer:
        layer = _produce_layer(self.dir, spec, seed, index)
        self.put_file(layer.path, layer.blob)
        return layer

    @property
    def digests(self) -> list[str]:
        return list(self._written)

    @property
    def total_bytes(self) -> int:
        return sum(self._written.values())


def _config(platform: _Platform, layers: Sequence[_Layer]) -> dict[str, Any]:
    return {
        **platform.as_dict(),
        "created": _CREATED,
        "config": {
            "Cmd": ["/bin/sh"],
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        },
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [
            {"created": _CREATED, "created_by": f"p2pimg sample layer {i}"} for i in range(len(layers))
        ],
    }


def _descriptor(media_type: str, blob: _Blob) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": blob.digest, "size": blob.size}


def _read_existing_manifests(index_path: Path, tag: str) -> list[dict[str, Any]]:
    """Entries of an existing index.json other than `tag`, so several tags can share a layout."""
    try:
        existing = json.loads(index_path.read_bytes())
    except FileNotFoundError:
        return []
    manifests: list[dict[str, Any]] = existing.get("manifests", [])
    return [m for m in manifests if m.get("annotations", {}).get(_REF_NAME) != tag]


def _atomic_write(path: Path, data: bytes) -> None:
    with _temp_file(path.parent) as (temp, f):
        f.write(data)
        f.close()
        os.replace(temp, path)


def write_oci_layout(
    dest: Path,
    layers: Sequence[LayerSpec],
    *,
    tag: str = "latest",
    seed: int = 0,
    platforms: Sequence[str] = ("linux/amd64",),
    media: str = "oci",
) -> SampleImage:
    """Write a sample image into the OCI image layout at `dest` under `tag`.

    One platform yields an image manifest; several yield an image index (or a Docker manifest
    list with media="docker") with one manifest, config and layer set per platform. Entries
    for other tags already in `dest`'s index.json are kept.
    """
    if media not in _MEDIA_TYPES:
        raise ValueError(f"media must be 'oci' or 'docker', got {media!r}")
    if not platforms:
        raise ValueError("at least one platform is required")
    index_type, manifest_type, config_type, plain_type, gzip_type = _MEDIA_TYPES[media]
    parsed = [_Platform.parse(p) for p in platforms]

    dest = Path(dest)
    store = _BlobStore(dest)
    entries: list[dict[str, Any]] = []
    for text, platform in zip(platforms, parsed, strict=True):
        # The platform string is part of the seed so that every platform gets distinct layers.
        layer_seed = _derive_seed(seed, text)
        built = [store.put_layer(spec, layer_seed, i) for i, spec in enumerate(layers)]
        config = store.put_bytes(_json_bytes(_config(platform, built)))
        manifest = {
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": _descriptor(config_type, config),
            "layers": [
                _descriptor(gzip_type if spec.compression == "gzip" else plain_type, layer.blob)
                for spec, layer in zip(layers, built, strict=True)
            ],
        }
        blob = store.put_bytes(_json_bytes(manifest))
        entries.append({**_descriptor(manifest_type, blob), "platform": platform.as_dict()})

    if len(entries) == 1:
        top_type = manifest_type
        top = _Blob(entries[0]["digest"], entries[0]["size"])
    else:
        top_type = index_type
        top = store.put_bytes(
            _json_bytes({"schemaVersion": 2, "mediaType": index_type, "manifests": entries})
        )

    _atomic_write(dest / "oci-layout", _json_bytes({"imageLayoutVersion": "1.0.0"}))
    index_path = dest / "index.json"
    ref = {**_descriptor(top_type, top), "annotations": {_REF_NAME: tag}}
    index = {
        "schemaVersion": 2,
        "mediaType": _OCI_INDEX,
        "manifests": [*_read_existing_manifests(index_path, tag), ref],
    }
    _atomic_write(index_path, _json_bytes(index))
    return SampleImage(dest, top.digest, store.digests, store.total_bytes)


def _split_repo_tag(repo_tag: str) -> tuple[str, str]:
    repo, sep, tag = repo_tag.rpartition(":")
    # A colon before the last slash belongs to a registry port, not to a tag.
    if not sep or "/" in tag:
        return repo_tag, "latest"
    return repo, tag


def write_docker_archive(
    dest: Path,
    layers: Sequence[LayerSpec],
    *,
    repo_tag: str = "demo/app:1",
    seed: int = 0,
) -> SampleImage:
    """Write a `docker save`-style tarball of a linux/amd64 sample image to `dest`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    repo, tag = _split_repo_tag(repo_tag)
    layer_seed = _derive_seed(seed, "linux/amd64")
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".tmp-archive-") as scratch:
        # Layers are staged as files first because a tar member's size must precede its data.
        built = [_produce_layer(Path(scratch), spec, layer_seed, i) for i, spec in enumerate(layers)]
        config_bytes = _json_bytes(_config(_Platform("linux", "amd64", None), built))
        config = _Blob("sha256:" + hashlib.sha256(config_bytes).hexdigest(), len(config_bytes))
        config_name = config.digest.removeprefix("sha256:") + ".json"
        layer_dirs = [layer.blob.digest.removeprefix("sha256:") for layer in built]
        manifest = [
            {
                "Config": config_name,
                "RepoTags": [f"{repo}:{tag}"],
                "Layers": [f"{d}/layer.tar" for d in layer_dirs],
            }
        ]
        repositories = {repo: {tag: layer_dirs[-1]}} if layer_dirs else {}

        with _temp_file(dest.parent) as (temp, f):
            with tarfile.TarFile(fileobj=f, mode="w", format=tarfile.PAX_FORMAT, copybufsize=_CHUNK) as tar:
                seen: set[str] = set()
                for d, layer in zip(layer_dirs, built, strict=True):
                    if d in seen:
                        continue
                    seen.add(d)
                    tar.addfile(_tarinfo(d, directory=True))
                    with layer.path.open("rb") as src:
                        tar.addfile(_tarinfo(f"{d}/layer.tar", layer.blob.size), src)
                for name, data in (
                    (config_name, config_bytes),
                    ("manifest.json", _json_bytes(manifest)),
                    ("repositories", _json_bytes(repositories)),
                ):
                    tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
            f.close()
            os.replace(temp, dest)

    blobs = {config.digest: config.size}
    for layer in built:
        blobs.setdefault(layer.blob.digest, layer.blob.size)
    return SampleImage(dest, config.digest, list(blobs), sum(blobs.values()))
