"""Two faults with real processes: the cache's disk fills up mid-pull, and 100 clients pull at once.

Disk full: the proxy's home sits on a 40 MiB tmpfs, the origin (S3 on moto, behind a rate-capped
fault proxy) does not, and the image's layer is 60 MiB. A pull of a blob that cannot fit is
refused with 507 before any byte is sent; a pull during which the disk fills up is cut (never a
wrong byte) with "cache disk is full" in the log. Either way the server stays up, the cache stays
consistent (test_crash.check_cache), and once there is room again the same server completes the
pull from the chunks it kept.

Load: one proxy, a cold S3 origin behind a slow fault proxy, 100 scripted registry clients and
real skopeo pulls at the same time: every pull is digest-correct, the origin sends every blob
once, and the proxy's peak RSS stays bounded.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import os
import random
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import FaultProxy, http_status, make_bucket, metric
from test_crash import check_cache
from test_s3_pull import blob_bytes, check_pulled, publish, s3_url, serve, skopeo_pull, stop_clean

from p2pimg.ops.sample import LayerSpec, write_oci_layout

if TYPE_CHECKING:
    from conftest import RunP2pimg, Skopeo


@pytest.fixture(autouse=True)
def _aws(aws_env: None) -> None:
    """Every p2pimg process here talks S3 with moto's test credentials."""


def get(url: str, timeout: float = 30) -> tuple[int, bytes]:
    """Status and body of GET `url` (an error status too), never through a proxy."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@contextlib.contextmanager
def small_tmpfs(mnt: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` at `mnt` (skip the test when this machine does not let us mount one)."""
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(
            f"cannot mount a {size} tmpfs for the cache (needs root or CAP_SYS_ADMIN): "
            f"`mount` exit {mounted.returncode}: {mounted.stderr.strip()}"
        )
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def remount(mnt: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)


def fill_up(path: Path, leave: int) -> int:
    """Write `path` until its file system has at most `leave` bytes free; return the bytes written."""
    vfs = os.statvfs(path.parent)
    todo = vfs.f_bavail * vfs.f_frsize - leave
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    written = 0
    piece = b"\xff" * (1 << 20)
    try:
        while written < todo:
            try:
                written += os.write(fd, piece[: todo - written])
            except OSError as exc:  # the pull took some of the room meanwhile: full is fine too
                assert exc.errno == errno.ENOSPC, exc
                break
    finally:
        os.close(fd)
    return written


def test_disk_full_mid_pull_then_space_returns(
    moto: str,
    fault_proxy: Callable[..., FaultProxy],
    run_p2pimg: RunP2pimg,
    skopeo: Skopeo,
    tmp_path: Path,
) -> None:
    image = write_oci_layout(tmp_path / "img", [LayerSpec(60 << 20, "none")], tag="1", seed=11)
    manifest = json.loads((image.path / "blobs" / "sha256" / image.top_digest[7:]).read_bytes())
    layer = manifest["layers"][0]["digest"]
    truth = (image.path / "blobs" / "sha256" / layer[7:]).read_bytes()
    # The origin (S3, on moto's side) is on another file system than the cache. The same image
    # also goes to a file origin: check_cache reads the blob maps from <home>/origin.
    publisher = tmp_path / "publisher"
    run_p2pimg("publish", f"oci:{image.path}:1", "demo/app:1", home=publisher)
    bucket = make_bucket(moto)
    publish(run_p2pimg, image, s3_url(bucket, moto), publisher)
    # 4 MiB/s a connection: the 60 MiB layer (four 16 MiB spans at once) takes ~4 s to fetch.
    proxy = fault_proxy(moto, "--rate", str(4 << 20))

    with small_tmpfs(tmp_path / "small", "40m") as mnt:
        home = mnt / "home"
        view = tmp_path / "view"  # what check_cache looks at: this cache, the origin's blob maps
        view.mkdir()
        (view / "cache").symlink_to(home / "cache")
        (view / "origin").symlink_to(publisher / "origin")
        cached_layer = home / "cache" / "blobs" / "sha256" / layer[7:]
        daemon, host = serve(home, s3_url(bucket, proxy.endpoint), tmp_path / "logs")
        blob_url = f"http://{host}/v2/demo/app/blobs/{layer}"
        try:
            # 1. The layer cannot fit at all: refused before any byte is sent.
            pull = skopeo(
                "copy",
                "--preserve-digests",
                "--src-tls-verify=false",
                f"docker://{host}/demo/app:1",
                f"oci:{tmp_path / 'out1'}:x",
                check=False,
            )
            assert pull.returncode != 0
            assert "507 (Insufficient Storage)" in pull.stderr, pull.stderr
            status, body = get(blob_url)
            assert status == 507
            (error,) = json.loads(body)["errors"]
            assert error["message"].startswith(f"cache disk is full: blob {layer} needs 60.0 MiB"), error
            assert http_status(f"http://{host}/v2/") == 200
            assert "cache disk is full" in daemon.stderr_path.read_text()
            assert not cached_layer.exists()
            # Nothing of the refused layer was claimed (the image's config, a small blob the node
            # fetches on its first look at the image, may still be on its way: checked, not counted).
            check_cache(view)
            claims = home / "cache" / "partial" / "sha256" / f"{layer[7:]}.have"
            assert not claims.exists() or 1 not in claims.read_bytes()

            # 2. Room for it when the pull starts, none left a moment later.
            remount(mnt, "200m")
            received = tmp_path / "received"
            curl = subprocess.Popen(
                ["curl", "-sS", "-o", str(received), blob_url], stderr=subprocess.PIPE, text=True
            )
            have = home / "cache" / "partial" / "sha256" / f"{layer[7:]}.have"
            deadline = time.monotonic() + 30
            while not (have.exists() and have.read_bytes().count(1) >= 8):
                assert time.monotonic() < deadline, "the fetch made no progress"
                time.sleep(0.02)
            # Room for one and a half 1 MiB chunks: one more fits, the write of the next one is
            # cut short by the kernel and only the write after that fails with ENOSPC.
            filler = mnt / "filler"
            fill_up(filler, leave=(3 << 20) // 2)
            _, curl_err = curl.communicate(timeout=60)
            got = received.read_bytes()
            print(f"curl exit {curl.returncode}: {curl_err.strip()} ({len(got)} bytes)")
            assert curl.returncode != 0, "a cut blob looked whole to the client"
            assert len(got) < len(truth) and truth.startswith(got), "the client got wrong bytes"
            log = daemon.stderr_path.read_text()
            assert f"fetch of {layer} failed: cache disk is full while writing chunk" in log, log
            assert http_status(f"http://{host}/v2/") == 200, "the server did not survive"
            assert daemon.proc.poll() is None
            # Before any new request: opening the partial blob again would drop a false claim.
            complete, claimed = check_cache(view)
            print(f"disk full: {complete} complete blobs, {claimed} verified partial chunks kept")
            assert claimed >= 8 and not cached_layer.exists()
            status, body = get(blob_url)  # the disk is still full: a clear error, at once
            assert status == 507 and "cache disk is full" in body.decode(), body

            # 3. Space returns: the same server pulls it, resuming from the chunks it kept.
            filler.unlink()
            out = tmp_path / "out"
            skopeo(
                "copy",
                "--preserve-digests",
                "--src-tls-verify=false",
                f"docker://{host}/demo/app:1",
                f"oci:{out}:x",
            )
            check_pulled(out, image)
            deadline = time.monotonic() + 20
            while not cached_layer.exists():
                assert time.monotonic() < deadline, "the layer never became complete in the cache"
                time.sleep(0.05)
            assert check_cache(view) == (len(image.blob_digests) - 1, 0)  # all but the manifest
            cache = home / "cache"
            leftovers = [*(cache / "partial" / "sha256").iterdir(), *(cache / "tmp").iterdir()]
            assert not leftovers, leftovers
            # Every verified chunk was kept through both failures: none came from the origin twice.
            assert metric(host, "p2pimg_source_bytes_total", source="origin") == blob_bytes(image)
        finally:
            stop_clean(daemon)


# --------------------------------------------------------------------------------------------
# 100 clients at once
# --------------------------------------------------------------------------------------------

ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)


class PullError(Exception):
    pass


def pull_once(host: str, repo: str, tag: str, start: threading.Barrier) -> dict[str, object]:
    """What a registry client does, on one keep-alive connection: GET /v2/, the manifest by tag,
    then every blob (in a random order, so that clients overlap on different blobs), each
    sha256-hashed while it streams and compared with its descriptor."""
    conn = http.client.HTTPConnection(host, timeout=120)
    began = time.monotonic()
    size = 0
    try:
        start.wait()
        began = time.monotonic()
        conn.request("GET", "/v2/")
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise PullError(f"/v2/: HTTP {resp.status}")
        conn.request("GET", f"/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT})
        resp = conn.getresponse()
        raw = resp.read()
        manifest = "sha256:" + hashlib.sha256(raw).hexdigest()
        if resp.status != 200 or resp.getheader("docker-content-digest") != manifest:
            raise PullError(
                f"manifest: HTTP {resp.status}, digest {resp.getheader('docker-content-digest')} "
                f"for bytes of {manifest}"
            )
        doc = json.loads(raw)
        descriptors = [doc["config"], *doc["layers"]]
        random.shuffle(descriptors)
        for desc in descriptors:
            conn.request("GET", f"/v2/{repo}/blobs/{desc['digest']}")
            resp = conn.getresponse()
            if resp.status != 200:
                raise PullError(f"{desc['digest']}: HTTP {resp.status} {resp.read()[:300]!r}")
            h, n = hashlib.sha256(), 0
            while piece := resp.read(1 << 20):
                h.update(piece)
                n += len(piece)
            if n != desc["size"] or "sha256:" + h.hexdigest() != desc["digest"]:
                raise PullError(f"{desc['digest']}: got {n} bytes hashing to sha256:{h.hexdigest()}")
            size += n
        return {"ok": True, "manifest": manifest, "bytes": size, "seconds": time.monotonic() - began}
    except Exception as exc:  # reported to the test, which fails with every client's story
        return {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}",
            "bytes": size,
            "seconds": time.monotonic() - began,
        }
    finally:
        conn.close()


def pull_client_main(host: str, repo: str, tag: str, count: int) -> None:
    """`count` concurrent pulls (threads), started together; prints one JSON result each."""
    start = threading.Barrier(count)
    results: list[dict[str, object]] = [{} for _ in range(count)]

    def run(i: int) -> None:
        results[i] = pull_once(host, repo, tag, start)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    json.dump(results, sys.stdout)


def peak_rss(pid: int) -> int:
    """VmHWM (the process's peak resident set) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


CLIENTS = 100
SKOPEO_PULLS = 3


def test_hundred_clients_one_cold_proxy(
    moto: str, fault_proxy: Callable[..., FaultProxy], run_p2pimg: RunP2pimg, tmp_path: Path
) -> None:
    layers = [LayerSpec(20 << 20, "none"), LayerSpec(12 << 20, "gzip", files=3), LayerSpec(8 << 20, "gzip")]
    image = write_oci_layout(tmp_path / "img", layers, tag="1", seed=12)
    bucket = make_bucket(moto)
    publish(run_p2pimg, image, s3_url(bucket, moto), tmp_path / "publisher")
    # A far, slowish origin: every ranged GET waits 50 ms and a connection sends 8 MiB/s, so the
    # cold fetch of each blob takes seconds and all the clients' reads of it overlap.
    proxy = fault_proxy(moto, "--latency", "0.05", "--rate", str(8 << 20))
    daemon, host = serve(tmp_path / "home", s3_url(bucket, proxy.endpoint), tmp_path / "logs")
    try:
        began = time.monotonic()
        clients = subprocess.Popen(
            [sys.executable, __file__, host, "demo/app", "1", str(CLIENTS)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        pulls = [skopeo_pull(f"{host}/demo/app:1", tmp_path / f"skopeo{i}") for i in range(SKOPEO_PULLS)]
        out, err = clients.communicate(timeout=120)
        clients_done = time.monotonic() - began
        assert clients.returncode == 0, err
        for i, p in enumerate(pulls):
            _, skopeo_err = p.communicate(timeout=120)
            assert p.returncode == 0, skopeo_err.decode()
            check_pulled(tmp_path / f"skopeo{i}", image)
        elapsed = time.monotonic() - began
        results = json.loads(out)
        failed = [r for r in results if not r["ok"]]
        assert not failed, f"{len(failed)} of {CLIENTS} pulls failed, e.g. {failed[:3]}"
        assert len(results) == CLIENTS
        assert {r["manifest"] for r in results} == {image.top_digest}
        assert {r["bytes"] for r in results} == {blob_bytes(image)}
        # The origin sent each blob's bytes once, for 103 pulls.
        assert metric(host, "p2pimg_source_bytes_total", source="origin") == blob_bytes(image)
        stats = proxy.stats()
        extra = stats["body_bytes"] - blob_bytes(image)
        print(
            f"origin bodies beyond the blobs: {extra} bytes; hedges: "
            f"{metric(host, 'p2pimg_fetch_hedges_total')}"
        )
        assert extra < 64 << 10  # + the head, blocks and tag record
        # Metadata too is fetched once however many clients ask at once: the tag's head once (it
        # carries the root, the manifest and the blob maps; a block it did not bring in time is
        # fetched once, as Resolver.block merges concurrent misses), the tag record once per tag
        # TTL (5 s; this run lasts a few TTLs at most).
        blocks = {p: n for p, n in stats["paths"].items() if "/p2pimg/blocks/" in p}
        heads = [n for p, n in stats["paths"].items() if "/p2pimg/heads/" in p]
        tag_reads = sum(n for p, n in stats["paths"].items() if "/p2pimg/tags/" in p)
        assert heads == [1], stats["paths"]
        assert len(blocks) <= 2 + len(layers) + 1, blocks  # root, manifest, config + layer maps
        assert set(blocks.values()) <= {1}, f"blocks fetched more than once: {blocks}"
        assert tag_reads <= 2 + (time.monotonic() - began) / 5, stats["paths"]
        assert metric(host, "p2pimg_served_bytes_total") >= (CLIENTS + SKOPEO_PULLS) * blob_bytes(image)
        rss = peak_rss(daemon.proc.pid)
        seconds = sorted(float(r["seconds"]) for r in results)
        print(
            f"{CLIENTS} clients done in {clients_done:.1f} s (per pull: min {seconds[0]:.1f} s, "
            f"median {seconds[len(seconds) // 2]:.1f} s, max {seconds[-1]:.1f} s), all with skopeo "
            f"{elapsed:.1f} s; proxy peak RSS {rss / 2**20:.0f} MiB"
        )
        # An idle `serve` peaks at ~52 MiB; under this load it peaked at 68 MiB (2 cores, three
        # runs: 68-70 MiB). Blob bodies go file -> socket with sendfile and the fetch holds one
        # chunk per origin request, so 100 clients cost almost nothing; 160 MiB leaves room for
        # noise, but not for one 1 MiB chunk buffered per client (+100 MiB), let alone a blob.
        assert rss < 160 << 20, f"proxy peak RSS {rss / 2**20:.0f} MiB"
    finally:
        stop_clean(daemon)


if __name__ == "__main__":
    # The load test's client process: python test_faults_disk_and_load.py HOST REPO TAG COUNT
    pull_client_main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
