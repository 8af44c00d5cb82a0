"""Warm pull: the image is in p2pimg's cache; the same client pulls it through p2pimg and from the
Debian `docker-registry` serving the same image from local disk, alternately, in the same run.

The figure is the client's wall-clock pull time; the ratio p2pimg / docker-registry says what
serving from p2pimg's verified chunk cache costs against a plain registry on the same disk.
Clients: `skopeo copy` into a fresh OCI layout, and `ctr content fetch` into a fresh namespace of
a private containerd (its content store isolated per namespace, so every pull downloads).

And `curl`: one GET of a single large blob (256 MB in --quick, 1 GB in --full) from each server,
body to /dev/null, giving two rows: throughput (MB/s) and the server's CPU seconds per GB served
(utime + stime of the server process from /proc, read before and after each GET). This is what a
warm cache costs per byte when the client is not the bottleneck: p2pimg sends cached blobs with
sendfile, docker-registry copies them through its own buffers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

from ..procs import (
    Containerd,
    Unavailable,
    ceiling_server,
    client_env,
    containerd,
    cpu_seconds,
    p2pimg_serve,
    registry_process,
    require,
)
from ..scenario import Context, Measure, Skipped
from . import MB, REPO, ImageSpec, build_image, file_origin, image_matrix, publish, push, skopeo_pull, tiny

SCENARIO = "warm-pull"
CLIENTS = ("skopeo", "ctr", "curl")
BASELINE = "docker-registry (local disk)"
GB = 1000 * MB
# The tag of the one-layer image whose blob the curl rows GET.
BLOB_TAG = "blob"


def warm_pull(ctx: Context, clients: Sequence[str] = CLIENTS) -> list[Measure | Skipped]:
    """One row per client and image, and curl's two rows of one large blob; `clients` narrows the
    clients (the smoke test uses skopeo)."""
    if unknown := set(clients) - set(CLIENTS):
        raise ValueError(f"unknown clients {sorted(unknown)}; known: {', '.join(CLIENTS)}")
    # skopeo also places the image in docker-registry, so it is needed even for ctr's rows.
    if missing := require("skopeo", "docker-registry"):
        return [Skipped(SCENARIO, f"missing {', '.join(missing)} (apt-get install skopeo docker-registry)")]
    rows: list[Measure | Skipped] = []
    if "curl" in clients and require("curl"):
        rows.append(Skipped(SCENARIO, "curl: not installed (apt-get install curl)"))
        clients = [c for c in clients if c != "curl"]
    specs = image_matrix(ctx)
    home = ctx.workdir / "home"
    blob: tuple[ImageSpec, str, int] | None = None  # curl's image, its layer's digest and size
    with ExitStack() as stack:
        registry, registry_proc = stack.enter_context(registry_process(ctx.workdir))
        layers: dict[ImageSpec, list[str]] = {}
        for spec in specs:
            ctx.progress(f"making and placing a {spec.label} image")
            image = build_image(spec, ctx.workdir / f"layout-{spec.key}")
            manifest = json.loads((image.path / "blobs" / "sha256" / image.top_digest[7:]).read_bytes())
            layers[spec] = [layer["digest"] for layer in manifest["layers"]]
            publish(image, f"{REPO}:{spec.key}", home)
            push(image, f"{registry}/{REPO}:{spec.key}")
            shutil.rmtree(image.path)  # both registries hold their own copy now
        if "curl" in clients:
            spec = blob_spec(ctx)
            ctx.progress(f"making and placing a {spec.label} image for curl")
            image = build_image(spec, ctx.workdir / "layout-blob")
            manifest = json.loads((image.path / "blobs" / "sha256" / image.top_digest[7:]).read_bytes())
            (layer,) = manifest["layers"]
            blob = (spec, str(layer["digest"]), int(layer["size"]))
            publish(image, f"{REPO}:{BLOB_TAG}", home)
            push(image, f"{registry}/{REPO}:{BLOB_TAG}")
            shutil.rmtree(image.path)
        # Started after publishing, so it serves what is there and nothing races its startup.
        proxy, proxy_proc = stack.enter_context(
            p2pimg_serve(home, origin=file_origin(home), log=ctx.workdir / "p2pimg.log")
        )
        pullers: dict[str, Callable[[str], float]] = {}
        if "skopeo" in clients:
            pullers["skopeo"] = lambda ref: skopeo_pull(ref, ctx.workdir / "pull")
        if "ctr" in clients:
            try:
                ctd = stack.enter_context(containerd(ctx.workdir))
            except Unavailable as exc:
                rows.append(Skipped(SCENARIO, f"ctr: {exc}"))
            else:
                pullers["ctr"] = lambda ref: ctr_fetch(ctd, ref)
        for spec in specs:
            ours_ref, theirs_ref = f"{proxy}/{REPO}:{spec.key}", f"{registry}/{REPO}:{spec.key}"
            for client, pull in pullers.items():
                what = f"{client}, {spec.label}"
                # Untimed first pulls: the first through p2pimg fills its cache (which is what
                # "warm" means), and each side's files get into the page cache alike.
                ctx.progress(f"{what}: warming up")
                pull(ours_ref)
                pull(theirs_ref)
                check_cached(home, layers[spec])
                ours: list[float] = []
                theirs: list[float] = []
                for run in range(ctx.runs):
                    ctx.progress(f"{what}: run {run + 1}/{ctx.runs}")
                    # Alternate who goes first, so a drift of the machine (another tenant, page
                    # cache pressure) does not always land on the same side.
                    if run % 2 == 0:
                        ours.append(pull(ours_ref))
                        theirs.append(pull(theirs_ref))
                    else:
                        theirs.append(pull(theirs_ref))
                        ours.append(pull(ours_ref))
                rows.append(
                    Measure(
                        scenario=SCENARIO,
                        client=what,
                        metric="pull time, image in p2pimg's cache",
                        unit="s",
                        p2pimg=ours,
                        baseline=theirs,
                        baseline_name=BASELINE,
                        details={"image": spec.label, "image_bytes": spec.total, "layers": spec.layers},
                    )
                )
        if blob is not None:
            spec, digest, size = blob
            try:
                rows += blob_get(
                    ctx,
                    home,
                    spec,
                    digest,
                    size,
                    ours=(proxy, proxy_proc.pid),
                    theirs=(registry, registry_proc.pid),
                )
            except Exception as exc:  # the pull rows above stand on their own
                rows.append(Skipped(SCENARIO, f"curl, blob GET: error: {type(exc).__name__}: {exc}"))
    return rows


def blob_spec(ctx: Context) -> ImageSpec:
    """The one-layer image of curl's rows: 256 MB in --quick, 1 GB in --full."""
    if tiny():
        return ImageSpec(2 * MB, 1)
    return ImageSpec(256 * MB if ctx.quick else GB, 1)


def curl_get(host: str, digest: str, size: int) -> float:
    """Seconds curl takes to GET the blob `digest` from `host` (body to /dev/null, size checked)."""
    url = f"http://{host}/v2/{REPO}/blobs/{digest}"
    argv = ["curl", "-sSf", "--noproxy", "*", "-o", "/dev/null", "-w", "%{size_download}", url]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, env=client_env(), timeout=600, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(
            f"curl {url} exited with {done.returncode}: {done.stderr.decode(errors='replace')}"
        )
    if int(float(done.stdout.decode() or 0)) != size:
        raise RuntimeError(f"curl {url} got {done.stdout.decode()} bytes, not {size}")
    return elapsed


def blob_get(
    ctx: Context,
    home: Path,
    spec: ImageSpec,
    digest: str,
    size: int,
    *,
    ours: tuple[str, int],
    theirs: tuple[str, int],
) -> list[Measure]:
    """curl's rows: throughput of a warm GET of one large blob, and the server's CPU per GB.

    `ours` and `theirs` are each server's HOST:PORT and process id. The first GET through p2pimg
    fills its cache from the file origin; one untimed GET from docker-registry puts its file in
    the page cache alike. Then each run GETs the blob once from each server, in alternating order,
    reading the server's CPU time right before and right after.

    A figure is over `repeat` GETs one after another, at least 1 GB in all: a 256 MB GET takes a
    fraction of a second, and CPU time is counted in clock ticks (10 ms at 100 Hz).
    """
    repeat = 1 if tiny() else max(1, -(-GB // size))
    what = f"curl, blob GET of {size / MB:.0f} MB"
    ctx.progress(f"{what}: warming up")
    for host, _pid in (ours, theirs):
        curl_get(host, digest, size)
    check_cached(home, [digest])
    blob_file = home / "cache" / "blobs" / "sha256" / digest.removeprefix("sha256:")
    with ceiling_server(blob_file) as (ceiling, ceiling_proc):
        curl_get(ceiling, digest, size)
        return _blob_rows(ctx, spec, digest, size, repeat, what, [ours, theirs, (ceiling, ceiling_proc.pid)])


def _blob_rows(
    ctx: Context,
    spec: ImageSpec,
    digest: str,
    size: int,
    repeat: int,
    what: str,
    servers: list[tuple[str, int]],
) -> list[Measure]:
    """The timed GETs of `blob_get`: p2pimg, docker-registry and the ceiling, in turn."""
    speed: tuple[list[float], ...] = ([], [], [])
    cpu: tuple[list[float], ...] = ([], [], [])
    seconds: tuple[list[float], ...] = ([], [], [])
    cpu_raw: tuple[list[float], ...] = ([], [], [])
    for run in range(ctx.runs):
        ctx.progress(f"{what}: run {run + 1}/{ctx.runs}")
        sides = list(enumerate(servers))
        sides = sides[run % 3 :] + sides[: run % 3]  # who goes first turns
        for side, (host, pid) in sides:
            before = cpu_seconds(pid)
            elapsed = sum(curl_get(host, digest, size) for _ in range(repeat))
            used = cpu_seconds(pid) - before
            seconds[side].append(elapsed)
            cpu_raw[side].append(used)
            speed[side].append(repeat * size / MB / elapsed)
            cpu[side].append(used / (repeat * size / GB))
    details: dict[str, object] = {
        "image": spec.label,
        "blob_bytes": size,
        "client": "curl -o /dev/null, one connection",
        "gets_per_figure": repeat,
        "cache": "warm: the blob was GET through p2pimg once before the timed runs",
        "p2pimg_seconds": seconds[0],  # of all the GETs of each figure
        "baseline_seconds": seconds[1],
        "p2pimg_cpu_seconds": cpu_raw[0],
        "baseline_cpu_seconds": cpu_raw[1],
        "cpu_clock_ticks_per_s": os.sysconf("SC_CLK_TCK"),
    }

    def throughput(metric: str, side: int, baseline_name: str, **extra: object) -> Measure:
        return Measure(
            scenario=SCENARIO,
            client=what,
            metric=metric,
            unit="MB/s",
            p2pimg=speed[0],
            baseline=speed[side],
            baseline_name=baseline_name,
            lower_is_better=False,
            details={**details, **extra},
        )

    return [
        throughput("blob GET throughput, blob in p2pimg's cache", 1, BASELINE, target_ratio=">= 2.0"),
        Measure(
            scenario=SCENARIO,
            client=what,
            metric="server CPU seconds per GB served (utime + stime)",
            unit="s/GB",
            p2pimg=cpu[0],
            baseline=cpu[1],
            baseline_name=BASELINE,
            details={**details, "target_ratio": "<= 0.35"},
        ),
        throughput(
            "blob GET throughput against this machine's ceiling, blob in p2pimg's cache",
            2,
            "the blob sent from memory by a bare server (tools/ceiling_server.py)",
            baseline_seconds=seconds[2],
            baseline_cpu_seconds=cpu_raw[2],
            note="what loopback TCP gives one curl connection here, with nothing read from disk "
            "nor checked; 2x docker-registry is only reachable if docker-registry is below half of it",
        ),
    ]


def ctr_fetch(ctd: Containerd, ref: str) -> float:
    """Seconds `ctr content fetch` takes to download `ref` into a namespace of its own."""
    namespace = f"bench-{uuid.uuid4().hex[:12]}"
    started = time.perf_counter()
    ctd.ctr("content", "fetch", "--plain-http", ref, namespace=namespace)
    elapsed = time.perf_counter() - started
    ctd.drop_namespace(namespace)  # outside the timing: keeps the disk from filling up
    return elapsed


def check_cached(home: Path, digests: list[str]) -> None:
    """Fail loudly if the warm-up left a layer out of p2pimg's cache: the figures would then
    measure a cold pull under the warm pull's name."""
    blobs = home / "cache" / "blobs" / "sha256"
    if absent := [d for d in digests if not (blobs / d.removeprefix("sha256:")).is_file()]:
        raise RuntimeError(f"after a full pull, p2pimg's cache still lacks {', '.join(absent)}")
