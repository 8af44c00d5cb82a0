"""`kill -9` of the proxy in the middle of a pull: the cache stays consistent, the pull completes.

The file origin is fast, so where exactly the kill lands varies from run to run; the assertions
hold wherever it lands: nothing unverified is visible, every claim a partial blob makes is true,
and a restarted proxy serves every blob whole and correct.
"""

from __future__ import annotations

import hashlib
import signal
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import Daemon, client_env, http_status, start_or_fail

from p2pimg.content.cid import Cid

if TYPE_CHECKING:
    from conftest import RunP2pimg, SampleCache, Skopeo


def serve(home: Path, logdir: Path, name: str) -> tuple[Daemon, str]:
    def launch(port: int) -> Daemon:
        argv = [sys.executable, "-m", "p2pimg", "serve", "--listen", f"127.0.0.1:{port}"]
        return Daemon(name, argv, logdir=logdir, env=client_env(P2PIMG_HOME=str(home)))

    daemon, port = start_or_fail(
        "p2pimg serve did not start", name, launch, lambda p: http_status(f"http://127.0.0.1:{p}/v2/") == 200
    )
    return daemon, f"127.0.0.1:{port}"


def check_cache(home: Path) -> tuple[int, int]:
    """Every visible blob hashes to its name; every claimed chunk of a partial blob is real.

    Returns (complete blobs, claimed partial chunks).
    """
    cache = home / "cache"
    blobs = list((cache / "blobs" / "sha256").iterdir())
    for blob in blobs:
        h = hashlib.sha256()
        with blob.open("rb") as f:
            while piece := f.read(1 << 20):
                h.update(piece)
        assert h.hexdigest() == blob.name, f"visible blob {blob.name} does not match its digest"
    claimed = 0
    from p2pimg.content import dagcbor
    from p2pimg.content.model import BlobMap

    maps = {}
    for block in (home / "origin" / "p2pimg" / "blocks").iterdir():
        cid = Cid.parse(block.name)
        if cid.codec_name == "dag-cbor":
            node = dagcbor.decode(block.read_bytes())
            if isinstance(node, dict) and node.get("type") == "p2pimg/blob-map@1":
                bmap = BlobMap.from_node(node)
                maps[bmap.digest[7:]] = bmap
    for have in (cache / "partial" / "sha256").glob("*.have"):
        bmap = maps[have.name.removesuffix(".have")]
        data_path = have.with_suffix(".data")
        flags = have.read_bytes()
        if not data_path.exists():
            continue  # finalized between the rename and the unlink of its claim file
        with data_path.open("rb") as f:
            for i, flag in enumerate(flags):
                if flag == 1:
                    lo, hi = bmap.bounds(i)
                    f.seek(lo)
                    # A claim may be stale after a crash (it is re-verified on open), but the
                    # store writes the claim only after the data, so a kill -9 leaves none stale.
                    assert bmap.chunks[i].matches(f.read(hi - lo)), f"false claim for chunk {i}"
                    claimed += 1
    return len(blobs), claimed


@pytest.mark.parametrize("delay", [0.02, 0.08, 0.25])
def test_kill_9_mid_pull(
    samples: SampleCache,
    run_p2pimg: RunP2pimg,
    skopeo: Skopeo,
    p2pimg_home: Path,
    tmp_path: Path,
    delay: float,
) -> None:
    sample = samples.big_layer
    run_p2pimg("publish", sample.source, sample.name_tag, "--chunk-size", "256K", home=p2pimg_home)
    (layer,) = sample.platform_manifest()["layers"]
    daemon, host = serve(p2pimg_home, tmp_path / "logs", "victim")
    try:
        with socket.create_connection(tuple(host.split(":"))) as s:  # type: ignore[arg-type]
            s.sendall(f"GET /v2/{sample.repo}/blobs/{layer['digest']} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert s.recv(12).startswith(b"HTTP/1.1 200")
            time.sleep(delay)
            daemon.proc.send_signal(signal.SIGKILL)
            daemon.proc.wait(10)
    finally:
        daemon.stop()
    complete, claimed = check_cache(p2pimg_home)
    print(f"after kill -9 at {delay} s: {complete} complete blobs, {claimed} verified partial chunks")

    survivor, host = serve(p2pimg_home, tmp_path / "logs", "survivor")
    try:
        out = tmp_path / "out"
        skopeo(
            "copy",
            "--preserve-digests",
            "--src-tls-verify=false",
            f"docker://{host}/{sample.name_tag}",
            f"oci:{out}:x",
        )
        dst = out / "blobs" / "sha256" / layer["digest"].removeprefix("sha256:")
        assert "sha256:" + hashlib.sha256(dst.read_bytes()).hexdigest() == layer["digest"]
        deadline = time.monotonic() + 20
        while check_cache(p2pimg_home)[0] < len(sample.image.blob_digests) - 1:
            assert time.monotonic() < deadline, "blobs never became complete in the cache"
            time.sleep(0.1)
    finally:
        status, graceful = survivor.stop()
    assert graceful and status == 0, survivor.output()
