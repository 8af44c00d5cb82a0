"""Pull-through mirror mode against the Debian docker-registry as the upstream.

p2pimg serves names it has not published from the upstream: verified against the whole-blob
digest, cached once it matches, and from then on served from the cache. It works
as a containerd mirror (hosts.toml, `?ns=`) and a podman mirror (registries.conf).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from conftest import metric, run_command

from p2pimg.ops.sample import LayerSpec, write_oci_layout

if TYPE_CHECKING:
    from conftest import Containerd, P2pimgServe, Podman, Registry, RunP2pimg, Skopeo


def push(skopeo: Skopeo, layout: Path, tag: str, ref: str) -> None:
    skopeo("copy", "--dest-tls-verify=false", "--preserve-digests", f"oci:{layout}:{tag}", f"docker://{ref}")


def pull_digests(skopeo: Skopeo, ref: str, dest: Path) -> tuple[str, set[str]]:
    skopeo("copy", "--src-tls-verify=false", "--preserve-digests", f"docker://{ref}", f"oci:{dest}:x")
    index = json.loads((dest / "index.json").read_text())
    blobs = {
        "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest() for p in (dest / "blobs" / "sha256").iterdir()
    }
    assert blobs == {"sha256:" + p.name for p in (dest / "blobs" / "sha256").iterdir()}, "a blob is corrupt"
    return index["manifests"][0]["digest"], blobs


def test_pull_through_caches_and_verifies(
    registry: Registry, skopeo: Skopeo, p2pimg_serve: P2pimgServe, p2pimg_home: Path, tmp_path: Path
) -> None:
    image = write_oci_layout(
        tmp_path / "img", [LayerSpec(3 << 20), LayerSpec(1 << 20, "none")], tag="1", seed=11
    )
    repo = f"mirror/{uuid.uuid4().hex[:8]}"
    push(skopeo, image.path, "1", f"{registry.host}/{repo}:1")
    server = p2pimg_serve(p2pimg_home, extra_args=["--upstream", registry.url])

    top, blobs = pull_digests(skopeo, f"{server.host}/{repo}:1", tmp_path / "a")
    assert top == image.top_digest and blobs == set(image.blob_digests)
    layer_bytes = image.total_bytes - len((image.path / "blobs" / "sha256" / top[7:]).read_bytes())
    assert metric(server.host, "p2pimg_source_bytes_total", source="upstream") == layer_bytes
    # The name is the upstream's: its blobs are not read ahead from the origin.
    for outcome in ("used", "wasted"):
        assert metric(server.host, "p2pimg_read_ahead_bytes_total", outcome=outcome) == 0
    # Verified upstream blobs are now ordinary cached blobs (nothing is left half-written).
    cache = p2pimg_home / "cache"
    for digest in blobs - {top}:
        assert (cache / "blobs" / "sha256" / digest[7:]).is_file()
    assert not [p for p in (cache / "partial").iterdir() if p.suffix == ".data"]

    # A second pull is served from the cache: no upstream blob bytes.
    again, _ = pull_digests(skopeo, f"{server.host}/{repo}:1", tmp_path / "b")
    assert again == top
    assert metric(server.host, "p2pimg_source_bytes_total", source="upstream") == layer_bytes
    assert metric(server.host, "p2pimg_cache_requests_total", result="hit") >= 2

    # The dashboard lists the mirrored image, cached whole, and its fetches from the upstream.
    with urllib.request.urlopen(f"http://{server.host}/ui/api/images", timeout=10) as r:
        images = json.loads(r.read())["images"]
    (shown,) = [i for i in images if i["name"] == repo]
    assert shown["kind"] == "mirror" and shown["tag"] == "1" and shown["digest"] == top
    assert shown["upstream"] == registry.host and shown["root"] is None and shown["pinned"] is False
    assert (
        shown["size"]
        == shown["cached"]
        == image.total_bytes - len((image.path / "blobs" / "sha256" / top[7:]).read_bytes())
    )
    with urllib.request.urlopen(f"http://{server.host}/ui/api/transfers", timeout=10) as r:
        finished = json.loads(r.read())["finished"]
    layers = [t for t in finished if t["repository"] == repo]
    assert layers and all(t["ok"] and t["sources"] == [f"upstream {registry.url}"] for t in layers)


def test_corrupt_upstream_blob_is_refused(
    registry: Registry, skopeo: Skopeo, p2pimg_serve: P2pimgServe, p2pimg_home: Path, tmp_path: Path
) -> None:
    image = write_oci_layout(tmp_path / "img", [LayerSpec(2 << 20, "none")], tag="1", seed=12)
    repo = f"mirror/{uuid.uuid4().hex[:8]}"
    push(skopeo, image.path, "1", f"{registry.host}/{repo}:1")
    manifest = json.loads((image.path / "blobs" / "sha256" / image.top_digest[7:]).read_bytes())
    layer = manifest["layers"][0]["digest"][7:]
    # Damage the blob in the registry's own storage: the upstream now serves wrong bytes.
    data_file = registry.root / "docker" / "registry" / "v2" / "blobs" / "sha256" / layer[:2] / layer / "data"
    damaged = bytearray(data_file.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    data_file.write_bytes(damaged)

    server = p2pimg_serve(p2pimg_home, extra_args=["--upstream", registry.url])
    result = subprocess.run(
        [
            "skopeo",
            "copy",
            "--insecure-policy",
            "--src-tls-verify=false",
            f"docker://{server.host}/{repo}:1",
            f"oci:{tmp_path / 'out'}:x",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0, "a client took a blob that does not match its digest"
    assert not (p2pimg_home / "cache" / "blobs" / "sha256" / layer).exists()
    assert metric(server.host, "p2pimg_verify_failures_total", source="upstream") >= 1
    assert not list((p2pimg_home / "cache" / "tmp").glob("upstream-*")), "a rejected download was left"


def test_mutable_tags_are_rechecked(
    registry: Registry, skopeo: Skopeo, p2pimg_serve: P2pimgServe, tmp_path: Path
) -> None:
    repo = f"mirror/{uuid.uuid4().hex[:8]}"
    v1 = write_oci_layout(tmp_path / "v1", [LayerSpec(64 << 10)], tag="1", seed=21)
    v2 = write_oci_layout(tmp_path / "v2", [LayerSpec(64 << 10)], tag="1", seed=22)
    push(skopeo, v1.path, "1", f"{registry.host}/{repo}:latest")
    fresh = p2pimg_serve(tmp_path / "h1", extra_args=["--upstream", registry.url, "--upstream-tag-ttl", "0"])
    stale = p2pimg_serve(
        tmp_path / "h2", extra_args=["--upstream", registry.url, "--upstream-tag-ttl", "3600"]
    )
    for server in (fresh, stale):
        assert (
            pull_digests(
                skopeo, f"{server.host}/{repo}:latest", tmp_path / f"p-{server.host.replace(':', '-')}"
            )[0]
            == v1.top_digest
        )
    push(skopeo, v2.path, "1", f"{registry.host}/{repo}:latest")
    assert pull_digests(skopeo, f"{fresh.host}/{repo}:latest", tmp_path / "f2")[0] == v2.top_digest
    assert pull_digests(skopeo, f"{stale.host}/{repo}:latest", tmp_path / "s2")[0] == v1.top_digest


def test_published_names_win_and_ns_selects_the_registry(
    registry: Registry,
    skopeo: Skopeo,
    run_p2pimg: RunP2pimg,
    p2pimg_serve: P2pimgServe,
    p2pimg_home: Path,
    tmp_path: Path,
) -> None:
    ours = write_oci_layout(tmp_path / "ours", [LayerSpec(32 << 10)], tag="1", seed=31)
    theirs = write_oci_layout(tmp_path / "theirs", [LayerSpec(32 << 10)], tag="1", seed=32)
    push(skopeo, theirs.path, "1", f"{registry.host}/shadow/app:1")
    run_p2pimg("publish", f"oci:{ours.path}:1", "shadow/app:1", home=p2pimg_home)
    server = p2pimg_serve(p2pimg_home, extra_args=["--upstream", registry.url])
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def top(query: str) -> str:
        with opener.open(f"http://{server.host}/v2/shadow/app/manifests/1{query}", timeout=10) as r:
            return str(r.headers["Docker-Content-Digest"])

    assert top("") == ours.top_digest  # no ns: p2pimg's own image
    assert top(f"?ns={registry.host}") == theirs.top_digest  # containerd asking for the upstream's
    try:
        top("?ns=quay.io")
        raise AssertionError("a registry this mirror does not serve was answered")
    except urllib.error.HTTPError as exc:
        assert exc.code == 404 and json.loads(exc.read())["errors"][0]["code"] == "NAME_UNKNOWN"


def test_containerd_mirror_via_hosts_toml(
    registry: Registry,
    skopeo: Skopeo,
    containerd: Containerd,
    run_p2pimg: RunP2pimg,
    p2pimg_serve: P2pimgServe,
    p2pimg_home: Path,
    tmp_path: Path,
) -> None:
    image = write_oci_layout(tmp_path / "img", [LayerSpec(1 << 20)], tag="1", seed=41)
    repo = f"mirror/{uuid.uuid4().hex[:8]}"
    push(skopeo, image.path, "1", f"{registry.host}/{repo}:1")
    server = p2pimg_serve(p2pimg_home, extra_args=["--upstream", registry.url])
    hosts = tmp_path / "certs.d" / registry.host
    hosts.mkdir(parents=True)
    toml = run_p2pimg(
        "containerd-config", "--registry", registry.host, "--mirror", server.url, home=p2pimg_home
    ).stdout
    (hosts / "hosts.toml").write_text(toml)
    ns = f"mirror-{uuid.uuid4().hex[:6]}"
    containerd.ctr(
        "images",
        "pull",
        "--hosts-dir",
        str(tmp_path / "certs.d"),
        *containerd.pull_flags,
        f"{registry.host}/{repo}:1",
        namespace=ns,
    )
    assert containerd.image_targets(ns)[f"{registry.host}/{repo}:1"][1] == image.top_digest
    # The blobs came through p2pimg (the mirror), not straight from the registry.
    assert metric(server.host, "p2pimg_source_bytes_total", source="upstream") > 1 << 20


def test_podman_mirror_via_registries_conf(
    registry: Registry,
    skopeo: Skopeo,
    podman: Podman,
    run_p2pimg: RunP2pimg,
    p2pimg_serve: P2pimgServe,
    p2pimg_home: Path,
    tmp_path: Path,
) -> None:
    image = write_oci_layout(tmp_path / "img", [LayerSpec(1 << 20)], tag="1", seed=51)
    repo = f"mirror/{uuid.uuid4().hex[:8]}"
    push(skopeo, image.path, "1", f"{registry.host}/{repo}:1")
    server = p2pimg_serve(p2pimg_home, extra_args=["--upstream", registry.url])
    conf = run_p2pimg(
        "podman-config", "--registry", registry.host, "--mirror", server.url, home=p2pimg_home
    ).stdout
    root = tmp_path / "podman"
    registries = tmp_path / "registries.conf"
    registries.write_text("unqualified-search-registries = []\n\n" + conf)
    env = dict(podman.env(root), CONTAINERS_REGISTRIES_CONF=str(registries))
    run_command(
        [
            *podman.argv(root),
            "pull",
            "--signature-policy",
            str(podman.config.policy),
            f"{registry.host}/{repo}:1",
        ],
        env=env,
    )
    assert metric(server.host, "p2pimg_source_bytes_total", source="upstream") > 1 << 20


def test_publish_imports_from_a_registry(
    registry: Registry,
    skopeo: Skopeo,
    run_p2pimg: RunP2pimg,
    p2pimg_serve: P2pimgServe,
    p2pimg_home: Path,
    tmp_path: Path,
) -> None:
    image = write_oci_layout(
        tmp_path / "img",
        [LayerSpec(2 << 20), LayerSpec(1 << 20, "none")],
        tag="1",
        platforms=("linux/amd64", "linux/arm64"),
        seed=61,
    )
    repo = f"import/{uuid.uuid4().hex[:8]}"
    skopeo(
        "copy",
        "--all",
        "--dest-tls-verify=false",
        "--preserve-digests",
        f"oci:{image.path}:1",
        f"docker://{registry.host}/{repo}:1",
    )
    out = run_p2pimg("publish", f"docker://{registry.host}/{repo}:1", "imported/app:1", home=p2pimg_home)
    assert out.stdout.split()[-1].startswith("bafy")
    server = p2pimg_serve(p2pimg_home)  # no upstream: served from p2pimg's own origin
    dest = tmp_path / "out"
    skopeo(
        "copy",
        "--all",
        "--src-tls-verify=false",
        "--preserve-digests",
        f"docker://{server.host}/imported/app:1",
        f"oci:{dest}:x",
    )
    assert json.loads((dest / "index.json").read_text())["manifests"][0]["digest"] == image.top_digest
    assert {"sha256:" + p.name for p in (dest / "blobs" / "sha256").iterdir()} == set(image.blob_digests)
