"""Swarm-key proofs name the node they are for, between real `p2pimg serve` processes: nodes that
know each other only by address (`--peer`) learn each other's node id and fetch from each other,
a remote warm (`warm --lan`) reaches them, and nothing is refused along the way; a request
captured on its way to one node is refused by the other."""

from __future__ import annotations

import secrets
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port, metric
from test_swarm import Nodes, blob_bytes, p2pimg, published, pull

from p2pimg.node.swarmkey import INFO_PATH, sign, vouched_node
from p2pimg.ops.sample import LayerSpec


@pytest.fixture(autouse=True)
def _aws(aws_env: None) -> None:
    """Every p2pimg process here talks S3 with moto's test credentials."""


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Nodes]:
    n = Nodes(tmp_path)
    try:
        yield n
    finally:
        n.stop_all()


def _refused(host: str) -> float:
    try:
        return metric(host, "p2pimg_peer_requests_total", result="refused")
    except AssertionError:  # never counted: none refused
        return 0.0


def test_keyed_static_peers_learn_each_other_and_fetch(moto: str, nodes: Nodes, tmp_path: Path) -> None:
    image, bucket = published(tmp_path, moto, [LayerSpec(6 << 20, "none"), LayerSpec(2 << 20)], seed=11)
    origin = f"s3://{bucket}?endpoint={moto}"
    key = secrets.token_hex(32)
    for name in ("a", "b"):  # the key in each home (`serve` and `warm` both take it from there)
        (tmp_path / name).mkdir()
        (tmp_path / name / "swarm.key").write_text(key)
    ports = {"a": free_port(), "b": free_port()}
    url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    # A starts first, with B not there yet: it learns B's id once B answers.
    _, a_host, _ = nodes.start("a", origin, "--peer", url["b"], peer_port=ports["a"])
    _, b_host, _ = nodes.start("b", origin, "--peer", url["a"], peer_port=ports["b"])

    # A remote warm from B's home: through B's server (this machine, no key needed there) and
    # straight to A, its peer (with the key, naming A).
    warmed = p2pimg("warm", "demo/app:1", "--lan", home=tmp_path / "b")
    assert warmed.returncode == 0, warmed.stdout + warmed.stderr
    assert warmed.stdout.count("warmed demo/app:1") == 2, warmed.stdout
    for host in (a_host, b_host):
        got = metric(host, "p2pimg_source_bytes_total", source="origin") + metric(
            host, "p2pimg_source_bytes_total", source="peer"
        )
        assert got == blob_bytes(image)

    # A third node with the key, whose only peer is A, pulls it all from A.
    c_home = tmp_path / "c"
    c_home.mkdir()
    (c_home / "swarm.key").write_text(key)
    _, c_host, _ = nodes.start("c", origin, "--peer", url["a"])
    pull(c_host, tmp_path / "c-out", image)
    assert metric(c_host, "p2pimg_source_bytes_total", source="peer") == blob_bytes(image)
    assert metric(c_host, "p2pimg_source_bytes_total", source="origin") == 0
    # Each node named the other right from the start: not one request was refused.
    assert _refused(a_host) == 0 and _refused(b_host) == 0

    # A proof made for A, captured and sent to B: refused (B never saw its nonce).
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    asked = sign(key.encode(), "GET", INFO_PATH)
    with opener.open(urllib.request.Request(url["a"] + INFO_PATH, headers={"Authorization": asked})) as r:
        a_node = vouched_node(key.encode(), asked, r.headers["X-P2pimg-Swarm-Node"])
    assert a_node is not None
    layer = max((image.path / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size).name
    have = f"/p2pimg/v1/have/sha256:{layer}"
    for_a = {"Authorization": sign(key.encode(), "GET", have, to=a_node)}
    with pytest.raises(urllib.error.HTTPError) as refused:
        opener.open(urllib.request.Request(url["b"] + have, headers=for_a), timeout=10)
    assert refused.value.code == 403 and b"another node" in refused.value.read()
    refused.value.close()
    with opener.open(urllib.request.Request(url["a"] + have, headers=for_a), timeout=10) as r:
        assert r.status == 200  # at A, the node it names
    assert _refused(b_host) == 1
