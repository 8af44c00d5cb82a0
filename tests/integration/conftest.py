"""Fixtures that run real daemons and real clients on loopback for the integration tests.

Every daemon (the reference `docker-registry`, `containerd`, `p2pimg serve`) listens on
127.0.0.1 only, gets a fresh free port or a private unix socket, keeps all of its state in
pytest temp dirs, and is always torn down: SIGTERM first, SIGKILL if it does not go away.
Startup is bounded: we poll for readiness for at most `STARTUP_TIMEOUT` seconds and fail (or
skip, for optional clients) with the daemon's own log output when it never becomes ready.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import pytest

from p2pimg.ops.sample import LayerSpec, SampleImage, write_docker_archive, write_oci_layout

STARTUP_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
# Generous per-command bound: a hung client must fail the test, never hang the whole run.
COMMAND_TIMEOUT = 300.0
# Tail of a log or output that goes into a failure message; whole logs drown the real error.
TAIL_CHARS = 4000

_HERE = Path(__file__).resolve().parent
# For paths with a length limit (unix sockets, podman's runroot): $TMPDIR may be deep.
_SHORT_TMP = "/tmp" if os.path.isdir("/tmp") else None

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A `pytestmark` in conftest.py does not apply to test modules, so mark by location:
    # everything under tests/integration starts real processes.
    for item in items:
        if _HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.integration)


# --------------------------------------------------------------------------------------------
# Processes and commands
# --------------------------------------------------------------------------------------------


def _tail(text: str, limit: int = TAIL_CHARS) -> str:
    return text if len(text) <= limit else "[...]\n" + text[-limit:]


def client_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: ours, minus proxies, plus `extra`.

    Tests must only talk to 127.0.0.1; dropping proxy settings guarantees no client routes a
    loopback request through some proxy elsewhere. P2PIMG_* is dropped so the developer's own
    p2pimg state can never leak into a test.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.lower().endswith("_proxy") and not k.startswith("P2PIMG_")
    }
    # mDNS would send multicast on the machine's real interfaces: only the tests that create
    # their own network namespaces turn it back on, there.
    env["P2PIMG_MDNS"] = "0"
    env.update(extra)
    return env


def run_command(
    argv: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    env: dict[str, str] | None = None,
    timeout: float = COMMAND_TIMEOUT,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion and capture its output.

    Output is captured as bytes and decoded with surrogateescape, which is lossless: callers
    that need the exact bytes (e.g. a raw manifest) re-encode with surrogateescape.
    With check=True a non-zero exit fails the test with the command's stdout and stderr.
    """
    args = [os.fspath(a) for a in argv]
    try:
        proc = subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=env if env is not None else client_env(),
            timeout=timeout,
            cwd=cwd,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace")
        err = (exc.stderr or b"").decode(errors="replace")
        raise AssertionError(
            f"command timed out after {timeout:.0f}s: {' '.join(args)}\n"
            f"--- stdout ---\n{_tail(out)}\n--- stderr ---\n{_tail(err)}"
        ) from None
    result = subprocess.CompletedProcess(
        args,
        proc.returncode,
        proc.stdout.decode("utf-8", "surrogateescape"),
        proc.stderr.decode("utf-8", "surrogateescape"),
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"command failed with exit {result.returncode}: {' '.join(args)}\n"
            f"--- stdout ---\n{_tail(result.stdout)}\n--- stderr ---\n{_tail(result.stderr)}"
        )
    return result


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (callers retry if it got taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """Status of GET `url`, or None if nothing answers. Never goes through a proxy."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            status: int = resp.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


class StartupError(Exception):
    """A daemon died or never became ready; the message carries its log tail."""


class Daemon:
    """A background process whose stdout/stderr go to files (a full pipe would block it)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str | os.PathLike[str]],
        *,
        logdir: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = [os.fspath(a) for a in argv]
        logdir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = logdir / f"{name}.stdout.log"
        self.stderr_path = logdir / f"{name}.stderr.log"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env if env is not None else client_env(),
                # Own session: a Ctrl-C at the terminal must not reach the daemon directly;
                # teardown decides how it stops (and p2pimg's clean exit is asserted).
                start_new_session=True,
            )

    def output(self) -> str:
        parts = []
        for label, path in (("stderr", self.stderr_path), ("stdout", self.stdout_path)):
            with contextlib.suppress(OSError):
                parts.append(f"--- {label} ---\n{_tail(path.read_text(errors='replace'))}")
        return "\n".join(parts)

    def wait_ready(self, ready: Callable[[], bool], what: str, timeout: float = STARTUP_TIMEOUT) -> None:
        """Poll `ready` until it is true; raise StartupError if the process dies or time's up."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise StartupError(
                    f"{self.name} exited with {self.proc.returncode} before {what}\n"
                    f"command: {' '.join(self.argv)}\n{self.output()}"
                )
            if ready():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise StartupError(
                    f"{self.name} not {what} after {timeout:.0f}s\n"
                    f"command: {' '.join(self.argv)}\n{self.output()}"
                )
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> tuple[int, bool]:
        """Stop the process; return (exit status, whether it stopped without SIGKILL)."""
        if self.proc.poll() is not None:
            return self.proc.returncode, True
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout), True
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(), False


def start_on_free_port(
    name: str,
    launch: Callable[[int], Daemon],
    ready: Callable[[int], bool],
    attempts: int = 3,
) -> tuple[Daemon, int]:
    """Launch a daemon on a free port, retrying when another process grabbed the port first."""
    for attempt in range(attempts):
        port = free_port()
        daemon = launch(port)
        try:
            daemon.wait_ready(functools.partial(ready, port), f"listening on 127.0.0.1:{port}")
        except StartupError as exc:
            if "address already in use" in str(exc).lower() and attempt + 1 < attempts:
                continue
            raise
        return daemon, port
    raise AssertionError(f"unreachable: {name} start loop")  # pragma: no cover


def start_or_fail(
    what: str, name: str, launch: Callable[[int], Daemon], ready: Callable[[int], bool]
) -> tuple[Daemon, int]:
    """start_on_free_port, failing the test with the daemon's log if it cannot start."""
    try:
        return start_on_free_port(name, launch, ready)
    except StartupError as exc:
        message = f"{what}: {exc}"
    # Outside the except block, so the report is not cluttered by a chained traceback.
    pytest.fail(message, pytrace=False)


# --------------------------------------------------------------------------------------------
# Sample images
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """A generated sample image plus the name it is published and pushed under."""

    key: str
    image: SampleImage
    repo: str
    tag: str
    kind: str  # "oci" (an OCI layout) or "docker-archive" (a `docker save` tarball)
    media: str = "oci"  # media types inside an OCI layout: "oci" or "docker"

    @property
    def path(self) -> Path:
        return Path(self.image.path)

    @property
    def name_tag(self) -> str:
        return f"{self.repo}:{self.tag}"

    @property
    def source(self) -> str:
        """The SOURCE argument of `p2pimg publish`."""
        if self.kind == "docker-archive":
            return f"docker-archive:{self.path}"
        return f"oci:{self.path}:{self.tag}"

    def top_manifest(self) -> tuple[str, bytes]:
        """(mediaType, exact bytes) of the manifest or index that the tag points at."""
        index = json.loads((self.path / "index.json").read_bytes())
        for desc in index["manifests"]:
            if desc.get("annotations", {}).get("org.opencontainers.image.ref.name") == self.tag:
                return desc["mediaType"], self.blob(desc["digest"])
        raise AssertionError(f"tag {self.tag!r} not in {self.path}/index.json")

    @property
    def is_index(self) -> bool:
        return self.kind == "oci" and self.top_manifest()[0] in INDEX_TYPES

    def blob(self, digest: str) -> bytes:
        algo, _, hexpart = digest.partition(":")
        return (self.path / "blobs" / algo / hexpart).read_bytes()

    def platform_manifest(self, platform: str = "linux/amd64") -> dict[str, Any]:
        """The image manifest a single-platform client pulls for `platform`."""
        media_type, raw = self.top_manifest()
        doc: dict[str, Any] = json.loads(raw)
        if media_type not in INDEX_TYPES:
            return doc
        os_name, arch = platform.split("/")[:2]
        for desc in doc["manifests"]:
            plat = desc.get("platform", {})
            if plat.get("os") == os_name and plat.get("architecture") == arch:
                child: dict[str, Any] = json.loads(self.blob(desc["digest"]))
                return child
        raise AssertionError(f"{self.key}: no {platform} manifest in the index")

    def config_digest(self, platform: str = "linux/amd64") -> str:
        digest: str = self.platform_manifest(platform)["config"]["digest"]
        return digest


class SampleCache:
    """Sample images generated on first use and shared by the whole session.

    Generation is lazy so that e.g. `-k harness` never pays for the 70 MiB image.
    """

    # The OCI-layout samples that every client test runs against.
    OCI_KEYS = ("one_layer", "multi_layer", "multi_arch", "docker_types")

    def __init__(self, root: Path) -> None:
        self.root = root

    def get(self, key: str) -> Sample:
        sample = getattr(self, key)
        assert isinstance(sample, Sample), f"unknown sample {key!r}"
        return sample

    def _oci(
        self,
        key: str,
        layers: Sequence[LayerSpec],
        *,
        platforms: Sequence[str] = ("linux/amd64",),
        media: str = "oci",
        seed: int = 0,
    ) -> Sample:
        tag = "v1"
        image = write_oci_layout(
            self.root / key, layers, tag=tag, seed=seed, platforms=platforms, media=media
        )
        return Sample(key, image, f"samples/{key.replace('_', '-')}", tag, "oci", media)

    @cached_property
    def one_layer(self) -> Sample:
        return self._oci("one_layer", [LayerSpec(256 * 1024)], seed=1)

    @cached_property
    def multi_layer(self) -> Sample:
        layers = [
            LayerSpec(512 * 1024, "gzip", files=3),
            LayerSpec(128 * 1024, "none"),
            LayerSpec(1024 * 1024, "gzip", files=5),
            LayerSpec(1, "none"),
        ]
        return self._oci("multi_layer", layers, seed=2)

    @cached_property
    def multi_arch(self) -> Sample:
        layers = [LayerSpec(200 * 1024, "gzip"), LayerSpec(64 * 1024, "none", files=2)]
        return self._oci("multi_arch", layers, platforms=("linux/amd64", "linux/arm64"), seed=3)

    @cached_property
    def docker_types(self) -> Sample:
        layers = [LayerSpec(300 * 1024, "gzip"), LayerSpec(50 * 1024, "none")]
        return self._oci("docker_types", layers, media="docker", seed=4)

    @cached_property
    def big_layer(self) -> Sample:
        # 70 MiB of incompressible payload, stored uncompressed: the layer blob is larger than
        # one 64 MiB segment, so it must be split and reassembled across the boundary.
        return self._oci("big_layer", [LayerSpec(70 * 1024 * 1024, "none")], seed=5)

    @cached_property
    def docker_archive(self) -> Sample:
        dest = self.root / "docker_archive.tar"
        layers = [LayerSpec(256 * 1024, "none", files=2), LayerSpec(100 * 1024, "gzip")]
        image = write_docker_archive(dest, layers, repo_tag="demo/app:1", seed=6)
        return Sample("docker_archive", image, "samples/archive", "1", "docker-archive")


@pytest.fixture(scope="session")
def samples(tmp_path_factory: pytest.TempPathFactory) -> SampleCache:
    return SampleCache(tmp_path_factory.mktemp("samples"))


# --------------------------------------------------------------------------------------------
# skopeo / podman (containers/image clients)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContainersConfig:
    """Private containers/image configuration so the host's files cannot change results."""

    registries_conf: Path
    policy: Path

    def env(self) -> dict[str, str]:
        return client_env(CONTAINERS_REGISTRIES_CONF=str(self.registries_conf))


@pytest.fixture(scope="session")
def containers_config(tmp_path_factory: pytest.TempPathFactory) -> ContainersConfig:
    d = tmp_path_factory.mktemp("containers-config")
    registries = d / "registries.conf"
    # No search registries (a short name must never resolve to the internet) and loopback is
    # plain HTTP. Ports are dynamic, so the tests also pass --tls-verify=false explicitly.
    registries.write_text(
        'unqualified-search-registries = []\n\n[[registry]]\nlocation = "127.0.0.1"\ninsecure = true\n'
    )
    policy = d / "policy.json"
    policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    return ContainersConfig(registries, policy)


class Skopeo(Protocol):
    def __call__(
        self, *args: str | os.PathLike[str], check: bool = True
    ) -> subprocess.CompletedProcess[str]: ...


@pytest.fixture(scope="session")
def skopeo(containers_config: ContainersConfig) -> Skopeo:
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed (apt-get install skopeo)")
    env = containers_config.env()

    def run(*args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        # --insecure-policy: the signature policy is not under test, and the host's
        # /etc/containers/policy.json might reject unsigned loopback images.
        return run_command(["skopeo", "--insecure-policy", *args], check=check, env=env)

    return run


class Podman:
    """Runs podman as root with private, throwaway storage per `root` directory.

    vfs is the storage driver that works everywhere (no overlay mounts, no fuse), cgroupfs and
    the file events backend avoid needing systemd/journald, and every state directory podman
    would otherwise put under /run or /var/lib/containers is redirected below `root`.
    """

    def __init__(self, config: ContainersConfig, runroot_base: Path) -> None:
        self.config = config
        self.runroot_base = runroot_base
        self._runroots: dict[Path, Path] = {}

    def runroot(self, root: Path) -> Path:
        # podman refuses a --runroot longer than 50 characters (it must leave room for socket
        # paths below it), which pytest's tmp paths exceed, so each root gets a short one.
        root = root.resolve()
        if root not in self._runroots:
            self._runroots[root] = self.runroot_base / str(len(self._runroots))
        return self._runroots[root]

    def argv(self, root: Path) -> list[str]:
        return [
            "podman",
            "--storage-driver",
            "vfs",
            "--root",
            str(root / "storage"),
            "--runroot",
            str(self.runroot(root)),
            "--tmpdir",
            str(root / "tmp"),
            "--network-config-dir",
            str(root / "net"),
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
        ]

    def env(self, root: Path) -> dict[str, str]:
        root.mkdir(parents=True, exist_ok=True)
        storage_conf = root / "storage.conf"
        if not storage_conf.exists():
            # The host's storage.conf may carry overlay-only options that vfs rejects.
            storage_conf.write_text(
                f'[storage]\ndriver = "vfs"\ngraphroot = {json.dumps(str(root / "storage"))}\n'
                f"runroot = {json.dumps(str(self.runroot(root)))}\n"
            )
        env = self.config.env()
        env["CONTAINERS_STORAGE_CONF"] = str(storage_conf)
        return env

    def __call__(
        self, *args: str | os.PathLike[str], root: Path, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run_command([*self.argv(root), *args], check=check, env=self.env(root))

    def pull(self, ref: str, *, root: Path, platform: str = "linux/amd64") -> None:
        # Pin the platform so a multi-arch pull picks the same instance on any host.
        self(
            "pull",
            "--tls-verify=false",
            "--signature-policy",
            str(self.config.policy),
            "--platform",
            platform,
            ref,
            root=root,
        )

    def inspect(self, ref: str, *, root: Path) -> dict[str, Any]:
        out = self("image", "inspect", ref, root=root).stdout
        docs = json.loads(out)
        assert isinstance(docs, list) and len(docs) == 1, f"podman inspect {ref}: {out}"
        doc: dict[str, Any] = docs[0]
        return doc


@pytest.fixture(scope="session")
def podman(containers_config: ContainersConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (apt-get install podman)")
    runroot_base = Path(tempfile.mkdtemp(prefix="p2pimg-podman-", dir=_SHORT_TMP))
    try:
        runner = Podman(containers_config, runroot_base)
        probe = tmp_path_factory.mktemp("podman-probe")
        result = runner("info", root=probe, check=False)
        if result.returncode != 0:
            pytest.skip(
                f"podman cannot run here (`podman info` exit {result.returncode}):\n{_tail(result.stderr)}"
            )
        yield runner
    finally:
        shutil.rmtree(runroot_base, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Reference registry (Go distribution registry 2.8, Debian's docker-registry)
# --------------------------------------------------------------------------------------------


def _layout_as_dir_transport(sample: Sample, dest: Path) -> Path:
    """Copy the tagged image of an OCI layout into containers/image's `dir:` format.

    skopeo 1.9's `oci:` transport ignores index.json entries whose mediaType is not an OCI
    type, so it cannot read layouts holding Docker schema 2 manifests; `dir:` carries any
    manifest type byte for byte, which --preserve-digests then pushes unchanged.
    """
    dest.mkdir(parents=True, exist_ok=True)
    media_type, top = sample.top_manifest()
    (dest / "manifest.json").write_bytes(top)
    manifests = [json.loads(top)]
    if media_type in INDEX_TYPES:
        for desc in manifests[0]["manifests"]:
            raw = sample.blob(desc["digest"])
            (dest / f"{desc['digest'].partition(':')[2]}.manifest.json").write_bytes(raw)
            manifests.append(json.loads(raw))
    for doc in manifests:
        for desc in [*([doc["config"]] if "config" in doc else []), *doc.get("layers", [])]:
            # dir: names blobs by the bare hex digest.
            (dest / desc["digest"].partition(":")[2]).write_bytes(sample.blob(desc["digest"]))
    (dest / "version").write_text("Directory Transport Version: 1.1\n")
    return dest


@dataclass
class Registry:
    host: str
    root: Path
    daemon: Daemon
    _pushed: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def ref(self, sample: Sample) -> str:
        return f"{self.host}/{sample.name_tag}"

    def push(self, sample: Sample, skopeo: Skopeo) -> str:
        """Push `sample` digest-for-digest (once per session); return its reference."""
        if sample.key in self._pushed:
            return self._pushed[sample.key]
        assert sample.kind == "oci", f"{sample.key}: only OCI layouts are pushed"
        ref = self.ref(sample)
        if sample.media == "oci":
            src = f"oci:{sample.path}:{sample.tag}"
        else:
            src = f"dir:{_layout_as_dir_transport(sample, self.root.parent / f'dir-{sample.key}')}"
        all_flag = ["--all"] if sample.is_index else []
        skopeo(
            "copy",
            "--dest-tls-verify=false",
            "--preserve-digests",
            *all_flag,
            src,
            f"docker://{ref}",
        )
        self._pushed[sample.key] = ref
        return ref


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry is not installed (apt-get install docker-registry)")
    base = tmp_path_factory.mktemp("registry")
    storage = base / "storage"
    storage.mkdir()

    def launch(port: int) -> Daemon:
        config = base / "config.yml"
        # JSON strings are valid YAML scalars, so paths need no YAML-specific quoting.
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {json.dumps(str(storage))}\n"
            f"http:\n  addr: 127.0.0.1:{port}\n"
        )
        return Daemon("docker-registry", ["docker-registry", "serve", config], logdir=base)

    daemon, port = start_or_fail(
        "reference registry did not start",
        "docker-registry",
        launch,
        lambda p: http_status(f"http://127.0.0.1:{p}/v2/") == 200,
    )
    try:
        yield Registry(f"127.0.0.1:{port}", storage, daemon)
    finally:
        daemon.stop()


class PushReference(Protocol):
    def __call__(self, sample: Sample) -> str: ...


@pytest.fixture(scope="session")
def push_reference(registry: Registry, skopeo: Skopeo) -> PushReference:
    """Push a sample to the reference registry (cached); returns `HOST/NAME:TAG`."""

    def push(sample: Sample) -> str:
        return registry.push(sample, skopeo)

    return push


# --------------------------------------------------------------------------------------------
# containerd
# --------------------------------------------------------------------------------------------

# Plugins that cannot work in a throwaway daemon: CRI wants CNI and a kubelet; aufs, btrfs,
# zfs and devmapper need kernel modules, special filesystems or a configured thin pool. They
# would only log "skip"/"error", but disabling them keeps the log readable on failure.
_CONTAINERD_DISABLED = [
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper",
]


@dataclass
class Containerd:
    address: Path
    snapshotter: str
    daemon: Daemon

    def ctr(
        self, *args: str | os.PathLike[str], namespace: str = "test", check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run_command(
            ["ctr", "--address", str(self.address), "--namespace", namespace, *args],
            check=check,
        )

    @property
    def pull_flags(self) -> list[str]:
        """Flags every `ctr images pull` of a loopback registry needs."""
        return ["--plain-http", "--snapshotter", self.snapshotter]

    def content_digests(self, namespace: str) -> set[str]:
        out = self.ctr("content", "ls", "--quiet", namespace=namespace).stdout
        return {line.strip() for line in out.splitlines() if line.strip()}

    def image_targets(self, namespace: str) -> dict[str, tuple[str, str]]:
        """ref -> (target mediaType, target digest) from `ctr images ls`."""
        out = self.ctr("images", "ls", namespace=namespace).stdout
        targets: dict[str, tuple[str, str]] = {}
        for line in out.splitlines()[1:]:  # first line is the column header
            cols = line.split()
            if len(cols) >= 3:
                targets[cols[0]] = (cols[1], cols[2])
        return targets


def _snapshotter_status(address: Path) -> dict[str, str]:
    out = run_command(["ctr", "--address", str(address), "plugins", "ls"]).stdout
    status: dict[str, str] = {}
    for line in out.splitlines():
        cols = line.split()
        if len(cols) >= 4 and cols[0] == "io.containerd.snapshotter.v1":
            status[cols[1]] = cols[-1]
    return status


@pytest.fixture(scope="session")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    for tool in ("containerd", "ctr"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install containerd)")
    base = tmp_path_factory.mktemp("containerd")
    # A unix socket path must fit in sun_path (108 bytes); a deep --basetemp may not.
    sockdir = base
    if len(str(base / "containerd.sock.ttrpc")) > 100:
        sockdir = Path(tempfile.mkdtemp(prefix="p2pimg-ctd-", dir=_SHORT_TMP))
    address = sockdir / "containerd.sock"
    config = base / "config.toml"
    config.write_text(
        "version = 2\n"
        f"root = {json.dumps(str(base / 'root'))}\n"
        f"state = {json.dumps(str(base / 'state'))}\n"
        f"disabled_plugins = {json.dumps(_CONTAINERD_DISABLED)}\n"
        "[grpc]\n"
        f"  address = {json.dumps(str(address))}\n"
        "[ttrpc]\n"
        f"  address = {json.dumps(str(address) + '.ttrpc')}\n"
        "[debug]\n"
        '  level = "warn"\n'
        "[plugins]\n"
        '  [plugins."io.containerd.metadata.v1.bolt"]\n'
        # With the default "shared" policy a blob already fetched into one namespace is
        # linked into another without any download, so the second pull of a comparison would
        # never reach its registry. "isolated" makes every namespace fetch for itself.
        '    content_sharing_policy = "isolated"\n'
        # The default is /opt/containerd on the host.
        '  [plugins."io.containerd.internal.v1.opt"]\n'
        f"    path = {json.dumps(str(base / 'opt'))}\n"
    )
    daemon = Daemon("containerd", ["containerd", "--config", config], logdir=base)
    try:
        failure = None
        try:
            daemon.wait_ready(
                lambda: (
                    run_command(["ctr", "--address", str(address), "version"], check=False).returncode == 0
                ),
                "serving on its socket",
            )
        except StartupError as exc:
            failure = str(exc)
        if failure is not None:
            pytest.skip(f"containerd cannot start on this machine: {failure}")
        status = _snapshotter_status(address)
        # The overlayfs plugin mounts a test overlay in its root at startup and reports "ok"
        # only if that worked (it fails e.g. when the temp dir itself is on overlayfs).
        # native copies every layer but works on any filesystem.
        if status.get("overlayfs") == "ok":
            snapshotter = "overlayfs"
        elif status.get("native") == "ok":
            snapshotter = "native"
        else:
            pytest.skip(f"containerd has no usable snapshotter: {status}\n{daemon.output()}")
        yield Containerd(address, snapshotter, daemon)
    finally:
        daemon.stop()
        if sockdir != base:
            shutil.rmtree(sockdir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# p2pimg
# --------------------------------------------------------------------------------------------


class RunP2pimg(Protocol):
    def __call__(
        self,
        *args: str | os.PathLike[str],
        home: Path,
        check: bool = True,
        timeout: float = COMMAND_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]: ...


@pytest.fixture(scope="session")
def run_p2pimg() -> RunP2pimg:
    """Run `python -m p2pimg ...` with the venv's python and P2PIMG_HOME=home."""

    def run(
        *args: str | os.PathLike[str],
        home: Path,
        check: bool = True,
        timeout: float = COMMAND_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        env = client_env(P2PIMG_HOME=str(home))
        return run_command([sys.executable, "-m", "p2pimg", *args], check=check, env=env, timeout=timeout)

    return run


@pytest.fixture
def p2pimg_home(tmp_path: Path) -> Path:
    home = tmp_path / "p2pimg-home"
    home.mkdir()
    return home


@dataclass
class P2pimgServer:
    host: str
    home: Path
    daemon: Daemon

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.daemon.proc


class P2pimgServe(Protocol):
    def __call__(
        self, home: Path, origin: str | None = None, extra_args: Sequence[str] = ()
    ) -> P2pimgServer: ...


class _ServerPool:
    """Starts `p2pimg serve` processes and checks at teardown that each exits cleanly."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.servers: list[P2pimgServer] = []

    def start(self, home: Path, origin: str | None = None, extra_args: Sequence[str] = ()) -> P2pimgServer:
        env = client_env(P2PIMG_HOME=str(home), PYTHONUNBUFFERED="1")
        origin_args = ["--origin", origin] if origin is not None else []
        name = f"p2pimg-serve-{len(self.servers)}"

        def launch(port: int) -> Daemon:
            argv = [
                sys.executable,
                "-m",
                "p2pimg",
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                *origin_args,
                *extra_args,
            ]
            return Daemon(name, argv, logdir=self.logdir, env=env)

        daemon, port = start_or_fail(
            "p2pimg serve did not become ready",
            name,
            launch,
            lambda p: http_status(f"http://127.0.0.1:{p}/v2/") == 200,
        )
        server = P2pimgServer(f"127.0.0.1:{port}", home, daemon)
        self.servers.append(server)
        return server

    def stop_all(self) -> None:
        problems = []
        for server in self.servers:
            status, graceful = server.daemon.stop(signal.SIGTERM, STOP_TIMEOUT)
            if not graceful:
                problems.append(
                    f"{server.host}: still running {STOP_TIMEOUT:.0f}s after SIGTERM, killed\n"
                    f"{server.daemon.output()}"
                )
            elif status != 0:
                problems.append(
                    f"{server.host}: exited {status} after SIGTERM, expected 0\n{server.daemon.output()}"
                )
        if problems:
            pytest.fail("p2pimg serve did not shut down cleanly:\n" + "\n".join(problems))


@pytest.fixture
def p2pimg_serve(tmp_path: Path) -> Iterator[P2pimgServe]:
    """Factory: start `p2pimg serve` for a home dir; stopped (and exit 0 asserted) after."""
    pool = _ServerPool(tmp_path / "p2pimg-serve-logs")
    try:
        yield pool.start
    finally:
        pool.stop_all()


@pytest.fixture(scope="module")
def p2pimg_serve_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[P2pimgServe]:
    """Like `p2pimg_serve`, for servers shared by all tests of a module."""
    pool = _ServerPool(tmp_path_factory.mktemp("p2pimg-serve-logs"))
    try:
        yield pool.start
    finally:
        pool.stop_all()


# --------------------------------------------------------------------------------------------
# S3 origin (moto_server) and the misbehaving proxy in front of origins and peers
# --------------------------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[2]
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in AWS.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto_server (a real S3 server process) on loopback; yields its endpoint URL."""
    logdir = tmp_path_factory.mktemp("moto")

    def launch(port: int) -> Daemon:
        return Daemon(
            "moto",
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            logdir=logdir,
            env=client_env(**AWS),
        )

    daemon, port = start_or_fail(
        "moto_server did not start",
        "moto",
        launch,
        lambda p: http_status(f"http://127.0.0.1:{p}/moto-api/data.json") == 200,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        daemon.stop()


def make_bucket(moto: str) -> str:
    import boto3

    name = f"p2pimg-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@dataclass
class FaultProxy:
    """`tools/faultproxy.py` running in front of some HTTP server."""

    daemon: Daemon
    endpoint: str

    def stats(self) -> dict[str, int]:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"{self.endpoint}/__faultproxy/stats", timeout=10) as r:
            stats: dict[str, int] = json.loads(r.read())
            return stats


@pytest.fixture
def fault_proxy(tmp_path: Path) -> Iterator[Callable[..., FaultProxy]]:
    """Factory: fault_proxy(upstream_url, *proxy_args) -> a running FaultProxy."""
    started: list[Daemon] = []

    def start(upstream: str, *args: str) -> FaultProxy:
        def launch(port: int) -> Daemon:
            argv = [
                sys.executable,
                "-m",
                "tools.faultproxy",
                "--upstream",
                upstream,
                "--listen",
                f"127.0.0.1:{port}",
                *args,
            ]
            return Daemon(
                f"faultproxy-{len(started)}",
                argv,
                logdir=tmp_path / "proxy-logs",
                env=client_env(PYTHONPATH=str(REPO_ROOT)),
            )

        daemon, port = start_or_fail(
            "fault proxy did not start",
            "faultproxy",
            launch,
            lambda p: http_status(f"http://127.0.0.1:{p}/__faultproxy/stats") == 200,
        )
        started.append(daemon)
        return FaultProxy(daemon, f"http://127.0.0.1:{port}")

    try:
        yield start
    finally:
        for daemon in started:
            daemon.stop()


def metric(host: str, name: str, **labels: str) -> float:
    """One sample from a p2pimg node's /metrics."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{host}/metrics", timeout=10) as r:
        text = r.read().decode()
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{want} not in /metrics")
