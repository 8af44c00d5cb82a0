"""The LAN swarm on loopback: peers are separate `p2pimg serve` processes with their own homes.

Where the origin's egress matters it is an S3 origin (moto_server) behind `tools/faultproxy.py`,
which counts the bytes it sends; peers that lie or stall are real peers behind the same proxy.
"""

from __future__ import annotations

import hashlib
import json
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import (
    AWS,
    Daemon,
    FaultProxy,
    client_env,
    free_port,
    http_status,
    make_bucket,
    metric,
    start_or_fail,
)

from p2pimg.ops.sample import LayerSpec, SampleImage, write_oci_layout


class Nodes:
    """`p2pimg serve` processes with peer listeners, stopped (and checked) at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.daemons: list[Daemon] = []

    def start(
        self, name: str, origin: str, *extra: str, peer_port: int | None = None
    ) -> tuple[Daemon, str, str]:
        home = self.tmp / name
        ports: dict[str, int] = {}

        def launch(port: int) -> Daemon:
            ports["registry"] = port
            ports["peer"] = peer_port or free_port()
            argv = [
                sys.executable,
                "-m",
                "p2pimg",
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                "--peer-listen",
                f"127.0.0.1:{ports['peer']}",
                "--origin",
                origin,
                "--no-mdns",
                *extra,
            ]
            return Daemon(name, argv, logdir=self.tmp / "logs", env=client_env(P2PIMG_HOME=str(home), **AWS))

        daemon, _ = start_or_fail(
            f"{name} did not start", name, launch, lambda p: http_status(f"http://127.0.0.1:{p}/v2/") == 200
        )
        self.daemons.append(daemon)
        return daemon, f"127.0.0.1:{ports['registry']}", f"http://127.0.0.1:{ports['peer']}"

    def stop_all(self) -> None:
        problems = []
        for d in self.daemons:
            status, graceful = d.stop()
            if d.proc.returncode not in (0, -signal.SIGKILL) or not graceful:
                problems.append(f"{d.name}: exit {status}\n{d.output()}")
        assert not problems, "\n".join(problems)


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


def p2pimg(*args: str, home: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pimg", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=client_env(P2PIMG_HOME=str(home), **AWS),
        check=False,
    )


def published(tmp: Path, moto: str, layers: list[LayerSpec], seed: int) -> tuple[SampleImage, str]:
    image = write_oci_layout(tmp / f"img{seed}", layers, tag="1", seed=seed)
    bucket = make_bucket(moto)
    out = p2pimg(
        "publish",
        f"oci:{image.path}:1",
        "demo/app:1",
        "--origin",
        f"s3://{bucket}?endpoint={moto}",
        home=tmp / "publisher",
    )
    assert out.returncode == 0, out.stderr
    return image, bucket


def blob_bytes(image: SampleImage) -> int:
    return image.total_bytes - (image.path / "blobs" / "sha256" / image.top_digest[7:]).stat().st_size


def pull(host: str, dest: Path, image: SampleImage, name: str = "demo/app:1") -> None:
    """Pull with skopeo and check the top digest and every blob's bytes."""
    result = subprocess.run(
        [
            "skopeo",
            "copy",
            "--insecure-policy",
            "--preserve-digests",
            "--src-tls-verify=false",
            f"docker://{host}/{name}",
            f"oci:{dest}:x",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=client_env(),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((dest / "index.json").read_text())["manifests"][0]["digest"] == image.top_digest
    for blob in (dest / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name


def test_pull_what_a_peer_warmed(moto: str, nodes: Nodes, tmp_path: Path) -> None:
    image, bucket = published(tmp_path, moto, [LayerSpec(12 << 20, "none"), LayerSpec(3 << 20)], seed=1)
    origin = f"s3://{bucket}?endpoint={moto}"
    _, a_host, a_peer = nodes.start("a", origin)
    warmed = p2pimg("warm", "demo/app:1", home=tmp_path / "a")
    assert warmed.returncode == 0, warmed.stderr
    assert "through the server of this home" in warmed.stderr and "warmed demo/app:1" in warmed.stdout
    assert metric(a_host, "p2pimg_source_bytes_total", source="origin") == blob_bytes(image)

    _, b_host, _ = nodes.start("b", origin, "--peer", a_peer)
    pull(b_host, tmp_path / "out", image)
    assert metric(b_host, "p2pimg_source_bytes_total", source="peer") == blob_bytes(image)
    assert metric(b_host, "p2pimg_source_bytes_total", source="origin") == 0
    assert metric(a_host, "p2pimg_peer_served_bytes_total") >= blob_bytes(image)


def test_three_nodes_warm_at_once_origin_serves_about_once(
    moto: str, nodes: Nodes, fault_proxy: Callable[..., FaultProxy], tmp_path: Path
) -> None:
    image, bucket = published(
        tmp_path, moto, [LayerSpec(24 << 20, "none"), LayerSpec(16 << 20, "none")], seed=2
    )
    far = fault_proxy(moto, "--latency", "0.02", "--rate", str(16 << 20))
    origin = f"s3://{bucket}?endpoint={far.endpoint}"
    # Every node knows the others by --peer (mDNS does this on a real LAN; see the netns test).
    ports = [free_port() for _ in range(3)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    restarted = []
    for i, name in enumerate(("n1", "n2", "n3")):
        others = [arg for u in urls if u != urls[i] for arg in ("--peer", u)]
        restarted.append(nodes.start(name, origin, *others, peer_port=ports[i])[1])
    before = far.stats()["body_bytes"]
    warmed = p2pimg("warm", "demo/app:1", "--lan", home=tmp_path / "n1")
    assert warmed.returncode == 0, warmed.stdout + warmed.stderr
    assert warmed.stdout.count("warmed demo/app:1") == 3, warmed.stdout  # this machine and both peers
    egress = far.stats()["body_bytes"] - before
    assert egress <= 1.2 * blob_bytes(image), f"origin sent {egress / blob_bytes(image):.2f}x the image"
    for host in restarted:
        assert metric(host, "p2pimg_source_bytes_total", source="origin") + metric(
            host, "p2pimg_source_bytes_total", source="peer"
        ) == blob_bytes(image)


def test_peer_killed_mid_transfer(moto: str, nodes: Nodes, tmp_path: Path) -> None:
    image, bucket = published(tmp_path, moto, [LayerSpec(24 << 20, "none")], seed=3)
    origin = f"s3://{bucket}?endpoint={moto}"
    a, _a_host, a_peer = nodes.start("a", origin, "--peer-rate", "3M")  # slow enough to be caught mid-span
    assert p2pimg("warm", "demo/app:1", home=tmp_path / "a").returncode == 0
    _, b_host, _ = nodes.start("b", origin, "--peer", a_peer)
    client = subprocess.Popen(
        [
            "skopeo",
            "copy",
            "--insecure-policy",
            "--preserve-digests",
            "--src-tls-verify=false",
            f"docker://{b_host}/demo/app:1",
            f"oci:{tmp_path / 'out'}:x",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=client_env(),
    )
    deadline = time.monotonic() + 60
    while metric(b_host, "p2pimg_source_bytes_total", source="peer") < 2 << 20:
        assert time.monotonic() < deadline and client.poll() is None, "no bytes came from the peer"
        time.sleep(0.05)
    a.proc.send_signal(signal.SIGKILL)
    _, err = client.communicate(timeout=300)
    assert client.returncode == 0, err.decode()
    assert (
        json.loads((tmp_path / "out" / "index.json").read_text())["manifests"][0]["digest"]
        == image.top_digest
    )
    for blob in (tmp_path / "out" / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    assert metric(b_host, "p2pimg_source_bytes_total", source="origin") > 0  # the rest came from the origin


def test_lying_peer_never_reaches_the_client(
    moto: str, nodes: Nodes, fault_proxy: Callable[..., FaultProxy], tmp_path: Path
) -> None:
    image, bucket = published(tmp_path, moto, [LayerSpec(8 << 20, "none")], seed=4)
    origin = f"s3://{bucket}?endpoint={moto}"
    _, _a_host, a_peer = nodes.start("a", origin)
    assert p2pimg("warm", "demo/app:1", home=tmp_path / "a").returncode == 0
    liar = fault_proxy(a_peer, "--faults", "corrupt", "--every", "1")  # every span A sends is corrupted
    _, b_host, _ = nodes.start("b", origin, "--peer", liar.endpoint)
    pull(b_host, tmp_path / "out", image)
    assert metric(b_host, "p2pimg_verify_failures_total", source="peer") >= 1
    assert metric(b_host, "p2pimg_source_bytes_total", source="peer") < blob_bytes(image)
    assert metric(b_host, "p2pimg_source_bytes_total", source="origin") + metric(
        b_host, "p2pimg_source_bytes_total", source="peer"
    ) == blob_bytes(image)


@pytest.mark.parametrize("fault", ["fail", "busy", "reset", "stall", "slow"])
def test_faulty_peer_still_yields_a_correct_pull(
    fault: str, moto: str, nodes: Nodes, fault_proxy: Callable[..., FaultProxy], tmp_path: Path
) -> None:
    """A peer answering 503, cutting its spans short (truncated), going silent mid-span, or
    trickling at 64 KiB/s: the pull ends correct, the origin supplies what the peer did not."""
    image, bucket = published(tmp_path, moto, [LayerSpec(8 << 20, "none")], seed=11)
    origin = f"s3://{bucket}?endpoint={moto}"
    _, _a_host, a_peer = nodes.start("a", origin)
    assert p2pimg("warm", "demo/app:1", home=tmp_path / "a").returncode == 0
    args = ["--rate", str(64 << 10)] if fault == "slow" else ["--faults", fault, "--every", "1"]
    bad = fault_proxy(a_peer, *args)
    _, b_host, _ = nodes.start("b", origin, "--peer", bad.endpoint)
    pull(b_host, tmp_path / "out", image)
    if fault != "slow":
        assert bad.stats()["faults"] >= 1, "the peer was never asked: nothing was tested"
    assert metric(b_host, "p2pimg_source_bytes_total", source="origin") > 0
    assert metric(b_host, "p2pimg_source_bytes_total", source="peer") < blob_bytes(image)


def test_busy_peer_answers_429_and_the_pull_goes_on(moto: str, nodes: Nodes, tmp_path: Path) -> None:
    image, bucket = published(tmp_path, moto, [LayerSpec(16 << 20, "none"), LayerSpec(4 << 20)], seed=5)
    origin = f"s3://{bucket}?endpoint={moto}"
    _, a_host, a_peer = nodes.start("a", origin, "--peer-max-requests", "1", "--peer-rate", "8M")
    assert p2pimg("warm", "demo/app:1", home=tmp_path / "a").returncode == 0
    _, b_host, _ = nodes.start("b", origin, "--peer", a_peer)
    pull(b_host, tmp_path / "out", image)
    assert metric(a_host, "p2pimg_peer_requests_total", result="busy") >= 1
    assert metric(b_host, "p2pimg_source_bytes_total", source="peer") > 0


def test_warm_errors_are_clear(tmp_path: Path) -> None:
    for ref, message in (
        ("demo/nothing:1", "not published"),
        ("ipfs/notacid", "invalid CID"),
        ("Bad:Ref", "invalid repository name"),
    ):
        result = p2pimg("warm", ref, "--no-mdns", home=tmp_path / f"h{uuid.uuid4().hex[:6]}")
        assert result.returncode != 0
        assert message in result.stdout + result.stderr and "Traceback" not in result.stderr


def test_origin_down_image_pulls_from_a_peer(
    moto: str, nodes: Nodes, fault_proxy: Callable[..., FaultProxy], tmp_path: Path
) -> None:
    """B never saw the image and its origin is unreachable: by root CID, every block (root,
    manifest, blob maps) and every chunk comes from A, checked against its CID."""
    image, bucket = published(tmp_path, moto, [LayerSpec(6 << 20, "none"), LayerSpec(1 << 20)], seed=6)
    _, _a_host, a_peer = nodes.start("a", f"s3://{bucket}?endpoint={moto}")
    warmed = p2pimg("warm", "demo/app:1", home=tmp_path / "a")
    assert warmed.returncode == 0, warmed.stderr
    root = warmed.stdout.split("(")[1].split(")")[0]
    doomed = fault_proxy(moto)
    _, b_host, _ = nodes.start("b", f"s3://{bucket}?endpoint={doomed.endpoint}", "--peer", a_peer)
    doomed.daemon.stop()  # B's origin is gone before B asked it anything
    pull(b_host, tmp_path / "out", image, name=f"ipfs/{root}:latest")
    assert metric(b_host, "p2pimg_source_bytes_total", source="peer") == blob_bytes(image)
    assert metric(b_host, "p2pimg_source_bytes_total", source="origin") == 0


def test_origin_down_tag_comes_from_a_peer_only_signed_by_a_trusted_key(
    moto: str, nodes: Nodes, fault_proxy: Callable[..., FaultProxy], tmp_path: Path
) -> None:
    """B never saw `demo/app:1` and its origin is unreachable: it takes the tag record from A only
    because the publisher's key signed it and B trusts that key; nodes that trust no key, or only
    another one, refuse the record with a clear error and serve nothing."""
    made = p2pimg("keygen", home=tmp_path / "publisher")
    assert made.returncode == 0, made.stderr
    pub = made.stdout.strip().splitlines()[-1]
    stranger = p2pimg("keygen", home=tmp_path / "stranger-keys")
    assert stranger.returncode == 0, stranger.stderr
    stranger_pub = stranger.stdout.strip().splitlines()[-1]
    image, bucket = published(tmp_path, moto, [LayerSpec(3 << 20, "none")], seed=9)
    _, _a_host, a_peer = nodes.start("a", f"s3://{bucket}?endpoint={moto}", "--trust", pub)
    warmed = p2pimg("warm", "demo/app:1", "--trust", pub, home=tmp_path / "a")
    assert warmed.returncode == 0, warmed.stderr
    doomed = fault_proxy(moto)
    dead = f"s3://{bucket}?endpoint={doomed.endpoint}"
    _, b_host, _ = nodes.start("b", dead, "--peer", a_peer, "--trust", pub)
    _, c_host, _ = nodes.start("c", dead, "--peer", a_peer)
    _, d_host, _ = nodes.start("d", dead, "--peer", a_peer, "--trust", stranger_pub)
    doomed.daemon.stop()  # their origin is gone before they asked it anything
    pull(b_host, tmp_path / "out", image)
    assert metric(b_host, "p2pimg_source_bytes_total", source="peer") == blob_bytes(image)
    assert metric(b_host, "p2pimg_source_bytes_total", source="origin") == 0
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for host, reason in ((c_host, "trusts no publisher key"), (d_host, "not trusted")):
        with pytest.raises(urllib.error.HTTPError) as refused:
            opener.open(f"http://{host}/v2/demo/app/manifests/1", timeout=60)
        message = json.loads(refused.value.read())["errors"][0]["message"]
        assert "demo/app:1" in message and reason in message, message
        assert metric(host, "p2pimg_source_bytes_total", source="peer") == 0


def test_mutual_tls_between_peers(moto: str, nodes: Nodes, tmp_path: Path) -> None:
    """Peers with certificates from the swarm's CA talk HTTPS and share chunks; a client with no
    certificate, or one from another CA, gets no byte (the handshake fails) and the serving node
    carries on; a node without TLS refuses to take an https peer it cannot verify."""
    import httpx
    import trustme

    ca, rogue = trustme.CA(), trustme.CA()

    def credentials(issuer: trustme.CA, where: Path) -> list[str]:
        where.mkdir(parents=True, exist_ok=True)
        leaf = issuer.issue_cert("127.0.0.1")
        leaf.cert_chain_pems[0].write_to_path(str(where / "peer.crt"))
        leaf.private_key_pem.write_to_path(str(where / "peer.key"))
        ca.cert_pem.write_to_path(str(where / "ca.crt"))
        return [str(where / "peer.crt"), str(where / "peer.key"), str(where / "ca.crt")]

    a_files = credentials(ca, tmp_path / "a-tls")
    image, bucket = published(tmp_path, moto, [LayerSpec(5 << 20, "none"), LayerSpec(1 << 20)], seed=10)
    origin = f"s3://{bucket}?endpoint={moto}"
    _, _a_host, a_peer = nodes.start(
        "a", origin, "--peer-tls-cert", a_files[0], "--peer-tls-key", a_files[1], "--peer-tls-ca", a_files[2]
    )
    a_peer = a_peer.replace("http://", "https://")
    warmed = p2pimg("warm", "demo/app:1", home=tmp_path / "a")
    assert warmed.returncode == 0, warmed.stderr

    # B keeps its certificate in the home's tls/ directory (the default place).
    credentials(ca, tmp_path / "b" / "tls")
    _, b_host, _ = nodes.start("b", origin, "--peer", a_peer)
    pull(b_host, tmp_path / "b-out", image)
    assert metric(b_host, "p2pimg_source_bytes_total", source="peer") == blob_bytes(image)
    assert metric(b_host, "p2pimg_source_bytes_total", source="origin") == 0

    # Strangers: no certificate, a certificate from another CA, or no TLS at all.
    manifest = json.loads((image.path / "blobs" / "sha256" / image.top_digest[7:]).read_bytes())
    layer = f"{a_peer}/p2pimg/v1/blobs/{manifest['layers'][0]['digest']}"
    rogue_files = credentials(rogue, tmp_path / "rogue")

    def client(cert: list[str] | None) -> httpx.Client:
        context = ssl.create_default_context(cafile=a_files[2])
        if cert is not None:
            context.load_cert_chain(cert[0], cert[1])
        return httpx.Client(verify=context, trust_env=False, timeout=10)

    for stranger in (client(None), client(rogue_files)):
        with stranger, pytest.raises(httpx.TransportError):
            stranger.get(layer)
    with httpx.Client(trust_env=False, timeout=10) as plain, pytest.raises(httpx.TransportError):
        plain.get(layer.replace("https://", "http://"))
    _, c_host, _ = nodes.start("c", origin, "--peer", a_peer)
    pull(c_host, tmp_path / "c-out", image)
    assert metric(c_host, "p2pimg_source_bytes_total", source="peer") == 0
    with client(a_files) as member:
        got = member.get(layer).content  # A is still serving, to members
    assert "sha256:" + hashlib.sha256(got).hexdigest() == layer.rpartition("/")[2]


def test_swarm_key_keeps_strangers_out(moto: str, nodes: Nodes, tmp_path: Path) -> None:
    """With a swarm key, a peer serves nothing (not even /info) to nodes that cannot prove it:
    401 without credentials, 403 with a wrong key; nodes with the key pull from it."""
    import secrets

    image, bucket = published(tmp_path, moto, [LayerSpec(4 << 20, "none")], seed=7)
    origin = f"s3://{bucket}?endpoint={moto}"
    key, wrong = tmp_path / "swarm.key", tmp_path / "wrong.key"
    key.write_text(secrets.token_hex(32))
    wrong.write_text(secrets.token_hex(32))
    _, a_host, a_peer = nodes.start("a", origin, "--swarm-key-file", str(key))
    assert p2pimg("warm", "demo/app:1", home=tmp_path / "a").returncode == 0  # local: no key needed
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises(urllib.error.HTTPError) as refused:
        opener.open(f"{a_peer}/p2pimg/v1/info", timeout=10)
    assert refused.value.code == 401 and refused.value.headers["WWW-Authenticate"] == "P2pimg-Swarm"
    forged = urllib.request.Request(f"{a_peer}/p2pimg/v1/info", headers={"Authorization": "P2pimg-Swarm 00"})
    with pytest.raises(urllib.error.HTTPError) as denied:
        opener.open(forged, timeout=10)
    assert denied.value.code == 403
    # A proof made with the key is good once: sent again (a capture replayed), it is refused.
    from p2pimg.node.swarmkey import sign

    proof = sign(key.read_text().strip().encode(), "GET", "/p2pimg/v1/info")
    signed = urllib.request.Request(f"{a_peer}/p2pimg/v1/info", headers={"Authorization": proof})
    with opener.open(signed, timeout=10) as answer:
        assert answer.status == 200
    with pytest.raises(urllib.error.HTTPError) as replayed:
        opener.open(signed, timeout=10)
    assert replayed.value.code == 403 and b"replayed" in replayed.value.read()
    replayed.value.close()

    _, b_host, _ = nodes.start("b", origin, "--peer", a_peer, "--swarm-key-file", str(key))
    pull(b_host, tmp_path / "b-out", image)
    assert metric(b_host, "p2pimg_source_bytes_total", source="peer") == blob_bytes(image)
    for name, extra in (("c", []), ("d", ["--swarm-key-file", str(wrong)])):
        _, host, _ = nodes.start(name, origin, "--peer", a_peer, *extra)
        pull(host, tmp_path / f"{name}-out", image)
        assert metric(host, "p2pimg_source_bytes_total", source="peer") == 0
        assert metric(host, "p2pimg_source_bytes_total", source="origin") == blob_bytes(image)
    assert metric(a_host, "p2pimg_peer_requests_total", result="refused") >= 4
