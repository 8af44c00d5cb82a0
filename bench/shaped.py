"""Helpers for benchmarks on shaped links: an origin, a registry and p2pimg nodes in namespaces.

The scenarios in `bench/scenarios/` build a LAN of network namespaces with `tools.netns` and put
every process in it: the origin (moto_server behind `tools/faultproxy.py`) and the Debian
`docker-registry` on an origin host whose link is shaped with tbf, the clients on hosts of
their own. Nothing listens in the root namespace, so every byte a client gets from the origin
crosses the shaped link. Readiness checks, stats and hashing fetches therefore run inside the
namespaces too: with curl, or with this module run as a program there:

    python -m bench.shaped stream S3_URL DIGEST SIZE   # one ranged GET of a whole blob, hashed
    python -m bench.shaped fetch URL DIGEST            # one plain GET, hashed
    python -m bench.shaped mkbucket ENDPOINT BUCKET

Each prints one JSON line. Every child runs with P2PIMG_MDNS=0, without proxy settings and with
moto's test credentials, and every wait here is bounded.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.scenario import Measure, Skipped
from bench.scenarios import ImageSpec
from p2pimg.ops.sample import SampleImage
from tools.netns import IP, Host, support

ROOT = Path(__file__).resolve().parents[1]
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "bench"
IMAGE_NAME = "bench/img:1"
MOTO_PORT = 5001  # on the origin host's loopback: only faultproxy and the publisher talk to it
PROXY_PORT = 9000  # faultproxy, on the origin host's LAN address
REGISTRY_PORT = 5000  # docker-registry, on every address of the origin host
FAR_REGISTRY_PORT = 9001  # faultproxy in front of docker-registry, on the origin host's LAN address
P2PIMG_PORT = 5050  # p2pimg's registry on each client host's loopback
PEER_PORT = 5051  # p2pimg's peer listener on each client host's LAN address
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
STEP_TIMEOUT = 120.0  # a command that is not a transfer (publish of small images, push, stats)
MB = 1_000_000
MiB = 1 << 20

# One line of the registry's access log (Apache combined format):
#   10.1.0.1 - - [date] "GET /v2/x/blobs/sha256:... HTTP/1.1" 200 26214400 "" "skopeo/1.9.3"
_ACCESS_LINE = re.compile(r'"GET (/v2/\S*) HTTP/[\d.]+" (\d{3}) (\d+) ')


def child_env(**extra: str) -> dict[str, str]:
    """Environment for processes in the namespaces: no proxies (unreachable from there), no
    P2PIMG_* of the caller's own, mDNS off, moto's test credentials, this repository importable."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.lower().endswith("_proxy") and not k.startswith("P2PIMG_")
    }
    env.update(AWS, P2PIMG_MDNS="0", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def unavailable(*tools: str) -> str | None:
    """Why a shaped-link scenario cannot run here, or None."""
    caps = support()
    if caps.netns:
        return f"network namespaces unavailable: {caps.netns}"
    if caps.shaping:
        return f"link shaping (tc tbf) unavailable: {caps.shaping}"
    missing = [t for t in tools if shutil.which(t) is None]
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
        missing.append("moto[server] (python)")
    if missing:
        return f"missing tools: {', '.join(missing)}"
    return None


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def bytes_per_s(rate_mbit: float) -> float:
    return rate_mbit * 1e6 / 8


def manifest_layers(image: SampleImage) -> list[dict[str, Any]]:
    """The layer descriptors of a single-platform sample image (its top blob is the manifest)."""
    top = json.loads((image.path / "blobs" / "sha256" / image.top_digest[7:]).read_bytes())
    if "manifests" in top:  # an index: follow its only manifest
        digest = top["manifests"][0]["digest"]
        top = json.loads((image.path / "blobs" / "sha256" / digest[7:]).read_bytes())
    return list(top["layers"])


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def transfer_timeout(nbytes: float, rate_mbit: float, copies: int = 1) -> float:
    """A generous bound for moving `copies` x `nbytes` over a `rate_mbit` link."""
    return 60.0 + 10 * copies * nbytes / bytes_per_s(rate_mbit)


# --------------------------------------------------------------------------------------------
# Processes in namespaces
# --------------------------------------------------------------------------------------------


@dataclass
class Daemon:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self, limit: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-limit:]
        return ""


def start_daemon(host: Host, name: str, argv: Sequence[str], logs: Path, **env: str) -> Daemon:
    """Start `argv` in `host`, output to logs/<name>.log; Lan.close stops it if we do not."""
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    with log.open("ab") as out:
        proc = host.popen(
            list(argv), env=child_env(**env), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    return Daemon(name, proc, log)


def stop_daemon(daemon: Daemon) -> None:
    proc = daemon.proc
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)


def curl(host: Host, url: str, *extra: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    argv = ["curl", "-sf", "--noproxy", "*", "--max-time", str(timeout), *extra, url]
    return host.run(argv, capture_output=True, text=True, timeout=timeout + 5, env=child_env())


def wait_ready(host: Host, url: str, daemon: Daemon, timeout: float = START_TIMEOUT) -> None:
    """Poll `url` from inside `host` until it answers 2xx; fail early if the daemon exits."""
    deadline = time.monotonic() + timeout
    while True:
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"{daemon.name} exited with {daemon.proc.returncode}:\n{daemon.tail()}")
        if curl(host, url, "-o", "/dev/null", timeout=2).returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{daemon.name} did not answer {url} within {timeout:g} s:\n{daemon.tail()}")
        time.sleep(0.1)


def run_in(
    host: Host, argv: Sequence[str], what: str, timeout: float = STEP_TIMEOUT, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run a command in `host` to completion; a failure raises with its output."""
    try:
        result = host.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=child_env(**env),
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{what}: timed out after {timeout:.0f} s") from exc
    if result.returncode != 0:
        output = result.stdout[-2000:] + result.stderr[-2000:]
        raise RuntimeError(f"{what}: exit {result.returncode}\n{output}")
    return result


def helper(host: Host, *args: str, what: str, timeout: float = STEP_TIMEOUT) -> dict[str, Any]:
    """Run this module as a program in `host`; returns its JSON line."""
    out = run_in(host, [sys.executable, "-m", "bench.shaped", *args], what, timeout=timeout)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def link_tx_bytes(host: Host) -> int:
    """Bytes sent on the host's eth0 (frames: payload plus TCP/IP and Ethernet headers)."""
    out = subprocess.run(
        [IP, "-n", host.ns, "-s", "-j", "link", "show", "eth0"],
        capture_output=True,
        text=True,
        timeout=15,
        check=True,
    ).stdout
    return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])


def skopeo_copy_argv(src: str, dest: Path) -> list[str]:
    return [
        "skopeo",
        "copy",
        "--insecure-policy",
        "--preserve-digests",
        "--src-tls-verify=false",
        f"docker://{src}",
        f"oci:{dest}:x",
    ]


def check_pulled(dest: Path, image: SampleImage) -> None:
    """The pulled layout holds the published manifest, and every blob hashes to its name."""
    index = json.loads((dest / "index.json").read_text())
    got = index["manifests"][0]["digest"]
    if got != image.top_digest:
        raise RuntimeError(f"pulled manifest {got} != published {image.top_digest}")
    for blob in (dest / "blobs" / "sha256").iterdir():
        h = hashlib.sha256()
        with blob.open("rb") as f:
            while piece := f.read(MiB):
                h.update(piece)
        if h.hexdigest() != blob.name:
            raise RuntimeError(f"pulled blob {blob.name} hashes to {h.hexdigest()}")


# --------------------------------------------------------------------------------------------
# The origin host: moto_server + faultproxy, and docker-registry
# --------------------------------------------------------------------------------------------


@dataclass
class Origin:
    host: Host
    latency_s: float
    stream_rate: float  # bytes/s per connection at the proxy, 0 = none
    daemons: list[Daemon] = field(default_factory=list)

    @property
    def moto(self) -> str:
        return f"http://127.0.0.1:{MOTO_PORT}"

    @property
    def proxy(self) -> str:
        return f"http://{self.host.addr}:{PROXY_PORT}"

    @property
    def url(self) -> str:
        """What p2pimg and the single-stream baseline read: the bucket through the proxy."""
        return f"s3://{BUCKET}?endpoint={self.proxy}"

    def stats(self, client: Host) -> dict[str, int]:
        """faultproxy's counters, asked from `client` (the proxy listens on the LAN address only)."""
        out = curl(client, f"{self.proxy}/__faultproxy/stats")
        if out.returncode != 0:
            raise RuntimeError(f"faultproxy stats: curl exit {out.returncode}")
        stats: dict[str, int] = json.loads(out.stdout)
        return stats


def start_origin(host: Host, logs: Path, *, latency_s: float, stream_rate: float = 0.0) -> Origin:
    """moto_server on the origin host's loopback and faultproxy in front of it on its LAN address."""
    origin = Origin(host, latency_s, stream_rate)
    moto = start_daemon(
        host, "moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(MOTO_PORT)], logs
    )
    origin.daemons.append(moto)
    wait_ready(host, f"{origin.moto}/moto-api/data.json", moto)
    helper(host, "mkbucket", origin.moto, BUCKET, what="create the bucket")
    proxy = start_faultproxy(host, "faultproxy", origin.moto, PROXY_PORT, logs, latency_s, stream_rate)
    origin.daemons.append(proxy)
    return origin


def start_faultproxy(
    host: Host, name: str, upstream: str, port: int, logs: Path, latency_s: float, stream_rate: float = 0.0
) -> Daemon:
    """`tools/faultproxy.py` in front of `upstream`, on the host's LAN address at `port`, adding
    `latency_s` before every response (and capping each connection at `stream_rate` bytes/s)."""
    argv = [
        sys.executable,
        "-m",
        "tools.faultproxy",
        "--upstream",
        upstream,
        "--listen",
        f"{host.addr}:{port}",
        "--latency",
        str(latency_s),
    ]
    if stream_rate:
        argv += ["--rate", str(int(stream_rate))]
    proxy = start_daemon(host, name, argv, logs)
    wait_ready(host, f"http://{host.addr}:{port}/__faultproxy/stats", proxy)
    return proxy


def publish(origin: Origin, image: SampleImage, home: Path, timeout: float) -> None:
    """Publish to moto directly, from the origin host: the shaped link is for pulls only."""
    run_in(
        origin.host,
        [
            sys.executable,
            "-m",
            "p2pimg",
            "publish",
            f"oci:{image.path}:1",
            IMAGE_NAME,
            "--origin",
            f"s3://{BUCKET}?endpoint={origin.moto}",
            "--home",
            str(home),
        ],
        "p2pimg publish",
        timeout=timeout,
    )


@dataclass
class Registry:
    host: Host
    daemon: Daemon

    @property
    def ref(self) -> str:
        return f"{self.host.addr}:{REGISTRY_PORT}/{IMAGE_NAME}"

    @property
    def far_ref(self) -> str:
        """The image through faultproxy (`start_faultproxy` at FAR_REGISTRY_PORT): the registry
        with the origin's added latency before every response."""
        return f"{self.host.addr}:{FAR_REGISTRY_PORT}/{IMAGE_NAME}"

    def egress(self) -> int:
        """Body bytes of every successful GET under /v2/ so far, from the access log."""
        total = 0
        for match in _ACCESS_LINE.finditer(self.daemon.log.read_text(errors="replace")):
            if match[2].startswith("2"):
                total += int(match[3])
        return total


def start_registry(host: Host, workdir: Path, logs: Path, image: SampleImage, timeout: float) -> Registry:
    """docker-registry on the origin host (every address there), holding `image` in its own storage.

    The image is pushed over the origin host's loopback, so the push never crosses the link.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "registry.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n"
        f"storage:\n  filesystem:\n    rootdirectory: {workdir / 'registry-data'}\n"
        f"http:\n  addr: 0.0.0.0:{REGISTRY_PORT}\n"
    )
    daemon = start_daemon(host, "docker-registry", ["docker-registry", "serve", str(config)], logs)
    wait_ready(host, f"http://127.0.0.1:{REGISTRY_PORT}/v2/", daemon)
    run_in(
        host,
        [
            "skopeo",
            "copy",
            "--insecure-policy",
            "--preserve-digests",
            "--dest-tls-verify=false",
            f"oci:{image.path}:1",
            f"docker://127.0.0.1:{REGISTRY_PORT}/{IMAGE_NAME}",
        ],
        "push to docker-registry",
        timeout=timeout,
    )
    return Registry(host, daemon)


def start_p2pimg(
    host: Host,
    name: str,
    home: Path,
    logs: Path,
    origin_url: str | None,
    *,
    upstream: str | None = None,
    peer_listen: bool = False,
    peers: Sequence[str] = (),
    wait: bool = True,
) -> Daemon:
    """`p2pimg serve` on the host's loopback (its own namespace), static peers only, no mDNS.

    `origin_url` None: the home's own (empty) file origin, for a pull-through mirror of
    `upstream`. With `wait=False` it returns at once; `p2pimg_ready` then waits for it to answer.
    """
    argv = [sys.executable, "-m", "p2pimg", "serve", "--listen", f"127.0.0.1:{P2PIMG_PORT}", "--no-mdns"]
    if origin_url is not None:
        argv += ["--origin", origin_url]
    if upstream is not None:
        argv += ["--upstream", upstream]
    if peer_listen:
        argv += ["--peer-listen", f"{host.addr}:{PEER_PORT}"]
    argv += [a for peer in peers for a in ("--peer", peer)]
    daemon = start_daemon(host, name, argv, logs, P2PIMG_HOME=str(home))
    if wait:
        p2pimg_ready(host, daemon)
    return daemon


def p2pimg_ready(host: Host, daemon: Daemon) -> None:
    wait_ready(host, f"http://127.0.0.1:{P2PIMG_PORT}/v2/", daemon)


def peer_url(host: Host) -> str:
    return f"http://{host.addr}:{PEER_PORT}"


# --------------------------------------------------------------------------------------------
# Run inside a namespace: `python -m bench.shaped ...`
# --------------------------------------------------------------------------------------------


async def _stream(url: str, key: str, size: int, digest: str) -> dict[str, Any]:
    from p2pimg.sources.origins.s3 import S3Origin

    origin = S3Origin(url)
    origin.prepare()  # its HTTP client made before the clock starts, as `serve` makes its own
    try:
        started = time.perf_counter()
        h = hashlib.sha256()
        async for piece in origin.read_range(key, 0, size):
            h.update(piece)
        elapsed = time.perf_counter() - started
    finally:
        await origin.aclose()
    if "sha256:" + h.hexdigest() != digest:
        raise SystemExit(f"streamed bytes hash to sha256:{h.hexdigest()}, not {digest}")
    return {"seconds": elapsed, "bytes": size}


def _fetch(url: str, digest: str) -> dict[str, Any]:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    started = time.perf_counter()
    h = hashlib.sha256()
    n = 0
    with opener.open(url, timeout=60) as response:
        while piece := response.read(MiB):
            h.update(piece)
            n += len(piece)
    elapsed = time.perf_counter() - started
    if "sha256:" + h.hexdigest() != digest:
        raise SystemExit(f"fetched bytes hash to sha256:{h.hexdigest()}, not {digest}")
    return {"seconds": elapsed, "bytes": n}


def _timeline(url: str) -> dict[str, Any]:
    """A node's timeline (`GET /p2pimg/v1/timeline` on its registry listener), reduced."""
    import urllib.request

    from bench.timeline import summarize

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=30) as response:
        doc = json.loads(response.read())
    return summarize(doc["events"])


def _mkbucket(endpoint: str, bucket: str) -> dict[str, Any]:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return {"bucket": bucket}


def main(argv: list[str]) -> int:
    import trio

    from p2pimg.sources.origins import blob_key

    match argv:
        case ["stream", url, digest, size]:
            result = trio.run(_stream, url, blob_key(digest), int(size), digest)
        case ["fetch", url, digest]:
            result = _fetch(url, digest)
        case ["timeline", url]:
            result = _timeline(url)
        case ["mkbucket", endpoint, bucket]:
            result = _mkbucket(endpoint, bucket)
        case _:
            print(__doc__, file=sys.stderr)
            return 2
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))


def per_image(
    workdir: Path, images: Sequence[ImageSpec], run: Callable[[ImageSpec, Path], list[Measure | Skipped]]
) -> list[Measure | Skipped]:
    """Run a scenario once per image, each in a directory removed right after (up to ~1 GB per
    copy in --full)."""
    results: list[Measure | Skipped] = []
    for i, spec in enumerate(images):
        work = workdir / f"image{i}"
        try:
            results += run(spec, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return results
