"""Processes a benchmark runs beside p2pimg: the reference registry, containerd and the proxy itself."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# A hung client must fail its scenario, never hang the whole benchmark run.
COMMAND_TIMEOUT = 1800.0
# Enough of a failing command's output to see why, without burying the report in it.
TAIL_CHARS = 2000


@contextmanager
def scratch_dir() -> Iterator[Path]:
    """A work directory for one benchmark run, removed afterwards whatever happens."""
    work = Path(tempfile.mkdtemp(prefix="p2pimg-bench-"))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def require(*tools: str) -> list[str]:
    """Names of the tools that are missing."""
    return [t for t in tools if shutil.which(t) is None]


@contextmanager
def stopping(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def client_env(**extra: str) -> dict[str, str]:
    """Our environment minus proxy settings (every request here is for 127.0.0.1), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(extra)
    return env


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: dict[str, str] | None = None,
    timeout: float = COMMAND_TIMEOUT,
) -> subprocess.CompletedProcess[bytes]:
    """Run a command to completion; on failure raise with the tail of its stderr.

    CalledProcessError's message has no output, and "exit status 1" alone is no reason to put in
    a benchmark report.
    """
    args = [os.fspath(a) for a in argv]
    try:
        done = subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=env if env is not None else client_env(),
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{' '.join(args)} did not finish within {timeout:.0f} s") from None
    if done.returncode != 0:
        err = (done.stderr or done.stdout).decode(errors="replace").strip()[-TAIL_CHARS:]
        raise RuntimeError(f"{' '.join(args)} exited with {done.returncode}: {err}")
    return done


def peak_rss_kib(pid: int) -> int:
    """VmHWM: the most resident memory the process ever had (Linux only)."""
    return _status_kib(pid, "VmHWM:")


def rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmRSS:")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far, all its threads together
    (utime + stime of /proc/PID/stat; Linux only). Children are not counted."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) is in parentheses and may hold spaces: count fields after it.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {key} (not Linux?)")


@contextmanager
def docker_registry(workdir: Path) -> Iterator[str]:
    """The Debian `docker-registry` (distribution 2.8) serving from local disk; yields HOST:PORT."""
    with registry_process(workdir) as (host, _proc):
        yield host


@contextmanager
def registry_process(workdir: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`docker_registry`, also yielding the process (to read its memory).

    The storage is `workdir/registry-data` whatever the port, so a new process on the same
    workdir serves what an earlier one was given.
    """
    port = free_port()
    config = workdir / "registry.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {workdir / 'registry-data'}\nhttp:\n  addr: 127.0.0.1:{port}\n"
    )
    proc = subprocess.Popen(
        ["docker-registry", "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    with stopping(proc):
        wait_http(f"http://127.0.0.1:{port}/v2/", proc)
        yield f"127.0.0.1:{port}", proc


@contextmanager
def p2pimg_serve(
    home: Path, *, origin: str | None = None, log: Path | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`p2pimg serve` on a free loopback port; yields HOST:PORT and the process.

    `origin` overrides the default `file://$home/origin`; `log` keeps the server's stderr.
    """
    port = free_port()
    env = dict(os.environ, P2PIMG_HOME=str(home), P2PIMG_MDNS="0")  # benchmarks stay on loopback
    if origin is not None:
        env["P2PIMG_ORIGIN"] = origin
    with open(log or os.devnull, "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "p2pimg", "serve", "--listen", f"127.0.0.1:{port}"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    with stopping(proc):
        wait_http(f"http://127.0.0.1:{port}/v2/", proc)
        yield f"127.0.0.1:{port}", proc


# Plugins a throwaway containerd cannot use: CRI wants CNI and a kubelet; these snapshotters need
# kernel modules or special filesystems. Disabled, they keep the daemon's log to real problems.
_CONTAINERD_DISABLED = [
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper",
]


class Unavailable(RuntimeError):
    """A helper daemon cannot run on this machine; the message says why."""


@dataclass
class Containerd:
    address: Path

    def ctr(self, *args: str, namespace: str, timeout: float = COMMAND_TIMEOUT) -> bytes:
        argv = ["ctr", "--address", str(self.address), "--namespace", namespace, *args]
        return run(argv, timeout=timeout).stdout

    def drop_namespace(self, namespace: str) -> None:
        """Delete what a pull left in `namespace`, then the namespace (containerd's GC frees the
        blobs); best effort, since a leftover only costs disk."""
        try:
            digests = self.ctr("content", "ls", "--quiet", namespace=namespace).decode().split()
            if digests:
                self.ctr("content", "rm", *digests, namespace=namespace)
            run(["ctr", "--address", str(self.address), "namespaces", "rm", namespace])
        except RuntimeError:
            pass


@contextmanager
def containerd(workdir: Path, timeout: float = 20) -> Iterator[Containerd]:
    """A private containerd (own root, state and sockets under `workdir`); raises Unavailable.

    Its content sharing policy is "isolated": with the default "shared", a blob one namespace
    already fetched is linked into the next without any download, so a second timed pull would
    never reach its registry. Pull each time into a fresh namespace.
    """
    if missing := require("containerd", "ctr"):
        raise Unavailable(f"{' and '.join(missing)} not installed (apt-get install containerd)")
    base = workdir / "containerd"
    base.mkdir(parents=True, exist_ok=True)
    # A unix socket path must fit in sun_path (108 bytes); a deep workdir may not.
    sockdir = base
    if len(str(base / "containerd.sock.ttrpc")) > 100:
        sockdir = Path(tempfile.mkdtemp(prefix="p2pimg-ctd-", dir="/tmp"))
    address = sockdir / "containerd.sock"
    config = base / "config.toml"
    config.write_text(
        "version = 2\n"
        f"root = {json.dumps(str(base / 'root'))}\n"
        f"state = {json.dumps(str(base / 'state'))}\n"
        f"disabled_plugins = {json.dumps(_CONTAINERD_DISABLED)}\n"
        f"[grpc]\n  address = {json.dumps(str(address))}\n"
        f"[ttrpc]\n  address = {json.dumps(str(address) + '.ttrpc')}\n"
        '[debug]\n  level = "warn"\n'
        "[plugins]\n"
        '  [plugins."io.containerd.metadata.v1.bolt"]\n'
        '    content_sharing_policy = "isolated"\n'
        '  [plugins."io.containerd.internal.v1.opt"]\n'  # the default is /opt/containerd
        f"    path = {json.dumps(str(base / 'opt'))}\n"
    )
    log = base / "containerd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["containerd", "--config", str(config)], stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    try:
        with stopping(proc):
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise Unavailable(f"containerd exited with {proc.returncode}: {_tail(log)}")
                probe = subprocess.run(
                    ["ctr", "--address", str(address), "version"], capture_output=True, check=False
                )
                if probe.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    raise Unavailable(f"containerd did not answer within {timeout:.0f} s: {_tail(log)}")
                time.sleep(0.1)
            yield Containerd(address)
    finally:
        if sockdir != base:
            shutil.rmtree(sockdir, ignore_errors=True)


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()[-TAIL_CHARS:] or "(no output)"
    except OSError:
        return "(no log)"


def tool_version(tool: str, flag: str = "--version") -> str | None:
    """The first line `TOOL FLAG` prints, or None when the tool is missing or fails to say."""
    if shutil.which(tool) is None:
        return None
    try:
        done = subprocess.run([tool, flag], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.decode(errors="replace").strip().splitlines()
    return lines[0] if done.returncode == 0 and lines else None


S3_TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def moto_with_image(workdir: Path, layout: Path, ref: str) -> Iterator[str]:
    """A moto_server on loopback holding bucket "bench" with `layout` published as `ref`;
    yields the endpoint URL. The S3 test credentials are put in this process's environment."""
    os.environ.update(S3_TEST_CREDENTIALS)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with stopping(proc):
        wait_http(f"{endpoint}/moto-api/data.json", proc, timeout=30)
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "p2pimg",
                "publish",
                f"oci:{layout}:1",
                ref,
                "--origin",
                f"s3://bench?endpoint={endpoint}",
                "--home",
                str(workdir / "publisher"),
            ],
            check=True,
            capture_output=True,
            env=dict(os.environ, P2PIMG_MDNS="0"),
        )
        yield endpoint


@contextmanager
def ceiling_server(path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`tools/ceiling_server.py` serving `path` from memory for any GET: this machine's ceiling
    for a blob GET. Yields HOST:PORT and the process."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.ceiling_server", "--listen", f"127.0.0.1:{port}", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONPATH=str(_ROOT)),
    )
    with stopping(proc):
        wait_http(f"http://127.0.0.1:{port}/ready", proc)
        yield f"127.0.0.1:{port}", proc


@contextmanager
def fault_proxy(upstream: str, *args: str) -> Iterator[str]:
    """`tools/faultproxy.py` in front of `upstream`; yields its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tools.faultproxy",
            "--upstream",
            upstream,
            "--listen",
            f"127.0.0.1:{port}",
            *args,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONPATH=str(_ROOT)),
    )
    with stopping(proc):
        wait_http(f"{url}/__faultproxy/stats", proc, timeout=30)
        yield url
