"""Real clients pull the same images from p2pimg and from the reference registry.

Each sample image is published to p2pimg (through its default file origin) and pushed
digest-for-digest to Debian's `docker-registry` (Go distribution 2.8, the reference). Then
skopeo, podman and containerd pull it from both, by name and (from p2pimg) by its
`ipfs/<root CID>` name, and everything the clients end up with must be identical.

The expensive setup (publishing, pushing, one shared `p2pimg serve`) happens once per module in
the `world` fixture; each test only pulls into its own fresh destination.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import (
        Containerd,
        P2pimgServe,
        P2pimgServer,
        Podman,
        PushReference,
        Registry,
        RunP2pimg,
        Sample,
        SampleCache,
        Skopeo,
    )

OCI_SAMPLES = ("one_layer", "multi_layer", "multi_arch", "docker_types")
PLATFORM = "linux/amd64"
SEGMENT = 64 * 1024 * 1024

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

# A CIDv1 in its default text form: multibase "b" (base32, lower case), e.g. "bafyrei...".
CID_RE = re.compile(r"b[a-z2-7]{20,}")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def raw_stdout(result: subprocess.CompletedProcess[str]) -> bytes:
    # run_command decodes with surrogateescape, so this restores the exact bytes.
    return result.stdout.encode("utf-8", "surrogateescape")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


@dataclass(frozen=True)
class Layout:
    """What a client wrote into an OCI layout: index.json entries and verified blobs."""

    entries: list[tuple[str, str, int]]  # (mediaType, digest, size) from index.json
    blobs: dict[str, str]  # file name -> sha256 of its bytes

    @classmethod
    def read(cls, path: Path) -> Layout:
        index = json.loads((path / "index.json").read_bytes())
        entries = [(m["mediaType"], m["digest"], m["size"]) for m in index["manifests"]]
        blobs = {f.name: sha256_file(f) for f in sorted((path / "blobs" / "sha256").iterdir())}
        corrupt = {n: d for n, d in blobs.items() if d != f"sha256:{n}"}
        assert not corrupt, f"{path}: blob content does not match its name: {corrupt}"
        return cls(entries, blobs)

    @property
    def digests(self) -> set[str]:
        return {f"sha256:{name}" for name in self.blobs}


def skopeo_pull(skopeo: Skopeo, ref: str, sample: Sample, dest: Path) -> Layout:
    """`skopeo copy` ref into a fresh OCI layout (all platforms of an index)."""
    all_flag = ["--all"] if sample.is_index else []
    # --preserve-digests: without it skopeo may convert Docker manifests to OCI on the way
    # into an OCI layout, which would hide what the registry actually served.
    skopeo(
        "copy", "--src-tls-verify=false", "--preserve-digests", *all_flag,
        f"docker://{ref}", f"oci:{dest}:{sample.tag}",
    )  # fmt: skip
    return Layout.read(dest)


def skopeo_raw(skopeo: Skopeo, ref: str) -> bytes:
    return raw_stdout(skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{ref}"))


def skopeo_inspect(skopeo: Skopeo, ref: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{ref}").stdout)
    return doc


def podman_identity(podman: Podman, ref: str, root: Path) -> dict[str, Any]:
    """Pull `ref` into the podman storage at `root` and return what identifies the image."""
    podman.pull(ref, root=root, platform=PLATFORM)
    info = podman.inspect(ref, root=root)
    return {
        "Id": info["Id"],
        "Digest": info["Digest"],
        "RootFS": info["RootFS"]["Layers"],
        "Os/Arch": (info["Os"], info["Architecture"]),
    }


def ctr_fetch(containerd: Containerd, ref: str, sample: Sample, namespace: str) -> set[str]:
    """`ctr content fetch` into its own namespace; return the digests in that namespace."""
    platforms = ["--all-platforms"] if sample.is_index else []
    containerd.ctr("content", "fetch", "--plain-http", *platforms, ref, namespace=namespace)
    return containerd.content_digests(namespace)


def ctr_pull(containerd: Containerd, ref: str, namespace: str) -> tuple[tuple[str, str], set[str]]:
    """`ctr images pull` (unpacked with the usable snapshotter) into its own namespace.

    Returns the image's target (mediaType, digest) and the content digests in the namespace.
    """
    containerd.ctr(
        "images", "pull", *containerd.pull_flags, "--platform", PLATFORM, ref,
        namespace=namespace,
    )  # fmt: skip
    targets = containerd.image_targets(namespace)
    assert ref in targets, f"`ctr images ls` in {namespace} lacks {ref}: {targets}"
    return targets[ref], containerd.content_digests(namespace)


def expected_pull_digests(sample: Sample) -> set[str]:
    """Blobs a single-platform pull of `sample` needs: top, platform manifest, config, layers."""
    manifest = sample.platform_manifest(PLATFORM)
    digests = {sample.image.top_digest, manifest["config"]["digest"]}
    digests.update(layer["digest"] for layer in manifest["layers"])
    if sample.is_index:
        index = json.loads(sample.top_manifest()[1])
        digests.update(
            d["digest"]
            for d in index["manifests"]
            if f"{d['platform']['os']}/{d['platform']['architecture']}" == PLATFORM
        )
    return digests


def publish(run_p2pimg: RunP2pimg, sample: Sample, home: Path) -> str:
    """`p2pimg publish` the sample under its name; return the root CID it printed last."""
    result = run_p2pimg("publish", sample.source, sample.name_tag, home=home, check=False)
    assert result.returncode == 0, (
        f"p2pimg publish {sample.source} {sample.name_tag} exited {result.returncode}\n"
        f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-4000:]}"
    )
    lines = result.stdout.strip().splitlines()
    cid = lines[-1].strip() if lines else ""
    assert CID_RE.fullmatch(cid), (
        f"p2pimg publish should print the root CID (CIDv1, base32) as its last stdout line, "
        f"got {cid!r}\n--- stdout ---\n{result.stdout[-4000:]}"
    )
    return cid


# --------------------------------------------------------------------------------------------
# Shared setup
# --------------------------------------------------------------------------------------------


@dataclass
class World:
    """All samples published to one p2pimg home, pushed to the reference, and one server."""

    samples: SampleCache
    registry: Registry
    server: P2pimgServer
    cids: dict[str, str]
    publish_errors: dict[str, str]

    def sample(self, key: str) -> Sample:
        """The sample, failing the calling test if publishing it to p2pimg failed."""
        if key in self.publish_errors:
            pytest.fail(f"publishing {key} to p2pimg failed:\n{self.publish_errors[key]}")
        return self.samples.get(key)

    def ref(self, sample: Sample) -> str:
        return self.registry.ref(sample)

    def p2p(self, sample: Sample) -> str:
        return f"{self.server.host}/{sample.name_tag}"

    def p2p_cid(self, sample: Sample) -> str:
        # Any tag addresses the top manifest/index of an ipfs/<CID> repository.
        return f"{self.server.host}/ipfs/{self.cids[sample.key]}:latest"


@pytest.fixture(scope="module")
def world(
    samples: SampleCache,
    registry: Registry,
    push_reference: PushReference,
    run_p2pimg: RunP2pimg,
    p2pimg_serve_module: P2pimgServe,
    tmp_path_factory: pytest.TempPathFactory,
) -> World:
    home = tmp_path_factory.mktemp("p2pimg-home")
    cids: dict[str, str] = {}
    errors: dict[str, str] = {}
    for key in (*OCI_SAMPLES, "docker_archive"):
        sample = samples.get(key)
        # One sample failing to publish must fail only the tests that use it.
        try:
            cids[key] = publish(run_p2pimg, sample, home)
        except AssertionError as exc:
            errors[key] = str(exc)
    for key in OCI_SAMPLES:
        push_reference(samples.get(key))
    # Serve starts after publishing so it cannot matter whether it rereads its origin.
    server = p2pimg_serve_module(home)
    return World(samples, registry, server, cids, errors)


# --------------------------------------------------------------------------------------------
# The harness itself, against the reference registry only
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["one_layer", "multi_arch", "docker_types"])
def test_harness_reference_registry_roundtrip(
    key: str,
    samples: SampleCache,
    push_reference: PushReference,
    skopeo: Skopeo,
    podman: Podman,
    containerd: Containerd,
    tmp_path: Path,
) -> None:
    """Push to docker-registry and pull back with every client: proves the fixtures work and
    that the reference returns exactly the source image, so comparisons against it mean
    something."""
    sample = samples.get(key)
    ref = push_reference(sample)
    top_type, top_bytes = sample.top_manifest()

    layout = skopeo_pull(skopeo, ref, sample, tmp_path / "skopeo")
    assert layout.entries == [(top_type, sample.image.top_digest, len(top_bytes))]
    assert layout.digests == set(sample.image.blob_digests), "skopeo did not get the source blobs"
    assert skopeo_raw(skopeo, ref) == top_bytes, "registry altered the top manifest bytes"
    assert skopeo_inspect(skopeo, ref)["Digest"] == sample.image.top_digest

    ident = podman_identity(podman, ref, tmp_path / "podman")
    assert ident["Id"] == sample.config_digest(PLATFORM).removeprefix("sha256:")
    assert ident["Os/Arch"] == tuple(PLATFORM.split("/"))

    fetched = ctr_fetch(containerd, ref, sample, f"harness-fetch-{key}")
    assert fetched == set(sample.image.blob_digests)
    target, pulled = ctr_pull(containerd, ref, f"harness-pull-{key}")
    assert target == (top_type, sample.image.top_digest)
    assert pulled == expected_pull_digests(sample)


# --------------------------------------------------------------------------------------------
# skopeo
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", OCI_SAMPLES)
def test_skopeo_copy_matches_reference(key: str, world: World, skopeo: Skopeo, tmp_path: Path) -> None:
    sample = world.sample(key)
    ref = skopeo_pull(skopeo, world.ref(sample), sample, tmp_path / "ref")
    p2p = skopeo_pull(skopeo, world.p2p(sample), sample, tmp_path / "p2p")
    assert p2p.entries == ref.entries, "index.json differs between p2pimg and the reference"
    assert p2p.blobs == ref.blobs, "blob files differ between p2pimg and the reference"
    assert p2p.digests == set(sample.image.blob_digests)


@pytest.mark.parametrize("key", OCI_SAMPLES)
def test_skopeo_inspect_matches_reference(key: str, world: World, skopeo: Skopeo) -> None:
    sample = world.sample(key)
    ref_raw = skopeo_raw(skopeo, world.ref(sample))
    p2p_raw = skopeo_raw(skopeo, world.p2p(sample))
    assert p2p_raw == ref_raw, "`skopeo inspect --raw` bytes differ from the reference"

    ref_info = skopeo_inspect(skopeo, world.ref(sample))
    p2p_info = skopeo_inspect(skopeo, world.p2p(sample))
    for field in ("Digest", "Layers", "Os", "Architecture", "Created"):
        assert p2p_info[field] == ref_info[field], f"`skopeo inspect` {field} differs"


@pytest.mark.parametrize("key", OCI_SAMPLES)
def test_skopeo_by_cid(key: str, world: World, skopeo: Skopeo, tmp_path: Path) -> None:
    sample = world.sample(key)
    cid_ref = world.p2p_cid(sample)
    assert skopeo_raw(skopeo, cid_ref) == skopeo_raw(skopeo, world.ref(sample))
    ref = skopeo_pull(skopeo, world.ref(sample), sample, tmp_path / "ref")
    by_cid = skopeo_pull(skopeo, cid_ref, sample, tmp_path / "cid")
    assert by_cid.entries == ref.entries
    assert by_cid.blobs == ref.blobs
    assert skopeo_inspect(skopeo, cid_ref)["Digest"] == sample.image.top_digest


# --------------------------------------------------------------------------------------------
# podman
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", OCI_SAMPLES)
def test_podman_pull_matches_reference(key: str, world: World, podman: Podman, tmp_path: Path) -> None:
    sample = world.sample(key)
    # Separate storage roots: the second pull must not find layers from the first.
    ref = podman_identity(podman, world.ref(sample), tmp_path / "ref")
    p2p = podman_identity(podman, world.p2p(sample), tmp_path / "p2p")
    assert p2p == ref, "podman sees a different image from p2pimg than from the reference"
    assert p2p["Id"] == sample.config_digest(PLATFORM).removeprefix("sha256:")


@pytest.mark.parametrize("key", OCI_SAMPLES)
def test_podman_pull_by_cid(key: str, world: World, podman: Podman, tmp_path: Path) -> None:
    sample = world.sample(key)
    ref = podman_identity(podman, world.ref(sample), tmp_path / "ref")
    by_cid = podman_identity(podman, world.p2p_cid(sample), tmp_path / "cid")
    assert by_cid == ref, "podman sees a different image by CID than from the reference"


# --------------------------------------------------------------------------------------------
# containerd
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", OCI_SAMPLES)
def test_ctr_content_fetch_matches_reference(key: str, world: World, containerd: Containerd) -> None:
    sample = world.sample(key)
    # Namespaces are isolated in the fixture's containerd, so each fetch really downloads.
    ref = ctr_fetch(containerd, world.ref(sample), sample, f"ref-fetch-{key}")
    p2p = ctr_fetch(containerd, world.p2p(sample), sample, f"p2p-fetch-{key}")
    assert p2p == ref, "`ctr content ls` differs between p2pimg and the reference"
    assert p2p == set(sample.image.blob_digests)


@pytest.mark.parametrize("key", OCI_SAMPLES)
def test_ctr_images_pull_matches_reference(key: str, world: World, containerd: Containerd) -> None:
    sample = world.sample(key)
    ref_target, ref_content = ctr_pull(containerd, world.ref(sample), f"ref-pull-{key}")
    p2p_target, p2p_content = ctr_pull(containerd, world.p2p(sample), f"p2p-pull-{key}")
    assert p2p_target == ref_target, "`ctr images ls` target differs from the reference"
    assert p2p_target[1] == sample.image.top_digest
    assert p2p_content == ref_content, "`ctr content ls` differs after `ctr images pull`"


@pytest.mark.parametrize("key", OCI_SAMPLES)
def test_ctr_by_cid(key: str, world: World, containerd: Containerd) -> None:
    sample = world.sample(key)
    cid_ref = world.p2p_cid(sample)
    ref = ctr_fetch(containerd, world.ref(sample), sample, f"ref-cidcmp-fetch-{key}")
    assert ctr_fetch(containerd, cid_ref, sample, f"cid-fetch-{key}") == ref

    ref_target, ref_content = ctr_pull(containerd, world.ref(sample), f"ref-cidcmp-pull-{key}")
    cid_target, cid_content = ctr_pull(containerd, cid_ref, f"cid-pull-{key}")
    assert cid_target == ref_target
    assert cid_content == ref_content


# --------------------------------------------------------------------------------------------
# docker-archive sources
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchiveFacts:
    config_digest: str
    layer_digests: list[str]
    layer_gzipped: list[bool]


def read_docker_archive(path: Path) -> ArchiveFacts:
    """Digests of the config and layer files as they sit inside a `docker save` tarball."""
    with tarfile.open(path) as tar:

        def member(name: str) -> bytes:
            f = tar.extractfile(name)
            assert f is not None, f"{path}: {name} is not a regular file"
            return f.read()

        (manifest,) = json.loads(member("manifest.json"))
        config = "sha256:" + hashlib.sha256(member(manifest["Config"])).hexdigest()
        layers = [member(name) for name in manifest["Layers"]]
    return ArchiveFacts(
        config,
        ["sha256:" + hashlib.sha256(data).hexdigest() for data in layers],
        [data[:2] == b"\x1f\x8b" for data in layers],
    )


def test_docker_archive_served_as_docker_schema2(world: World, skopeo: Skopeo, tmp_path: Path) -> None:
    sample = world.sample("docker_archive")
    facts = read_docker_archive(sample.path)
    assert facts.config_digest == sample.image.top_digest  # sanity check of the reader

    for ref in (world.p2p(sample), world.p2p_cid(sample)):
        manifest = json.loads(skopeo_raw(skopeo, ref))
        assert manifest.get("mediaType") == DOCKER_MANIFEST, f"{ref}: not Docker schema 2"
        assert manifest.get("schemaVersion") == 2
        assert manifest["config"]["digest"] == facts.config_digest, f"{ref}: config changed"
        assert manifest["config"]["mediaType"] == DOCKER_CONFIG
        assert [layer["digest"] for layer in manifest["layers"]] == facts.layer_digests, (
            f"{ref}: layers are not the archive's layer files byte for byte"
        )
        # The declared compression must match the bytes, or strict clients mis-unpack them.
        assert [layer["mediaType"] for layer in manifest["layers"]] == [
            DOCKER_LAYER_GZIP if gz else DOCKER_LAYER for gz in facts.layer_gzipped
        ]

    pulled = skopeo_pull(skopeo, world.p2p(sample), sample, tmp_path / "pulled")
    assert {facts.config_digest, *facts.layer_digests} <= pulled.digests


def test_docker_archive_podman_pull(world: World, podman: Podman, skopeo: Skopeo, tmp_path: Path) -> None:
    sample = world.sample("docker_archive")
    facts = read_docker_archive(sample.path)
    raw = skopeo_raw(skopeo, world.p2p(sample))
    ident = podman_identity(podman, world.p2p(sample), tmp_path / "podman")
    assert ident["Id"] == facts.config_digest.removeprefix("sha256:")
    assert ident["Digest"] == "sha256:" + hashlib.sha256(raw).hexdigest()


# --------------------------------------------------------------------------------------------
# A layer blob larger than one segment
# --------------------------------------------------------------------------------------------


def test_big_layer_blob_identical(
    samples: SampleCache,
    run_p2pimg: RunP2pimg,
    p2pimg_serve: P2pimgServe,
    p2pimg_home: Path,
    skopeo: Skopeo,
    tmp_path: Path,
) -> None:
    sample = samples.big_layer
    (layer,) = sample.platform_manifest(PLATFORM)["layers"]
    assert layer["size"] > SEGMENT, "the sample must cross the 64 MiB segment boundary"
    publish(run_p2pimg, sample, p2pimg_home)
    server = p2pimg_serve(p2pimg_home)

    # A direct GET first: nothing between the server and the hash verifies or retries.
    url = f"{server.url}/v2/{sample.repo}/blobs/{layer['digest']}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    h, size = hashlib.sha256(), 0
    with opener.open(url, timeout=120) as resp:
        while chunk := resp.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    assert size == layer["size"], f"GET {url} returned {size} bytes, want {layer['size']}"
    assert "sha256:" + h.hexdigest() == layer["digest"], f"GET {url}: bytes differ from source"

    pulled = skopeo_pull(skopeo, f"{server.host}/{sample.name_tag}", sample, tmp_path / "out")
    assert pulled.digests == set(sample.image.blob_digests)
    src = sample.path / "blobs" / "sha256" / layer["digest"].removeprefix("sha256:")
    dst = tmp_path / "out" / "blobs" / "sha256" / layer["digest"].removeprefix("sha256:")
    assert sha256_file(dst) == sha256_file(src) == layer["digest"]
