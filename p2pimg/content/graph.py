"""An image graph as data: manifests and indexes as exact bytes, the blobs they name, and a
walk over it. Pure: reading a layout or a registry is the caller's job.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from p2pimg.content.cid import digest_of, parse_digest
from p2pimg.content.model import INDEX_MEDIA_TYPES, MANIFEST_MEDIA_TYPES
from p2pimg.errors import SourceInvalid

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = {
    "gzip": "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "zstd": "application/vnd.docker.image.rootfs.diff.tar.zstd",
    "none": "application/vnd.docker.image.rootfs.diff.tar",
}


@dataclass(frozen=True)
class SourceBlob:
    digest: str
    size: int
    open: Callable[[], BinaryIO]


@dataclass
class SourceImage:
    """An image graph: its top manifest/index, all manifests (bytes), all other blobs, and which
    of the manifests refer to which (subject digest -> referrer digests; see content.referrers)."""

    top: str
    manifests: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    blobs: dict[str, SourceBlob] = field(default_factory=dict)
    referrers: dict[str, set[str]] = field(default_factory=dict)


def descriptor(d: object, where: str) -> tuple[str, int, str]:
    if not isinstance(d, dict):
        raise SourceInvalid(f"{where}: descriptor is not an object")
    digest, size, media = d.get("digest"), d.get("size"), d.get("mediaType", "")
    if not isinstance(digest, str) or not isinstance(size, int) or isinstance(size, bool):
        raise SourceInvalid(f"{where}: descriptor needs a digest and a size")
    if size < 0 or not isinstance(media, str):
        raise SourceInvalid(f"{where}: descriptor has an invalid size or media type")
    try:
        parse_digest(digest)
    except Exception as exc:
        raise SourceInvalid(f"{where}: {exc}") from None
    return digest, size, media


def parse_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise SourceInvalid(f"{what} is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(doc, dict):
        raise SourceInvalid(f"{what} is not a JSON object")
    return doc


def manifest_media_type(data: bytes, declared: str, what: str) -> str:
    """The media type a manifest is served with: its own `mediaType`, else the descriptor's."""
    doc = parse_json(data, what)
    own = doc.get("mediaType")
    if own is not None and not isinstance(own, str):
        raise SourceInvalid(f"{what}: mediaType is not a string")
    media = own or declared or (OCI_INDEX if "manifests" in doc else OCI_MANIFEST)
    if media not in MANIFEST_MEDIA_TYPES:
        raise SourceInvalid(f"{what}: unsupported manifest media type {media!r}")
    if doc.get("schemaVersion") != 2:
        raise SourceInvalid(f"{what}: only schemaVersion 2 manifests are supported")
    return media


Descriptor = tuple[str, int, str]  # digest, size, media type


def manifest_children(data: bytes, media: str, what: str) -> tuple[list[Descriptor], list[Descriptor]]:
    """(child manifests, blobs) a manifest or index refers to, as (digest, size, media type)."""
    doc = parse_json(data, what)
    if media in INDEX_MEDIA_TYPES:
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise SourceInvalid(f"{what}: index has no manifests list")
        return [descriptor(d, what) for d in entries], []
    config, layers = doc.get("config"), doc.get("layers")
    if not isinstance(layers, list):
        raise SourceInvalid(f"{what}: manifest has no layers list")
    return [], [descriptor(config, what)] + [descriptor(d, what) for d in layers]


# A walk over an image graph, as a generator: it yields (digest, size) of each manifest it needs
# (size -1 for the top one, whose size no descriptor gives) and is sent that manifest's bytes.
GraphWalk = Generator[tuple[str, int], bytes, SourceImage]


def graph_walk(top: str, top_media: str, blob: Callable[[str, int], SourceBlob]) -> GraphWalk:
    """Collect an image graph from its top manifest, checking every digest and size.

    Sans I/O: the caller fetches each manifest the walk asks for, however it reads (a file, a
    registry client on trio), and sends its bytes in; the image is the walk's return value.
    """
    image = SourceImage(top=top)
    pending = [(top, -1, top_media)]
    while pending:
        digest, size, declared = pending.pop()
        if digest in image.manifests:
            continue
        data = yield digest, size
        if digest_of(data) != digest:
            raise SourceInvalid(f"manifest {digest} does not match its digest")
        if size >= 0 and len(data) != size:
            raise SourceInvalid(f"manifest {digest} has {len(data)} bytes, descriptor says {size}")
        media = manifest_media_type(data, declared, f"manifest {digest}")
        image.manifests[digest] = (data, media)
        children, blobs = manifest_children(data, media, f"manifest {digest}")
        pending += children
        for bdigest, bsize, _ in blobs:
            if bdigest not in image.blobs:
                image.blobs[bdigest] = blob(bdigest, bsize)
    return image


def walk_graph(
    top: str,
    top_media: str,
    read_manifest: Callable[[str, int], bytes],
    blob: Callable[[str, int], SourceBlob],
) -> SourceImage:
    """`graph_walk` with manifests read by `read_manifest(digest, size)`."""
    walk = graph_walk(top, top_media, blob)
    try:
        wanted = next(walk)
        while True:
            wanted = walk.send(read_manifest(*wanted))
    except StopIteration as stop:
        image: SourceImage = stop.value
        return image


# -- OCI image layout ----------------------------------------------------------------------
