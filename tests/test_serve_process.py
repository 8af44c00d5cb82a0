"""`p2pimg serve` as a process: ready, read-only, and stopped cleanly by SIGINT or SIGTERM."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from p2pimg.ops.sample import LayerSpec, write_oci_layout


def start(home: Path) -> tuple[subprocess.Popen[str], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "p2pimg", "serve", "--listen", f"127.0.0.1:{port}"],
        env=dict(os.environ, P2PIMG_HOME=str(home)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1) as r:
                assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
                return proc, f"127.0.0.1:{port}"
        except OSError:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("serve did not become ready")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_serve_even_with_a_stalled_client(tmp_path: Path, signum: int) -> None:
    home = tmp_path / "home"
    image = write_oci_layout(tmp_path / "img", [LayerSpec(24 << 20, "none")], tag="1")
    subprocess.run(
        [sys.executable, "-m", "p2pimg", "publish", f"oci:{image.path}:1", "demo/app:1", "--home", str(home)],
        check=True,
        capture_output=True,
    )
    layer = max((p for p in (image.path / "blobs" / "sha256").iterdir()), key=lambda p: p.stat().st_size)
    proc, host = start(home)
    # A client that asks for a 24 MiB blob and then reads nothing: the server's send blocks.
    stalled = socket.create_connection(tuple(host.split(":")))  # type: ignore[arg-type]
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.sendall(f"GET /v2/demo/app/blobs/sha256:{layer.name} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    first = stalled.recv(100)
    assert first.startswith(b"HTTP/1.1 200"), first
    time.sleep(0.5)
    proc.send_signal(signum)
    try:
        out, err = proc.communicate(timeout=10)
    finally:
        stalled.close()
        proc.kill()
    assert proc.returncode == 0, err
    assert "shutting down" in err and "Traceback" not in err


def test_listen_address_in_use(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "p2pimg",
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                "--home",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode != 0
    assert "address already in use" in result.stderr.lower() and "Traceback" not in result.stderr


# -- a mirror with credentials, listening beyond loopback -------------------------------------------


def _docker_config(tmp_path: Path, registry: str | None) -> dict[str, str]:
    """The environment of a user whose Docker config holds a login to `registry` (or none)."""
    config = tmp_path / "docker"
    config.mkdir()
    auths = {registry: {"auth": base64.b64encode(b"alice:secret").decode()}} if registry else {}
    (config / "config.json").write_text(json.dumps({"auths": auths}))
    return dict(os.environ, DOCKER_CONFIG=str(config), P2PIMG_HOME=str(tmp_path / "home"))


def _serve(env: dict[str, str], listen_host: str, *extra: str) -> tuple[subprocess.Popen[str], int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [
        sys.executable,
        "-m",
        "p2pimg",
        "serve",
        "--listen",
        f"{listen_host}:{port}",
        "--no-mdns",
        "--upstream",
        "https://registry.example.com",
        *extra,
    ]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), port


def _ready_then_stop(proc: subprocess.Popen[str], port: int) -> str:
    """Wait until the registry answers on loopback, stop it with SIGINT: its stderr."""
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "serve did not become ready"
                time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == 0, err
    return err


def test_mirror_with_credentials_beyond_loopback_refuses_to_start(tmp_path: Path) -> None:
    env = _docker_config(tmp_path, "registry.example.com")
    proc, port = _serve(env, "0.0.0.0")
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith(
        f"p2pimg: error: not serving on 0.0.0.0:{port}: "
        "the mirror pulls from registry.example.com with your "
        f"credentials (from {env['DOCKER_CONFIG']}/config.json)"
    )
    assert "--allow-public-mirror" in err and "secret" not in err and out == ""


def test_mirror_with_credentials_beyond_loopback_when_allowed_warns(tmp_path: Path) -> None:
    proc, port = _serve(_docker_config(tmp_path, "registry.example.com"), "0.0.0.0", "--allow-public-mirror")
    err = _ready_then_stop(proc, port)
    warning = [line for line in err.splitlines() if "WARNING" in line]
    assert len(warning) == 1 and "registry.example.com" in warning[0] and f"0.0.0.0:{port}" in warning[0]
    assert "secret" not in err


@pytest.mark.parametrize("case", ["credentials on loopback", "anonymous beyond loopback"])
def test_mirror_that_exposes_nothing_private_starts_quietly(tmp_path: Path, case: str) -> None:
    if case == "credentials on loopback":
        proc, port = _serve(_docker_config(tmp_path, "registry.example.com"), "127.0.0.1")
    else:  # logged in elsewhere only: what this mirror pulls is public
        proc, port = _serve(_docker_config(tmp_path, "other.example.com"), "0.0.0.0")
    err = _ready_then_stop(proc, port)
    assert "WARNING" not in err and "error" not in err


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "localhost", "::1", "[::1]"])
def test_loopback_listen_addresses(host: str) -> None:
    from p2pimg.sources.upstream.refs import is_loopback

    assert is_loopback(host)
    for beyond in ("0.0.0.0", "::", "10.0.0.5", "myhost", "[::ffff:10.0.0.5]"):
        assert not is_loopback(beyond)
