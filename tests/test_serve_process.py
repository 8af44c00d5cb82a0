"""`p2pimg serve` as a process: ready, read-only, and stopped cleanly by SIGINT or SIGTERM."""

from __future__ import annotations

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
    proc = subprocess.Popen([sys.executable, "-m", "p2pimg", "serve", "--listen", f"127.0.0.1:{port}"],
                            env=dict(os.environ, P2PIMG_HOME=str(home)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
    subprocess.run([sys.executable, "-m", "p2pimg", "publish", f"oci:{image.path}:1", "demo/app:1",
                    "--home", str(home)], check=True, capture_output=True)
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
        result = subprocess.run([sys.executable, "-m", "p2pimg", "serve", "--listen", f"127.0.0.1:{port}",
                                 "--home", str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "address already in use" in result.stderr.lower() and "Traceback" not in result.stderr
