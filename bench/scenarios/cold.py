"""Cold pull from a Storj-like origin over a shaped link, against the same bytes fetched the
plain ways, in the same run.

The LAN is made of network namespaces (`tools.netns`): a client host, and an origin host whose
link is shaped with tbf to `link_mbit` in both directions. On the origin host: moto_server (an
S3 store) on its loopback with `tools/faultproxy.py` in front adding `latency_s` before every
response (netem is not assumed to exist, so per-request latency stands in for distance), and
the Debian `docker-registry` serving the same image from its own storage. On the client host:
`p2pimg serve` with a fresh cache for every figure, and the clients. Every byte a client gets
crosses the shaped link.

Figures per image, each against a baseline from the same origin host and link:

- skopeo pulling the image through p2pimg (parallel segment-aligned spans, each chunk verified)
  against skopeo pulling it straight from docker-registry. The registry answers without the
  added latency: faultproxy sits only in front of the S3 origin.
- one GET of the largest layer through p2pimg against a single sequential ranged stream of the
  same blob from the same S3 origin (`S3Origin.read_range` of the whole object, hashed).

The bound of each is its bytes divided by the link rate.

Two more rows need no namespaces and run on loopback (`bench/cold_pull_s3.py`): one GET of a
single large layer (128 MiB in --quick) through p2pimg against one sequential stream of it from
the same S3 origin (moto), first with faultproxy in front capping every connection (8 MiB/s,
20 ms before each response: a far gateway's per-stream limit), then straight from moto with no
cap and no added latency. Loopback moto rereads the whole object for every ranged GET, so on
the uncapped link many parallel spans cost moto far more than one stream does.
"""

from __future__ import annotations

import importlib.util
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from bench.cold_pull_s3 import Figures, compare, s3_layer
from bench.procs import require
from bench.scenario import Context, Measure, Skipped
from bench.scenarios import ImageSpec, build_image, image_matrix, tiny
from bench.shaped import (
    FAR_REGISTRY_PORT,
    IMAGE_NAME,
    MB,
    P2PIMG_PORT,
    REGISTRY_PORT,
    bytes_per_s,
    check_pulled,
    helper,
    manifest_layers,
    per_image,
    publish,
    run_in,
    skopeo_copy_argv,
    start_faultproxy,
    start_origin,
    start_p2pimg,
    start_registry,
    stop_daemon,
    transfer_timeout,
    unavailable,
)
from p2pimg.ops.sample import SampleImage
from tools.netns import Host, lans

SCENARIO = "cold-pull"


@dataclass(frozen=True)
class ColdPlan:
    images: tuple[ImageSpec, ...]
    runs: int
    link_mbit: float  # the origin host's link, both directions (tbf)
    latency_s: float  # added by faultproxy before every S3 response
    stream_rate_mbit: float | None  # faultproxy's per-connection cap, None = only the link limits
    clients: tuple[str, ...] = ("skopeo", "GET of the largest layer")


def cold_plan(ctx: Context) -> ColdPlan:
    """What `cold_pull` runs; cheap, needs no namespaces.

    200 Mbit/s (25 MB/s) is a common office or cloud-egress link, and slow enough that the
    Python processes on the origin side (moto, faultproxy) are not what limits a pull on two
    cores. 50 ms before every S3 response stands for a far gateway's time to first byte. No
    per-connection cap by default: the link is the limit, as the docker-registry baseline sees it.
    """
    return ColdPlan(
        images=tuple(image_matrix(ctx)),
        runs=ctx.runs,
        link_mbit=200.0,
        latency_s=0.05,
        stream_rate_mbit=None,
    )


def cold_pull(ctx: Context) -> list[Measure | Skipped]:
    plan = cold_plan(ctx)
    rows: list[Measure | Skipped] = []
    reason = unavailable("skopeo", "docker-registry", "curl")
    if reason:
        rows.append(Skipped(SCENARIO, reason))
    else:
        rows += per_image(ctx.workdir / "cold", plan.images, lambda spec, work: _image(ctx, plan, spec, work))
    rows += s3_loopback(ctx)
    return rows


# -- one layer from S3 on loopback, no namespaces ------------------------------------------------


@dataclass(frozen=True)
class S3Plan:
    layer_bytes: int
    rate: float  # faultproxy's cap per connection, bytes/s
    latency_s: float  # faultproxy's wait before every response


def s3_plan(ctx: Context) -> S3Plan:
    """128 MiB at 8 MiB/s per connection in --quick (16 s for the single stream), 256 MiB in
    --full; 20 ms before each response."""
    mib = 1 << 20
    size = 1 * mib if tiny() else 128 * mib if ctx.quick else 256 * mib
    return S3Plan(layer_bytes=size, rate=8 * mib, latency_s=0.02)


def s3_loopback(ctx: Context) -> list[Measure | Skipped]:
    """The two loopback S3 rows; a failure is a skipped row, not a lost scenario."""
    missing = require("curl")
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
        missing.append("moto[server] (python)")
    if missing:
        return [Skipped(SCENARIO, f"one layer from S3 on loopback: missing {', '.join(missing)}")]
    try:
        return _s3_rows(ctx, s3_plan(ctx))
    except Exception as exc:
        return [Skipped(SCENARIO, f"one layer from S3 on loopback: error: {type(exc).__name__}: {exc}")]


def _s3_rows(ctx: Context, plan: S3Plan) -> list[Measure | Skipped]:
    work = ctx.workdir / "s3"
    mib = plan.layer_bytes / (1 << 20)
    label = f"{mib:.0f} MiB layer" if mib >= 1 else f"{plan.layer_bytes / 1000:.0f} kB layer"
    cap = f"{plan.rate / (1 << 20):g} MiB/s per connection, {plan.latency_s * 1000:.0f} ms"
    ctx.progress(f"S3 on loopback: writing and publishing a {label} to moto")
    try:
        with s3_layer(work, plan.layer_bytes) as layer:
            ctx.progress(f"S3 on loopback, {label}, {cap}")
            capped = compare(
                work,
                layer,
                ctx.runs,
                latency=plan.latency_s,
                rate=plan.rate,
                progress=lambda line: ctx.progress(f"S3 on loopback, {label}, {cap}: {line}"),
            )
            ctx.progress(f"S3 on loopback, {label}, no cap")
            uncapped = compare(
                work,
                layer,
                ctx.runs,
                latency=0.0,
                rate=0.0,
                progress=lambda line: ctx.progress(f"S3 on loopback, {label}, no cap: {line}"),
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def mbps(seconds: list[float]) -> list[float]:
        return [layer.size / MB / s for s in seconds]

    def details(figures: Figures, **link: object) -> dict[str, object]:
        return {
            "origin": "moto_server on loopback (S3), no namespaces",
            **link,
            "layer_bytes": layer.size,
            "client": "curl through a fresh p2pimg serve; baseline S3Origin.read_range of the whole blob",
            "p2pimg_seconds": figures.p2pimg_s,
            "baseline_seconds": figures.stream_s,
            "p2pimg_MB_s": [round(x, 1) for x in mbps(figures.p2pimg_s)],
            "baseline_MB_s": [round(x, 1) for x in mbps(figures.stream_s)],
            "p2pimg_peak_rss_mib": [round(k / 1024, 1) for k in figures.peak_rss_kib],
        }

    baseline = "one sequential ranged stream from the same origin (S3Origin.read_range, hashed)"
    return [
        Measure(
            scenario=SCENARIO,
            client=f"GET of one layer, S3 at {plan.rate / (1 << 20):g} MiB/s per connection",
            metric=f"blob fetch throughput ({label}, S3 origin behind a per-connection cap: {cap})",
            unit="MB/s",
            p2pimg=mbps(capped.p2pimg_s),
            baseline=mbps(capped.stream_s),
            baseline_name=baseline,
            lower_is_better=False,
            details={
                **details(
                    capped,
                    per_connection_cap_bytes_s=plan.rate,
                    latency_s=plan.latency_s,
                    proxy="tools/faultproxy.py --rate --latency in front of moto",
                ),
                "target_ratio": ">= 4 (the speed-up)",
                "bound": "none: a per-connection cap, no link limit",
            },
        ),
        Measure(
            scenario=SCENARIO,
            client="GET of one layer on an uncapped link",
            metric=f"blob fetch time ({label}, loopback moto, no cap, no added latency)",
            unit="s",
            p2pimg=uncapped.p2pimg_s,
            baseline=uncapped.stream_s,
            baseline_name=baseline,
            details={
                **details(uncapped, per_connection_cap_bytes_s=None, latency_s=0.0, proxy="none"),
                "target_ratio": "<= 1.0",
                "note": "moto rereads the whole object for every ranged GET: p2pimg's parallel spans "
                "cost the origin far more CPU than one stream does on this loopback",
            },
        ),
    ]


def _image(ctx: Context, plan: ColdPlan, spec: ImageSpec, work: Path) -> list[Measure | Skipped]:
    label = spec.label
    ctx.progress(f"cold pull {label}: writing the image")
    image = build_image(spec, work / "image")
    blob = max(manifest_layers(image), key=lambda layer: int(layer["size"]))
    blob_digest, blob_size = str(blob["digest"]), int(blob["size"])
    blob_label = f"{blob_size / MB:.0f} MB" if blob_size >= MB else f"{blob_size / 1000:.0f} kB"
    rate = bytes_per_s(plan.link_mbit)
    pull_timeout = transfer_timeout(image.total_bytes, plan.link_mbit)
    blob_timeout = transfer_timeout(blob_size, plan.link_mbit)
    logs = work / "logs"
    stream_rate = bytes_per_s(plan.stream_rate_mbit) if plan.stream_rate_mbit else 0.0

    pulls: list[float] = []
    registry_pulls: list[float] = []
    far_pulls: list[float] = []  # the registry behind faultproxy's added latency too
    fetches: list[float] = []
    streams: list[float] = []
    egress: list[float] = []
    timelines: list[dict[str, object]] = []  # where each pull's time went (bench/timeline.py)
    fetch_timelines: list[dict[str, object]] = []  # and each one-layer GET's
    with lans() as make:
        ctx.progress(f"cold pull {label}: building the namespaces")
        lan = make(1)
        client = lan.hosts[0]
        origin_host = lan.add_origin_host(rate_mbit=plan.link_mbit)
        ctx.progress(f"cold pull {label}: starting moto, faultproxy and docker-registry")
        origin = start_origin(origin_host, logs, latency_s=plan.latency_s, stream_rate=stream_rate)
        publish(origin, image, work / "publisher", timeout=pull_timeout)
        registry = start_registry(origin_host, work / "registry", logs, image, timeout=pull_timeout)
        # The same registry with the origin's 50 ms before every response: the two clients then
        # wait alike for each request (a second baseline; the first sees only the link).
        start_faultproxy(
            origin_host,
            "faultproxy-registry",
            f"http://127.0.0.1:{REGISTRY_PORT}",
            FAR_REGISTRY_PORT,
            logs,
            plan.latency_s,
        )

        for run in range(plan.runs):
            step = f"cold pull {label}, run {run + 1}/{plan.runs}"
            ctx.progress(f"{step}: single sequential stream of a {blob_label} layer")
            got = helper(
                client,
                "stream",
                origin.url,
                blob_digest,
                str(blob_size),
                what="single sequential stream",
                timeout=blob_timeout,
            )
            streams.append(float(got["seconds"]))

            ctx.progress(f"{step}: the same layer through p2pimg")
            home = work / f"home-fetch{run}"
            node = start_p2pimg(client, f"p2pimg-fetch{run}", home, logs, origin.url)
            try:
                repo = IMAGE_NAME.split(":")[0]
                url = f"http://127.0.0.1:{P2PIMG_PORT}/v2/{repo}/blobs/{blob_digest}"
                got = helper(
                    client, "fetch", url, blob_digest, what="GET through p2pimg", timeout=blob_timeout
                )
                fetches.append(float(got["seconds"]))
                fetch_timelines.append(
                    helper(
                        client,
                        "timeline",
                        f"http://127.0.0.1:{P2PIMG_PORT}/p2pimg/v1/timeline",
                        what="p2pimg's timeline",
                    )
                )
            finally:
                stop_daemon(node)
                shutil.rmtree(home, ignore_errors=True)

            ctx.progress(f"{step}: skopeo through p2pimg")
            home = work / f"home-pull{run}"
            node = start_p2pimg(client, f"p2pimg-pull{run}", home, logs, origin.url)
            try:
                before = origin.stats(client)["body_bytes"]
                pulls.append(
                    _skopeo(
                        client, f"127.0.0.1:{P2PIMG_PORT}/{IMAGE_NAME}", work / "out", image, pull_timeout
                    )
                )
                egress.append((origin.stats(client)["body_bytes"] - before) / image.total_bytes)
                timelines.append(
                    helper(
                        client,
                        "timeline",
                        f"http://127.0.0.1:{P2PIMG_PORT}/p2pimg/v1/timeline",
                        what="p2pimg's timeline",
                    )
                )
            finally:
                stop_daemon(node)
                shutil.rmtree(home, ignore_errors=True)

            ctx.progress(f"{step}: skopeo from docker-registry")
            registry_pulls.append(_skopeo(client, registry.ref, work / "out", image, pull_timeout))
            ctx.progress(f"{step}: skopeo from docker-registry, {plan.latency_s * 1000:.0f} ms per response")
            far_pulls.append(_skopeo(client, registry.far_ref, work / "out", image, pull_timeout))

    def mbps(nbytes: int, seconds: list[float]) -> float:
        return round(nbytes / MB / statistics.median(seconds), 1)

    link = {
        "origin_link_mbit": plan.link_mbit,
        "shaping": "tbf on the origin host's veth and its bridge port",
        "latency_s": plan.latency_s,
        "latency_note": "faultproxy adds it before every S3 response; docker-registry is reached "
        "directly in the first baseline (its requests see no added latency) and through a second "
        "faultproxy in the other",
        "per_connection_cap_mbit": plan.stream_rate_mbit,
    }
    ms = f"{plan.latency_s * 1000:.0f} ms"

    def skopeo_row(metric: str, baseline: list[float], baseline_name: str, **extra: object) -> Measure:
        """skopeo's pulls through p2pimg against one of the registry baselines."""
        return Measure(
            scenario=SCENARIO,
            client="skopeo",
            metric=metric,
            unit="s",
            p2pimg=pulls,
            baseline=baseline,
            baseline_name=baseline_name,
            bound=image.total_bytes / rate,
            details={
                **link,
                "image": label,
                "image_bytes": image.total_bytes,
                "p2pimg_MB_s": mbps(image.total_bytes, pulls),
                "baseline_MB_s": mbps(image.total_bytes, baseline),
                "bound_MB_s": round(rate / MB, 1),
                **extra,
            },
        )

    pull = skopeo_row(
        f"pull time ({label})",
        registry_pulls,
        "docker-registry behind the same link",
        p2pimg_origin_egress_x_image=[round(e, 3) for e in egress],
        p2pimg_timeline=timelines,
    )
    far_pull = skopeo_row(
        f"pull time ({label}), the registry also {ms} per response",
        far_pulls,
        f"docker-registry behind the same link and faultproxy's {ms} before every response",
    )
    fetch = Measure(
        scenario=SCENARIO,
        client="GET of the largest layer",
        metric=f"blob fetch time ({label}: {blob_label} layer)",
        unit="s",
        p2pimg=fetches,
        baseline=streams,
        baseline_name="single sequential ranged stream (S3Origin.read_range, hashed)",
        bound=blob_size / rate,
        details={
            **link,
            "image": label,
            "blob_bytes": blob_size,
            "p2pimg_MB_s": mbps(blob_size, fetches),
            "baseline_MB_s": mbps(blob_size, streams),
            "bound_MB_s": round(rate / MB, 1),
            "p2pimg_timeline": fetch_timelines,
        },
    )
    return [pull, far_pull, fetch]


def _skopeo(client: Host, ref: str, dest: Path, image: SampleImage, timeout: float) -> float:
    """Seconds for skopeo in `client` to copy `ref` into an OCI layout (then checked, removed)."""
    shutil.rmtree(dest, ignore_errors=True)
    started = time.perf_counter()
    run_in(client, skopeo_copy_argv(ref, dest), f"skopeo copy {ref}", timeout=timeout)
    elapsed = time.perf_counter() - started
    check_pulled(dest, image)
    shutil.rmtree(dest, ignore_errors=True)
    return elapsed
