"""LAN swarm of pull-through mirrors: N nodes, each `p2pimg serve --upstream` of one registry behind
a narrow uplink, pull the same image at once; against the same N clients pulling it at once
straight from that registry through the same uplink.

Built like `lan-swarm` (bench/scenarios/swarm.py): N node hosts in network namespaces, each link
shaped with tbf to `node_link_mbit`, and an origin host whose link is shaped to `uplink_mbit`.
On the origin host the Debian `docker-registry` holds a generated image (pushed over the origin
host's loopback, so the push never crosses the link); it is the upstream, and nothing else runs
there. On every node host, for each p2pimg run: `p2pimg serve` with a fresh cache, its own empty
file origin, `--upstream http://<origin host>:5000`, a peer listener on the node's address and
`--peer` for every other node (static peers, mDNS off). Then skopeo pulls the image on every
node at the same moment, through the node's own p2pimg in one round and from docker-registry in
the other.

Figures (p2pimg against docker-registry): time until the first node is done and until all are,
per-node pull times, and the upstream's egress divided by the image size: the registry's access
log (body bytes of its 2xx GET answers under /v2/, ranged ones included), the same counter for
both rounds; the bytes the origin host sent on its link (headers included) are in the details.
Each node's `p2pimg_source_bytes_total` by source (peer, upstream, origin) is read from its
/metrics after the round and kept in the details too, with where the upstream's bytes beyond one
copy went: every node's timeline (`GET /p2pimg/v1/timeline`) lists the spans it fetched from the
upstream, so chunks that more than one node kept from the upstream, and spans cut short, are
counted (`upstream_spans`).

Targets (the mirror-swarm issue; reported in the details, not asserted): upstream egress at most
1.1x the image at 4 and 8 nodes, and with 4 nodes everyone done in at most half the time of the
direct pulls. Before mirror mode went through the fetch engine, each mirror node fetched the
whole image from the upstream itself (about N x the image).

    python -m bench --quick --only lan-swarm-mirror                               # 4 nodes
    P2PIMG_BENCH_MIRROR_NODES=8 python -m bench --quick --only lan-swarm-mirror   # 8, same image
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.scenario import Context, Measure, Skipped
from bench.scenarios import ImageSpec, build_image, image_matrix
from bench.scenarios.swarm import Round, pick_times, pull_at_once, start_nodes
from bench.shaped import (
    IMAGE_NAME,
    P2PIMG_PORT,
    REGISTRY_PORT,
    bytes_per_s,
    curl,
    link_tx_bytes,
    per_image,
    percentile,
    start_registry,
    stop_daemon,
    transfer_timeout,
    unavailable,
)
from tools.netns import Host, lans

SCENARIO = "lan-swarm-mirror"
CLIENT = "skopeo on every node"
BASELINE = "docker-registry behind the same uplink, pulled directly"
SOURCES = ("peer", "upstream", "origin")
TARGET_EGRESS_X = 1.1  # upstream egress / image, at 4 and 8 nodes
TARGET_ALL_DONE_RATIO = 0.5  # time to all done / the direct pulls', at 4 nodes
NODES_ENV = "P2PIMG_BENCH_MIRROR_NODES"  # nodes instead of 4 (--quick) or 8 (--full)
TIMELINES_ENV = "P2PIMG_BENCH_MIRROR_TIMELINES"  # a directory to keep every node's raw timeline in

# One sample of a counter with a `source` label in Prometheus' text format, e.g.
#   p2pimg_source_bytes_total{source="upstream"} 1.048576e+08
_SAMPLE = re.compile(r'^(p2pimg_[a-z_]+_total)\{source="([a-z]+)"\} ([0-9.eE+-]+)$', re.MULTILINE)


@dataclass(frozen=True)
class MirrorPlan:
    images: tuple[ImageSpec, ...]
    runs: int
    nodes: int
    node_link_mbit: float  # every node's link, both directions (tbf)
    uplink_mbit: float  # the upstream host's link, both directions (tbf)
    client: str = CLIENT


def mirror_plan(ctx: Context) -> MirrorPlan:
    """What `lan_swarm_mirror` runs; cheap, needs no namespaces. The links are lan-swarm's:
    nodes on 1 Gbit/s, the upstream behind 200 Mbit/s. NODES_ENV sets the number of nodes (e.g.
    8 on the --quick image, without the --full matrix)."""
    nodes = os.environ.get(NODES_ENV, "").strip()
    return MirrorPlan(
        images=tuple(image_matrix(ctx)),
        runs=ctx.runs,
        nodes=int(nodes) if nodes else 4 if ctx.quick else 8,
        node_link_mbit=1000.0,
        uplink_mbit=200.0,
    )


def lan_swarm_mirror(ctx: Context) -> list[Measure | Skipped]:
    plan = mirror_plan(ctx)
    reason = unavailable("skopeo", "docker-registry", "curl")
    if reason:
        return [Skipped(SCENARIO, reason)]
    return per_image(ctx.workdir / "mirror", plan.images, lambda spec, work: _image(ctx, plan, spec, work))


def parse_sources(text: str) -> dict[str, dict[str, float]]:
    """{metric: {source: value}} of the per-source counters in a /metrics page."""
    found: dict[str, dict[str, float]] = {}
    for match in _SAMPLE.finditer(text):
        found.setdefault(match[1], {})[match[2]] = float(match[3])
    return found


def node_metrics(host: Host) -> dict[str, dict[str, float]]:
    """The node's per-source counters, read from inside its namespace."""
    out = curl(host, f"http://127.0.0.1:{P2PIMG_PORT}/metrics")
    if out.returncode != 0:
        raise RuntimeError(f"/metrics on {host.name}: curl exit {out.returncode}")
    return parse_sources(out.stdout)


def _image(ctx: Context, plan: MirrorPlan, spec: ImageSpec, work: Path) -> list[Measure | Skipped]:
    label = spec.label
    ctx.progress(f"mirror swarm {label}: writing the image")
    image = build_image(spec, work / "image")
    size = image.total_bytes
    logs = work / "logs"
    one_copy = size / bytes_per_s(plan.uplink_mbit)
    ours: list[Round] = []
    theirs: list[Round] = []
    per_node: list[list[dict[str, Any]]] = []  # per run, per node: its counters by source
    spans: list[dict[str, Any]] = []  # per run: the upstream's spans over all nodes
    with lans() as make:
        ctx.progress(f"mirror swarm {label}: building {plan.nodes} namespaces and the upstream's")
        lan = make(plan.nodes, rate_mbit=plan.node_link_mbit)
        upstream_host = lan.add_origin_host(rate_mbit=plan.uplink_mbit)
        ctx.progress(f"mirror swarm {label}: starting docker-registry and pushing the image")
        setup_timeout = transfer_timeout(size, plan.uplink_mbit)
        registry = start_registry(upstream_host, work / "registry", logs, image, timeout=setup_timeout)
        upstream = f"http://{upstream_host.addr}:{REGISTRY_PORT}"
        # Both rounds are given the time N copies would take: today's mirror takes N copies too.
        timeout = transfer_timeout(size, plan.uplink_mbit, copies=plan.nodes)

        for run in range(plan.runs):
            step = f"mirror swarm {label}, run {run + 1}/{plan.runs}"
            ctx.progress(f"{step}: starting {plan.nodes} p2pimg mirrors")
            nodes = start_nodes(
                lan.hosts, None, work / f"run{run}", logs, f"mirror-run{run}", upstream=upstream
            )
            try:
                ctx.progress(f"{step}: {plan.nodes} nodes pulling through their mirrors at once")
                before, wire = registry.egress(), link_tx_bytes(upstream_host)
                times = pull_at_once(
                    lan.hosts,
                    f"127.0.0.1:{P2PIMG_PORT}/{IMAGE_NAME}",
                    work / f"run{run}" / "out",
                    image,
                    timeout,
                )
                ours.append(Round(times, registry.egress() - before, link_tx_bytes(upstream_host) - wire))
                per_node.append([_counters(host, t) for host, t in zip(lan.hosts, times, strict=True)])
                timelines = {h.name: node_timeline(h) for h in lan.hosts}
                spans.append(upstream_spans(timelines))
                if keep := os.environ.get(TIMELINES_ENV):
                    Path(keep).mkdir(parents=True, exist_ok=True)
                    (Path(keep) / re.sub(r"[^\w.-]+", "_", f"timelines-{label}-run{run}.json")).write_text(
                        json.dumps(timelines)
                    )
            finally:
                for node in nodes:
                    stop_daemon(node)
                shutil.rmtree(work / f"run{run}", ignore_errors=True)

            ctx.progress(f"{step}: {plan.nodes} nodes pulling from docker-registry at once")
            before, wire = registry.egress(), link_tx_bytes(upstream_host)
            times = pull_at_once(lan.hosts, registry.ref, work / f"run{run}" / "out", image, timeout)
            theirs.append(Round(times, registry.egress() - before, link_tx_bytes(upstream_host) - wire))
            shutil.rmtree(work / f"run{run}", ignore_errors=True)

    totals = [
        {source: round(sum(n[source] for n in nodes) / size, 3) for source in SOURCES} for nodes in per_node
    ]
    common: dict[str, object] = {
        "image": label,
        "image_bytes": size,
        "nodes": plan.nodes,
        "node_link_mbit": plan.node_link_mbit,
        "upstream_uplink_mbit": plan.uplink_mbit,
        "upstream": "docker-registry (Debian), reached by p2pimg as --upstream http://HOST:5000",
        "discovery": "static --peer lists, mDNS off",
        "bound_one_copy_s": round(one_copy, 3),
        "bound_n_copies_s": round(plan.nodes * one_copy, 3),
    }

    def pct(rounds: list[Round], pick: str) -> dict[str, float]:
        values = pick_times(rounds, pick)
        return {"p50": round(percentile(values, 50), 3), "p99": round(percentile(values, 99), 3)}

    def row(metric: str, pick: str, extra: dict[str, object] | None = None) -> Measure:
        return Measure(
            scenario=SCENARIO,
            client=CLIENT,
            metric=f"{metric} ({label}, {plan.nodes} nodes)",
            unit="s",
            p2pimg=pick_times(ours, pick),
            baseline=pick_times(theirs, pick),
            baseline_name=BASELINE,
            bound=one_copy,
            details={**common, "p2pimg_s": pct(ours, pick), "baseline_s": pct(theirs, pick), **(extra or {})},
        )

    ratios = [
        round(max(a.times) / max(b.times), 3) for a, b in zip(ours, theirs, strict=True) if max(b.times) > 0
    ]
    egress = Measure(
        scenario=SCENARIO,
        client=CLIENT,
        metric=f"upstream egress / image size ({label}, {plan.nodes} nodes)",
        unit="x",
        p2pimg=[r.egress_bytes / size for r in ours],
        baseline=[r.egress_bytes / size for r in theirs],
        baseline_name=BASELINE,
        bound=1.0,
        details={
            **common,
            "source": "docker-registry access log, body bytes of 2xx GET /v2/ answers (ranged ones "
            "included), the same counter for both rounds",
            "target_x": TARGET_EGRESS_X,
            "bound_baseline_x": plan.nodes,
            "p2pimg_wire_x": [round(r.wire_bytes / size, 3) for r in ours],
            "baseline_wire_x": [round(r.wire_bytes / size, 3) for r in theirs],
            "wire_note": "bytes the upstream host sent on its link (TCP/IP and Ethernet headers included)",
            "source_bytes_note": "p2pimg_source_bytes_total of every node after its pull, by "
            "source; totals are summed over the nodes and divided by the image size",
            "source_bytes_x": totals,
            "source_bytes": per_node,
            "upstream_spans_note": "from every node's timeline: spans by kind of source and "
            "outcome, hedges to the upstream, and chunks kept from the upstream by more than one "
            "node: each later fetch (1 chunk each) started while the earliest was running or after "
            "it had ended; extra_fetches lists them as [its start, the earliest fetch's end, hedge, "
            "node], seconds after the round's first upstream span; extra_by_why counts them by why "
            "each node asked (the span's `why` in its timeline: own block, stolen block, hedge)",
            "upstream_spans": spans,
        },
    )
    return [
        row("time to first done", "first"),
        row(
            "time to all done",
            "all",
            {"target_ratio": TARGET_ALL_DONE_RATIO if plan.nodes == 4 else None, "ratio_per_run": ratios},
        ),
        row("per-node pull time", "each"),
        egress,
    ]


def node_timeline(host: Host) -> list[dict[str, Any]]:
    """The events of the node's timeline, read from inside its namespace."""
    out = curl(host, f"http://127.0.0.1:{P2PIMG_PORT}/p2pimg/v1/timeline")
    if out.returncode != 0:
        raise RuntimeError(f"timeline on {host.name}: curl exit {out.returncode}")
    events: list[dict[str, Any]] = json.loads(out.stdout)["events"]
    return events


def upstream_spans(timelines: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """What the nodes asked of the upstream in one round, from their timelines: spans by kind of
    source (a span's source reads "upstream URL", "peer URL" or "origin URL") and outcome, hedges,
    and the chunks more than one node kept from the upstream. A span's `bytes` are the chunks it
    delivered, from its first on (a span cut short kept its head)."""
    every = [(node, e) for node, events in timelines.items() for e in events if e.get("what") == "span"]
    kinds: dict[str, dict[str, int]] = {}
    for _, e in every:
        outcome = kinds.setdefault(str(e.get("source")).split(" ")[0], {})
        outcome[str(e.get("outcome"))] = outcome.get(str(e.get("outcome")), 0) + 1
    ups = [(node, e) for node, e in every if str(e.get("source")).startswith("upstream")]
    if not ups:
        return {"spans_by_kind": kinds}
    t0 = min(float(e["start"]) for _, e in ups)
    # (blob, chunk) -> every span that kept it: (start, end, hedge, node, why), seconds after t0
    kept: dict[tuple[str, int], list[tuple[float, float, bool, str, str]]] = {}
    chunk = _chunk_bytes(ups)
    for node, e in ups:
        first, end = (int(x) for x in e["chunks"])
        got = -(-int(e.get("bytes") or 0) // chunk) if chunk else end - first
        why = str(e.get("why") or "")  # why the node asked: "own", "steal", "hedge of peer"...
        fetch = (float(e["start"]) - t0, float(e["end"]) - t0, bool(e.get("hedge")), node, why)
        for i in range(first, min(end, first + got)):
            kept.setdefault((str(e["blob"]), i), []).append(fetch)
    # Each later fetch of a chunk, with the earliest one: started while that one was still
    # running, or after it had ended (the chunk then held first-hand by another node).
    again = [(sorted(f)[0], later) for f in kept.values() if len(f) > 1 for later in sorted(f)[1:]]
    return {
        "spans_by_kind": kinds,
        "upstream_hedges": sum(1 for _, e in ups if e.get("hedge")),
        "chunk_bytes": chunk,
        "chunks_kept_more_than_once": sum(1 for f in kept.values() if len(f) > 1),
        "extra_chunk_fetches": len(again),
        "extra_while_fetched_elsewhere": sum(1 for first, later in again if later[0] < first[1]),
        "extra_after_held_elsewhere": sum(1 for first, later in again if later[0] >= first[1]),
        "extra_by_hedges": sum(1 for _, later in again if later[2]),
        # "while|after: why the later fetch was asked / why the earliest was" -> extra fetches
        "extra_by_why": dict(
            Counter(
                f"{'while' if later[0] < first[1] else 'after'}: {later[4]} / {first[4]}"
                for first, later in again
            ).most_common()
        ),
        # [the later fetch's start, the earliest fetch's end, hedge, node]
        "extra_fetches": [
            [round(later[0], 3), round(first[1], 3), later[2], later[3]] for first, later in again
        ],
    }


def _chunk_bytes(ups: list[tuple[str, dict[str, Any]]]) -> int:
    """The chunk size, from a span that delivered all of several chunks (0: cannot tell)."""
    sizes = [
        int(e["bytes"]) // (int(e["chunks"][1]) - int(e["chunks"][0]))
        for _, e in ups
        if e.get("outcome") == "ok" and int(e["chunks"][1]) - int(e["chunks"][0]) > 1
    ]
    return max(sizes, default=0)


def _counters(host: Host, seconds: float) -> dict[str, Any]:
    found = node_metrics(host)
    received = found.get("p2pimg_source_bytes_total", {})
    failures = found.get("p2pimg_verify_failures_total", {})
    record: dict[str, Any] = {"node": host.name, "pull_s": round(seconds, 3)}
    record.update({source: int(received.get(source, 0)) for source in SOURCES})
    record["verify_failures"] = {k: int(v) for k, v in failures.items() if v}
    return record
