"""OCI referrers as data (distribution spec 1.1 "Listing Referrers", image spec 1.1 artifacts).

A referrer is a manifest whose `subject` names another manifest: a signature, an SBOM, an
attestation. Here: a manifest's subject, the referrers among an OCI layout's manifests, the
descriptor the referrers API lists for a referrer, the index it answers with, and the artifact
manifest `publish --attach` writes. Pure: reading files or an origin is the caller's job.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from p2pimg.content.cid import digest_of
from p2pimg.content.graph import (
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    SourceBlob,
    SourceImage,
    descriptor,
    manifest_media_type,
    parse_json,
    walk_graph,
)
from p2pimg.content.model import INDEX_MEDIA_TYPES, MANIFEST_MEDIA_TYPES
from p2pimg.errors import BlockInvalid, InvalidInput, P2pimgError

EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_BLOB = b"{}"
EMPTY_DIGEST = digest_of(EMPTY_BLOB)
TITLE_ANNOTATION = "org.opencontainers.image.title"
CREATED_ANNOTATION = "org.opencontainers.image.created"
DEFAULT_FILE_MEDIA_TYPE = "application/octet-stream"
ARTIFACT_TYPE_FILTER = "artifactType"

# RFC 6838 media type names (type "/" subtype, restricted-name characters), as the image spec
# asks of artifactType and of descriptors' mediaType.
_NAME = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
_MEDIA_TYPE_RE = re.compile(rf"{_NAME}/{_NAME}")
# Tags of the referrers tag schema: `<algorithm>-<hex>` (an index of referrers kept as a tag).
_REFERRERS_TAG_RE = re.compile(r"[a-z0-9]{1,32}-[0-9a-f]{64}")


def check_media_type(value: str, what: str) -> str:
    if not _MEDIA_TYPE_RE.fullmatch(value):
        raise InvalidInput(f"invalid {what} {value[:100]!r}: expected a media type, TYPE/SUBTYPE")
    return value


def is_referrers_tag(tag: str) -> bool:
    """Whether a tag has the referrers tag schema's form (`sha256-<hex>`): an index of referrers,
    not an image."""
    return _REFERRERS_TAG_RE.fullmatch(tag) is not None


def manifest_subject(data: bytes, what: str) -> str | None:
    """The digest a manifest's or index's `subject` names, or None when it has none."""
    doc = parse_json(data, what)
    subject = doc.get("subject")
    if subject is None:
        return None
    return descriptor(subject, f"{what}: subject")[0]


# -- OCI layouts -----------------------------------------------------------------------------


def layout_manifests(
    entries: Iterable[Descriptor], read_manifest: Callable[[str, int], bytes], limit: int = 10000
) -> dict[str, tuple[int, str, bytes]]:
    """Every manifest an OCI layout's index.json reaches (its entries and, through indexes, their
    children): digest -> (size, media type, bytes). At most `limit` of them."""
    found: dict[str, tuple[int, str, bytes]] = {}
    pending = list(entries)
    while pending:
        digest, size, declared = pending.pop()
        if digest in found:
            continue
        if declared and declared not in MANIFEST_MEDIA_TYPES:
            continue  # not a manifest (index.json may list other things; nothing refers through them)
        if len(found) >= limit:
            raise InvalidInput(f"the OCI layout holds more than {limit} manifests")
        data = read_manifest(digest, size)
        what = f"manifest {digest}"
        media = manifest_media_type(data, declared, what)
        found[digest] = (len(data), media, data)
        if media in INDEX_MEDIA_TYPES:
            entries_doc = parse_json(data, what).get("manifests")
            if isinstance(entries_doc, list):
                pending += [descriptor(d, what) for d in entries_doc]
    return found


def add_referrers(
    image: SourceImage,
    manifests: Mapping[str, tuple[int, str, bytes]],
    read_manifest: Callable[[str, int], bytes],
    blob: Callable[[str, int], SourceBlob],
) -> None:
    """Add to `image` each of `manifests` whose subject is one of the image's manifests, with all
    it refers to; also those whose subject is a referrer added so (a signature of an SBOM)."""
    subjects: dict[str, str] = {}
    for digest, (_, _, data) in manifests.items():
        subject = manifest_subject(data, f"manifest {digest}")
        if subject is not None and digest not in image.manifests:
            subjects[digest] = subject
    added = True
    while added:
        added = False
        for digest, subject in sorted(subjects.items()):
            if digest in image.manifests or subject not in image.manifests:
                continue
            size, media, _ = manifests[digest]
            graph = walk_graph(digest, media, read_manifest, blob)
            for d, manifest in graph.manifests.items():
                image.manifests.setdefault(d, manifest)
            for d, b in graph.blobs.items():
                image.blobs.setdefault(d, b)
            image.referrers.setdefault(subject, set()).add(digest)
            added = True


# -- the referrers API -----------------------------------------------------------------------


def referrer_descriptor(data: bytes, digest: str, media_type: str, subject: str) -> dict[str, Any]:
    """What the referrers API lists for the manifest `data` (verified to be `digest`): its media
    type, digest and size, its `artifactType` (for an image manifest without one: its config's
    media type; an index without one has none) and its annotations.

    BlockInvalid when its subject is not `subject`: an image root that lists it as a referrer of
    `subject` is wrong, and the API must list only manifests whose subject is the one asked for."""
    what = f"referrer {digest}"
    try:
        found = manifest_subject(data, what)
        doc = parse_json(data, what)
    except P2pimgError as exc:
        raise BlockInvalid(exc.message) from None
    if found != subject:
        raise BlockInvalid(f"{what} is listed as a referrer of {subject}, but its subject is {found}")
    desc: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": len(data)}
    artifact_type = doc.get("artifactType")
    if not isinstance(artifact_type, str) or not artifact_type:
        artifact_type = None
        config = doc.get("config")
        if media_type not in INDEX_MEDIA_TYPES and isinstance(config, dict):
            config_type = config.get("mediaType")
            artifact_type = config_type if isinstance(config_type, str) and config_type else None
    if artifact_type is not None:
        desc["artifactType"] = artifact_type
    annotations = doc.get("annotations")
    if isinstance(annotations, dict) and annotations:
        desc["annotations"] = annotations
    return desc


def referrers_index(descriptors: Sequence[Mapping[str, Any]]) -> bytes:
    """The referrers API's answer: an OCI image index of `descriptors` (an empty one for none)."""
    return json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list(descriptors)}, separators=(",", ":")
    ).encode()


# -- artifacts -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArtifactFile:
    """A file that becomes a layer of an artifact: its digest, size, media type and file name."""

    digest: str
    size: int
    media_type: str
    title: str


def artifact_manifest(
    artifact_type: str, subject: Descriptor, files: Sequence[ArtifactFile], annotations: Mapping[str, str]
) -> bytes:
    """An OCI 1.1 artifact manifest: `artifactType`, the empty config (`{}`, also inline as data),
    one layer per file (titled with its file name, as `oras pull` names what it writes), the
    subject it refers to, and `annotations` (none: the key is left out)."""
    check_media_type(artifact_type, "artifact type")
    digest, size, media = subject
    if media not in MANIFEST_MEDIA_TYPES:
        raise InvalidInput(f"the subject {digest} is a {media!r}, not a manifest or index")
    layers = []
    for f in files:
        check_media_type(f.media_type, "media type")
        layers.append(
            {
                "mediaType": f.media_type,
                "digest": f.digest,
                "size": f.size,
                "annotations": {TITLE_ANNOTATION: f.title},
            }
        )
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {
            "mediaType": EMPTY_MEDIA_TYPE,
            "digest": EMPTY_DIGEST,
            "size": len(EMPTY_BLOB),
            "data": "e30=",
        },
        "layers": layers,
        "subject": {"mediaType": media, "digest": digest, "size": size},
    }
    if annotations:
        doc["annotations"] = dict(annotations)
    return json.dumps(doc, separators=(",", ":")).encode()


def parse_annotations(pairs: Iterable[str]) -> dict[str, str]:
    """`KEY=VALUE` strings (`--annotation`) as a dict; a key given twice is an error."""
    found: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or key != key.strip():
            raise InvalidInput(f"invalid annotation {pair[:100]!r}: expected KEY=VALUE")
        if key in found:
            raise InvalidInput(f"annotation {key[:100]!r} is given twice")
        found[key] = value
    return found
