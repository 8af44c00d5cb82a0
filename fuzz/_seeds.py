"""Known-good DAG-CBOR blocks and manifests the targets mutate (built here, deterministically)."""

from __future__ import annotations

import hashlib
import json

from p2pimg.content.cid import Cid
from p2pimg.content.model import BlobEntry, BlobMap, ImageRoot, ManifestEntry, TagRecord


def _sha(i: int) -> bytes:
    return hashlib.sha256(bytes([i])).digest()


def _digest(i: int) -> str:
    return "sha256:" + _sha(i).hex()


def manifest(layers: int = 2) -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": _digest(0), "size": 7},
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": _digest(i + 1),
                "size": 1000 * i,
            }
            for i in range(layers)
        ],
        "annotations": {"org.opencontainers.image.ref.name": "1"},
    }
    return json.dumps(doc, indent=2).encode()


def index() -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": _digest(9),
                "size": 500,
                "platform": {"architecture": "amd64", "os": "linux"},
            }
        ],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def docker_manifest() -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "size": 3,
            "digest": _digest(3),
        },
        "layers": [
            {
                "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "size": 5,
                "digest": _digest(4),
            }
        ],
    }
    return json.dumps(doc).encode()


def blob_map(chunks: int = 3) -> BlobMap:
    return BlobMap(
        digest=_digest(1),
        size=4096 * chunks - 10,
        chunk_size=4096,
        chunks=tuple(Cid.of_raw(bytes([i])) for i in range(chunks)),
    )


def image_root() -> ImageRoot:
    man = manifest()
    top = "sha256:" + hashlib.sha256(man).hexdigest()
    return ImageRoot(
        top=top,
        manifests={
            top: ManifestEntry("application/vnd.oci.image.manifest.v1+json", len(man), Cid.from_digest(top))
        },
        blobs={_digest(i): BlobEntry(100 + i, Cid.of_dag_cbor(bytes([i]))) for i in range(3)},
    )


def tag_record(name: str = "demo/app", tag: str = "1") -> TagRecord:
    return TagRecord(name=name, tag=tag, root=Cid.of_dag_cbor(b"root"), seq=1_700_000_000_000_000)


MANIFESTS = [manifest(), manifest(0), index(), docker_manifest()]
BLOCKS = [blob_map().encode(), blob_map(1).encode(), image_root().encode(), tag_record().encode()]
