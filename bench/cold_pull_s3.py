"""Cold pull of one large layer from an S3 origin: p2pimg's parallel, verified spans against a
single sequential stream from the same origin, in the same run.

    python -m bench.cold_pull_s3 [--size-mib 256] [--runs 3] [--latency 0.02] [--rate-mib 24]

The origin is a real moto_server. Between it and its readers sits `tools/faultproxy.py` acting as
a far link: `--latency` seconds before each response, at most `--rate-mib` MiB/s per connection
(a remote gateway's per-stream limit); with `--rate-mib 0 --latency 0` both read loopback moto
as it is, with no proxy between. Reported: throughput of each, their ratio, and the peak RSS of
the p2pimg proxy during its pulls.

`python -m bench` runs the same comparison as rows of its cold-pull scenario
(`bench/scenarios/cold.py`) through `s3_layer` and `compare` below.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from p2pimg.ops.sample import LayerSpec, write_oci_layout
from p2pimg.sources.origins import blob_key
from p2pimg.sources.origins.s3 import S3Origin

from .procs import client_env, fault_proxy, moto_with_image, p2pimg_serve, peak_rss_kib, require, scratch_dir
from .report import emit

REPO = "bench/big"
# A GET is given this long at least, and the time a stream at `rate` would take four times over.
MIN_TIMEOUT = 120.0


async def sequential_stream(url: str, digest: str, size: int) -> float:
    """One ranged GET of the whole blob, hashed as it streams: the baseline."""
    origin = S3Origin(url)
    origin.prepare()  # its HTTP client made before the clock starts, as `serve` makes its own
    started = time.perf_counter()
    h = hashlib.sha256()
    async for piece in origin.read_range(blob_key(digest), 0, size):
        h.update(piece)
    elapsed = time.perf_counter() - started
    await origin.aclose()
    if "sha256:" + h.hexdigest() != digest:
        raise RuntimeError(f"the single stream of {digest} does not match its digest")
    return elapsed


@dataclass(frozen=True)
class Layer:
    """The one layer published to moto, and moto's endpoint."""

    moto: str  # http://127.0.0.1:PORT
    digest: str
    size: int


@contextmanager
def s3_layer(work: Path, size: int) -> Iterator[Layer]:
    """A moto_server on loopback holding a one-layer image of `size` payload bytes (uncompressed
    random tar), published by p2pimg as bench/big:1. The layout is removed once published."""
    image = write_oci_layout(work / "img", [LayerSpec(size, "none")], tag="1")
    manifest = json.loads((image.path / "blobs" / "sha256" / image.top_digest[7:]).read_bytes())
    (layer,) = manifest["layers"]
    with moto_with_image(work, image.path, f"{REPO}:1") as moto:
        shutil.rmtree(image.path)
        yield Layer(moto, str(layer["digest"]), int(layer["size"]))


@dataclass
class Figures:
    """Seconds of each run: p2pimg's GET and the single stream, and p2pimg's peak RSS."""

    p2pimg_s: list[float] = field(default_factory=list)
    stream_s: list[float] = field(default_factory=list)
    peak_rss_kib: list[int] = field(default_factory=list)


def compare(
    work: Path,
    layer: Layer,
    runs: int,
    *,
    latency: float,
    rate: float,
    progress: Callable[[str], None] = lambda _line: None,
) -> Figures:
    """`runs` times, in alternating order: one single sequential stream of the layer from the
    origin, and one curl GET of it through a `p2pimg serve` with a fresh cache.

    With `latency` (seconds before each response) or `rate` (bytes/s per connection) the origin
    is faultproxy in front of moto; with neither, moto itself.
    """
    figures = Figures()
    seconds = layer.size / rate if rate else 0.0
    timeout = max(MIN_TIMEOUT, 4 * seconds)
    with ExitStack() as stack:
        endpoint = layer.moto
        if latency or rate:
            args = ["--latency", str(latency), "--rate", str(int(rate))]
            endpoint = stack.enter_context(fault_proxy(layer.moto, *args))
        origin = f"s3://bench?endpoint={endpoint}"

        def stream() -> None:
            figures.stream_s.append(trio.run(sequential_stream, origin, layer.digest, layer.size))

        def through_p2pimg(run: int) -> None:
            home = work / f"home{run}"  # a fresh cache: the GET is cold
            with p2pimg_serve(home, origin=origin, log=work / "p2pimg.log") as (host, proc):
                url = f"http://{host}/v2/{REPO}/blobs/{layer.digest}"
                started = time.perf_counter()
                got = subprocess.run(
                    ["curl", "-sSf", "--noproxy", "*", url],
                    capture_output=True,
                    env=client_env(),
                    timeout=timeout,
                    check=False,
                )
                elapsed = time.perf_counter() - started
                if got.returncode != 0:
                    err = got.stderr.decode(errors="replace").strip()
                    raise RuntimeError(f"curl {url} exited with {got.returncode}: {err}")
                figures.peak_rss_kib.append(peak_rss_kib(proc.pid))
            if "sha256:" + hashlib.sha256(got.stdout).hexdigest() != layer.digest:
                raise RuntimeError(f"the GET of {layer.digest} through p2pimg does not match its digest")
            figures.p2pimg_s.append(elapsed)
            shutil.rmtree(home, ignore_errors=True)

        for run in range(runs):
            progress(f"run {run + 1}/{runs}")
            if run % 2 == 0:
                stream()
                through_p2pimg(run)
            else:
                through_p2pimg(run)
                stream()
    return figures


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
    with scratch_dir() as work, s3_layer(work, args.size_mib << 20) as layer:
        figures = compare(
            work,
            layer,
            args.runs,
            latency=args.latency,
            rate=args.rate_mib * (1 << 20),
            progress=lambda line: print(line, file=sys.stderr),
        )
    ours, theirs, rss = figures.p2pimg_s, figures.stream_s, figures.peak_rss_kib
    size_mb = layer.size / 1e6
    med_ours, med_theirs = statistics.median(ours), statistics.median(theirs)
    result = {
        "scenario": "cold-pull-s3",
        "client": "curl",
        "layer_bytes": layer.size,
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
