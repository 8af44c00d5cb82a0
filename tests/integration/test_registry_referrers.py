"""`publish docker://...` carries the source image's referrers, against Debian's `docker-registry`.

distribution 2.8 has no referrers API (it answers `GET /v2/<repo>/referrers/<digest>` with 404), so
what is exercised here is the fallback: the referrers tag schema, an OCI index of referrers kept
under the tag `sha256-<hex>` of the subject's digest, as oras and cosign push it to such a registry.
The artifact, its blobs and that index are pushed with raw HTTP requests.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from p2pimg.content import dagcbor
from p2pimg.content.cid import digest_of
from p2pimg.content.graph import OCI_INDEX, OCI_MANIFEST
from p2pimg.content.model import ImageRoot, TagRecord
from p2pimg.content.referrers import EMPTY_BLOB, ArtifactFile, artifact_manifest
from p2pimg.ops.publish import publish
from p2pimg.ops.sample import LayerSpec, write_oci_layout
from p2pimg.sources.origins import FileOrigin, blob_key, block_key, tag_key

if TYPE_CHECKING:
    from conftest import P2pimgServe, Registry, Skopeo

SIGNATURE_TYPE = "application/vnd.example.signature.v1"


def push_blob(client: httpx.Client, repo: str, data: bytes) -> str:
    digest = digest_of(data)
    started = client.post(f"/v2/{repo}/blobs/uploads/")
    assert started.status_code == 202, started.text
    location = started.headers["Location"]  # its query (the upload's state) must be kept
    done = client.put(
        location + ("&" if "?" in location else "?") + f"digest={digest}",
        content=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert done.status_code == 201, done.text
    return digest


def push_manifest(client: httpx.Client, repo: str, reference: str, data: bytes, media: str) -> None:
    r = client.put(f"/v2/{repo}/manifests/{reference}", content=data, headers={"Content-Type": media})
    assert r.status_code == 201, r.text


async def test_publish_from_a_registry_carries_referrers(
    registry: Registry, skopeo: Skopeo, p2pimg_serve: P2pimgServe, tmp_path: Path
) -> None:
    image = write_oci_layout(tmp_path / "img", [LayerSpec(8 << 10, "none")], tag="1", seed=83)
    repo = f"signed/{uuid.uuid4().hex[:8]}"
    skopeo(
        "copy",
        "--dest-tls-verify=false",
        "--preserve-digests",
        f"oci:{image.path}:1",
        f"docker://{registry.host}/{repo}:1",
    )
    top = image.top_digest
    top_size = (image.path / "blobs" / "sha256" / top.removeprefix("sha256:")).stat().st_size
    signature = b"a signature of the image, as bytes"
    with httpx.Client(base_url=registry.url, timeout=30) as client:
        # distribution 2.8: no referrers API, so the tag schema fallback is what publish uses.
        assert client.get(f"/v2/{repo}/referrers/{top}").status_code == 404
        push_blob(client, repo, EMPTY_BLOB)
        layer = push_blob(client, repo, signature)
        artifact = artifact_manifest(
            SIGNATURE_TYPE,
            (top, top_size, OCI_MANIFEST),
            [ArtifactFile(layer, len(signature), "application/octet-stream", "image.sig")],
            {"org.example.signed-by": "test"},
        )
        artifact_digest = digest_of(artifact)
        push_manifest(client, repo, artifact_digest, artifact, OCI_MANIFEST)
        index = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [
                    {
                        "mediaType": OCI_MANIFEST,
                        "digest": artifact_digest,
                        "size": len(artifact),
                        "artifactType": SIGNATURE_TYPE,
                    }
                ],
            }
        ).encode()
        push_manifest(client, repo, "sha256-" + top.removeprefix("sha256:"), index, OCI_INDEX)

    home = tmp_path / "home"
    home.mkdir()
    origin = FileOrigin(home / "origin")
    report = await publish(f"docker://{registry.host}/{repo}:1", "signed/app", "1", origin)
    record = TagRecord.decode(
        await origin.get(tag_key("signed/app", "1"), max_size=64 << 10), name="signed/app", tag="1"
    )
    assert record.root == report.root
    root = ImageRoot.from_node(
        dagcbor.decode_verified(
            await origin.get(block_key(report.root), max_size=dagcbor.MAX_BLOCK_SIZE), report.root
        )
    )
    assert root.top == top
    assert root.referrers == {top: (artifact_digest,)}
    assert artifact_digest in root.manifests and layer in root.blobs
    assert await origin.get(blob_key(layer), max_size=1 << 10) == signature

    server = p2pimg_serve(home)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.get(f"/v2/signed/app/referrers/{top}")
        assert r.status_code == 200 and r.headers["Content-Type"] == OCI_INDEX
        listed = r.json()["manifests"]
        assert [(d["digest"], d.get("artifactType")) for d in listed] == [(artifact_digest, SIGNATURE_TYPE)]
        assert listed[0]["annotations"] == {"org.example.signed-by": "test"}
        r = client.get(f"/v2/signed/app/manifests/{artifact_digest}", headers={"Accept": OCI_MANIFEST})
        assert r.status_code == 200 and r.content == artifact
        assert client.get(f"/v2/signed/app/blobs/{layer}").content == signature
