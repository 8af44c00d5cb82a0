"""Publish inputs: OCI image layouts and `docker save` archives, read as an image graph.

Every manifest and index is kept as its exact bytes (digests never change), and every other
blob as something that can be opened and streamed. Nothing here writes anywhere; nothing holds
a layer in memory.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

from p2pimg.content.cid import digest_of, parse_digest
from p2pimg.content.graph import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_MANIFEST,
    SourceBlob,
    SourceImage,
    descriptor,
    parse_json,
    walk_graph,
)
from p2pimg.content.model import MAX_MANIFEST_SIZE
from p2pimg.errors import SourceInvalid

_REF_ANNOTATION = "org.opencontainers.image.ref.name"
_MAX_INDEX_JSON = 4 << 20
_MAX_ARCHIVE_MANIFEST = 1 << 20


def read_oci_layout(spec: str) -> SourceImage:
    """`DIR[:TAG]`: an OCI image layout; the tag is the `ref.name` annotation in index.json."""
    path, tag = Path(spec), ""
    if not (path / "index.json").is_file() and ":" in spec:
        head, _, tag = spec.rpartition(":")
        path = Path(head)
    if not path.is_dir():
        raise SourceInvalid(f"OCI layout {str(path)!r} does not exist")
    if not (path / "oci-layout").is_file() or not (path / "index.json").is_file():
        raise SourceInvalid(f"{str(path)!r} is not an OCI image layout (no oci-layout/index.json)")
    raw = (path / "index.json").read_bytes()[: _MAX_INDEX_JSON + 1]
    if len(raw) > _MAX_INDEX_JSON:
        raise SourceInvalid("index.json is too large")
    index = parse_json(raw, "index.json")
    entries = index.get("manifests")
    if not isinstance(entries, list) or not entries:
        raise SourceInvalid(f"{str(path)!r}: index.json lists no images")
    if tag:
        chosen = [e for e in entries if isinstance(e, dict)
                  and (e.get("annotations") or {}).get(_REF_ANNOTATION) == tag]
        if not chosen:
            known = sorted({str((e.get("annotations") or {}).get(_REF_ANNOTATION))
                            for e in entries if isinstance(e, dict)} - {"None"})
            raise SourceInvalid(
                f"OCI layout has no image tagged {tag!r} (tags: {', '.join(known) or 'none'})")
    elif len(entries) == 1:
        chosen = entries
    else:
        raise SourceInvalid(f"OCI layout holds {len(entries)} images: name one as oci:DIR:TAG")
    top, _, media = descriptor(chosen[0], "index.json")
    blobs_dir = path / "blobs" / "sha256"

    def blob_path(digest: str, size: int) -> Path:
        p = blobs_dir / parse_digest(digest)
        if not p.is_file():
            raise SourceInvalid(f"OCI layout is missing blob {digest}")
        if size >= 0 and p.stat().st_size != size:
            raise SourceInvalid(f"blob {digest} has {p.stat().st_size} bytes, descriptor says {size}")
        return p

    def read_manifest(digest: str, size: int) -> bytes:
        p = blob_path(digest, size)
        if p.stat().st_size > MAX_MANIFEST_SIZE:
            raise SourceInvalid(f"manifest {digest} exceeds {MAX_MANIFEST_SIZE} bytes")
        return p.read_bytes()

    def blob(digest: str, size: int) -> SourceBlob:
        p = blob_path(digest, size)
        return SourceBlob(digest, size, lambda: open(p, "rb"))

    return walk_graph(top, media, read_manifest, blob)


# -- docker save archives ------------------------------------------------------------------

def _compression(head: bytes) -> str:
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    return "none"


def read_docker_archive(spec: str) -> SourceImage:
    """`FILE[:NAME:TAG]`: a `docker save` tarball, given a Docker schema 2 manifest as skopeo does."""
    path, want = Path(spec), ""
    if not path.is_file() and ":" in spec:
        head, _, rest = spec.partition(":")
        path, want = Path(head), rest
    if not path.is_file():
        raise SourceInvalid(f"docker archive {str(path)!r} does not exist")
    try:
        tar = tarfile.open(path)  # noqa: SIM115 - closed by the `with tar:` below
    except (tarfile.TarError, OSError) as exc:
        # tarfile's own message lists every compression it tried, one line each: keep the gist.
        why = str(exc).splitlines()[0].rstrip(":") if str(exc) else type(exc).__name__
        raise SourceInvalid(f"{str(path)!r} is not a tar archive ({why})") from None
    with tar:
        members = {m.name.removeprefix("./"): m for m in tar.getmembers()}

        def member(name: str) -> tarfile.TarInfo:
            m = members.get(name)
            if m is None or not m.isfile():
                raise SourceInvalid(f"docker archive has no file {name!r}")
            return m

        def read_small(name: str, limit: int) -> bytes:
            m = member(name)
            if m.size > limit:
                raise SourceInvalid(f"{name!r} in the archive is too large")
            f = tar.extractfile(m)
            assert f is not None
            return f.read()

        try:
            listing = json.loads(read_small("manifest.json", _MAX_ARCHIVE_MANIFEST) or b"null") \
                if "manifest.json" in members else None
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise SourceInvalid(f"{str(path)!r}: manifest.json is not valid JSON") from None
        if not isinstance(listing, list) or not listing:
            raise SourceInvalid(f"{str(path)!r} is not a docker save archive (no manifest.json)")
        if want:
            chosen = [e for e in listing if isinstance(e, dict) and want in (e.get("RepoTags") or [])]
            if not chosen:
                raise SourceInvalid(f"docker archive has no image {want!r}")
        elif len(listing) == 1:
            chosen = listing
        else:
            raise SourceInvalid(f"docker archive holds {len(listing)} images: "
                                "name one as docker-archive:FILE:NAME:TAG")
        entry = chosen[0]
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str) \
                or not isinstance(entry.get("Layers"), list):
            raise SourceInvalid("docker archive manifest.json entry needs Config and Layers")
        config = read_small(entry["Config"], MAX_MANIFEST_SIZE)
        parse_json(config, "image config")
        layers = []
        for name in entry["Layers"]:
            if not isinstance(name, str):
                raise SourceInvalid("docker archive manifest.json has a non-string layer")
            m = member(name)
            f = tar.extractfile(m)
            assert f is not None
            kind = _compression(f.read(4))
            h = hashlib.sha256()
            f.seek(0)
            while piece := f.read(1 << 20):
                h.update(piece)
            layers.append((name, m.size, "sha256:" + h.hexdigest(), DOCKER_LAYER[kind]))

    def opener(name: str) -> Callable[[], BinaryIO]:
        def open_member() -> BinaryIO:
            t = tarfile.open(path)  # noqa: SIM115 - owned and closed by the returned stream
            f = t.extractfile(t.getmember(members[name].name))
            assert f is not None
            return cast(BinaryIO, _Closing(f, t))
        return open_member

    config_digest = digest_of(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "size": len(config), "digest": config_digest},
        "layers": [{"mediaType": media, "size": size, "digest": digest}
                   for _, size, digest, media in layers],
    }
    data = json.dumps(manifest, indent=3).encode()
    image = SourceImage(top=digest_of(data))
    image.manifests[image.top] = (data, DOCKER_MANIFEST)
    image.blobs[config_digest] = SourceBlob(config_digest, len(config), lambda: io.BytesIO(config))
    for name, size, digest, _ in layers:
        image.blobs.setdefault(digest, SourceBlob(digest, size, opener(name)))
    return image


class _Closing(io.RawIOBase):
    """A tar member stream that also closes its archive."""

    def __init__(self, f: IO[bytes], tar: tarfile.TarFile) -> None:
        self._f, self._tar = f, tar

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return self._f.read(size)

    def readinto(self, b: Any) -> int:
        data = self._f.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._tar.close()
        super().close()


def read_source(spec: str) -> SourceImage:
    """Read a publish SOURCE: `oci:DIR[:TAG]` or `docker-archive:FILE`."""
    transport, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise SourceInvalid(f"invalid source {spec!r}: expected oci:DIR[:TAG], docker-archive:FILE "
                            "or docker://HOST/REPO:TAG")
    if transport == "oci":
        return read_oci_layout(rest)
    if transport == "docker-archive":
        return read_docker_archive(rest)
    if transport == "docker":
        from p2pimg.sources.upstream import import_image  # the registry client is only needed here

        return import_image(spec)
    raise SourceInvalid(f"unsupported source transport {transport!r}: expected oci, docker-archive or docker")
