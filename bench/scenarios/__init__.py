"""The benchmark scenarios, and what they share: which images to use and how to place them.

Each scenario module has one function of a `bench.scenario.Context` returning measured rows; the
runner (`bench/runner.py`) imports them by name, so a module missing from a build only skips its
scenario.

Image sizes come from `image_matrix(ctx)`: --quick uses one ~100 MB image in 4 layers, --full
Spegel's matrix (10 MB, 100 MB and 1 GB, each in 1 and 4 layers). With the environment variable
P2PIMG_BENCH_TINY set (not "0" or empty), every image is tiny and request counts small: the smoke
test runs the real scenario code that way in seconds.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from p2pimg.ops.sample import LayerSpec, SampleImage, write_oci_layout

from ..procs import client_env, run
from ..scenario import Context

MB = 1000 * 1000
TINY_ENV = "P2PIMG_BENCH_TINY"
TINY_BYTES = 200 * 1000
# Tag and repository every scenario uses on both registries, so references differ only in host.
REPO = "bench/app"


def tiny() -> bool:
    return os.environ.get(TINY_ENV, "").strip() not in ("", "0")


@dataclass(frozen=True)
class ImageSpec:
    total: int  # payload bytes over all layers (the layers' tar framing adds a little)
    layers: int

    @property
    def label(self) -> str:
        size = f"{self.total // 1000} kB" if self.total < MB else f"{self.total // MB} MB"
        if self.total >= 1000 * MB:
            size = f"{self.total / (1000 * MB):g} GB"
        return f"{size} in {self.layers} layer{'s' if self.layers > 1 else ''}"

    @property
    def key(self) -> str:
        """A name fit for paths and tags."""
        return f"{self.total}x{self.layers}"


def image_matrix(ctx: Context) -> list[ImageSpec]:
    if tiny():
        return [ImageSpec(TINY_BYTES, 2)]
    if ctx.quick:
        return [ImageSpec(100 * MB, 4)]
    return [ImageSpec(size, layers) for size in (10 * MB, 100 * MB, 1000 * MB) for layers in (1, 4)]


def largest(ctx: Context) -> ImageSpec:
    # Of equal totals, the one with fewer layers: one big blob is the harder case for memory.
    return max(image_matrix(ctx), key=lambda s: (s.total, -s.layers))


def build_image(spec: ImageSpec, dest: Path, tag: str = "1") -> SampleImage:
    """A deterministic sample image as an OCI layout.

    Layers are uncompressed tars of random bytes: gzip would only slow the generation (random
    data does not compress) and neither registry looks inside a layer.
    """
    per_layer = spec.total // spec.layers
    return write_oci_layout(dest, [LayerSpec(per_layer, "none", files=2)] * spec.layers, tag=tag)


def file_origin(home: Path) -> str:
    """p2pimg's default origin for `home`, spelled out: a P2PIMG_ORIGIN in the caller's
    environment must not send a benchmark's image somewhere else."""
    return f"file://{home.absolute() / 'origin'}"


def publish(image: SampleImage, name: str, home: Path, origin: str | None = None) -> None:
    """`p2pimg publish` the layout into `origin` (by default `home`'s own file origin)."""
    argv = [sys.executable, "-m", "p2pimg", "publish", f"oci:{image.path}:1", name]
    argv += ["--home", str(home), "--origin", origin or file_origin(home)]
    run(argv, env=client_env(P2PIMG_MDNS="0"))


def push(image: SampleImage, ref: str) -> None:
    """Copy the layout byte for byte into a plain-HTTP registry at `ref` (HOST:PORT/NAME:TAG)."""
    run(
        [
            "skopeo",
            "copy",
            "--insecure-policy",
            "--preserve-digests",
            "--dest-tls-verify=false",
            f"oci:{image.path}:1",
            f"docker://{ref}",
        ]
    )


def skopeo_pull(ref: str, dest: Path) -> float:
    """Seconds `skopeo copy` takes to pull `ref` into a fresh OCI layout at `dest`."""
    shutil.rmtree(dest, ignore_errors=True)
    argv = [
        "skopeo",
        "copy",
        "--insecure-policy",
        "--preserve-digests",
        "--src-tls-verify=false",
        f"docker://{ref}",
        f"oci:{dest}:x",
    ]
    started = time.perf_counter()
    run(argv)
    elapsed = time.perf_counter() - started
    shutil.rmtree(dest, ignore_errors=True)  # outside the timing; a 1 GB copy per run adds up
    return elapsed
