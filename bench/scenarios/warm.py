"""Warm pull: the image is in p2pimg's cache; the same client pulls it through p2pimg and from the
Debian `docker-registry` serving the same image from local disk, alternately, in the same run.

The figure is the client's wall-clock pull time; the ratio p2pimg / docker-registry says what
serving from p2pimg's verified chunk cache costs against a plain registry on the same disk.
Clients: `skopeo copy` into a fresh OCI layout, and `ctr content fetch` into a fresh namespace of
a private containerd (its content store isolated per namespace, so every pull downloads).
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

from ..procs import Containerd, Unavailable, containerd, docker_registry, p2pimg_serve, require
from ..scenario import Context, Measure, Skipped
from . import REPO, ImageSpec, build_image, file_origin, image_matrix, publish, push, skopeo_pull

SCENARIO = "warm-pull"
CLIENTS = ("skopeo", "ctr")
BASELINE = "docker-registry (local disk)"


def warm_pull(ctx: Context, clients: Sequence[str] = CLIENTS) -> list[Measure | Skipped]:
    """One row per client and image; `clients` narrows the clients (the smoke test uses skopeo)."""
    if unknown := set(clients) - set(CLIENTS):
        raise ValueError(f"unknown clients {sorted(unknown)}; known: {', '.join(CLIENTS)}")
    # skopeo also places the image in docker-registry, so it is needed even for ctr's rows.
    if missing := require("skopeo", "docker-registry"):
        return [Skipped(SCENARIO, f"missing {', '.join(missing)} (apt-get install skopeo docker-registry)")]
    rows: list[Measure | Skipped] = []
    specs = image_matrix(ctx)
    home = ctx.workdir / "home"
    with ExitStack() as stack:
        registry = stack.enter_context(docker_registry(ctx.workdir))
        layers: dict[ImageSpec, list[str]] = {}
        for spec in specs:
            ctx.progress(f"making and placing a {spec.label} image")
            image = build_image(spec, ctx.workdir / f"layout-{spec.key}")
            manifest = json.loads((image.path / "blobs" / "sha256" / image.top_digest[7:]).read_bytes())
            layers[spec] = [layer["digest"] for layer in manifest["layers"]]
            publish(image, f"{REPO}:{spec.key}", home)
            push(image, f"{registry}/{REPO}:{spec.key}")
            shutil.rmtree(image.path)  # both registries hold their own copy now
        # Started after publishing, so it serves what is there and nothing races its startup.
        proxy, _proc = stack.enter_context(
            p2pimg_serve(home, origin=file_origin(home), log=ctx.workdir / "p2pimg.log")
        )
        pullers: dict[str, Callable[[str], float]] = {}
        if "skopeo" in clients:
            pullers["skopeo"] = lambda ref: skopeo_pull(ref, ctx.workdir / "pull")
        if "ctr" in clients:
            try:
                ctd = stack.enter_context(containerd(ctx.workdir))
            except Unavailable as exc:
                rows.append(Skipped(SCENARIO, f"ctr: {exc}"))
            else:
                pullers["ctr"] = lambda ref: ctr_fetch(ctd, ref)
        for spec in specs:
            ours_ref, theirs_ref = f"{proxy}/{REPO}:{spec.key}", f"{registry}/{REPO}:{spec.key}"
            for client, pull in pullers.items():
                what = f"{client}, {spec.label}"
                # Untimed first pulls: the first through p2pimg fills its cache (which is what
                # "warm" means), and each side's files get into the page cache alike.
                ctx.progress(f"{what}: warming up")
                pull(ours_ref)
                pull(theirs_ref)
                check_cached(home, layers[spec])
                ours: list[float] = []
                theirs: list[float] = []
                for run in range(ctx.runs):
                    ctx.progress(f"{what}: run {run + 1}/{ctx.runs}")
                    # Alternate who goes first, so a drift of the machine (another tenant, page
                    # cache pressure) does not always land on the same side.
                    if run % 2 == 0:
                        ours.append(pull(ours_ref))
                        theirs.append(pull(theirs_ref))
                    else:
                        theirs.append(pull(theirs_ref))
                        ours.append(pull(ours_ref))
                rows.append(
                    Measure(
                        scenario=SCENARIO,
                        client=what,
                        metric="pull time, image in p2pimg's cache",
                        unit="s",
                        p2pimg=ours,
                        baseline=theirs,
                        baseline_name=BASELINE,
                        details={"image": spec.label, "image_bytes": spec.total, "layers": spec.layers},
                    )
                )
    return rows


def ctr_fetch(ctd: Containerd, ref: str) -> float:
    """Seconds `ctr content fetch` takes to download `ref` into a namespace of its own."""
    namespace = f"bench-{uuid.uuid4().hex[:12]}"
    started = time.perf_counter()
    ctd.ctr("content", "fetch", "--plain-http", ref, namespace=namespace)
    elapsed = time.perf_counter() - started
    ctd.drop_namespace(namespace)  # outside the timing: keeps the disk from filling up
    return elapsed


def check_cached(home: Path, digests: list[str]) -> None:
    """Fail loudly if the warm-up left a layer out of p2pimg's cache: the figures would then
    measure a cold pull under the warm pull's name."""
    blobs = home / "cache" / "blobs" / "sha256"
    if absent := [d for d in digests if not (blobs / d.removeprefix("sha256:")).is_file()]:
        raise RuntimeError(f"after a full pull, p2pimg's cache still lacks {', '.join(absent)}")
