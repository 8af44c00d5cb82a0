"""OCI referrers end to end in process: publish carries an OCI layout's artifacts whose subject is
one of the image's manifests, `publish --attach` adds one next to a published image, and the
registry lists them with `GET /v2/<name>/referrers/<digest>` by name and by `ipfs/<CID>`."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from _referrers import OCI_INDEX, SBOM, SIGNATURE, WithReferrers, layout_with_referrers
from _support import CHUNK, start_registry

from p2pimg.content import dagcbor, signing
from p2pimg.content.cid import Cid
from p2pimg.content.model import ImageRoot, TagRecord
from p2pimg.content.referrers import CREATED_ANNOTATION, EMPTY_DIGEST, EMPTY_MEDIA_TYPE, TITLE_ANNOTATION
from p2pimg.content.signing import TagSignatureError, TrustStore
from p2pimg.errors import InvalidInput, ManifestUnknown, OriginError, SourceInvalid
from p2pimg.fetch.resolver import Resolver
from p2pimg.ops.inputs import read_source
from p2pimg.ops.publish import attach, publish
from p2pimg.ops.sample import SampleImage
from p2pimg.sources.origins import FileOrigin, block_key, tag_key
from p2pimg.store.chunks import ChunkStore


async def load_root(origin: FileOrigin, cid: Cid) -> ImageRoot:
    block = await origin.get(block_key(cid), max_size=1 << 20)
    return ImageRoot.from_node(dagcbor.decode_verified(block, cid))


async def tag_record(origin: FileOrigin) -> TagRecord:
    data = await origin.get(tag_key("demo/app", "1"), max_size=4096)
    return TagRecord.decode(data, name="demo/app", tag="1")


def error_code(response: httpx.Response) -> str:
    code: str = response.json()["errors"][0]["code"]
    return code


@dataclass
class World:
    layout: WithReferrers
    origin: FileOrigin
    root: Cid
    client: httpx.AsyncClient


@pytest.fixture
async def world(tmp_path: Path, sample: SampleImage, nursery: trio.Nursery) -> AsyncIterator[World]:
    layout = layout_with_referrers(Path(sample.path), tmp_path / "layout")
    origin = FileOrigin(tmp_path / "origin")
    report = await publish(f"oci:{layout.path}:1", "demo/app", "1", origin, chunk_size=CHUNK)
    url = await start_registry(nursery, ChunkStore(tmp_path / "cache"), origin)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        yield World(layout, origin, report.root, client)


# -- publish from an OCI layout ------------------------------------------------------------


async def test_publish_carries_the_layouts_referrers(world: World) -> None:
    w = world.layout
    root = await load_root(world.origin, world.root)
    assert root.top == w.top.digest
    assert root.referrers == {
        w.top.digest: tuple(sorted(r.digest for r in w.of_top())),
        w.sbom.digest: (w.sbom_signature.digest,),
    }
    # The artifacts are manifests of the image, their blobs blobs of it: pulled like the rest.
    for r in [*w.of_top(), w.sbom_signature]:
        assert root.manifests[r.digest].media_type == r.media_type
        assert root.manifests[r.digest].size == r.size
    assert EMPTY_DIGEST in root.blobs
    # A manifest whose subject is not one of the image's is not part of it.
    assert w.stranger.digest not in root.manifests
    assert all(w.stranger.digest not in digests for digests in root.referrers.values())


def test_a_layout_without_a_tag_is_the_one_image_among_its_referrers(
    tmp_path: Path, sample: SampleImage
) -> None:
    """index.json lists the image and its (untagged) artifacts: `oci:DIR` picks the image."""
    layout = layout_with_referrers(Path(sample.path), tmp_path / "layout")
    with_tag = read_source(f"oci:{layout.path}:1")
    without = read_source(f"oci:{layout.path}")
    assert without.top == with_tag.top == layout.top.digest
    assert without.referrers == with_tag.referrers and without.referrers


def test_a_layout_missing_a_referrers_blob_is_refused(tmp_path: Path, sample: SampleImage) -> None:
    layout = layout_with_referrers(Path(sample.path), tmp_path / "layout")
    sig = json.loads((layout.path / "blobs" / "sha256" / layout.signature.digest[7:]).read_bytes())
    (layout.path / "blobs" / "sha256" / sig["layers"][0]["digest"][7:]).unlink()
    with pytest.raises(SourceInvalid, match="missing blob"):
        read_source(f"oci:{layout.path}:1")


async def test_an_image_without_referrers_keeps_its_root_cid(tmp_path: Path, sample: SampleImage) -> None:
    """Roots without referrers encode exactly as before the field existed: no `referrers` key."""
    origin = FileOrigin(tmp_path / "origin")
    report = await publish(f"oci:{sample.path}:1", "demo/app", "1", origin, chunk_size=CHUNK)
    node = dagcbor.decode(await origin.get(block_key(report.root), max_size=1 << 20))
    assert set(node) == {"type", "top", "manifests", "blobs"}


# -- the referrers API -------------------------------------------------------------------------


def listed(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == OCI_INDEX
    assert int(response.headers["content-length"]) == len(response.content)
    doc = response.json()
    assert doc["schemaVersion"] == 2 and doc["mediaType"] == OCI_INDEX
    manifests: list[dict[str, Any]] = doc["manifests"]
    return manifests


@pytest.mark.parametrize("by", ["name", "ipfs"])
async def test_referrers_are_listed(world: World, by: str) -> None:
    w = world.layout
    name = "demo/app" if by == "name" else f"ipfs/{world.root}"
    r = await world.client.get(f"/v2/{name}/referrers/{w.top.digest}")
    assert "oci-filters-applied" not in r.headers
    got = listed(r)
    assert sorted(got, key=lambda d: d["digest"]) == sorted(
        (x.listed() for x in w.of_top()), key=lambda d: d["digest"]
    )
    by_digest = {d["digest"]: d for d in got}
    assert by_digest[w.sbom.digest]["artifactType"] == SBOM
    assert by_digest[w.sbom.digest]["annotations"] == {"org.example.format": "json"}
    assert by_digest[w.typed.digest]["artifactType"] == "application/vnd.example.config.v1+json"
    assert "artifactType" not in by_digest[w.index.digest]  # an index without one has none
    assert by_digest[w.index.digest]["mediaType"] == OCI_INDEX
    # A referrer's own referrers: the SBOM's signature.
    assert listed(await world.client.get(f"/v2/{name}/referrers/{w.sbom.digest}")) == [
        w.sbom_signature.listed()
    ]
    # Each listed manifest is served by digest, byte for byte, and so are its blobs.
    for desc in got:
        m = await world.client.get(f"/v2/{name}/manifests/{desc['digest']}")
        assert m.status_code == 200 and m.headers["content-type"] == desc["mediaType"]
        assert "sha256:" + hashlib.sha256(m.content).hexdigest() == desc["digest"]
        for layer in m.json().get("layers", []):
            b = await world.client.get(f"/v2/{name}/blobs/{layer['digest']}")
            assert b.status_code == 200
            assert "sha256:" + hashlib.sha256(b.content).hexdigest() == layer["digest"]


@pytest.mark.parametrize("by", ["name", "ipfs"])
async def test_referrers_filtered_by_artifact_type(world: World, by: str) -> None:
    w = world.layout
    name = "demo/app" if by == "name" else f"ipfs/{world.root}"
    url = f"/v2/{name}/referrers/{w.top.digest}"
    for artifact_type, expected in (
        (SBOM, [w.sbom]),
        (SIGNATURE, [w.signature]),
        ("application/vnd.example.none", []),
    ):
        r = await world.client.get(url, params={"artifactType": artifact_type})
        assert r.headers["oci-filters-applied"] == "artifactType"
        assert listed(r) == [x.listed() for x in expected], artifact_type
    # An empty filter filters nothing, and says so by leaving the header out.
    r = await world.client.get(url, params={"artifactType": ""})
    assert len(listed(r)) == 4 and "oci-filters-applied" not in r.headers


@pytest.mark.parametrize("by", ["name", "ipfs"])
async def test_no_referrers_is_an_empty_index(world: World, by: str) -> None:
    name = "demo/app" if by == "name" else f"ipfs/{world.root}"
    config = json.loads((world.layout.path / "blobs" / "sha256" / world.layout.top.digest[7:]).read_bytes())
    for subject in ("sha256:" + "0" * 64, config["config"]["digest"], world.layout.signature.digest):
        assert listed(await world.client.get(f"/v2/{name}/referrers/{subject}")) == []


async def test_referrers_head(world: World) -> None:
    url = f"/v2/demo/app/referrers/{world.layout.top.digest}"
    get = await world.client.get(url, params={"artifactType": SBOM})
    head = await world.client.head(url, params={"artifactType": SBOM})
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(get.content))
    assert head.headers["content-type"] == OCI_INDEX and head.headers["oci-filters-applied"] == "artifactType"


async def test_referrers_errors(world: World) -> None:
    missing_root = "bafyreiaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
    top = world.layout.top.digest
    for path, status, code in (
        (f"/v2/nobody/here/referrers/{top}", 404, "NAME_UNKNOWN"),
        (f"/v2/ipfs/{missing_root}/referrers/{top}", 404, "NAME_UNKNOWN"),
        ("/v2/demo/app/referrers/sha256:1234", 400, "DIGEST_INVALID"),
        ("/v2/demo/app/referrers/latest", 400, "DIGEST_INVALID"),
        (f"/v2/Demo/referrers/{top}", 400, "NAME_INVALID"),
    ):
        r = await world.client.get(path)
        assert (r.status_code, error_code(r)) == (status, code), path
    r = await world.client.delete(f"/v2/demo/app/referrers/{top}")
    assert r.status_code == 405 and error_code(r) == "UNSUPPORTED"


# -- attach ------------------------------------------------------------------------------------


async def published(tmp_path: Path, sample: SampleImage) -> tuple[FileOrigin, Resolver, Cid]:
    origin = FileOrigin(tmp_path / "origin")
    report = await publish(f"oci:{sample.path}:1", "demo/app", "1", origin, chunk_size=CHUNK)
    return origin, Resolver(ChunkStore(tmp_path / "cache"), origin, tag_ttl=0), report.root


async def test_attach_adds_an_artifact_and_moves_the_tag(tmp_path: Path, sample: SampleImage) -> None:
    origin, resolver, first = await published(tmp_path, sample)
    before = await load_root(origin, first)
    sbom = tmp_path / "sbom.spdx.json"
    sbom.write_text('{"spdxVersion": "SPDX-2.3"}')
    report = await attach(
        resolver,
        "demo/app",
        "1",
        [sbom],
        origin,
        artifact_type="application/spdx+json",
        media_type="application/spdx+json",
        annotations={"org.example.by": "test"},
        chunk_size=CHUNK,
    )
    root = await load_root(origin, report.root)
    assert report.root != first and report.artifact is not None
    # The image is unchanged; the artifact is a referrer of its top manifest.
    assert root.top == before.top
    assert {d: m for d, m in root.manifests.items() if d != report.artifact} == before.manifests
    assert root.referrers == {before.top: (report.artifact,)}
    manifest = json.loads(await origin.get(block_key(root.manifests[report.artifact].cid), max_size=1 << 20))
    file_digest = "sha256:" + hashlib.sha256(sbom.read_bytes()).hexdigest()
    assert manifest["artifactType"] == "application/spdx+json"
    assert manifest["config"] == {
        "mediaType": EMPTY_MEDIA_TYPE,
        "digest": EMPTY_DIGEST,
        "size": 2,
        "data": "e30=",
    }
    assert manifest["layers"] == [
        {
            "mediaType": "application/spdx+json",
            "digest": file_digest,
            "size": sbom.stat().st_size,
            "annotations": {TITLE_ANNOTATION: "sbom.spdx.json"},
        }
    ]
    assert manifest["subject"] == {
        "mediaType": before.top_entry.media_type,
        "digest": before.top,
        "size": before.top_entry.size,
    }
    assert manifest["annotations"]["org.example.by"] == "test"
    assert CREATED_ANNOTATION in manifest["annotations"]
    assert set(root.blobs) == set(before.blobs) | {EMPTY_DIGEST, file_digest}
    # The tag moved, with a higher sequence number.
    record = await tag_record(origin)
    assert record.root == report.root
    # A second attach keeps the first.
    sig = tmp_path / "image.sig"
    sig.write_bytes(b"\x00signature")
    again = await attach(resolver, "demo/app", "1", [sig], origin, artifact_type=SIGNATURE, chunk_size=CHUNK)
    root2 = await load_root(origin, again.root)
    assert root2.referrers == {before.top: tuple(sorted([report.artifact, again.artifact or ""]))}
    assert set(root2.manifests) == set(root.manifests) | {again.artifact}


async def start_registry_without_tag_ttl(nursery: trio.Nursery, store: ChunkStore, origin: FileOrigin) -> str:
    """A registry whose resolver reads tags again on every request (start_registry's keeps them 5 s)."""
    from p2pimg.fetch.engine import FetchConfig, Fetcher
    from p2pimg.metrics import Metrics
    from p2pimg.sources.base import OriginSource
    from p2pimg.web.registry import Registry
    from p2pimg.web.server import serve_http

    metrics = Metrics()
    fetcher = Fetcher(store, [OriginSource(origin)], nursery, metrics=metrics, config=FetchConfig(tick=0.05))
    registry = Registry(store, Resolver(store, origin, tag_ttl=0), fetcher, metrics)
    listeners = await nursery.start(serve_http, registry.handle, "127.0.0.1", 0)
    host, port = listeners[0].socket.getsockname()[:2]
    return f"http://{host}:{port}"


async def test_attached_artifacts_are_listed_by_the_registry(
    tmp_path: Path, sample: SampleImage, nursery: trio.Nursery
) -> None:
    """An attach moves the tag: the name lists the new artifact once the tag is read again (here at
    once: no tag TTL), the old root's CID still lists what it had (nothing), the new one the artifact."""
    origin, resolver, first = await published(tmp_path, sample)
    store = ChunkStore(tmp_path / "cache-registry")
    url = await start_registry_without_tag_ttl(nursery, store, origin)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        top = sample.top_digest
        assert listed(await client.get(f"/v2/demo/app/referrers/{top}")) == []
        note = tmp_path / "note.txt"
        note.write_text("hello")
        report = await attach(resolver, "demo/app", "1", [note], origin, artifact_type=SBOM, chunk_size=CHUNK)
        assert listed(await client.get(f"/v2/ipfs/{first}/referrers/{top}")) == []
        (desc,) = listed(await client.get(f"/v2/ipfs/{report.root}/referrers/{top}"))
        assert desc["digest"] == report.artifact and desc["artifactType"] == SBOM
        assert listed(await client.get(f"/v2/demo/app/referrers/{top}")) == [desc]
        layer = (await client.get(f"/v2/demo/app/manifests/{report.artifact}")).json()["layers"][0]
        blob = await client.get(f"/v2/demo/app/blobs/{layer['digest']}")
        assert blob.content == b"hello"


async def test_attach_refusals(tmp_path: Path, sample: SampleImage) -> None:
    origin, resolver, _ = await published(tmp_path, sample)
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(ManifestUnknown):
        await attach(resolver, "demo/app", "2", [f], origin, artifact_type=SBOM)
    with pytest.raises(SourceInvalid, match="no such file"):
        await attach(resolver, "demo/app", "1", [tmp_path / "nope"], origin, artifact_type=SBOM)
    for bad in ("sbom", "a/b/c", "", "application/ spdx"):
        with pytest.raises(InvalidInput, match="artifact type"):
            await attach(resolver, "demo/app", "1", [f], origin, artifact_type=bad)
        with pytest.raises(InvalidInput, match="media type"):
            await attach(resolver, "demo/app", "1", [f], origin, artifact_type=SBOM, media_type=bad)


async def test_attach_refuses_a_tag_that_moved_meanwhile(
    tmp_path: Path, sample: SampleImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    origin, resolver, first = await published(tmp_path, sample)
    f = tmp_path / "f"
    f.write_text("x")
    real_root = resolver.root

    async def root_then_republish(cid: Cid) -> ImageRoot:
        found = await real_root(cid)
        # Another publish moves the tag between the attach's read and its write.
        await origin.put_bytes(
            tag_key("demo/app", "1"),
            TagRecord(name="demo/app", tag="1", root=Cid.of_dag_cbor(b"elsewhere"), seq=2**62).encode(),
        )
        return found

    monkeypatch.setattr(resolver, "root", root_then_republish)
    with pytest.raises(OriginError, match="moved while attaching"):
        await attach(resolver, "demo/app", "1", [f], origin, artifact_type=SBOM)
    record = await tag_record(origin)
    assert record.seq == 2**62  # untouched


async def test_attach_signs_and_needs_a_trusted_record(tmp_path: Path, sample: SampleImage) -> None:
    """With a publisher key the new record is signed; an image whose record the home's trust policy
    refuses (unsigned, once the home has a key) is not built upon."""
    home = tmp_path / "home"
    origin, _, _ = await published(tmp_path, sample)  # unsigned
    signing.generate_key(home)
    signer = signing.load_signer(home)
    assert signer is not None
    trust = TrustStore.load(home)
    resolver = Resolver(ChunkStore(tmp_path / "cache2"), origin, trust=trust, tag_ttl=0)
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(TagSignatureError):
        await attach(resolver, "demo/app", "1", [f], origin, artifact_type=SBOM, signer=signer)
    await publish(f"oci:{sample.path}:1", "demo/app", "1", origin, chunk_size=CHUNK, signer=signer)
    report = await attach(resolver, "demo/app", "1", [f], origin, artifact_type=SBOM, signer=signer)
    assert report.record.key == signer.key_id
    trust.check(report.record)


# -- the command line --------------------------------------------------------------------------


def run_cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pimg", *args, "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_publish_attach(tmp_path: Path, sample: SampleImage) -> None:
    home = tmp_path / "home"
    first = run_cli("publish", f"oci:{sample.path}:1", "demo/app:1", home=home)
    assert first.returncode == 0, first.stderr
    sbom = tmp_path / "sbom.json"
    sbom.write_text("{}")
    result = run_cli(
        "publish",
        "--attach",
        str(sbom),
        "--artifact-type",
        SBOM,
        "--media-type",
        "application/json",
        "--annotation",
        "org.example.k=v=w",
        "demo/app:1",
        home=home,
    )
    assert result.returncode == 0, result.stderr
    cid = result.stdout.strip().splitlines()[-1]
    assert cid != first.stdout.strip().splitlines()[-1]
    assert "attached sha256:" in result.stderr
    resolved = run_cli("resolve", "demo/app:1", home=home)
    assert resolved.stdout.strip() == cid

    async def check() -> None:
        root = await load_root(FileOrigin(home / "origin"), Cid.parse(cid))
        (artifact,) = root.referrers[sample.top_digest]
        doc = json.loads(
            await FileOrigin(home / "origin").get(block_key(root.manifests[artifact].cid), max_size=1 << 20)
        )
        assert doc["annotations"]["org.example.k"] == "v=w"
        assert doc["layers"][0]["mediaType"] == "application/json"

    trio.run(check)


@pytest.mark.parametrize(
    "args,message",
    [
        (("publish", "--attach", "f", "--artifact-type", SBOM, "oci:x", "demo/app:1"), "NAME:TAG alone"),
        (("publish", "--attach", "f", "demo/app:1"), "needs --artifact-type"),
        (("publish", "demo/app:1"), "needs SOURCE and NAME:TAG"),
        (("publish", "oci:x", "demo/app:1", "--artifact-type", SBOM), "go with --attach"),
        (
            ("publish", "--attach", "f", "--artifact-type", SBOM, "--annotation", "novalue", "demo/app:1"),
            "expected KEY=VALUE",
        ),
        (("publish", "--attach", "f", "--artifact-type", "notatype", "demo/app:1"), "invalid artifact type"),
    ],
)
def test_cli_attach_errors(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    (tmp_path / "f").write_text("x")
    result = subprocess.run(
        [sys.executable, "-m", "p2pimg", *args, "--home", str(tmp_path / "home")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
