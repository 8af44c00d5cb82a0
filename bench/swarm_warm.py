"""LAN swarm warm: N nodes warm one image at once from a far origin, against one node alone.

    python -m bench.swarm_warm [--nodes 4] [--size-mib 256] [--uplink-mib 48] [--latency 0.01]

The origin is a real moto_server behind `tools/faultproxy.py`, which plays the origin's uplink
(`--uplink-mib` MiB/s shared by every connection, `--latency` s per response) and counts what the
origin sends. The nodes are `p2pimg serve` processes on loopback that know each other by --peer.
Reported, same run: time until every node has the whole image (`warm --lan`) against one node
warming alone, and the origin's egress divided by the image size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

from p2pimg.ops.sample import LayerSpec, write_oci_layout

from .procs import (
    S3_TEST_CREDENTIALS,
    fault_proxy,
    free_port,
    moto_with_image,
    scratch_dir,
    stopping,
    wait_http,
)
from .report import emit

ROOT = Path(__file__).resolve().parents[1]
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def env(**extra: str) -> dict[str, str]:
    return dict(os.environ, **S3_TEST_CREDENTIALS, PYTHONPATH=str(ROOT), P2PIMG_MDNS="0", **extra)


def start(argv: list[str], ready: str, **extra: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(**extra))
    wait_http(ready, proc, timeout=30)
    return proc


def egress(proxy: str) -> int:
    with OPENER.open(f"{proxy}/__faultproxy/stats", timeout=10) as r:
        return int(json.loads(r.read())["body_bytes"])


def warm(home: Path, *extra: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "p2pimg", "warm", "bench/big:1", *extra],
        check=True,
        capture_output=True,
        env=env(P2PIMG_HOME=str(home)),
    )
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--uplink-mib", type=float, default=48)
    parser.add_argument("--latency", type=float, default=0.01)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with scratch_dir() as work:
        half = (args.size_mib << 20) // 2
        image = write_oci_layout(work / "img", [LayerSpec(half, "none"), LayerSpec(half, "none")], tag="1")
        with ExitStack() as stack:
            moto = stack.enter_context(moto_with_image(work, image.path, "bench/big:1"))
            proxy = stack.enter_context(
                fault_proxy(
                    moto,
                    "--latency",
                    str(args.latency),
                    "--total-rate",
                    str(int(args.uplink_mib * (1 << 20))),
                )
            )
            origin = f"s3://bench?endpoint={proxy}"

            def serve(name: str, peer_port: int, peers: list[str]) -> None:
                port = free_port()
                argv = [
                    sys.executable,
                    "-m",
                    "p2pimg",
                    "serve",
                    "--listen",
                    f"127.0.0.1:{port}",
                    "--peer-listen",
                    f"127.0.0.1:{peer_port}",
                    "--origin",
                    origin,
                    "--no-mdns",
                ]
                argv += [a for u in peers for a in ("--peer", u)]
                stack.enter_context(
                    stopping(start(argv, f"http://127.0.0.1:{port}/v2/", P2PIMG_HOME=str(work / name)))
                )

            serve("alone", free_port(), [])
            before = egress(proxy)
            alone = warm(work / "alone")
            alone_egress = egress(proxy) - before

            ports = [free_port() for _ in range(args.nodes)]
            urls = [f"http://127.0.0.1:{p}" for p in ports]
            for i, port in enumerate(ports):
                serve(f"n{i}", port, [u for u in urls if u != urls[i]])
            before = egress(proxy)
            together = warm(work / "n0", "--lan")
            swarm_egress = egress(proxy) - before
        size = image.total_bytes
        result = {
            "scenario": "swarm-warm",
            "client": "p2pimg warm --lan",
            "nodes": args.nodes,
            "image_bytes": size,
            "link": {"origin_uplink_mib_s": args.uplink_mib, "latency_s": args.latency},
            "p2pimg": together,
            "baseline": alone,
            "ratio": together / alone,
            "unit": "s (all nodes done)",
            "origin_egress_ratio": swarm_egress / size,
            "alone_egress_ratio": alone_egress / size,
            "bound": size / (args.uplink_mib * (1 << 20)),
        }
        r = result
        summary = (
            f"{args.nodes} nodes warming {size / 1e6:.0f} MB at once through a {args.uplink_mib:.0f} MiB/s "
            f"origin uplink: all done in {together:.1f} s, one node alone {alone:.1f} s "
            f"(ratio {r['ratio']:.2f}); origin sent {r['origin_egress_ratio']:.2f}x the image "
            f"(alone: {r['alone_egress_ratio']:.2f}x); uplink bound for one copy {r['bound']:.1f} s"
        )
        return emit(result, summary, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
