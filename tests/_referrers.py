"""OCI layouts with referrers (artifacts whose `subject` is a manifest of the image), for the tests:
the artifacts are written as oras and cosign write them, untagged entries of index.json."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pimg.content.referrers import EMPTY_BLOB, EMPTY_DIGEST, EMPTY_MEDIA_TYPE

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
SBOM = "application/vnd.example.sbom.v1"
SIGNATURE = "application/vnd.example.signature.v1"
CONFIG_TYPED = "application/vnd.example.config.v1+json"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Written:
    """A manifest written into a layout: its descriptor, as the referrers API should list it."""

    digest: str
    size: int
    media_type: str
    artifact_type: str | None
    annotations: dict[str, str]

    @property
    def subject_descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}

    def listed(self) -> dict[str, Any]:
        """The descriptor the referrers API lists for it."""
        desc: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.artifact_type is not None:
            desc["artifactType"] = self.artifact_type
        if self.annotations:
            desc["annotations"] = self.annotations
        return desc


class LayoutWriter:
    """A copy of an OCI layout that artifacts are added to."""

    def __init__(self, source: Path, dest: Path) -> None:
        shutil.copytree(source, dest)
        self.path = dest

    def index(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads((self.path / "index.json").read_bytes())
        return doc

    def tagged(self, tag: str) -> Written:
        """The manifest index.json tags `tag`, as a subject."""
        for d in self.index()["manifests"]:
            if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
                return Written(d["digest"], d["size"], d["mediaType"], None, {})
        raise AssertionError(f"no {tag} in {self.path}")

    def blob(self, data: bytes) -> dict[str, Any]:
        digest = sha256(data)
        (self.path / "blobs" / "sha256" / digest.removeprefix("sha256:")).write_bytes(data)
        return {"digest": digest, "size": len(data)}

    def manifest(self, doc: dict[str, Any], *, in_index: bool = True, tag: str | None = None) -> Written:
        data = json.dumps(doc, indent=2).encode()
        desc = {"mediaType": doc["mediaType"], **self.blob(data)}
        if in_index:
            index = self.index()
            entry: dict[str, Any] = dict(desc)
            if tag is not None:
                entry["annotations"] = {"org.opencontainers.image.ref.name": tag}
            index["manifests"].append(entry)
            (self.path / "index.json").write_text(json.dumps(index))
        artifact_type = doc.get("artifactType") or (doc["config"]["mediaType"] if "config" in doc else None)
        return Written(
            desc["digest"], desc["size"], doc["mediaType"], artifact_type, dict(doc.get("annotations", {}))
        )

    def artifact(
        self,
        subject: Written | None,
        artifact_type: str | None,
        payload: bytes,
        *,
        annotations: dict[str, str] | None = None,
        config_media_type: str = EMPTY_MEDIA_TYPE,
        subject_digest: str | None = None,
        in_index: bool = True,
    ) -> Written:
        """An image manifest with `subject`: with `artifact_type` an OCI 1.1 artifact over the empty
        config; without, its config's media type is what the referrers API reports."""
        config = EMPTY_BLOB if config_media_type == EMPTY_MEDIA_TYPE else b'{"kind": "example"}'
        config_desc = {"mediaType": config_media_type, **self.blob(config)}
        assert config_media_type != EMPTY_MEDIA_TYPE or config_desc["digest"] == EMPTY_DIGEST
        doc: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config_desc,
            "layers": [{"mediaType": "application/octet-stream", **self.blob(payload)}],
        }
        if artifact_type is not None:
            doc["artifactType"] = artifact_type
        if subject is not None:
            doc["subject"] = subject.subject_descriptor
        elif subject_digest is not None:
            doc["subject"] = {"mediaType": OCI_MANIFEST, "digest": subject_digest, "size": 123}
        if annotations:
            doc["annotations"] = annotations
        return self.manifest(doc, in_index=in_index)

    def index_artifact(self, subject: Written, annotations: dict[str, str]) -> Written:
        """An image index with a subject and no artifactType: listed without one."""
        doc = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [],
            "subject": subject.subject_descriptor,
            "annotations": annotations,
        }
        return self.manifest(doc)


@dataclass(frozen=True)
class WithReferrers:
    """A sample image plus its referrers, in an OCI layout."""

    path: Path
    top: Written
    sbom: Written  # artifactType, annotations, subject = top
    signature: Written  # artifactType, subject = top
    typed: Written  # no artifactType: the config's media type, subject = top
    index: Written  # an index with subject = top, no artifactType
    sbom_signature: Written  # subject = the SBOM
    stranger: Written  # subject = a manifest this image does not have: not one of its referrers

    def of_top(self) -> list[Written]:
        return [self.sbom, self.signature, self.typed, self.index]


def layout_with_referrers(source: Path, dest: Path, tag: str = "1") -> WithReferrers:
    """A copy of the layout at `source` with referrers of its image tagged `tag`."""
    w = LayoutWriter(source, dest)
    top = w.tagged(tag)
    sbom = w.artifact(top, SBOM, b'{"sbom": true}', annotations={"org.example.format": "json"})
    signature = w.artifact(top, SIGNATURE, b"signature of the image")
    typed = w.artifact(
        top,
        None,
        b"typed by its config",
        config_media_type=CONFIG_TYPED,
        annotations={"org.example.kind": "config-typed"},
    )
    index = w.index_artifact(top, {"org.example.kind": "index"})
    sbom_signature = w.artifact(sbom, SIGNATURE, b"signature of the sbom")
    stranger = w.artifact(None, SBOM, b"of something else", subject_digest=sha256(b"elsewhere"))
    return WithReferrers(w.path, top, sbom, signature, typed, index, sbom_signature, stranger)
