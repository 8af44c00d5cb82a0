"""Mirror mode through the swarm: upstream blobs go through the fetch engine, so mirror nodes
share what any of them fetched, and nodes pulling at once fetch the image from the upstream about
once between them.

Every node is a `p2pimg serve --upstream` process with its own home; the upstream is the Debian
docker-registry behind `tools/faultproxy.py`, which counts the bytes the upstream sends. Only the
whole digest checks a mirrored blob: a peer that sends wrong bytes (or claims chunks it does not
hold and sends garbage) costs a refetch from the upstream and is banned, and the client never gets
the final byte of a wrong blob.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from conftest import FaultProxy, client_env, free_port, metric
from test_mirror import push
from test_swarm import Nodes

from p2pimg.ops.sample import LayerSpec, SampleImage, write_oci_layout

if TYPE_CHECKING:
    from conftest import Containerd, Registry, RunP2pimg, Skopeo

MiB = 1 << 20


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Nodes]:
    n = Nodes(tmp_path)
    try:
        yield n
    finally:
        n.stop_all()


def upstream_image(
    tmp: Path, skopeo: Skopeo, registry: Registry, layers: list[LayerSpec], seed: int
) -> tuple[SampleImage, str]:
    image = write_oci_layout(tmp / f"img{seed}", layers, tag="1", seed=seed)
    repo = f"mirror/{uuid.uuid4().hex[:8]}"
    push(skopeo, image.path, "1", f"{registry.host}/{repo}:1")
    return image, f"{repo}:1"


def mirror_node(
    nodes: Nodes, tmp: Path, name: str, upstream: str, *extra: str, peer_port: int | None = None
) -> tuple[str, str]:
    """A mirror node (its own empty origin): (registry host, peer URL)."""
    origin = tmp / f"origin-{name}"
    origin.mkdir(exist_ok=True)
    _, host, peer = nodes.start(name, origin.as_uri(), "--upstream", upstream, *extra, peer_port=peer_port)
    return host, peer


def skopeo_pull(host: str, ref: str, dest: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--src-tls-verify=false",
            "--preserve-digests",
            f"docker://{host}/{ref}",
            f"oci:{dest}:x",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=client_env(),
    )


def finish(proc: subprocess.Popen[str], image: SampleImage, dest: Path) -> None:
    """Wait for a pull and check every byte of what it wrote."""
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert json.loads((dest / "index.json").read_text())["manifests"][0]["digest"] == image.top_digest
    blobs = list((dest / "blobs" / "sha256").iterdir())
    assert {f"sha256:{b.name}" for b in blobs} == set(image.blob_digests)
    for blob in blobs:
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name


def pull(host: str, ref: str, image: SampleImage, dest: Path) -> None:
    finish(skopeo_pull(host, ref, dest), image, dest)


def blob_bytes(image: SampleImage) -> int:
    """The image's blobs (config and layers), without its manifest."""
    return image.total_bytes - (image.path / "blobs" / "sha256" / image.top_digest[7:]).stat().st_size


def cache_is_clean(home: Path) -> None:
    """Every blob the node's cache holds matches its digest (nothing wrong was ever kept)."""
    for blob in (home / "cache" / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name, f"{blob} is wrong"


def test_b_after_a_takes_the_blobs_from_a(
    registry: Registry, skopeo: Skopeo, nodes: Nodes, fault_proxy: Callable[..., FaultProxy], tmp_path: Path
) -> None:
    image, ref = upstream_image(
        tmp_path, skopeo, registry, [LayerSpec(6 * MiB, "none"), LayerSpec(3 * MiB)], 1
    )
    upstream = fault_proxy(registry.url)  # counts what the upstream sends
    a_port, b_port = free_port(), free_port()
    a_host, a_peer = mirror_node(
        nodes, tmp_path, "a", upstream.endpoint, "--peer", f"http://127.0.0.1:{b_port}", peer_port=a_port
    )
    b_host, _ = mirror_node(nodes, tmp_path, "b", upstream.endpoint, "--peer", a_peer, peer_port=b_port)

    pull(a_host, ref, image, tmp_path / "a-out")
    assert metric(a_host, "p2pimg_source_bytes_total", source="upstream") == blob_bytes(image)
    before = upstream.stats()["body_bytes"]

    pull(b_host, ref, image, tmp_path / "b-out")
    assert metric(b_host, "p2pimg_source_bytes_total", source="upstream") == 0
    assert metric(b_host, "p2pimg_source_bytes_total", source="peer") >= blob_bytes(image)
    # What B asked of the upstream: the tag's manifest, nothing else (every blob, and the manifest
    # by digest, came from A).
    extra = upstream.stats()["body_bytes"] - before
    assert extra <= 16 << 10, f"B took {extra} bytes from the upstream"
    cache_is_clean(tmp_path / "b")
    # B's timeline (this machine only) shows where its bytes came from, span by span.
    events = httpx.get(f"http://{b_host}/p2pimg/v1/timeline", timeout=10).json()["events"]
    spans = [e for e in events if e["what"] == "span"]
    assert spans and all(e["source"] == f"peer {a_peer}" and e["outcome"] == "ok" for e in spans)
    assert sum(e["bytes"] for e in spans) == blob_bytes(image)
    assert any(e["what"] == "client" and "/blobs/" in e["request"] for e in events)


def test_three_nodes_at_once_fetch_the_image_about_once(
    registry: Registry, skopeo: Skopeo, nodes: Nodes, fault_proxy: Callable[..., FaultProxy], tmp_path: Path
) -> None:
    image, ref = upstream_image(
        tmp_path, skopeo, registry, [LayerSpec(12 * MiB, "none"), LayerSpec(8 * MiB, "none")], 2
    )
    # The upstream's uplink: 40 MB/s shared, 20 ms a response (so that the pulls overlap).
    upstream = fault_proxy(registry.url, "--total-rate", "40e6", "--latency", "0.02")
    ports = [free_port() for _ in range(3)]
    hosts = []
    for i, name in enumerate("abc"):
        peers = [arg for j, p in enumerate(ports) if j != i for arg in ("--peer", f"http://127.0.0.1:{p}")]
        hosts.append(mirror_node(nodes, tmp_path, name, upstream.endpoint, *peers, peer_port=ports[i])[0])
    procs = [skopeo_pull(h, ref, tmp_path / f"out-{i}") for i, h in enumerate(hosts)]
    for i, proc in enumerate(procs):
        finish(proc, image, tmp_path / f"out-{i}")
    sent = upstream.stats()["body_bytes"]
    taken = [metric(h, "p2pimg_source_bytes_total", source="upstream") for h in hosts]
    print(f"upstream sent {sent / blob_bytes(image):.3f}x the image's blobs; per node: {taken}")
    assert sum(taken) <= 1.2 * blob_bytes(image), f"upstream blob bytes per node: {taken}"
    assert sent <= 1.2 * blob_bytes(image) + (64 << 10), f"the upstream sent {sent} bytes"
    for h in hosts:  # each node took its share, and the rest from its peers
        assert metric(h, "p2pimg_source_bytes_total", source="peer") > 0


def test_peer_sending_wrong_bytes_is_found_out_and_banned(
    registry: Registry, skopeo: Skopeo, nodes: Nodes, fault_proxy: Callable[..., FaultProxy], tmp_path: Path
) -> None:
    image, ref = upstream_image(tmp_path, skopeo, registry, [LayerSpec(8 * MiB, "none")], 3)
    a_host, a_peer = mirror_node(nodes, tmp_path, "a", registry.url)
    pull(a_host, ref, image, tmp_path / "a-out")
    liar = fault_proxy(a_peer, "--faults", "corrupt", "--every", "1")  # every span A sends is corrupted
    b_host, _ = mirror_node(nodes, tmp_path, "b", registry.url, "--peer", liar.endpoint)
    # The digest fails (every byte came from the liar), B fetches the blob again from the
    # upstream alone, and only then does the client get it: the pull completes, with no retry.
    pull(b_host, ref, image, tmp_path / "b-out")
    assert liar.stats()["faults"] >= 1, "the peer was never asked: nothing was tested"
    assert metric(b_host, "p2pimg_verify_failures_total", source="peer") >= 1
    assert metric(b_host, "p2pimg_source_bytes_total", source="upstream") >= 8 * MiB
    cache_is_clean(tmp_path / "b")
    # Banned: a second image is not asked of it at all.
    asked = liar.stats()["ranged_gets"]
    image2, ref2 = upstream_image(tmp_path, skopeo, registry, [LayerSpec(2 * MiB, "none")], 4)
    pull(a_host, ref2, image2, tmp_path / "a-out2")
    pull(b_host, ref2, image2, tmp_path / "b-out2")
    assert liar.stats()["ranged_gets"] == asked


class _LyingPeer(BaseHTTPRequestHandler):
    """A peer that claims every blob whole (its chunk map is a lie) and sends garbage."""

    protocol_version = "HTTP/1.1"
    asked: list[str] = []

    def _json(self, doc: object) -> None:
        body = json.dumps(doc).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - the http.server interface
        path = self.path
        if path.startswith("/p2pimg/v1/have/"):
            self._json({"digest": path.rpartition("/")[2], "complete": True, "node": "liar", "chunks": None})
        elif path == "/p2pimg/v1/info":
            self._json({"version": 1, "node": "liar"})
        elif path.startswith("/p2pimg/v1/blobs/") and "range" in self.headers:
            type(self).asked.append(path)
            first, _, last = self.headers["range"].removeprefix("bytes=").partition("-")
            length = int(last) - int(first) + 1
            self.send_response(206)
            self.send_header("content-range", f"bytes {first}-{last}/*")
            self.send_header("content-length", str(length))
            self.end_headers()
            self.wfile.write(os.urandom(length))
        else:
            self.send_response(404)
            self.send_header("content-length", "0")
            self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
        pass


@pytest.fixture
def lying_peer() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _LyingPeer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_peer_lying_about_its_chunks_is_banned(
    registry: Registry, skopeo: Skopeo, nodes: Nodes, lying_peer: str, tmp_path: Path
) -> None:
    image, ref = upstream_image(tmp_path, skopeo, registry, [LayerSpec(4 * MiB, "none")], 5)
    host, _ = mirror_node(nodes, tmp_path, "b", registry.url, "--peer", lying_peer)
    pull(host, ref, image, tmp_path / "out")
    assert _LyingPeer.asked, "the liar was never asked: nothing was tested"
    assert metric(host, "p2pimg_verify_failures_total", source="peer") >= 1
    cache_is_clean(tmp_path / "b")


def test_upstream_ignoring_range_is_streamed_once_per_blob(
    registry: Registry, skopeo: Skopeo, nodes: Nodes, fault_proxy: Callable[..., FaultProxy], tmp_path: Path
) -> None:
    image, ref = upstream_image(tmp_path, skopeo, registry, [LayerSpec(24 * MiB, "none")], 6)
    upstream = fault_proxy(registry.url, "--no-ranges")
    host, _ = mirror_node(nodes, tmp_path, "a", upstream.endpoint)
    pull(host, ref, image, tmp_path / "out")
    assert metric(host, "p2pimg_source_bytes_total", source="upstream") == blob_bytes(image)
    # Asked for a range once, answered whole: from then on one whole-blob stream, not a re-read
    # of the blob's start for every span.
    assert upstream.stats()["body_bytes"] <= 2 * blob_bytes(image)
    cache_is_clean(tmp_path / "a")


def test_containerd_pulls_through_two_mirror_nodes(
    registry: Registry,
    skopeo: Skopeo,
    containerd: Containerd,
    run_p2pimg: RunP2pimg,
    nodes: Nodes,
    tmp_path: Path,
) -> None:
    image, ref = upstream_image(
        tmp_path, skopeo, registry, [LayerSpec(4 * MiB), LayerSpec(2 * MiB, "none")], 7
    )
    a_host, a_peer = mirror_node(nodes, tmp_path, "a", registry.url)
    b_host, _ = mirror_node(nodes, tmp_path, "b", registry.url, "--peer", a_peer)
    for name, host in (("a", a_host), ("b", b_host)):
        hosts_dir = tmp_path / f"certs-{name}"
        (hosts_dir / registry.host).mkdir(parents=True)
        toml = run_p2pimg(
            "containerd-config",
            "--registry",
            registry.host,
            "--mirror",
            f"http://{host}",
            home=tmp_path / name,
        ).stdout
        (hosts_dir / registry.host / "hosts.toml").write_text(toml)
        ns = f"node-{name}-{uuid.uuid4().hex[:6]}"  # an isolated namespace: it fetches everything
        containerd.ctr(
            "images",
            "pull",
            "--hosts-dir",
            str(hosts_dir),
            *containerd.pull_flags,
            f"{registry.host}/{ref}",
            namespace=ns,
        )
        assert containerd.image_targets(ns)[f"{registry.host}/{ref}"][1] == image.top_digest
    assert metric(a_host, "p2pimg_source_bytes_total", source="upstream") >= 6 * MiB
    assert metric(b_host, "p2pimg_source_bytes_total", source="upstream") == 0
    assert metric(b_host, "p2pimg_source_bytes_total", source="peer") >= 6 * MiB


@pytest.mark.parametrize("fault", ["fail", "busy", "reset", "stall"])
def test_peer_that_fails_mid_blob_still_yields_a_correct_pull(
    fault: str,
    registry: Registry,
    skopeo: Skopeo,
    nodes: Nodes,
    fault_proxy: Callable[..., FaultProxy],
    tmp_path: Path,
) -> None:
    """A peer that claims a mirrored blob, then answers 503, answers 429 to every span for ever
    (a first-hand holder is waited for while it is busy, but not for ever), resets mid-span or
    goes silent: the pull ends correct, the upstream supplying what the peer did not."""
    image, ref = upstream_image(tmp_path, skopeo, registry, [LayerSpec(8 * MiB, "none")], 8)
    a_host, a_peer = mirror_node(nodes, tmp_path, "a", registry.url)
    pull(a_host, ref, image, tmp_path / "a-out")
    bad = fault_proxy(a_peer, "--faults", fault, "--every", "1")
    b_host, _ = mirror_node(nodes, tmp_path, "b", registry.url, "--peer", bad.endpoint)
    pull(b_host, ref, image, tmp_path / "b-out")
    assert bad.stats()["faults"] >= 1, "the peer was never asked: nothing was tested"
    assert metric(b_host, "p2pimg_source_bytes_total", source="upstream") > 0
    cache_is_clean(tmp_path / "b")


def test_upstream_failing_blob_requests_gets_a_clear_error_then_recovers(
    registry: Registry, skopeo: Skopeo, nodes: Nodes, fault_proxy: Callable[..., FaultProxy], tmp_path: Path
) -> None:
    """An upstream answering 503 to every blob request: the client gets an error status with an
    OCI error body (not a cut or empty 200) and nothing is cached; once the upstream is healthy,
    the same home pulls correctly."""
    image, ref = upstream_image(tmp_path, skopeo, registry, [LayerSpec(3 * MiB, "none")], 9)
    failing = fault_proxy(registry.url, "--faults", "fail", "--every", "1")
    origin = tmp_path / "origin-a"
    origin.mkdir()
    daemon, host, _ = nodes.start("a", origin.as_uri(), "--upstream", failing.endpoint)
    layer = max(image.blob_digests, key=lambda d: (image.path / "blobs" / "sha256" / d[7:]).stat().st_size)
    repo = ref.partition(":")[0]
    with httpx.Client(trust_env=False, timeout=60) as client:
        client.get(f"http://{host}/v2/{repo}/manifests/1").raise_for_status()  # learns the blobs
        r = client.get(f"http://{host}/v2/{repo}/blobs/{layer}")
        assert r.status_code >= 500, (r.status_code, r.text[:200])
        assert "503" in r.json()["errors"][0]["message"], r.text
    assert failing.stats()["faults"] >= 1
    assert not (tmp_path / "a" / "cache" / "blobs" / "sha256" / layer[7:]).exists()
    daemon.stop()
    _, host, _ = nodes.start("a", origin.as_uri(), "--upstream", registry.url)
    pull(host, ref, image, tmp_path / "out")
    cache_is_clean(tmp_path / "a")
