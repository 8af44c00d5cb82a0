"""Warm pull: the image is in p2pimg's cache; the same client pulls it through p2pimg and from the
Debian `docker-registry` serving the same image from local disk, alternately, in the same run.

    python -m bench.warm_pull [--size-mib 100] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from p2pimg.sample import LayerSpec, write_oci_layout

from .procs import docker_registry, p2pimg_serve, require


def skopeo_pull(ref: str, dest: Path) -> float:
    shutil.rmtree(dest, ignore_errors=True)
    started = time.perf_counter()
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--insecure-policy",
            "--preserve-digests",
            "--src-tls-verify=false",
            f"docker://{ref}",
            f"oci:{dest}:x",
        ],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write results JSON here")
    args = parser.parse_args()
    if missing := require("skopeo", "docker-registry"):
        print(f"missing tools: {', '.join(missing)}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="p2pimg-bench-"))
    try:
        per_layer = (args.size_mib << 20) // 4
        image = write_oci_layout(work / "image", [LayerSpec(per_layer, files=2)] * 4, tag="1")
        home = work / "home"
        subprocess.run(
            [sys.executable, "-m", "p2pimg", "publish", f"oci:{image.path}:1", "bench/app:1"],
            env=dict(os.environ, P2PIMG_HOME=str(home)),
            check=True,
            capture_output=True,
        )
        with docker_registry(work) as registry, p2pimg_serve(home) as (proxy, _proc):
            subprocess.run(
                [
                    "skopeo",
                    "copy",
                    "--insecure-policy",
                    "--preserve-digests",
                    "--dest-tls-verify=false",
                    f"oci:{image.path}:1",
                    f"docker://{registry}/bench/app:1",
                ],
                check=True,
                capture_output=True,
            )
            skopeo_pull(f"{proxy}/bench/app:1", work / "warmup")  # fills p2pimg's cache
            skopeo_pull(f"{registry}/bench/app:1", work / "warmup")
            ours, theirs = [], []
            for _ in range(args.runs):
                ours.append(skopeo_pull(f"{proxy}/bench/app:1", work / "pull"))
                theirs.append(skopeo_pull(f"{registry}/bench/app:1", work / "pull"))
        med_ours, med_theirs = statistics.median(ours), statistics.median(theirs)
        result = {
            "scenario": "warm-pull",
            "client": "skopeo",
            "image_bytes": image.total_bytes,
            "runs": args.runs,
            "p2pimg_s": ours,
            "baseline_s": theirs,
            "p2pimg": med_ours,
            "baseline": med_theirs,
            "ratio": med_ours / med_theirs,
        }
        print(
            f"warm pull of {image.total_bytes / 1e6:.0f} MB with skopeo, median of {args.runs}: "
            f"p2pimg {med_ours:.3f} s, docker-registry {med_theirs:.3f} s, "
            f"ratio {result['ratio']:.2f} (p2pimg / registry)"
        )
        if args.out:
            args.out.write_text(json.dumps(result, indent=2))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
