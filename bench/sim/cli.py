"""`python -m bench.sim`: N nodes, each with its own instance of the real scheduling core, pull one
image at once over a simulated network; prints a summary, writes the figures (--json) and a plot
of time to done per node (SVG, beside the JSON).

    python -m bench.sim [--nodes 1000] [--image-mb 1024] [--churn F] [--hostile F] [--seed S]
                        [--json FILE] [--peers-per-node 24] [--view-only] [--mirror] ...

The model (details in net.py and world.py): per-node down and up links, one origin uplink shared
by every node, LAN and origin round trips, an optional cap per connection; flows share links by
an approximation of max-min fairness, advanced in steps of --dt. Each node polls a random set of
--peers-per-node neighbours (not the whole swarm: at 1,000 nodes nobody polls 999 peers every
0.3 s) and, unless --view-only, its scheduler is given the swarm's membership (every node that is
up, as discovery would list it). --hostile nodes take turns lying (they claim the whole blob and
cut every request short), forging (they send chunks that fail verification) and stalling (they
accept a request and send nothing); a chunk's content is tracked, so a forged chunk accepted
anywhere shows in wrong_chunks_accepted. --churn nodes leave at a random time within one node's
lone pull time (their uploads break, neighbours forget them after three missed polls) and as many
new ones join within that time, each with fresh neighbours.

--mirror: the origin is an upstream registry (pull-through mirror mode), so no chunk has a CID: a
chunk from a peer is taken unchecked, a node's blob is checked by its digest once whole (hashed
at --digest-mbps), and until then the node shares only the chunks it fetched from the upstream
itself. A blob that fails its digest (a forger's chunk in it) is forgotten and fetched again from
the upstream alone, and the peers whose chunks differ from the upstream's are banned.

Reported (JSON): nodes, image_bytes, chunk_bytes, origin_egress_ratio (origin bytes ÷ image bytes),
single_node_s (one node alone, same model), p50/p99/max_done_ratio (time to done of each honest
node that stayed, from when it started, ÷ single_node_s), upload_max_over_mean (over honest
nodes), unfinished (honest nodes that stayed and never finished), wrong_chunks_accepted,
wrong_blobs_accepted (honest nodes done with a forged chunk in their blob), wall_s, with --mirror
`mirror` (forged chunks taken unchecked, digest failures, bans), and more: per-node done times,
a time series, request outcomes, the parameters, the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

from ..runner import machine_info
from .plot import done_svg
from .world import FORGED, MiB, Params, World

KEYS = (
    "nodes",
    "image_bytes",
    "origin_egress_ratio",
    "single_node_s",
    "p50_done_ratio",
    "p99_done_ratio",
    "max_done_ratio",
    "upload_max_over_mean",
    "unfinished",
    "wrong_chunks_accepted",
    "wrong_blobs_accepted",
    "wall_s",
)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (as bench.runner does)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = q * (len(ordered) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def core_digest() -> str:
    """sha256 over the scheduling core's sources: which core's decisions the figures are."""
    import hashlib

    import p2pimg.fetch

    h = hashlib.sha256()
    for name in ("actions", "hedging", "policy", "schedule", "swarm"):
        h.update((Path(p2pimg.fetch.__path__[0]) / f"{name}.py").read_bytes())
    return h.hexdigest()


def single_node_s(params: Params) -> float:
    """One node alone pulling the image from the origin, same model."""
    alone = replace(params, nodes=1, churn=0.0, hostile=0.0, start_spread=0.0)
    world = World(alone, churn_window=1.0)
    world.run()
    done = world.nodes[0].done_at
    if done is None:
        raise RuntimeError(f"a node alone did not finish within {params.max_sim_s} s")
    return done


def simulate(params: Params, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The swarm run, reduced to the figures of the JSON document."""
    started = time.perf_counter()
    alone = single_node_s(params)
    world = World(params, churn_window=params.churn_window or alone, progress=progress)
    world.run()
    wall = time.perf_counter() - started
    return summarize(world, alone, wall)


def summarize(world: World, alone: float, wall: float) -> dict[str, Any]:
    p = world.params
    honest = [n for n in world.nodes if n.honest]
    stayed = [n for n in honest if n.leave_at is None or (n.done_at is not None and n.done_at <= n.leave_at)]
    times = sorted(
        n.done_at - n.joined_at for n in stayed if n.done_at is not None and n.joined_at is not None
    )
    unfinished = [n for n in stayed if n.done_at is None]
    sent = world.net.sent
    uploads = [float(sent[n.endpoint]) for n in honest if n.joined_at is not None]
    mean_up = sum(uploads) / len(uploads) if uploads else 0.0
    origin_bytes = float(sent[0])
    received: dict[str, float] = {}
    for n in honest:
        for kind, nbytes in n.received_before.items():
            received[kind] = received.get(kind, 0) + nbytes
        if n.blob is not None:
            for kind, nbytes in n.blob.received.items():
                received[kind] = received.get(kind, 0) + nbytes
    done = [n for n in honest if n.done_at is not None]

    def ratio(q: float) -> float | None:
        value = percentile(times, q)
        return None if value is None else value / alone

    c = world.counters
    return {
        "nodes": p.nodes,
        "image_bytes": world.size,
        "chunk_bytes": world.chunk,
        "origin_egress_ratio": origin_bytes / world.size,
        "single_node_s": alone,
        "p50_done_ratio": ratio(0.5),
        "p99_done_ratio": ratio(0.99),
        "max_done_ratio": times[-1] / alone if times else None,
        "upload_max_over_mean": max(uploads) / mean_up if mean_up else None,
        "unfinished": len(unfinished),
        # Mirror mode takes peers' chunks unchecked until the blob is whole: only a done node's
        # chunks count as accepted there.
        "wrong_chunks_accepted": sum(n.store.count(FORGED) for n in (done if p.mirror else honest)),
        "wrong_blobs_accepted": sum(1 for n in done if FORGED in n.store),
        "wall_s": wall,
        "sim_s": world.now,
        "honest_nodes": len(honest),
        "hostile_nodes": p.nodes - len([n for n in honest if not n.late]),
        "left": len([n for n in honest if n.left_at is not None]),
        "joined_late": len([n for n in honest if n.late]),
        "done_s": {
            "p50": percentile(times, 0.5),
            "p99": percentile(times, 0.99),
            "max": times[-1] if times else None,
            "min": times[0] if times else None,
        },
        "origin_bytes": origin_bytes,
        "received_bytes": received,
        "upload_bytes": {"mean": mean_up, "max": max(uploads, default=0.0)},
        "requests": {"started": c.starts, "ended": c.outcomes, "hedges": c.hedges},
        "bad_chunks_rejected": c.bad_chunks,
        "serve_misses": c.serve_misses,
        "mirror": {
            "unchecked_bad_chunks_taken": c.unchecked_bad,
            "digest_failures": c.digest_failures,
            "nodes_fetched_again": sum(1 for n in honest if n.referee is not None),
            "peers_banned": c.bans,
            "discard_misses": c.discard_misses,
        }
        if p.mirror
        else None,
        "gave_up": sum(n.gave_up for n in honest),
        "polls": c.polls,
        "events": c.events,
        "steps": c.steps,
        "params": asdict(p),
        "done_times_s": times,
        "series": world.series,
        "unfinished_nodes": [
            {"node": n.name, "late": n.late, "error": n.last_error, "missing": n.store.count(0)}
            for n in unfinished
        ][:20],
    }


def summary(result: dict[str, Any]) -> str:
    def f(value: Any, digits: int = 2) -> str:
        return "—" if value is None else f"{value:.{digits}f}"

    p = result["params"]
    mirror = result.get("mirror")
    lines = [
        f"{'mirror: ' if mirror else ''}{result['nodes']} nodes ({result['hostile_nodes']} hostile, "
        f"{result['left']} left, "
        f"{result['joined_late']} joined late), {result['image_bytes'] / MiB:.0f} MiB image in "
        f"{result['chunk_bytes'] / MiB:g} MiB chunks, {p['peers_per_node']} peers per node, "
        f"seed {p['seed']}",
        f"  one node alone: {f(result['single_node_s'])} s; swarm done (÷ that): "
        f"p50 {f(result['p50_done_ratio'])}, p99 {f(result['p99_done_ratio'])}, "
        f"max {f(result['max_done_ratio'])}",
        f"  origin egress: {f(result['origin_egress_ratio'], 3)} × the image; "
        f"upload max/mean {f(result['upload_max_over_mean'])}",
        f"  unfinished {result['unfinished']}, wrong chunks accepted {result['wrong_chunks_accepted']}, "
        f"wrong blobs accepted {result['wrong_blobs_accepted']}, "
        f"bad chunks rejected {result['bad_chunks_rejected']}, fetches given up {result['gave_up']}",
    ]
    if mirror:
        lines.append(
            f"  mirror: {mirror['unchecked_bad_chunks_taken']} forged chunks taken unchecked, "
            f"{mirror['digest_failures']} blobs failed their digest and were fetched again from the "
            f"upstream alone, {mirror['peers_banned']} bans"
        )
    lines.append(
        f"  simulated {f(result['sim_s'], 1)} s in {f(result['wall_s'], 1)} s wall "
        f"({result['polls']} polls, {result['events']} events)"
    )
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    d = Params()
    ap = argparse.ArgumentParser(
        prog="python -m bench.sim", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--nodes", type=int, default=d.nodes, help="simulated nodes (default %(default)s)")
    ap.add_argument(
        "--image-mb", type=float, default=d.image_mb, help="image size, MiB (default %(default)s)"
    )
    ap.add_argument(
        "--chunk-mb", type=float, default=d.chunk_mb, help="chunk size, MiB (default %(default)s)"
    )
    ap.add_argument(
        "--churn",
        type=float,
        default=d.churn,
        help="share of nodes that leave mid-pull; as many join late (default %(default)s)",
    )
    ap.add_argument(
        "--hostile",
        type=float,
        default=d.hostile,
        help="share of nodes that lie about inventories, send bad chunks or stall",
    )
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument(
        "--plot", type=Path, help="write the time-to-done plot (SVG) here (default: beside --json, .svg)"
    )
    ap.add_argument(
        "--peers-per-node",
        type=int,
        default=d.peers_per_node,
        help="neighbours each node polls and fetches from (default %(default)s)",
    )
    ap.add_argument(
        "--down-mbit", type=float, default=d.down_mbit, help="node downlink (default %(default)s)"
    )
    ap.add_argument("--up-mbit", type=float, default=d.up_mbit, help="node uplink (default %(default)s)")
    ap.add_argument(
        "--origin-mbit",
        type=float,
        default=d.origin_mbit,
        help="origin uplink, shared by all (default %(default)s)",
    )
    ap.add_argument("--conn-mbit", type=float, default=d.conn_mbit, help="cap per connection; 0: none")
    ap.add_argument("--lan-rtt", type=float, default=d.lan_rtt, help="s (default %(default)s)")
    ap.add_argument("--origin-rtt", type=float, default=d.origin_rtt, help="s (default %(default)s)")
    ap.add_argument("--dt", type=float, default=d.dt, help="network time step, s (default %(default)s)")
    ap.add_argument("--max-sim-s", type=float, default=d.max_sim_s, help="give up after this simulated time")
    ap.add_argument(
        "--origin-fetchers",
        type=int,
        default=d.origin_fetchers,
        help="nodes that fetch from the origin, with the membership list (default %(default)s)",
    )
    ap.add_argument(
        "--view-only",
        action="store_true",
        help="give the schedulers no membership list: each ranks only the peers it polls "
        "(what the engine does today)",
    )
    ap.add_argument(
        "--mirror",
        action="store_true",
        help="the origin is an upstream registry: no chunk CIDs, a blob is checked by its digest "
        "once whole; until then a node shares only chunks it fetched from the upstream itself",
    )
    ap.add_argument(
        "--digest-mbps",
        type=float,
        default=d.digest_mbps,
        help="with --mirror: sha256 of a whole blob, MB/s (default %(default)s; 0: instant)",
    )
    ap.add_argument("--progress", action="store_true", help="a line on stderr every 10 simulated seconds")
    ap.add_argument("--skip-verify", action="store_true", help=argparse.SUPPRESS)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    names = {f.name for f in fields(Params)}
    params = Params(**{k: v for k, v in vars(args).items() if k in names})
    if not (0 <= params.churn < 1 and 0 <= params.hostile < 1 and params.nodes >= 1):
        print("--churn and --hostile are shares in [0, 1); --nodes at least 1", file=sys.stderr)
        return 2
    started = time.perf_counter()

    def say(line: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s wall] {line}", file=sys.stderr, flush=True)

    result = simulate(params, say if args.progress else None)
    result["command"] = "python -m bench.sim " + " ".join(sys.argv[1:] if argv is None else argv)
    result["machine"] = machine_info()
    result["core_sha256"] = core_digest()
    print(summary(result))
    plot = args.plot or (args.json.with_suffix(".svg") if args.json else None)
    if plot:
        plot.parent.mkdir(parents=True, exist_ok=True)
        plot.write_text(done_svg(result))
        result["plot"] = str(plot)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0
