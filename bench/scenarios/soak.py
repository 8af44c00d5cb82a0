"""Soak: a server under a mix of ordinary, slow and vanishing clients for minutes, watched.

The same load (tools/loadclients.py) runs against p2pimg serving an image from its cache and
against the Debian `docker-registry` serving the same image from local disk, one after the other:

- slow readers: connections that each read 1 KiB a second from the largest layer;
- vanishing clients: new connections every second that reset after the request line, after the
  head, or after the first bytes of the body;
- ordinary clients: whole-blob GETs, each checked against the layer's digest.

Every second the server's open descriptors, threads and resident memory are sampled. The rows
say how much each grew from the first fifth of the run to the last (flat is 0), their peaks, and
how the ordinary GETs fared; the report draws the samples over time (`soak-over-time.png`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from statistics import median

from ..procs import client_env, p2pimg_serve, registry_process, require, rss_kib
from ..scenario import Context, Measure, Skipped
from . import MB, REPO, ImageSpec, build_image, file_origin, publish, push, skopeo_pull, tiny

SCENARIO = "soak"
BASELINE = "docker-registry (local disk), same load"
REPO_ROOT = Path(__file__).resolve().parents[2]


def plan(ctx: Context) -> tuple[ImageSpec, float, int, float, float]:
    """(image, seconds, slow readers, vanishing clients per second, ordinary GETs per second)."""
    if tiny():
        return ImageSpec(400 * 1000, 1), 6.0, 20, 10.0, 1.0
    if ctx.quick:
        return ImageSpec(32 * MB, 2), 90.0, 300, 50.0, 2.0
    return ImageSpec(64 * MB, 2), 300.0, 500, 100.0, 4.0


def soak(ctx: Context) -> list[Measure | Skipped]:
    if missing := require("skopeo", "docker-registry"):
        return [Skipped(SCENARIO, f"missing {', '.join(missing)} (apt-get install skopeo docker-registry)")]
    spec, seconds, slow, vanish_rate, normal_rate = plan(ctx)
    home = ctx.workdir / "home"
    image = build_image(spec, ctx.workdir / "layout")
    manifest = json.loads((image.path / "blobs" / "sha256" / image.top_digest[7:]).read_bytes())
    layer = max(manifest["layers"], key=lambda d: d["size"])["digest"]
    ref = f"{REPO}:soak"
    publish(image, ref, home)
    sides: dict[str, dict[str, object]] = {}
    with ExitStack() as stack:
        registry, registry_proc = stack.enter_context(registry_process(ctx.workdir))
        push(image, f"{registry}/{ref}")
        proxy, proxy_proc = stack.enter_context(
            p2pimg_serve(home, origin=file_origin(home), log=ctx.workdir / "p2pimg.log")
        )
        for side, host, pid in (("p2pimg", proxy, proxy_proc.pid), ("baseline", registry, registry_proc.pid)):
            ctx.progress(f"{side}: warming up")
            skopeo_pull(f"{host}/{ref}", ctx.workdir / "pull")  # p2pimg: into its cache
            ctx.progress(
                f"{side}: {slow} slow readers, {vanish_rate:g} vanishing and "
                f"{normal_rate:g} ordinary clients a second for {seconds:.0f} s"
            )
            sides[side] = load(
                host, pid, f"/v2/{REPO}/blobs/{layer}", layer, seconds, slow, vanish_rate, normal_rate
            )
    p2, base = sides["p2pimg"], sides["baseline"]
    details = {
        "image": spec.label,
        "seconds": seconds,
        "slow_readers": slow,
        "vanish_per_s": vanish_rate,
        "normal_per_s": normal_rate,
        "series": {side: s["series"] for side, s in sides.items()},
        "clients": {side: s["clients"] for side, s in sides.items()},
    }

    def row(metric: str, unit: str, key: str, *, lower: bool = True) -> Measure:
        return Measure(
            scenario=SCENARIO,
            client="mixed clients",
            metric=metric,
            unit=unit,
            p2pimg=[float(p2[key])],  # type: ignore[arg-type]
            baseline=[float(base[key])],  # type: ignore[arg-type]
            baseline_name=BASELINE,
            lower_is_better=lower,
            details=details,
        )

    return [
        row("open descriptors, growth from the first fifth to the last", "count", "fds_growth"),
        row("threads, growth from the first fifth to the last", "count", "threads_growth"),
        row("resident memory, growth from the first fifth to the last", "MiB", "rss_growth"),
        row("resident memory, peak while soaking", "MiB", "rss_peak"),
        row("ordinary whole-blob GET under the load, median", "s", "normal_median"),
        row("ordinary GETs that failed", "count", "normal_failed"),
    ]


def load(
    host: str,
    pid: int,
    path: str,
    digest: str,
    seconds: float,
    slow: int,
    vanish_rate: float,
    normal_rate: float,
) -> dict[str, object]:
    """Run tools/loadclients.py against `host` for `seconds`, sampling `pid` every second."""
    argv = [
        sys.executable,
        "-m",
        "tools.loadclients",
        "--host",
        host,
        "--path",
        path,
        "--digest",
        digest,
        "--slow",
        str(slow),
        "--vanish-rate",
        str(vanish_rate),
        "--normal-rate",
        str(normal_rate),
        "--duration",
        str(seconds),
    ]
    clients = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=client_env(PYTHONPATH=str(REPO_ROOT)),
    )
    series: dict[str, list[float]] = {"t": [], "fds": [], "threads": [], "rss_mib": []}
    began = time.monotonic()
    try:
        while clients.poll() is None:
            series["t"].append(round(time.monotonic() - began, 2))
            series["fds"].append(len(os.listdir(f"/proc/{pid}/fd")))
            series["threads"].append(len(os.listdir(f"/proc/{pid}/task")))
            series["rss_mib"].append(rss_kib(pid) / 1024)
            time.sleep(1.0)
        out, err = clients.communicate(timeout=60)
    finally:
        if clients.poll() is None:
            clients.kill()
            clients.wait()
    if clients.returncode != 0:
        raise RuntimeError(f"tools.loadclients exited with {clients.returncode}: {err.strip()[-500:]}")
    summary = json.loads(out.strip().splitlines()[-1])
    normal = summary["normal_median_s"]
    fifth = max(1, len(series["t"]) // 5)

    def growth(key: str) -> float:
        values = series[key]
        return median(values[-fifth:]) - median(values[:fifth])

    return {
        "series": series,
        "clients": summary,
        "fds_growth": growth("fds"),
        "threads_growth": growth("threads"),
        "rss_growth": growth("rss_mib"),
        "rss_peak": max(series["rss_mib"]),
        "normal_median": normal if normal is not None else float("nan"),
        "normal_failed": summary["normal_failed"],
    }
