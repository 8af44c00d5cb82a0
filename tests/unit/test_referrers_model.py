"""Unit tests for referrers in the content model (ImageRoot.referrers) and p2pimg.content.referrers."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pimg.content import dagcbor
from p2pimg.content.cid import Cid
from p2pimg.content.graph import SourceBlob, SourceImage
from p2pimg.content.model import ImageRoot, ManifestEntry
from p2pimg.content.referrers import (
    EMPTY_BLOB,
    EMPTY_DIGEST,
    EMPTY_MEDIA_TYPE,
    TITLE_ANNOTATION,
    ArtifactFile,
    add_referrers,
    artifact_manifest,
    check_media_type,
    is_referrers_tag,
    layout_manifests,
    manifest_subject,
    parse_annotations,
    referrer_descriptor,
    referrers_index,
)
from p2pimg.errors import BlockInvalid, InvalidInput, SourceInvalid

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def entry(data: bytes, media: str = OCI_MANIFEST) -> ManifestEntry:
    return ManifestEntry(media, len(data), Cid.of_raw(data))


TOP, SIG, SBOM, OTHER = (b'{"m":"top"}', b'{"m":"sig"}', b'{"m":"sbom"}', b'{"m":"other"}')


def root(referrers: dict[str, tuple[str, ...]]) -> ImageRoot:
    return ImageRoot(
        top=digest(TOP), manifests={digest(m): entry(m) for m in (TOP, SIG, SBOM, OTHER)}, referrers=referrers
    )


# -- ImageRoot.referrers -----------------------------------------------------------------------


def test_a_root_with_referrers_round_trips() -> None:
    refs = {digest(TOP): tuple(sorted([digest(SIG), digest(SBOM)])), digest(SBOM): (digest(OTHER),)}
    r = root(refs)
    block = r.encode()
    back = ImageRoot.from_node(dagcbor.decode(block))
    assert back == r and back.encode() == block
    assert back.referrers_of(digest(TOP)) == refs[digest(TOP)]
    assert back.referrers_of(digest(OTHER)) == ()
    assert r.to_node()["referrers"] == {s: list(d) for s, d in refs.items()}


def test_a_root_without_referrers_encodes_as_before_the_field() -> None:
    """Published images keep their CIDs: no `referrers` key when there are none, and a node
    without one (an old root) reads as a root without referrers."""
    r = root({})
    assert "referrers" not in r.to_node()
    # The node as p2pimg wrote it before referrers existed.
    old = {
        "type": "p2pimg/image@1",
        "top": r.top,
        "blobs": {},
        "manifests": {
            d: {"mediaType": m.media_type, "size": m.size, "block": m.cid} for d, m in r.manifests.items()
        },
    }
    assert r.encode() == dagcbor.encode(old)
    assert ImageRoot.from_node(dagcbor.decode(dagcbor.encode(old))) == r


@given(st.sets(st.sampled_from([SIG, SBOM, OTHER]), min_size=1))
def test_referrers_round_trip_generated(members: set[bytes]) -> None:
    r = root({digest(TOP): tuple(sorted(digest(m) for m in members))})
    assert ImageRoot.from_node(dagcbor.decode(r.encode())) == r


def _node(referrers: Any) -> dict[str, Any]:
    node = root({}).to_node()
    node["referrers"] = referrers
    return node


@pytest.mark.parametrize(
    "referrers",
    [
        {},  # empty: a second encoding of "none"
        [],
        {digest(TOP): []},  # an empty list
        {digest(TOP): [digest(SIG), digest(SIG)]},  # duplicates
        {digest(TOP): sorted([digest(SIG), digest(SBOM)], reverse=True)},  # unsorted
        {digest(TOP): [digest(b"not a manifest of the image")]},
        {digest(TOP): [digest(TOP)]},  # itself
        {digest(b"not a manifest"): [digest(SIG)]},  # a subject that is not one of its manifests
        {"sha256:../../x": [digest(SIG)]},
        {digest(TOP): digest(SIG)},  # not a list
        {digest(TOP): [1]},
        {digest(TOP): [Cid.of_raw(SIG)]},
    ],
)
def test_malformed_referrers_are_refused(referrers: Any) -> None:
    with pytest.raises(BlockInvalid):
        ImageRoot.from_node(_node(referrers))


# -- subjects, descriptors, the index ----------------------------------------------------------


def manifest(**fields: Any) -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.example.config+json", "digest": digest(b"c"), "size": 1},
        "layers": [],
        **fields,
    }
    return json.dumps(doc).encode()


SUBJECT = {"mediaType": OCI_MANIFEST, "digest": digest(TOP), "size": len(TOP)}


def test_manifest_subject() -> None:
    assert manifest_subject(manifest(subject=SUBJECT), "m") == digest(TOP)
    assert manifest_subject(manifest(), "m") is None
    for bad in ({"digest": "sha256:1"}, "sha256:" + "0" * 64, {"size": 1}):
        with pytest.raises(SourceInvalid):
            manifest_subject(manifest(subject=bad), "m")


def test_referrer_descriptor() -> None:
    data = manifest(subject=SUBJECT, artifactType="application/vnd.example.sbom.v1", annotations={"a": "b"})
    assert referrer_descriptor(data, digest(data), OCI_MANIFEST, digest(TOP)) == {
        "mediaType": OCI_MANIFEST,
        "digest": digest(data),
        "size": len(data),
        "artifactType": "application/vnd.example.sbom.v1",
        "annotations": {"a": "b"},
    }
    # No artifactType: the config's media type; no annotations: none listed.
    data = manifest(subject=SUBJECT)
    assert referrer_descriptor(data, digest(data), OCI_MANIFEST, digest(TOP)) == {
        "mediaType": OCI_MANIFEST,
        "digest": digest(data),
        "size": len(data),
        "artifactType": "application/vnd.example.config+json",
    }
    # An empty artifactType counts as none.
    data = manifest(subject=SUBJECT, artifactType="", annotations={})
    assert (
        referrer_descriptor(data, digest(data), OCI_MANIFEST, digest(TOP))["artifactType"]
        == "application/vnd.example.config+json"
    )
    # An index without artifactType has none (it has no config).
    index = json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [], "subject": SUBJECT}
    ).encode()
    assert "artifactType" not in referrer_descriptor(index, digest(index), OCI_INDEX, digest(TOP))


def test_referrer_descriptor_refuses_a_manifest_of_another_subject() -> None:
    data = manifest(subject=SUBJECT)
    with pytest.raises(BlockInvalid, match="its subject is"):
        referrer_descriptor(data, digest(data), OCI_MANIFEST, digest(SIG))
    with pytest.raises(BlockInvalid):
        referrer_descriptor(manifest(), digest(manifest()), OCI_MANIFEST, digest(TOP))
    with pytest.raises(BlockInvalid):
        referrer_descriptor(b"not json", digest(b"not json"), OCI_MANIFEST, digest(TOP))


def test_referrers_index() -> None:
    assert json.loads(referrers_index([])) == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    desc = {"mediaType": OCI_MANIFEST, "digest": digest(b"x"), "size": 1}
    assert json.loads(referrers_index([desc]))["manifests"] == [desc]


# -- artifacts ---------------------------------------------------------------------------------


def test_artifact_manifest() -> None:
    files = [ArtifactFile(digest(b"f"), 1, "application/spdx+json", "sbom.json")]
    data = artifact_manifest(
        "application/spdx+json", (digest(TOP), len(TOP), OCI_MANIFEST), files, {"k": "v"}
    )
    doc = json.loads(data)
    assert doc == {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/spdx+json",
        "config": {"mediaType": EMPTY_MEDIA_TYPE, "digest": EMPTY_DIGEST, "size": 2, "data": "e30="},
        "layers": [
            {
                "mediaType": "application/spdx+json",
                "digest": digest(b"f"),
                "size": 1,
                "annotations": {TITLE_ANNOTATION: "sbom.json"},
            }
        ],
        "subject": {"mediaType": OCI_MANIFEST, "digest": digest(TOP), "size": len(TOP)},
        "annotations": {"k": "v"},
    }
    assert digest(EMPTY_BLOB) == EMPTY_DIGEST and EMPTY_BLOB.decode() == "{}"
    assert "annotations" not in json.loads(
        artifact_manifest("application/x", (digest(TOP), 1, OCI_INDEX), files, {})
    )
    # Its descriptor as the referrers API lists it.
    assert (
        referrer_descriptor(data, digest(data), OCI_MANIFEST, digest(TOP))["artifactType"]
        == "application/spdx+json"
    )
    with pytest.raises(InvalidInput):
        artifact_manifest("application/x", (digest(TOP), 1, "application/octet-stream"), files, {})


@pytest.mark.parametrize(
    "value,ok",
    [
        ("application/spdx+json", True),
        ("application/vnd.example.sbom.v1", True),
        ("text/plain", True),
        ("sbom", False),
        ("a/b/c", False),
        ("", False),
        ("application/ spdx", False),
        ("/x", False),
        ("application/x; charset=utf-8", False),
    ],
)
def test_check_media_type(value: str, ok: bool) -> None:
    if ok:
        assert check_media_type(value, "t") == value
    else:
        with pytest.raises(InvalidInput):
            check_media_type(value, "t")


def test_parse_annotations() -> None:
    assert parse_annotations(["a=b", "c=d=e", "e="]) == {"a": "b", "c": "d=e", "e": ""}
    for bad in (["novalue"], ["=v"], ["a=1", "a=2"], [" a=1"]):
        with pytest.raises(InvalidInput):
            parse_annotations(bad)


def test_is_referrers_tag() -> None:
    assert is_referrers_tag("sha256-" + "a" * 64)
    assert not is_referrers_tag("1") and not is_referrers_tag("sha256-" + "a" * 63)
    assert not is_referrers_tag("latest")


# -- finding referrers in a layout (pure: the reads are functions) -----------------------------


class Store:
    """Manifests and blobs by digest, as a layout's blobs/ would hold them."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def put(self, data: bytes) -> dict[str, Any]:
        self.data[digest(data)] = data
        return {"digest": digest(data), "size": len(data)}

    def read(self, d: str, size: int) -> bytes:
        return self.data[d]

    def blob(self, d: str, size: int) -> SourceBlob:
        assert d in self.data, d
        return SourceBlob(d, size, lambda: None)  # type: ignore[arg-type,return-value]


def artifact(store: Store, subject: dict[str, Any], payload: bytes) -> dict[str, Any]:
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/x",
        "config": {"mediaType": EMPTY_MEDIA_TYPE, **store.put(EMPTY_BLOB)},
        "layers": [{"mediaType": "application/octet-stream", **store.put(payload)}],
        "subject": subject,
    }
    return {"mediaType": OCI_MANIFEST, **store.put(json.dumps(doc).encode())}


def test_add_referrers_follows_chains_and_leaves_strangers() -> None:
    store = Store()
    top = {"mediaType": OCI_MANIFEST, **store.put(manifest())}
    store.put(b"c")
    sbom = artifact(store, top, b"sbom")
    sig_of_sbom = artifact(store, sbom, b"signature of the sbom")
    stranger = artifact(store, {"mediaType": OCI_MANIFEST, "digest": digest(b"else"), "size": 1}, b"x")
    # The referrers tag schema's form: an index of the referrers (its children are found too).
    tag_index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [sig_of_sbom]}).encode()
    entries = [
        (top["digest"], top["size"], OCI_MANIFEST),
        (sbom["digest"], sbom["size"], OCI_MANIFEST),
        (stranger["digest"], stranger["size"], OCI_MANIFEST),
        (digest(tag_index), store.put(tag_index)["size"], OCI_INDEX),
        (digest(b"c"), 1, "application/vnd.oci.image.layer.v1.tar"),
    ]  # not a manifest: skipped
    found = layout_manifests(entries, store.read)
    assert set(found) == {
        top["digest"],
        sbom["digest"],
        sig_of_sbom["digest"],
        stranger["digest"],
        digest(tag_index),
    }
    image = SourceImage(
        top=top["digest"], manifests={top["digest"]: (store.data[top["digest"]], OCI_MANIFEST)}
    )
    add_referrers(image, found, store.read, store.blob)
    assert image.referrers == {top["digest"]: {sbom["digest"]}, sbom["digest"]: {sig_of_sbom["digest"]}}
    assert stranger["digest"] not in image.manifests
    assert {digest(b"sbom"), digest(b"signature of the sbom"), EMPTY_DIGEST} <= set(image.blobs)
    assert digest(b"x") not in image.blobs


def test_layout_manifests_is_bounded() -> None:
    store = Store()
    entries = []
    for i in range(5):
        d = store.put(manifest(annotations={"i": str(i)}))
        entries.append((d["digest"], d["size"], OCI_MANIFEST))
    assert len(layout_manifests(entries, store.read, limit=5)) == 5
    with pytest.raises(InvalidInput, match="more than 4"):
        layout_manifests(entries, store.read, limit=4)
