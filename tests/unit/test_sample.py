"""Tests for the offline sample image generator, including validation with skopeo and umoci."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from p2pimg.ops.sample import LayerSpec, SampleImage, write_docker_archive, write_oci_layout

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
REF_NAME = "org.opencontainers.image.ref.name"

LAYERS = (
    LayerSpec(size=0),
    LayerSpec(size=300_000, files=3),
    LayerSpec(size=70_001, compression="none", files=2),
)
TWO_PLATFORMS = ("linux/amd64", "linux/arm64/v8")


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_path(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.removeprefix("sha256:")


def read_blob(layout: Path, digest: str) -> bytes:
    return blob_path(layout, digest).read_bytes()


def read_json_blob(layout: Path, descriptor: dict[str, Any]) -> Any:
    data = read_blob(layout, descriptor["digest"])
    assert len(data) == descriptor["size"]
    return json.loads(data)


def tree_bytes(root: Path) -> dict[str, bytes]:
    if root.is_file():
        return {"": root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def uncompressed(data: bytes) -> bytes:
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def top_entry(layout: Path, tag: str) -> dict[str, Any]:
    index = json.loads((layout / "index.json").read_bytes())
    entries = [m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) == tag]
    assert len(entries) == 1
    entry: dict[str, Any] = entries[0]
    return entry


def check_image(layout: Path, manifest: dict[str, Any], specs: tuple[LayerSpec, ...]) -> None:
    """Config and layers of one manifest match their descriptors and the layer specs."""
    config = read_json_blob(layout, manifest["config"])
    assert config["rootfs"]["type"] == "layers"
    assert config["config"]["Cmd"] == ["/bin/sh"]
    assert len(manifest["layers"]) == len(specs)
    diff_ids = []
    for desc, spec in zip(manifest["layers"], specs, strict=True):
        data = read_blob(layout, desc["digest"])
        assert (len(data), sha256(data)) == (desc["size"], desc["digest"])
        assert desc["mediaType"].endswith("gzip") == (spec.compression == "gzip")
        assert (data[:2] == b"\x1f\x8b") == (spec.compression == "gzip")
        if spec.compression == "gzip":
            # A zero MTIME field keeps the compressed bytes independent of the wall clock.
            assert data[4:8] == b"\0\0\0\0"
        raw = uncompressed(data)
        diff_ids.append(sha256(raw))
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            members = tar.getmembers()
        payload = [m for m in members if m.name.endswith(".bin")]
        assert len(payload) == spec.files
        assert sum(m.size for m in payload) == spec.size
        assert all(m.isfile() or m.isdir() for m in members)
        assert all(m.uid == 0 and m.gid == 0 for m in members)
        assert len({m.mtime for m in members}) == 1
        assert members[0].mtime < time.time() - 86400, "tar mtimes must be pinned, not 'now'"
        assert any(m.name.endswith(".txt") for m in members)
    assert config["rootfs"]["diff_ids"] == diff_ids


def check_blob_accounting(image: SampleImage) -> None:
    """blob_digests/total_bytes describe exactly what is in blobs/, and no temp files remain."""
    files = {"sha256:" + p.name: p for p in (image.path / "blobs" / "sha256").iterdir()}
    assert len(image.blob_digests) == len(set(image.blob_digests))
    assert set(image.blob_digests) == set(files)
    assert image.total_bytes == sum(p.stat().st_size for p in files.values())
    for digest, path in files.items():
        assert sha256(path.read_bytes()) == digest


def test_layout_is_deterministic(tmp_path: Path) -> None:
    a = write_oci_layout(tmp_path / "a", LAYERS, tag="v1", seed=7, platforms=TWO_PLATFORMS)
    b = write_oci_layout(tmp_path / "b", LAYERS, tag="v1", seed=7, platforms=TWO_PLATFORMS)
    assert tree_bytes(a.path) == tree_bytes(b.path)
    assert (a.top_digest, a.blob_digests, a.total_bytes) == (
        b.top_digest,
        b.blob_digests,
        b.total_bytes,
    )
    c = write_oci_layout(tmp_path / "c", LAYERS, tag="v1", seed=8, platforms=TWO_PLATFORMS)
    assert c.top_digest != a.top_digest


def test_single_platform_layout(tmp_path: Path) -> None:
    image = write_oci_layout(tmp_path / "img", LAYERS, tag="v1", seed=1)
    assert json.loads((image.path / "oci-layout").read_bytes()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((image.path / "index.json").read_bytes())
    assert index["schemaVersion"] == 2
    assert len(index["manifests"]) == 1
    entry = top_entry(image.path, "v1")
    assert entry["mediaType"] == OCI_MANIFEST
    assert entry["digest"] == image.top_digest
    manifest = read_json_blob(image.path, entry)
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == OCI_MANIFEST
    assert manifest["config"]["mediaType"] == OCI_CONFIG
    assert [d["mediaType"] for d in manifest["layers"]] == [
        OCI_LAYER_GZIP,
        OCI_LAYER_GZIP,
        OCI_LAYER,
    ]
    config = read_json_blob(image.path, manifest["config"])
    assert (config["os"], config["architecture"]) == ("linux", "amd64")
    check_image(image.path, manifest, LAYERS)
    check_blob_accounting(image)
    # JSON is compact with sorted keys, so its bytes are reproducible by other implementations.
    raw = read_blob(image.path, image.top_digest)
    assert raw == json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()


def test_multi_platform_index(tmp_path: Path) -> None:
    image = write_oci_layout(tmp_path / "img", LAYERS[:2], tag="multi", platforms=TWO_PLATFORMS)
    entry = top_entry(image.path, "multi")
    assert entry["mediaType"] == OCI_INDEX
    assert entry["digest"] == image.top_digest
    index = read_json_blob(image.path, entry)
    assert (index["schemaVersion"], index["mediaType"]) == (2, OCI_INDEX)
    platforms = [m["platform"] for m in index["manifests"]]
    assert platforms == [
        {"os": "linux", "architecture": "amd64"},
        {"os": "linux", "architecture": "arm64", "variant": "v8"},
    ]
    layer_sets = []
    for desc in index["manifests"]:
        assert desc["mediaType"] == OCI_MANIFEST
        manifest = read_json_blob(image.path, desc)
        config = read_json_blob(image.path, manifest["config"])
        for key, value in desc["platform"].items():
            assert config[key] == value
        check_image(image.path, manifest, LAYERS[:2])
        layer_sets.append({d["digest"] for d in manifest["layers"]})
    assert not layer_sets[0] & layer_sets[1], "platforms must not share layer contents"
    check_blob_accounting(image)


def test_docker_media_types(tmp_path: Path) -> None:
    single = write_oci_layout(tmp_path / "one", LAYERS[1:2], media="docker")
    manifest = read_json_blob(single.path, top_entry(single.path, "latest"))
    assert manifest["mediaType"] == DOCKER_MANIFEST
    assert manifest["config"]["mediaType"] == DOCKER_CONFIG
    assert [d["mediaType"] for d in manifest["layers"]] == [DOCKER_LAYER_GZIP]
    check_image(single.path, manifest, LAYERS[1:2])

    multi = write_oci_layout(tmp_path / "two", LAYERS[1:2], media="docker", platforms=TWO_PLATFORMS)
    entry = top_entry(multi.path, "latest")
    assert entry["mediaType"] == DOCKER_LIST
    manifest_list = read_json_blob(multi.path, entry)
    assert manifest_list["mediaType"] == DOCKER_LIST
    assert {m["mediaType"] for m in manifest_list["manifests"]} == {DOCKER_MANIFEST}
    check_blob_accounting(multi)


def test_other_tags_are_kept(tmp_path: Path) -> None:
    first = write_oci_layout(tmp_path / "img", LAYERS[:1], tag="a", seed=1)
    write_oci_layout(tmp_path / "img", LAYERS[:1], tag="b", seed=2)
    again = write_oci_layout(tmp_path / "img", LAYERS[:1], tag="a", seed=1)
    index = json.loads((tmp_path / "img" / "index.json").read_bytes())
    assert sorted(m["annotations"][REF_NAME] for m in index["manifests"]) == ["a", "b"]
    assert top_entry(tmp_path / "img", "a")["digest"] == first.top_digest == again.top_digest


def test_layers_are_streamed(tmp_path: Path) -> None:
    size = 24 << 20
    tracemalloc.start()
    try:
        write_oci_layout(tmp_path / "plain", [LayerSpec(size, compression="none")])
        write_oci_layout(tmp_path / "gz", [LayerSpec(size // 4)])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak Python allocation {peak} bytes suggests a layer held in memory"


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        LayerSpec(-1)
    with pytest.raises(ValueError):
        LayerSpec(1, compression="zstd")
    with pytest.raises(ValueError):
        LayerSpec(1, files=0)
    with pytest.raises(ValueError):
        write_oci_layout(tmp_path / "x", LAYERS, media="helm")
    with pytest.raises(ValueError):
        write_oci_layout(tmp_path / "x", LAYERS, platforms=("linux",))


def test_docker_archive(tmp_path: Path) -> None:
    image = write_docker_archive(tmp_path / "a.tar", LAYERS, repo_tag="demo/app:1", seed=3)
    again = write_docker_archive(tmp_path / "b.tar", LAYERS, repo_tag="demo/app:1", seed=3)
    assert image.path.read_bytes() == again.path.read_bytes()

    with tarfile.open(image.path) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]
    (entry,) = json.loads(files["manifest.json"])
    assert entry["RepoTags"] == ["demo/app:1"]
    config_bytes = files[entry["Config"]]
    assert entry["Config"] == image.top_digest.removeprefix("sha256:") + ".json"
    assert sha256(config_bytes) == image.top_digest
    config = json.loads(config_bytes)
    assert (config["os"], config["architecture"]) == ("linux", "amd64")

    layer_blobs = [files[name] for name in entry["Layers"]]
    assert all(name.endswith("/layer.tar") for name in entry["Layers"])
    assert [b[:2] == b"\x1f\x8b" for b in layer_blobs] == [s.compression == "gzip" for s in LAYERS]
    assert config["rootfs"]["diff_ids"] == [sha256(uncompressed(b)) for b in layer_blobs]
    assert image.blob_digests == [image.top_digest, *(sha256(b) for b in layer_blobs)]
    assert image.total_bytes == len(config_bytes) + sum(len(b) for b in layer_blobs)

    repositories = json.loads(files["repositories"])
    assert repositories == {"demo/app": {"1": entry["Layers"][-1].split("/")[0]}}
    assert not list(tmp_path.glob(".tmp*")), "scratch files must be cleaned up"


def test_docker_archive_untagged_reference(tmp_path: Path) -> None:
    image = write_docker_archive(tmp_path / "a.tar", LAYERS[:1], repo_tag="localhost:5000/app")
    with tarfile.open(image.path) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        repositories = json.load(tar.extractfile("repositories"))  # type: ignore[arg-type]
    # The registry port must not be mistaken for a tag.
    assert manifest[0]["RepoTags"] == ["localhost:5000/app:latest"]
    assert list(repositories) == ["localhost:5000/app"]
    assert list(repositories["localhost:5000/app"]) == ["latest"]


# --- validation with real tools -------------------------------------------------------------


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} binary not found on PATH; cannot validate against it")
    return path


def run(*args: str) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SampleImage]:
    root = tmp_path_factory.mktemp("layouts")
    return {
        "single": write_oci_layout(root / "single", LAYERS, tag="v1"),
        "multi": write_oci_layout(root / "multi", LAYERS[:2], tag="v2", platforms=TWO_PLATFORMS),
        "docker": write_oci_layout(root / "docker", LAYERS, media="docker"),
        "docker-multi": write_oci_layout(
            root / "docker-multi", LAYERS[:2], media="docker", platforms=TWO_PLATFORMS
        ),
    }


@pytest.mark.parametrize(("name", "tag"), [("single", "v1"), ("multi", "v2")])
def test_skopeo_reads_oci_layout(
    layouts: dict[str, SampleImage], tmp_path: Path, name: str, tag: str
) -> None:
    skopeo = tool("skopeo")
    image = layouts[name]
    raw = run(skopeo, "inspect", "--raw", f"oci:{image.path}:{tag}").encode()
    assert sha256(raw) == image.top_digest
    # Full inspect resolves the config (and, for an index, the amd64 instance) too.
    info = json.loads(run(skopeo, "inspect", f"oci:{image.path}:{tag}"))
    assert (info["Os"], info["Architecture"]) == ("linux", "amd64")
    # --insecure-policy: copying between local directories must not depend on /etc/containers.
    copy = f"oci:{tmp_path / 'copy'}:{tag}"
    run(skopeo, "--insecure-policy", "copy", "--all", f"oci:{image.path}:{tag}", copy)
    assert json.loads(run(skopeo, "inspect", "--raw", copy))


@pytest.mark.parametrize("name", ["docker", "docker-multi"])
def test_skopeo_reads_docker_media_layout(layouts: dict[str, SampleImage], tmp_path: Path, name: str) -> None:
    skopeo = tool("skopeo")
    image = layouts[name]
    # skopeo 1.9 skips index.json entries with Docker media types when resolving a tag, so
    # address the layout's only image without a tag.
    raw = run(skopeo, "inspect", "--raw", f"oci:{image.path}").encode()
    assert sha256(raw) == image.top_digest
    copy = f"dir:{tmp_path / 'copy'}"
    run(skopeo, "--insecure-policy", "copy", "--all", f"oci:{image.path}", copy)


def test_skopeo_reads_docker_archive(tmp_path: Path) -> None:
    skopeo = tool("skopeo")
    image = write_docker_archive(tmp_path / "img.tar", LAYERS)
    info = json.loads(run(skopeo, "inspect", f"docker-archive:{image.path}"))
    assert (info["Os"], info["Architecture"]) == ("linux", "amd64")
    config = json.loads(run(skopeo, "inspect", "--config", "--raw", f"docker-archive:{image.path}"))
    # skopeo reports uncompressed layer digests for docker archives.
    assert info["Layers"] == config["rootfs"]["diff_ids"]
    copy = f"oci:{tmp_path / 'copy'}:t"
    run(skopeo, "--insecure-policy", "copy", f"docker-archive:{image.path}", copy)


def test_umoci_stat_and_unpack(layouts: dict[str, SampleImage], tmp_path: Path) -> None:
    umoci = tool("umoci")
    image = layouts["single"]
    # umoci 0.4 cannot resolve a tag that points at an image index, so only the single image.
    stat = json.loads(run(umoci, "stat", "--json", "--image", f"{image.path}:v1"))
    assert len(stat["history"]) == len(LAYERS)
    bundle = tmp_path / "bundle"
    run(umoci, "unpack", "--rootless", "--image", f"{image.path}:v1", str(bundle))
    payload = sorted((bundle / "rootfs" / "data").rglob("*.bin"))
    assert sum(p.stat().st_size for p in payload) == sum(s.size for s in LAYERS)
    assert len(payload) == sum(s.files for s in LAYERS)
