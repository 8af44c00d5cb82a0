"""Two nodes on their own network addresses (network namespaces made by the test), finding each
other by mDNS: B pulls what A warmed, and B's metrics show the bytes came from A, not the origin."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import netns
import pytest
from conftest import client_env
from netns import Host, LanFactory

from p2pimg.ops.sample import LayerSpec, write_oci_layout

lan_factory = netns.lan_factory

FETCH = """
import json, sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
with opener.open(sys.argv[1], timeout=5) as response:
    print(response.headers[sys.argv[2]] if len(sys.argv) > 2 else response.read().decode())
"""


def node(host: Host, home: Path, origin: Path, logs: Path) -> subprocess.Popen[bytes]:
    env = client_env(
        P2PIMG_HOME=str(home), P2PIMG_ORIGIN=origin.as_uri(), P2PIMG_MDNS="1", PYTHONUNBUFFERED="1"
    )
    with (logs / f"{host.name}.log").open("wb") as out:  # the child has its own copy of the descriptor
        return host.popen(
            [
                sys.executable,
                "-m",
                "p2pimg",
                "serve",
                "--listen",
                f"{host.addr}:5050",
                "--peer-listen",
                f"{host.addr}:5051",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def fetch(host: Host, url: str, header: str | None = None) -> str:
    """The body of a 2xx answer to GET `url` from `host`, or with `header` that header's value."""
    result = host.python(FETCH, url, *([header] if header else []), capture_output=True, text=True)
    if result.returncode != 0:
        raise OSError(result.stderr[-500:])
    return str(result.stdout)


def api_version(host: Host) -> str:
    """What the registry API of `host`'s node says it speaks (a header of /v2/'s answer, not its body)."""
    return fetch(host, f"http://{host.addr}:5050/v2/", "Docker-Distribution-API-Version").strip()


def wait_for(what: str, check: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():  # type: ignore[operator]
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.25)


def metric(host: Host, name: str, **labels: str) -> float:
    text = fetch(host, f"http://{host.addr}:5050/metrics")
    want = name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(want + " "))


def test_b_finds_a_by_mdns_and_pulls_from_it(lan_factory: LanFactory, tmp_path: Path) -> None:
    lan = lan_factory(2)
    a, b = lan.hosts
    image = write_oci_layout(
        tmp_path / "img", [LayerSpec(16 << 20, "none"), LayerSpec(2 << 20)], tag="1", seed=9
    )
    origin = tmp_path / "origin"  # one directory all namespaces see: the embedded origin
    published = subprocess.run(
        [
            sys.executable,
            "-m",
            "p2pimg",
            "publish",
            f"oci:{image.path}:1",
            "demo/app:1",
            "--origin",
            origin.as_uri(),
            "--home",
            str(tmp_path / "publisher"),
        ],
        capture_output=True,
        text=True,
        env=client_env(),
        check=False,
    )
    assert published.returncode == 0, published.stderr
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = [node(a, tmp_path / "a", origin, logs), node(b, tmp_path / "b", origin, logs)]
    try:
        for h in (a, b):
            wait_for(
                f"{h.name} to serve",
                lambda h=h: api_version(h) == "registry/2.0",
            )
        warmed = a.run(
            [sys.executable, "-m", "p2pimg", "warm", "demo/app:1"],
            capture_output=True,
            text=True,
            env=client_env(P2PIMG_HOME=str(tmp_path / "a"), P2PIMG_ORIGIN=origin.as_uri()),
        )
        assert warmed.returncode == 0, warmed.stdout + warmed.stderr
        assert "through the server of this home" in warmed.stderr
        # mDNS: B learns A's peer address without being told.
        wait_for(
            "B to discover A by mDNS",
            lambda: f"http://{a.addr}:5051" in json.loads(fetch(b, f"http://{b.addr}:5050/p2pimg/v1/peers")),
        )
        dest = tmp_path / "out"
        pulled = b.run(
            [
                "skopeo",
                "copy",
                "--insecure-policy",
                "--preserve-digests",
                "--src-tls-verify=false",
                f"docker://{b.addr}:5050/demo/app:1",
                f"oci:{dest}:x",
            ],
            capture_output=True,
            text=True,
            env=client_env(),
        )
        assert pulled.returncode == 0, pulled.stderr
        assert json.loads((dest / "index.json").read_text())["manifests"][0]["digest"] == image.top_digest
        for blob in (dest / "blobs" / "sha256").iterdir():
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
        layers = image.total_bytes - (image.path / "blobs" / "sha256" / image.top_digest[7:]).stat().st_size
        assert metric(b, "p2pimg_source_bytes_total", source="peer") == layers
        assert metric(b, "p2pimg_source_bytes_total", source="origin") == 0
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            assert proc.wait(15) == 0, "\n".join(p.read_text()[-3000:] for p in logs.iterdir())
