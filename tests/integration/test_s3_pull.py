"""Pulls from an S3 origin (a real moto_server), through a proxy that misbehaves on purpose.

The proxy (`tools/faultproxy.py`, its own process) sits between p2pimg and moto: it counts the
origin's egress, adds latency or a per-connection rate cap, and injects 5xx answers, connection
resets, stalls and corrupted bytes into ranged GETs.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import Daemon, FaultProxy, client_env, http_status, make_bucket, metric, start_or_fail

from p2pimg.ops.sample import LayerSpec, SampleImage, write_oci_layout

if TYPE_CHECKING:
    from conftest import RunP2pimg


@pytest.fixture(autouse=True)
def _aws(aws_env: None) -> None:
    """Every p2pimg process here talks S3 with moto's test credentials."""


def s3_url(bucket: str, endpoint: str) -> str:
    return f"s3://{bucket}/images?endpoint={endpoint}"


def publish(run_p2pimg: RunP2pimg, image: SampleImage, origin: str, home: Path, *extra: str) -> None:
    run_p2pimg("publish", f"oci:{image.path}:1", "demo/app:1", "--origin", origin, *extra, home=home)


def serve(
    home: Path, origin: str, logdir: Path, name: str = "p2pimg", extra: Sequence[str] = ()
) -> tuple[Daemon, str]:
    def launch(port: int) -> Daemon:
        return Daemon(
            name,
            [
                sys.executable,
                "-m",
                "p2pimg",
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                "--origin",
                origin,
                *extra,
            ],
            logdir=logdir,
            env=client_env(P2PIMG_HOME=str(home)),
        )

    daemon, port = start_or_fail(
        "p2pimg serve did not start", name, launch, lambda p: http_status(f"http://127.0.0.1:{p}/v2/") == 200
    )
    return daemon, f"127.0.0.1:{port}"


def skopeo_pull(ref: str, dest: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            "skopeo",
            "copy",
            "--insecure-policy",
            "--preserve-digests",
            "--src-tls-verify=false",
            f"docker://{ref}",
            f"oci:{dest}:x",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=client_env(),
    )


def check_pulled(dest: Path, image: SampleImage) -> None:
    index = json.loads((dest / "index.json").read_text())
    assert index["manifests"][0]["digest"] == image.top_digest
    for blob in (dest / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    assert {"sha256:" + p.name for p in (dest / "blobs" / "sha256").iterdir()} == set(image.blob_digests)


def stop_clean(daemon: Daemon) -> None:
    status, graceful = daemon.stop()
    assert graceful and status == 0, daemon.output()


def blob_bytes(image: SampleImage) -> int:
    """Bytes of the blobs a pull fetches through the fetch engine (all but the manifest)."""
    return image.total_bytes - (image.path / "blobs" / "sha256" / image.top_digest[7:]).stat().st_size


def test_four_clients_one_origin_fetch(
    moto: str, fault_proxy: Callable[..., FaultProxy], run_p2pimg: RunP2pimg, tmp_path: Path
) -> None:
    image = write_oci_layout(
        tmp_path / "img", [LayerSpec(24 << 20, "none"), LayerSpec(6 << 20)], tag="1", seed=5
    )
    bucket = make_bucket(moto)
    publish(run_p2pimg, image, s3_url(bucket, moto), tmp_path / "publisher")
    proxy = fault_proxy(moto, "--latency", "0.05")  # far enough that the four pulls overlap
    daemon, host = serve(tmp_path / "home", s3_url(bucket, proxy.endpoint), tmp_path / "logs")
    try:
        pulls = [skopeo_pull(f"{host}/demo/app:1", tmp_path / f"out{i}") for i in range(4)]
        for i, p in enumerate(pulls):
            _, err = p.communicate(timeout=180)
            assert p.returncode == 0, err.decode()
            check_pulled(tmp_path / f"out{i}", image)
        # The origin sent each blob's bytes once, for four clients.
        assert metric(host, "p2pimg_source_bytes_total", source="origin") == blob_bytes(image)
        assert proxy.stats()["body_bytes"] - blob_bytes(image) < 64 << 10  # + blocks and tag record
        assert metric(host, "p2pimg_served_bytes_total") >= 4 * blob_bytes(image)
    finally:
        stop_clean(daemon)


def test_kill_9_then_resume_fetches_only_the_rest(
    moto: str, fault_proxy: Callable[..., FaultProxy], run_p2pimg: RunP2pimg, tmp_path: Path
) -> None:
    image = write_oci_layout(tmp_path / "img", [LayerSpec(32 << 20, "none")], tag="1", seed=6)
    bucket = make_bucket(moto)
    publish(run_p2pimg, image, s3_url(bucket, moto), tmp_path / "publisher")
    proxy = fault_proxy(moto, "--rate", str(4 << 20))  # 4 MiB/s a connection: the fetch takes seconds
    home = tmp_path / "home"
    daemon, host = serve(home, s3_url(bucket, proxy.endpoint), tmp_path / "logs", "victim")
    manifest = json.loads((image.path / "blobs" / "sha256" / image.top_digest[7:]).read_bytes())
    layer = manifest["layers"][0]["digest"][7:]
    have = home / "cache" / "partial" / "sha256" / f"{layer}.have"
    client = subprocess.Popen(
        ["curl", "-s", "-o", "/dev/null", f"http://{host}/v2/demo/app/blobs/sha256:{layer}"]
    )
    deadline = time.monotonic() + 60
    while not (have.exists() and have.read_bytes().count(1) >= 8):
        assert time.monotonic() < deadline, "the fetch made no progress"
        time.sleep(0.05)
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(10)
    client.kill()
    client.wait()
    flags = have.read_bytes()
    layer_size = (image.path / "blobs" / "sha256" / layer).stat().st_size
    # Chunk i is [i MiB, (i+1) MiB) of the layer; the last one is short.
    kept = sum(min(1 << 20, layer_size - (i << 20)) for i, flag in enumerate(flags) if flag == 1)
    assert 7 << 20 < kept < layer_size
    # Blobs that completed before the kill (the config: a node's first look at an image fetches
    # its small blobs at once) are not fetched again either.
    kept += sum(p.stat().st_size for p in (home / "cache" / "blobs" / "sha256").glob("*"))
    # The proxy may still be pushing bytes at the dead process's sockets: wait until it stops.
    before, deadline = -1, time.monotonic() + 20
    while (now := proxy.stats()["body_bytes"]) != before:
        assert time.monotonic() < deadline, "the proxy kept sending to a dead process"
        before = now
        time.sleep(0.5)

    survivor, host = serve(home, s3_url(bucket, proxy.endpoint), tmp_path / "logs", "survivor")
    try:
        pull = skopeo_pull(f"{host}/demo/app:1", tmp_path / "out")
        _, err = pull.communicate(timeout=180)
        assert pull.returncode == 0, err.decode()
        check_pulled(tmp_path / "out", image)
        refetched = metric(host, "p2pimg_source_bytes_total", source="origin")
        assert refetched == blob_bytes(image) - kept, "verified chunks were fetched again"
        assert proxy.stats()["body_bytes"] - before < blob_bytes(image) - kept + (64 << 10)
    finally:
        stop_clean(survivor)


def test_origin_faults_still_yield_a_correct_pull(
    moto: str, fault_proxy: Callable[..., FaultProxy], run_p2pimg: RunP2pimg, tmp_path: Path
) -> None:
    image = write_oci_layout(
        tmp_path / "img", [LayerSpec(40 << 20, "none"), LayerSpec(3 << 20)], tag="1", seed=7
    )
    bucket = make_bucket(moto)
    publish(run_p2pimg, image, s3_url(bucket, moto), tmp_path / "publisher")
    proxy = fault_proxy(moto, "--faults", "fail,reset,stall,corrupt", "--every", "2", "--max-faults", "8")
    daemon, host = serve(tmp_path / "home", s3_url(bucket, proxy.endpoint), tmp_path / "logs")
    try:
        pull = skopeo_pull(f"{host}/demo/app:1", tmp_path / "out")
        _, err = pull.communicate(timeout=180)
        assert pull.returncode == 0, err.decode()
        check_pulled(tmp_path / "out", image)
        assert proxy.stats()["faults"] >= 4, "the proxy injected too few faults to test anything"
        assert metric(host, "p2pimg_verify_failures_total", source="origin") >= 1
        assert metric(host, "p2pimg_source_bytes_total", source="origin") == blob_bytes(image)
    finally:
        stop_clean(daemon)


def test_wrong_bytes_never_reach_the_client(
    moto: str, fault_proxy: Callable[..., FaultProxy], run_p2pimg: RunP2pimg, tmp_path: Path
) -> None:
    image = write_oci_layout(tmp_path / "img", [LayerSpec(6 << 20, "none")], tag="1", seed=8)
    bucket = make_bucket(moto)
    publish(run_p2pimg, image, s3_url(bucket, moto), tmp_path / "publisher", "--chunk-size", "256K")
    proxy = fault_proxy(moto, "--faults", "corrupt", "--every", "1")  # every ranged GET is corrupted
    home = tmp_path / "home"
    daemon, host = serve(home, s3_url(bucket, proxy.endpoint), tmp_path / "logs")
    manifest = json.loads((image.path / "blobs" / "sha256" / image.top_digest[7:]).read_bytes())
    layer = manifest["layers"][0]["digest"]
    truth = (image.path / "blobs" / "sha256" / layer[7:]).read_bytes()
    try:
        got = subprocess.run(
            ["curl", "-s", f"http://{host}/v2/demo/app/blobs/{layer}"],
            capture_output=True,
            timeout=120,
            check=False,
        ).stdout
        assert truth.startswith(got), "bytes that do not match their CID reached the client"
        assert len(got) < len(truth)
        pull = skopeo_pull(f"{host}/demo/app:1", tmp_path / "out")
        pull.communicate(timeout=180)
        assert pull.returncode != 0
        assert not (home / "cache" / "blobs" / "sha256" / layer[7:]).exists()
        assert metric(host, "p2pimg_verify_failures_total", source="origin") >= 1
        assert metric(host, "p2pimg_source_bytes_total", source="origin") < len(truth)
    finally:
        stop_clean(daemon)
