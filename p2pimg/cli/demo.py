"""`p2pimg demo`: the main job end to end on the embedded origin, offline; `p2pimg sample`.

The demo makes a small sample image, publishes it, starts the proxy in this process and pulls the
image through it with a real client, by tag and by root CID, checking the pulled digest. The
sample command writes the same image as an OCI layout and a docker archive, to publish by hand.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import trio

from p2pimg.content import signing
from p2pimg.errors import InvalidInput, ListenError, P2pimgError
from p2pimg.node.config import Config, parse_listen
from p2pimg.ops.publish import publish
from p2pimg.ops.sample import LayerSpec, SampleImage, write_docker_archive, write_oci_layout
from p2pimg.sources.origins import open_origin
from p2pimg.web.serve import serve

DEMO_REF = ("demo/app", "1")
# About 10 MB: a gzip layer of four files (several 1 MiB chunks), an uncompressed one, a small one.
SAMPLE_LAYERS = (LayerSpec(8 << 20, files=4), LayerSpec(2 << 20, "none"), LayerSpec(64 << 10))


def write_sample(directory: Path) -> tuple[SampleImage, SampleImage]:
    """The sample image as `directory/layout` (an OCI image layout, tag 1) and `directory/app.tar`
    (a `docker save` archive of the same layers and config, tagged demo/app:2). Neither may exist."""
    layout, archive = directory / "layout", directory / "app.tar"
    for path in (layout, archive):
        if path.exists() or path.is_symlink():
            raise InvalidInput(f"{path.absolute()} already exists: remove it or name another directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        return (
            write_oci_layout(layout, SAMPLE_LAYERS, tag="1"),
            write_docker_archive(archive, SAMPLE_LAYERS, repo_tag="demo/app:2"),
        )
    except OSError as exc:
        raise P2pimgError(f"cannot write the sample image in {directory}: {exc.strerror or exc}") from None


def run_sample(directory: str) -> int:
    layout, archive = os.path.join(directory, "layout"), os.path.join(directory, "app.tar")
    image, _ = write_sample(Path(directory))
    print(
        f"wrote a sample image ({image.total_bytes / 1e6:.1f} MB in {len(SAMPLE_LAYERS)} layers, "
        f"linux/amd64) as {layout} (an OCI image layout, tag 1) and as {archive} (a docker save "
        "archive); publish them with:",
        file=sys.stderr,
    )
    print(f"p2pimg publish oci:{layout}:1 demo/app:1")
    print(f"p2pimg publish docker-archive:{archive} demo/app:2")
    return 0


def _pull_command(client: str, ref: str, dest: Path) -> list[str]:
    if client == "skopeo":
        return [
            "skopeo",
            "copy",
            "--insecure-policy",
            "--preserve-digests",
            "--src-tls-verify=false",
            f"docker://{ref}",
            f"oci:{dest}:pulled",
        ]
    if client == "podman":
        return [
            "podman",
            "--storage-driver",
            "vfs",
            "--root",
            str(dest / "root"),
            "--runroot",
            str(dest / "run"),
            "pull",
            "--tls-verify=false",
            ref,
        ]
    return ["ctr", "content", "fetch", "--plain-http", ref]


def _pulled_digest(client: str, dest: Path) -> str | None:
    if client != "skopeo":
        return None
    index = json.loads((dest / "index.json").read_text())
    digest: str = index["manifests"][0]["digest"]
    return digest


async def _demo(config: Config, client: str, signer: signing.Signer | None) -> int:
    work = Path(tempfile.mkdtemp(prefix="p2pimg-demo-"))
    try:
        sample = await trio.to_thread.run_sync(
            lambda: write_oci_layout(work / "image", SAMPLE_LAYERS, tag="1")
        )
        origin = open_origin(config.origin, config.home)
        name, tag = DEMO_REF
        report = await publish(
            f"oci:{sample.path}:1", name, tag, origin, chunk_size=config.chunk_size, signer=signer
        )
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
                result = await trio.run_process(
                    _pull_command(client, ref, dest), check=False, capture_stdout=True, capture_stderr=True
                )
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
                print(
                    f"pulled {ref} with {client} in {elapsed:.2f} s" + (f" (manifest {got})" if got else "")
                )
            nursery.cancel_scope.cancel()
        return status
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_demo(config: Config, *, client: str = "skopeo", temporary_home: bool = False) -> int:
    """The demo in `config.home`; a `temporary_home` (made for it, removed after it) is also given a
    publisher key, so that the demo's tag records are signed and checked."""
    if shutil.which(client) is None:
        raise P2pimgError(
            f"the demo pulls with {client}, which is not installed "
            f"(apt-get install {'containerd' if client == 'ctr' else client})"
        )
    if client == "ctr":
        probe = subprocess.run(["ctr", "version"], capture_output=True, check=False)
        if probe.returncode != 0:
            raise P2pimgError(
                "ctr needs a running containerd daemon for the demo: as root, "
                "`systemctl start containerd`, or without systemd `containerd &`"
            )
    if temporary_home:
        signing.generate_key(config.home)
        print(f"demo home: {config.home} (temporary, removed at the end; --home DIR keeps one)")
    else:
        print(f"demo home: {config.home}")
    status = trio.run(_demo, config, client, signing.load_signer(config.home))
    if status == 0:
        print(
            "next, by hand: `p2pimg sample DIR` writes this image as DIR/layout and DIR/app.tar to "
            "publish, and `p2pimg --help` says what else there is"
        )
    return status
