"""Cold pull of one large layer from an S3 origin: p2pimg's parallel, verified spans against a
single sequential stream from the same origin, in the same run.

    python -m bench.cold_pull_s3 [--size-mib 256] [--runs 3] [--latency 0.02] [--rate-mib 24]

The origin is a real moto_server. Between it and its readers sits `tools/faultproxy.py` acting as
a far link: `--latency` seconds before each response, at most `--rate-mib` MiB/s per connection
(a remote gateway's per-stream limit); `--rate-mib 0` measures loopback moto as it is. Reported:
throughput of each, their ratio, and the peak RSS of the p2pimg proxy during its pulls.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import trio

from p2pimg.ops.sample import LayerSpec, write_oci_layout
from p2pimg.sources.origins import blob_key
from p2pimg.sources.origins.s3 import S3Origin

from .procs import fault_proxy, moto_with_image, p2pimg_serve, peak_rss_kib, require, scratch_dir
from .report import emit


async def sequential_stream(url: str, digest: str, size: int) -> float:
    """One ranged GET of the whole blob, hashed as it streams: the baseline."""
    origin = S3Origin(url)
    started = time.perf_counter()
    h = hashlib.sha256()
    async for piece in origin.read_range(blob_key(digest), 0, size):
        h.update(piece)
    elapsed = time.perf_counter() - started
    await origin.aclose()
    assert "sha256:" + h.hexdigest() == digest
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--rate-mib", type=float, default=24)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if missing := require("curl"):
        print(f"missing tools: {', '.join(missing)}", file=sys.stderr)
        return 2
    with scratch_dir() as work:
        image = write_oci_layout(work / "img", [LayerSpec(args.size_mib << 20, "none")], tag="1")
        manifest = json.loads((image.path / "blobs" / "sha256" / image.top_digest[7:]).read_bytes())
        layer = manifest["layers"][0]
        proxy_args = ["--latency", str(args.latency), "--rate", str(int(args.rate_mib * (1 << 20)))]
        with (
            moto_with_image(work, image.path, "bench/big:1") as moto,
            fault_proxy(moto, *proxy_args) as proxy,
        ):
            origin_url = f"s3://bench?endpoint={proxy}"
            ours, theirs, rss = [], [], []
            for run in range(args.runs):
                theirs.append(trio.run(sequential_stream, origin_url, layer["digest"], layer["size"]))
                home = work / f"home{run}"
                os.environ["P2PIMG_ORIGIN"] = origin_url
                with p2pimg_serve(home) as (host, proc):
                    started = time.perf_counter()
                    out = subprocess.run(
                        ["curl", "-sf", f"http://{host}/v2/bench/big/blobs/{layer['digest']}"],
                        capture_output=True,
                        check=True,
                    ).stdout
                    ours.append(time.perf_counter() - started)
                    rss.append(peak_rss_kib(proc.pid))
                del os.environ["P2PIMG_ORIGIN"]
                assert hashlib.sha256(out).hexdigest() == layer["digest"][7:]
        size_mb = layer["size"] / 1e6
        med_ours, med_theirs = statistics.median(ours), statistics.median(theirs)
        result = {
            "scenario": "cold-pull-s3",
            "client": "curl",
            "layer_bytes": layer["size"],
            "link": {"latency_s": args.latency, "rate_mib_per_connection": args.rate_mib},
            "p2pimg_s": ours,
            "baseline_s": theirs,
            "p2pimg": size_mb / med_ours,
            "baseline": size_mb / med_theirs,
            "unit": "MB/s",
            "ratio": med_theirs / med_ours,
            "peak_rss_kib": max(rss),
            "bound": None,  # a per-connection cap, no link limit: no physical bound to state
        }
        summary = (
            f"cold pull of a {size_mb:.0f} MB layer from S3 (moto, {args.latency * 1000:.0f} ms, "
            f"{args.rate_mib or 'unlimited'} MiB/s per connection), median of {args.runs}: "
            f"p2pimg {result['p2pimg']:.0f} MB/s, single stream {result['baseline']:.0f} MB/s, "
            f"speed-up {result['ratio']:.2f}x; p2pimg peak RSS {max(rss) / 1024:.0f} MiB"
        )
        return emit(result, summary, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
