"""LAN swarm: N nodes pull the same image at once from an origin behind a narrow uplink, against
the same N clients pulling it at once straight from docker-registry behind the same uplink.

The LAN is made of network namespaces (`tools.netns`): N node hosts, each link shaped with tbf to
`node_link_mbit`, and an origin host whose link is shaped to `uplink_mbit`. On the origin host:
moto_server (S3) on its loopback behind `tools/faultproxy.py` (`latency_s` before every
response; its stats count the origin's egress), and the Debian `docker-registry` serving the
same image from its own storage (reached directly: no added latency). On every node host, for
each p2pimg run: `p2pimg serve` with a fresh cache, a peer listener on the node's address and
`--peer` for every other node (static peers, mDNS off: deterministic, and no multicast timing
in the figures). Then skopeo pulls the image on every node at the same moment, through the
node's own p2pimg in one round and from docker-registry in the other.

Figures (p2pimg against docker-registry): time until the first node is done and until all are,
per-node pull times (p50 and p99 over nodes and runs in the details), and the origin's egress
divided by the image size (faultproxy's body bytes; the registry's from its access log). The
bound of the time rows is one copy of the image through the uplink, p2pimg's ideal; the
registry's own ideal, N copies, is in the details.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.scenario import Context, Measure, Skipped
from bench.scenarios import ImageSpec, build_image, file_origin, image_matrix
from bench.shaped import (
    IMAGE_NAME,
    P2PIMG_PORT,
    Daemon,
    bytes_per_s,
    check_pulled,
    child_env,
    link_tx_bytes,
    p2pimg_ready,
    peer_url,
    per_image,
    percentile,
    publish,
    skopeo_copy_argv,
    start_origin,
    start_p2pimg,
    start_registry,
    stop_daemon,
    transfer_timeout,
    unavailable,
)
from p2pimg.ops.sample import SampleImage
from tools.netns import Host, lans

SCENARIO = "lan-swarm"
CLIENT = "skopeo on every node"


@dataclass(frozen=True)
class SwarmPlan:
    images: tuple[ImageSpec, ...]
    runs: int
    nodes: int
    node_link_mbit: float  # every node's link, both directions (tbf)
    uplink_mbit: float  # the origin host's link, both directions (tbf)
    latency_s: float  # added by faultproxy before every S3 response
    client: str = CLIENT


def swarm_plan(ctx: Context) -> SwarmPlan:
    """What `lan_swarm` runs; cheap, needs no namespaces.

    Nodes on 1 Gbit/s, the origin behind 200 Mbit/s: the office LAN is five times the uplink,
    so one copy from the origin and the rest from peers is what a swarm can win. The origin
    is the cold-pull one (50 ms before every S3 response).
    """
    return SwarmPlan(
        images=tuple(image_matrix(ctx)),
        runs=ctx.runs,
        nodes=4 if ctx.quick else 8,
        node_link_mbit=1000.0,
        uplink_mbit=200.0,
        latency_s=0.05,
    )


def lan_swarm(ctx: Context) -> list[Measure | Skipped]:
    plan = swarm_plan(ctx)
    reason = unavailable("skopeo", "docker-registry", "curl")
    if reason:
        return [Skipped(SCENARIO, reason)]
    return per_image(ctx.workdir / "swarm", plan.images, lambda spec, work: _image(ctx, plan, spec, work))


@dataclass
class Round:
    """One simultaneous pull on every node: each node's seconds from the common start."""

    times: list[float]
    egress_bytes: int  # payload: faultproxy's body bytes, or the registry's access log
    wire_bytes: int  # frames the origin host sent on its link (headers included), both rounds alike


def _image(ctx: Context, plan: SwarmPlan, spec: ImageSpec, work: Path) -> list[Measure | Skipped]:
    label = spec.label
    ctx.progress(f"lan swarm {label}: writing the image")
    image = build_image(spec, work / "image")
    logs = work / "logs"
    one_copy = image.total_bytes / bytes_per_s(plan.uplink_mbit)
    ours: list[Round] = []
    theirs: list[Round] = []
    with lans() as make:
        ctx.progress(f"lan swarm {label}: building {plan.nodes} namespaces and the origin's")
        lan = make(plan.nodes, rate_mbit=plan.node_link_mbit)
        origin_host = lan.add_origin_host(rate_mbit=plan.uplink_mbit)
        ctx.progress(f"lan swarm {label}: starting moto, faultproxy and docker-registry")
        origin = start_origin(origin_host, logs, latency_s=plan.latency_s)
        setup_timeout = transfer_timeout(image.total_bytes, plan.uplink_mbit)
        publish(origin, image, work / "publisher", timeout=setup_timeout)
        registry = start_registry(origin_host, work / "registry", logs, image, timeout=setup_timeout)
        # Both rounds are given the time N copies would take: p2pimg's worst case is the registry's.
        timeout = transfer_timeout(image.total_bytes, plan.uplink_mbit, copies=plan.nodes)

        for run in range(plan.runs):
            step = f"lan swarm {label}, run {run + 1}/{plan.runs}"
            ctx.progress(f"{step}: starting {plan.nodes} p2pimg nodes")
            nodes = start_nodes(lan.hosts, origin.url, work / f"run{run}", logs, f"p2pimg-run{run}")
            try:
                ctx.progress(f"{step}: {plan.nodes} nodes pulling through p2pimg at once")
                before, wire = origin.stats(lan.hosts[0])["body_bytes"], link_tx_bytes(origin_host)
                times = pull_at_once(
                    lan.hosts,
                    f"127.0.0.1:{P2PIMG_PORT}/{IMAGE_NAME}",
                    work / f"run{run}" / "out",
                    image,
                    timeout,
                )
                ours.append(
                    Round(
                        times,
                        origin.stats(lan.hosts[0])["body_bytes"] - before,
                        link_tx_bytes(origin_host) - wire,
                    )
                )
            finally:
                for node in nodes:
                    stop_daemon(node)
                shutil.rmtree(work / f"run{run}", ignore_errors=True)

            ctx.progress(f"{step}: {plan.nodes} nodes pulling from docker-registry at once")
            before, wire = registry.egress(), link_tx_bytes(origin_host)
            times = pull_at_once(lan.hosts, registry.ref, work / f"run{run}" / "out", image, timeout)
            theirs.append(Round(times, registry.egress() - before, link_tx_bytes(origin_host) - wire))
            shutil.rmtree(work / f"run{run}", ignore_errors=True)

    common: dict[str, object] = {
        "image": label,
        "image_bytes": image.total_bytes,
        "nodes": plan.nodes,
        "node_link_mbit": plan.node_link_mbit,
        "origin_uplink_mbit": plan.uplink_mbit,
        "latency_s": plan.latency_s,
        "latency_note": "faultproxy adds it before every S3 response; docker-registry is reached "
        "directly, so its requests see no added latency",
        "discovery": "static --peer lists, mDNS off",
        "bound_one_copy_s": round(one_copy, 3),
        "bound_n_copies_s": round(plan.nodes * one_copy, 3),
    }

    def pct(rounds: list[Round], pick: str) -> dict[str, float]:
        values = pick_times(rounds, pick)
        return {"p50": round(percentile(values, 50), 3), "p99": round(percentile(values, 99), 3)}

    def row(metric: str, pick: str) -> Measure:
        return Measure(
            scenario=SCENARIO,
            client=CLIENT,
            metric=f"{metric} ({label}, {plan.nodes} nodes)",
            unit="s",
            p2pimg=pick_times(ours, pick),
            baseline=pick_times(theirs, pick),
            baseline_name="docker-registry behind the same uplink",
            bound=one_copy,
            details={**common, "p2pimg_s": pct(ours, pick), "baseline_s": pct(theirs, pick)},
        )

    size = image.total_bytes
    egress = Measure(
        scenario=SCENARIO,
        client=CLIENT,
        metric=f"origin egress / image size ({label}, {plan.nodes} nodes)",
        unit="x",
        p2pimg=[r.egress_bytes / size for r in ours],
        baseline=[r.egress_bytes / size for r in theirs],
        baseline_name="docker-registry behind the same uplink",
        bound=1.0,
        details={
            **common,
            "p2pimg_source": "faultproxy body bytes (S3 responses through the uplink)",
            "baseline_source": "docker-registry access log, body bytes of GET /v2/ responses",
            "bound_baseline_x": plan.nodes,
            "p2pimg_wire_x": [round(r.wire_bytes / size, 3) for r in ours],
            "baseline_wire_x": [round(r.wire_bytes / size, 3) for r in theirs],
            "wire_note": "bytes the origin host sent on its link (TCP/IP and Ethernet headers "
            "included), the same counter for both rounds",
        },
    )
    return [
        row("time to first done", "first"),
        row("time to all done", "all"),
        row("per-node pull time", "each"),
        egress,
    ]


def pick_times(rounds: list[Round], pick: str) -> list[float]:
    if pick == "first":
        return [min(r.times) for r in rounds]
    if pick == "all":
        return [max(r.times) for r in rounds]
    return [t for r in rounds for t in r.times]


def start_nodes(
    hosts: list[Host],
    origin_url: str | None,
    work: Path,
    logs: Path,
    name: str,
    *,
    upstream: str | None = None,
) -> list[Daemon]:
    """`p2pimg serve` on every host with a fresh home, each knowing every other by --peer (with
    `upstream`, a pull-through mirror of it; `origin_url` None: each home's own file origin)."""
    urls = [peer_url(h) for h in hosts]
    nodes: list[Daemon] = []
    try:
        # All start at once and load in parallel; then each must answer.
        for i, host in enumerate(hosts):
            home = work / f"home-{host.name}"
            nodes.append(
                start_p2pimg(
                    host,
                    f"{name}-{host.name}",
                    home,
                    logs,
                    origin_url if origin_url is not None else file_origin(home),
                    upstream=upstream,
                    peer_listen=True,
                    peers=[u for j, u in enumerate(urls) if j != i],
                    wait=False,
                )
            )
        for host, node in zip(hosts, nodes, strict=True):
            p2pimg_ready(host, node)
    except BaseException:
        for node in nodes:
            stop_daemon(node)
        raise
    return nodes


def pull_at_once(hosts: list[Host], ref: str, out: Path, image: SampleImage, timeout: float) -> list[float]:
    """Start skopeo on every host at once; each host's seconds until its copy is complete."""
    out.mkdir(parents=True, exist_ok=True)
    dests = [out / host.name for host in hosts]
    logs = [out / f"{host.name}.skopeo.log" for host in hosts]
    procs: list[subprocess.Popen[bytes]] = []
    started = time.perf_counter()
    for host, dest, log in zip(hosts, dests, logs, strict=True):
        with log.open("wb") as sink:
            procs.append(
                host.popen(
                    skopeo_copy_argv(ref, dest),
                    env=child_env(),
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            )
    done: list[float | None] = [None] * len(procs)
    deadline = started + timeout
    try:
        while any(d is None for d in done):
            now = time.perf_counter()
            for i, proc in enumerate(procs):
                if done[i] is None and proc.poll() is not None:
                    done[i] = now - started
                    if proc.returncode != 0:
                        raise RuntimeError(
                            f"skopeo on {hosts[i].name} exited {proc.returncode}: "
                            f"{logs[i].read_text(errors='replace')[-2000:]}"
                        )
            if now > deadline:
                raise RuntimeError(f"pulls of {ref} not done within {timeout:.0f} s")
            time.sleep(0.01)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    for dest in dests:
        check_pulled(dest, image)
    return [d for d in done if d is not None]
