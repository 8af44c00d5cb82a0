"""`p2pimg demo`: the main job end to end on the embedded origin, offline.

Makes a small sample image, publishes it, starts the proxy in this process and pulls the image
through it with a real client, by tag and by root CID, checking the pulled digest.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import trio

from p2pimg.errors import ListenError, P2pimgError
from p2pimg.node.config import Config, parse_listen
from p2pimg.ops.publish import publish
from p2pimg.ops.sample import LayerSpec, write_oci_layout
from p2pimg.sources.origins import open_origin
from p2pimg.web.serve import serve

DEMO_REF = ("demo/app", "1")


def _pull_command(client: str, ref: str, dest: Path) -> list[str]:
    if client == "skopeo":
        return ["skopeo", "copy", "--insecure-policy", "--preserve-digests", "--src-tls-verify=false",
                f"docker://{ref}", f"oci:{dest}:pulled"]
    if client == "podman":
        return ["podman", "--storage-driver", "vfs", "--root", str(dest / "root"),
                "--runroot", str(dest / "run"), "pull", "--tls-verify=false", ref]
    return ["ctr", "content", "fetch", "--plain-http", ref]


def _pulled_digest(client: str, dest: Path) -> str | None:
    if client != "skopeo":
        return None
    index = json.loads((dest / "index.json").read_text())
    digest: str = index["manifests"][0]["digest"]
    return digest


async def _demo(config: Config, client: str) -> int:
    work = Path(tempfile.mkdtemp(prefix="p2pimg-demo-"))
    try:
        sample = await trio.to_thread.run_sync(
            lambda: write_oci_layout(work / "image", [LayerSpec(8 << 20, files=4),
                                                      LayerSpec(2 << 20, "none"),
                                                      LayerSpec(64 << 10)], tag="1"))
        origin = open_origin(config.origin, config.home)
        name, tag = DEMO_REF
        report = await publish(f"oci:{sample.path}:1", name, tag, origin, chunk_size=config.chunk_size)
        print(f"published sample image {name}:{tag} ({sample.total_bytes} bytes) to {origin.url}")
        print(f"image root CID: {report.root}")

        host, port = parse_listen(config.listen)
        async with trio.open_nursery() as nursery:
            try:
                address = await nursery.start(serve, replace(config, listen=f"{host}:{port}", mdns=False))
            except ListenError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                print(f"{host}:{port} is busy; using a free port instead")
                address = await nursery.start(serve, replace(config, listen=f"{host}:0", mdns=False))
            status = 0
            for ref in (f"{address}/{name}:{tag}", f"{address}/ipfs/{report.root}:latest"):
                dest = work / f"pull-{len(ref)}"
                started = time.perf_counter()
                result = await trio.run_process(_pull_command(client, ref, dest), check=False,
                                                capture_stdout=True, capture_stderr=True)
                elapsed = time.perf_counter() - started
                if result.returncode != 0:
                    print(f"pull {ref} with {client} FAILED:\n{result.stderr.decode()}", file=sys.stderr)
                    status = 1
                    continue
                got = _pulled_digest(client, dest)
                if got is not None and got != sample.top_digest:
                    print(f"pull {ref}: got {got}, published {sample.top_digest}", file=sys.stderr)
                    status = 1
                    continue
                print(f"pulled {ref} with {client} in {elapsed:.2f} s"
                      + (f" (manifest {got})" if got else ""))
            nursery.cancel_scope.cancel()
        return status
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_demo(config: Config, *, client: str = "skopeo") -> int:
    if shutil.which(client) is None:
        raise P2pimgError(f"the demo pulls with {client}, which is not installed "
                          f"(apt-get install {'containerd' if client == 'ctr' else client})")
    if client == "ctr":
        probe = subprocess.run(["ctr", "version"], capture_output=True, check=False)
        if probe.returncode != 0:
            raise P2pimgError("ctr needs a running containerd daemon for the demo")
    return trio.run(_demo, config, client)
