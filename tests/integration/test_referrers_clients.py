"""Referrers with real clients: an image published with `p2pimg publish`, a file attached with
`p2pimg publish --attach`, then, through `p2pimg serve`: ORAS (the `oras` Python SDK) pulls the
artifact by digest and lists the referrers, skopeo copies the artifact and the image, by name
and by `ipfs/<CID>`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import P2pimgServe, P2pimgServer, RunP2pimg, SampleCache, Skopeo

oras_provider = pytest.importorskip("oras.provider", reason="pip install oras (in p2pimg's test extras)")
oras_schemas = pytest.importorskip("oras.schemas")
jsonschema = pytest.importorskip("jsonschema")

SBOM_TYPE = "application/spdx+json"
SIGNATURE_TYPE = "application/vnd.example.signature.v1"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


@dataclass
class Attached:
    server: P2pimgServer
    top: str  # the image's top manifest: the artifacts' subject
    root: str  # the image root CID after the attaches
    first_root: str  # ... and before
    sbom: str  # artifact manifest digests
    signature: str
    sbom_file: bytes


def attach(run_p2pimg: RunP2pimg, home: Path, path: Path, artifact_type: str, *extra: str) -> tuple[str, str]:
    """`p2pimg publish --attach`: (artifact digest, new root CID)."""
    result = run_p2pimg(
        "publish",
        "--attach",
        str(path),
        "--artifact-type",
        artifact_type,
        *extra,
        "samples/one:v1",
        home=home,
    )
    found = re.search(r"attached (sha256:[0-9a-f]{64})", result.stderr)
    assert found, result.stderr
    return found.group(1), result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def attached(
    samples: SampleCache,
    run_p2pimg: RunP2pimg,
    p2pimg_serve_module: P2pimgServe,
    tmp_path_factory: pytest.TempPathFactory,
) -> Attached:
    sample = samples.get("one_layer")
    home = tmp_path_factory.mktemp("p2pimg-home")
    files = tmp_path_factory.mktemp("files")
    first = run_p2pimg("publish", sample.source, "samples/one:v1", home=home).stdout.strip().splitlines()[-1]
    sbom_file = b'{"spdxVersion": "SPDX-2.3", "name": "one"}'
    (files / "sbom.spdx.json").write_bytes(sbom_file)
    (files / "image.sig").write_bytes(b"\x00\x01 a signature")
    sbom, _ = attach(
        run_p2pimg,
        home,
        files / "sbom.spdx.json",
        SBOM_TYPE,
        "--media-type",
        SBOM_TYPE,
        "--annotation",
        "org.example.tool=test",
    )
    signature, root = attach(run_p2pimg, home, files / "image.sig", SIGNATURE_TYPE)
    top = hashlib.sha256(sample.top_manifest()[1]).hexdigest()
    return Attached(p2pimg_serve_module(home), f"sha256:{top}", root, first, sbom, signature, sbom_file)


def registry(a: Attached) -> Any:
    return oras_provider.Registry(hostname=a.server.host, insecure=True)


@pytest.mark.parametrize("by", ["name", "ipfs"])
def test_oras_pulls_the_attached_artifact(attached: Attached, by: str, tmp_path: Path) -> None:
    name = "samples/one" if by == "name" else f"ipfs/{attached.root}"
    reg = registry(attached)
    target = f"{attached.server.host}/{name}@{attached.sbom}"
    manifest = reg.get_manifest(target, validation_schema=oras_schemas.manifest)
    assert manifest["artifactType"] == SBOM_TYPE and manifest["subject"]["digest"] == attached.top
    files = reg.pull(target=target, outdir=str(tmp_path))
    assert [Path(f).name for f in files] == ["sbom.spdx.json"]  # named by its title annotation
    assert Path(files[0]).read_bytes() == attached.sbom_file


@pytest.mark.parametrize("by", ["name", "ipfs"])
def test_oras_lists_the_referrers(attached: Attached, by: str) -> None:
    name = "samples/one" if by == "name" else f"ipfs/{attached.root}"
    reg = registry(attached)
    url = f"http://{attached.server.host}/v2/{name}/referrers/{attached.top}"
    r = reg.do_request(url, "GET")
    assert r.status_code == 200 and r.headers["Content-Type"] == OCI_INDEX
    index = r.json()
    jsonschema.validate(index, schema=oras_schemas.index)
    by_digest = {d["digest"]: d for d in index["manifests"]}
    assert set(by_digest) == {attached.sbom, attached.signature}
    assert by_digest[attached.sbom]["artifactType"] == SBOM_TYPE
    assert by_digest[attached.sbom]["annotations"]["org.example.tool"] == "test"
    assert by_digest[attached.signature]["artifactType"] == SIGNATURE_TYPE
    r = reg.do_request(url + f"?artifactType={SIGNATURE_TYPE}", "GET")
    assert r.headers["OCI-Filters-Applied"] == "artifactType"
    assert [d["digest"] for d in r.json()["manifests"]] == [attached.signature]
    # The image as it was published, before the attaches, has none.
    r = reg.do_request(
        f"http://{attached.server.host}/v2/ipfs/{attached.first_root}/referrers/{attached.top}", "GET"
    )
    assert r.status_code == 200 and r.json()["manifests"] == []


def test_skopeo_copies_the_artifact_and_the_image(attached: Attached, skopeo: Skopeo, tmp_path: Path) -> None:
    host = attached.server.host
    raw = skopeo(
        "inspect", "--tls-verify=false", "--raw", f"docker://{host}/samples/one@{attached.signature}"
    )
    doc = json.loads(raw.stdout)
    assert doc["artifactType"] == SIGNATURE_TYPE
    assert hashlib.sha256(raw.stdout.encode("utf-8", "surrogateescape")).hexdigest() == attached.signature[7:]
    skopeo(
        "copy",
        "--src-tls-verify=false",
        f"docker://{host}/samples/one@{attached.signature}",
        f"oci:{tmp_path / 'artifact'}:sig",
    )
    layer = doc["layers"][0]["digest"]
    assert (tmp_path / "artifact" / "blobs" / "sha256" / layer[7:]).read_bytes() == b"\x00\x01 a signature"
    # The tag still names the same image: attaching changed its root, not its top manifest.
    skopeo(
        "copy", "--src-tls-verify=false", f"docker://{host}/samples/one:v1", f"oci:{tmp_path / 'image'}:v1"
    )
    index = json.loads((tmp_path / "image" / "index.json").read_bytes())
    assert index["manifests"][0]["digest"] == attached.top
