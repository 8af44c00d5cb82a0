"""A throwaway LAN made of Linux network namespaces, for running p2pimg nodes on real addresses.

Loopback-only setups cannot exercise what a real LAN does: every node on its own IP address,
multicast (mDNS discovery) between nodes, and links slower than memory. `Lan(n)` builds

    switch namespace:  br0 (bridge) <- one veth port per host
    host namespaces:   lo + eth0 = 10.<octet>.0.<i+1>/24, route 224.0.0.0/4 via eth0

Nothing is created in the root namespace: the bridge lives in a namespace of its own, so the
machine's real interfaces, routes and firewall are never touched, and hosts have no default
route, so nothing they send can leave the LAN. Every namespace name carries the creating
process's pid, and teardown deletes all of them even after a failure; namespaces left behind by
runs that were killed outright are swept at the next run.

Shared by the integration tests (`tests/integration/netns.py` adds the pytest fixture and the
skip helpers on top of this module) and the benchmarks (`bench/scenarios/`). Plain use:

    from tools.netns import lans, support

    if support().netns is None:
        with lans() as make:
            lan = make(3, rate_mbit=20)              # 3 hosts, each link shaped to 20 Mbit/s
            origin = lan.add_origin_host(rate_mbit=200)
            proc = lan.hosts[0].popen([sys.executable, "-m", "p2pimg", "serve", ...])

Needs root (CAP_SYS_ADMIN + CAP_NET_ADMIN), iproute2 and, for shaping, `tc` with the tbf qdisc
(netem is not assumed to exist). `support()` says why not when they are missing; building a Lan
then raises `NetnsUnavailable`.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

PREFIX = "p2pn"
# Second octet of the 10.x.0.0/24 subnet. Each Lan is its own L2 segment in private namespaces,
# so equal subnets in parallel runs could not actually collide; a distinct octet per live Lan
# only keeps addresses in logs and captures unambiguous.
SUBNET_OCTETS = range(100, 200)
MAX_HOSTS = 100  # hosts get .1 - .100
ORIGIN_BASE = 200  # origin hosts get .201 - .250
MAX_ORIGINS = 50
HOST_IF = "eth0"
BRIDGE = "br0"
MULTICAST_NET = "224.0.0.0/4"
DEFAULT_LATENCY_MS = 50.0
IP_TIMEOUT = 15.0  # one `ip`/`tc` call; they take milliseconds unless the kernel is wedged
RUN_TIMEOUT = 60.0  # default bound for Host.run: a hung command must fail its caller, not hang it
STOP_TIMEOUT = 5.0

_PIDNS = os.stat("/proc/self/ns/pid").st_ino if os.path.exists("/proc/self/ns/pid") else 0
# <prefix>-<pid namespace inode>-<pid>-<octet>-<role>. The pid-namespace inode lets the stale
# sweep tell "owner is dead" from "owner lives in another container sharing /run/netns".
_NAME_RE = re.compile(rf"^{PREFIX}-(\d+)-(\d+)-(\d+)-(sw|probe|[ho]\d+)$")

Direction = Literal["both", "up", "down"]


class NetnsUnavailable(RuntimeError):
    """This machine cannot create namespaces (or shape links); tests skip, benchmarks report why."""


class NetnsError(RuntimeError):
    """An `ip`/`tc` command failed while building or tearing down a Lan."""


def _find_tool(name: str) -> str | None:
    # /usr/sbin is often missing from PATH outside login shells, and `ip` lives there.
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/sbin", "/usr/bin", "/bin"):
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


_IP = _find_tool("ip")
IP = _IP or "ip"  # for callers that run `ip` inside a host, e.g. host.run([netns.IP, "route"])
_TC = _find_tool("tc")
_SYSCTL = _find_tool("sysctl")


def _cmd(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=IP_TIMEOUT)
    if check and result.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    assert _IP is not None
    return _cmd([_IP, *args], check=check)


def _tc(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    assert _TC is not None
    return _cmd([_TC, "-n", ns, *args], check=check)


def _list_netns() -> list[str]:
    # Lines look like "name (id: 3)" or just "name".
    out = _ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _running(pid: int) -> bool:
    """Alive and not a zombie: an orphan we killed may wait a while for its new parent to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # State is the field after "(comm)"; comm itself may contain spaces or parentheses.
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _capabilities_missing() -> str | None:
    """Cheap pre-check from /proc so the usual non-root case skips with a precise reason."""
    try:
        with open("/proc/self/status") as status:
            line = next(x for x in status if x.startswith("CapEff:"))
    except (OSError, StopIteration):
        return None  # cannot tell; the trial below decides
    eff = int(line.split()[1], 16)
    missing = [name for bit, name in ((21, "CAP_SYS_ADMIN"), (12, "CAP_NET_ADMIN")) if not eff >> bit & 1]
    return f"missing {' and '.join(missing)} (run as root)" if missing else None


@dataclass(frozen=True)
class Support:
    """None means available; otherwise why not."""

    netns: str | None
    shaping: str | None


@functools.cache
def support() -> Support:
    """Probe once per process (a pytest session, a benchmark run) whether namespaces and tbf work here.

    A real trial, not just a capability check: containers may grant CAP_SYS_ADMIN yet forbid
    mounting /run/netns, and kernels may lack the bridge, veth or tbf modules.
    """
    if not sys.platform.startswith("linux"):
        return Support("network namespaces need Linux", "network namespaces need Linux")
    if _IP is None:
        return Support("iproute2 `ip` not found", "iproute2 `ip` not found")
    reason = _capabilities_missing()
    if reason:
        return Support(reason, reason)
    probe = f"{PREFIX}-{_PIDNS}-{os.getpid()}-0-probe"
    try:
        _ip("netns", "add", probe)
    except (NetnsError, OSError, subprocess.TimeoutExpired) as exc:
        return Support(f"cannot create a network namespace: {exc}", "no network namespaces")
    try:
        try:
            _ip("-n", probe, "link", "add", "pbr", "type", "bridge")
            _ip("-n", probe, "link", "add", "pa", "type", "veth", "peer", "name", "pb")
        except (NetnsError, subprocess.TimeoutExpired) as exc:
            return Support(f"cannot create a bridge/veth pair in a namespace: {exc}", "no veth")
        if _TC is None:
            return Support(None, "`tc` not found (iproute2)")
        try:
            _tc(
                probe,
                "qdisc",
                "add",
                "dev",
                "pa",
                "root",
                "tbf",
                "rate",
                "1mbit",
                "burst",
                "16kb",
                "latency",
                "50ms",
            )
        except (NetnsError, subprocess.TimeoutExpired) as exc:
            return Support(None, f"tbf qdisc unavailable: {exc}")
        return Support(None, None)
    finally:
        _ip("netns", "del", probe, check=False)


@functools.cache
def sweep_stale() -> list[str]:
    """Delete namespaces of ours whose creating process is dead (a run killed by SIGKILL/OOM).

    Only names from our pid namespace are considered: a pid from another container's pid
    namespace says nothing about whether that run is alive. Processes still inside a stale
    namespace are orphans of that dead run (nothing else enters these namespaces); they are
    ended first, since a namespace, its veths and its bridge live on until its last process
    exits, unreachable once the name is gone.
    """
    removed = []
    for name in _list_netns():
        match = _NAME_RE.match(name)
        if not match or int(match[1]) != _PIDNS:
            continue
        pid = int(match[2])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        _kill_ns_pids(name)
        if _ip("netns", "del", name, check=False).returncode == 0:
            removed.append(name)
    return removed


def _octets_in_use() -> set[int]:
    used = set()
    for name in _list_netns():
        match = _NAME_RE.match(name)
        if match:
            used.add(int(match[3]))
    return used


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def _kill_ns_pids(ns: str) -> None:
    """End whatever still runs inside a namespace this Lan created (children of our processes).

    Without this a leftover daemon would keep the namespace, its veth and its address alive
    after `ip netns del`, invisibly, until it exited on its own.
    """
    result = _ip("netns", "pids", ns, check=False)
    pids = [int(p) for p in result.stdout.split() if p.isdigit() and int(p) != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + STOP_TIMEOUT / 2
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _running(p)]
            if pids:
                time.sleep(0.05)
        if not pids:
            return


class Host:
    """One machine on the Lan: a namespace with `lo` and `eth0` at `addr`."""

    def __init__(self, lan: Lan, name: str, ns: str, addr: str, switch_port: str) -> None:
        self.lan = lan
        self.name = name
        self.ns = ns
        self.addr = addr
        self.switch_port = switch_port  # this host's port on the bridge, in lan.switch_ns

    def __repr__(self) -> str:
        return f"Host({self.name}, {self.addr}, ns={self.ns})"

    def argv(self, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
        """`argv` wrapped to run inside this host's namespace."""
        assert _IP is not None
        return [_IP, "netns", "exec", self.ns, *(os.fspath(a) for a in argv)]

    def run(self, argv: Sequence[str | os.PathLike[str]], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """subprocess.run inside the namespace; `timeout` defaults to RUN_TIMEOUT."""
        kw.setdefault("timeout", RUN_TIMEOUT)
        return subprocess.run(self.argv(argv), **kw)

    def popen(self, argv: Sequence[str | os.PathLike[str]], **kw: Any) -> subprocess.Popen[Any]:
        """subprocess.Popen inside the namespace; stopped (TERM, then KILL) when the Lan closes.

        `ip netns exec` execs the command in place, so the Popen's pid is the command itself
        and signals reach it directly.
        """
        proc = subprocess.Popen(self.argv(argv), **kw)
        self.lan._procs.append(proc)
        return proc

    def python(self, code: str, *args: str, **kw: Any) -> subprocess.CompletedProcess[Any]:
        """Run a Python snippet (this interpreter, so the venv's packages) in the namespace."""
        return self.run([sys.executable, "-c", code, *args], **kw)

    def _devices(self, direction: Direction) -> list[tuple[str, str]]:
        # tbf only shapes egress, so the host's download is shaped on its bridge port instead.
        up = (self.ns, HOST_IF)
        down = (self.lan.switch_ns, self.switch_port)
        return {"both": [up, down], "up": [up], "down": [down]}[direction]

    def shape(
        self,
        rate_mbit: float,
        *,
        direction: Direction = "both",
        latency_ms: float = DEFAULT_LATENCY_MS,
        burst_bytes: int | None = None,
    ) -> None:
        """Limit this host's link to `rate_mbit` with tbf (replacing any earlier shaping).

        "up" is what the host sends, "down" what it receives. The default burst is 10 ms worth
        of traffic but at least 16 KiB: tbf needs more than one MTU plus a timer tick's worth
        to reach its rate, and a small burst keeps short transfers honest.
        """
        reason = support().shaping
        if reason:
            raise NetnsUnavailable(f"cannot shape links: {reason}")
        if rate_mbit <= 0:
            raise ValueError("rate_mbit must be positive")
        rate_kbit = max(1, round(rate_mbit * 1000))
        burst = burst_bytes or max(16 * 1024, rate_kbit * 1000 // 8 // 100)
        for ns, dev in self._devices(direction):
            _tc(
                ns,
                "qdisc",
                "replace",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                f"{rate_kbit}kbit",
                "burst",
                str(burst),
                "latency",
                f"{latency_ms:g}ms",
            )

    def unshape(self, direction: Direction = "both") -> None:
        """Remove shaping (back to the veth's default no-queue, i.e. memory speed)."""
        for ns, dev in self._devices(direction):
            # Fails harmlessly when there was no qdisc to delete.
            _tc(ns, "qdisc", "del", "dev", dev, "root", check=False)


_OPEN_LANS: set[Lan] = set()


@atexit.register
def _close_leftovers() -> None:
    # Safety net for Lans used without `with` or the fixture; SIGKILL is the sweep's job.
    for lan in list(_OPEN_LANS):
        lan.close()


class Lan:
    """`n` hosts on one bridge, optionally each shaped to `rate_mbit` in both directions.

    Context manager; `close()` is idempotent and also runs when setup fails halfway.
    """

    def __init__(
        self, n: int, rate_mbit: float | None = None, *, latency_ms: float = DEFAULT_LATENCY_MS
    ) -> None:
        if not 1 <= n <= MAX_HOSTS:
            raise ValueError(f"1 <= n <= {MAX_HOSTS}")
        self.n = n
        self.rate_mbit = rate_mbit
        self.latency_ms = latency_ms
        self.octet = 0
        self.switch_ns = ""
        self.hosts: list[Host] = []
        self.origins: list[Host] = []
        self._namespaces: list[str] = []  # creation order: switch first
        self._procs: list[subprocess.Popen[Any]] = []
        self._open = False

    @property
    def subnet(self) -> str:
        return f"10.{self.octet}.0.0/24"

    @property
    def all_hosts(self) -> list[Host]:
        return [*self.hosts, *self.origins]

    def __enter__(self) -> Lan:
        caps = support()
        if caps.netns:
            raise NetnsUnavailable(caps.netns)
        if self.rate_mbit is not None and caps.shaping:
            raise NetnsUnavailable(f"cannot shape links: {caps.shaping}")
        sweep_stale()
        self._open = True
        _OPEN_LANS.add(self)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        problems = self.close()
        # Never mask the caller's own failure with a teardown complaint.
        if problems and exc_type is None:
            raise NetnsError("Lan teardown incomplete:\n" + "\n".join(problems))

    def _ns_name(self, role: str) -> str:
        return f"{PREFIX}-{_PIDNS}-{os.getpid()}-{self.octet}-{role}"

    def _build(self) -> None:
        free = [o for o in SUBNET_OCTETS if o not in _octets_in_use()]
        self.octet = random.choice(free or list(SUBNET_OCTETS))
        self.switch_ns = self._ns_name("sw")
        _ip("netns", "add", self.switch_ns)
        self._namespaces.append(self.switch_ns)
        sw = self.switch_ns
        _ip("-n", sw, "link", "set", "lo", "up")
        # Snooping off: the bridge floods all multicast like a cheap home switch, so delivery
        # does not depend on IGMP reports and querier timing (there is no multicast router).
        _ip("-n", sw, "link", "add", BRIDGE, "type", "bridge", "mcast_snooping", "0")
        _ip("-n", sw, "link", "set", BRIDGE, "up")
        for i in range(self.n):
            self.hosts.append(self._add(f"h{i}", i + 1, self.rate_mbit))

    def _add(self, name: str, hostnum: int, rate_mbit: float | None) -> Host:
        if not self._open:
            raise RuntimeError("Lan is not open (use it as a context manager)")
        ns = self._ns_name(name)
        addr = f"10.{self.octet}.0.{hostnum}"
        port = f"p{name}"  # interface names are per-namespace, so short fixed names are safe
        _ip("netns", "add", ns)
        self._namespaces.append(ns)
        if _SYSCTL:
            # IPv6 duplicate address detection keeps link-local addresses "tentative" (unusable
            # for binding) for ~1-2 s after the link comes up; on a LAN we built there can be
            # no duplicates, and IPv6 mDNS should work immediately. Set on "default" before eth0
            # exists so it inherits the setting. Best effort: IPv6 may be disabled.
            subprocess.run(
                [_IP or "ip", "netns", "exec", ns, _SYSCTL, "-qw", "net.ipv6.conf.default.accept_dad=0"],
                capture_output=True,
                timeout=IP_TIMEOUT,
                check=False,
            )
        _ip("-n", self.switch_ns, "link", "add", port, "type", "veth", "peer", "name", HOST_IF, "netns", ns)
        _ip("-n", self.switch_ns, "link", "set", port, "multicast", "on", "master", BRIDGE, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", HOST_IF)
        _ip("-n", ns, "link", "set", HOST_IF, "multicast", "on", "up")
        # Hosts have no default route (nothing may leave the LAN), so without this route a
        # multicast send or IP_ADD_MEMBERSHIP that does not name an interface fails with
        # ENETUNREACH/ENODEV instead of going out of eth0 as on a normal machine.
        _ip("-n", ns, "route", "add", MULTICAST_NET, "dev", HOST_IF)
        host = Host(self, name, ns, addr, port)
        if rate_mbit is not None:
            host.shape(rate_mbit, latency_ms=self.latency_ms)
        return host

    def add_host(self, rate_mbit: float | None = None) -> Host:
        """One more ordinary host (next free .N), optionally shaped."""
        if len(self.hosts) >= MAX_HOSTS:
            raise ValueError(f"at most {MAX_HOSTS} hosts")
        host = self._add(f"h{len(self.hosts)}", len(self.hosts) + 1, rate_mbit)
        self.hosts.append(host)
        return host

    def add_origin_host(self, rate_mbit: float | None = None, *, direction: Direction = "both") -> Host:
        """A host standing in for a remote origin (.201, .202, ...), with its own uplink shaping.

        It is on the same bridge as the peers; only its own link is shaped, so peer-to-peer
        traffic stays fast while everything from the origin is limited to `rate_mbit`.
        """
        if len(self.origins) >= MAX_ORIGINS:
            raise ValueError(f"at most {MAX_ORIGINS} origin hosts")
        k = len(self.origins)
        host = self._add(f"o{k}", ORIGIN_BASE + 1 + k, None)
        self.origins.append(host)
        if rate_mbit is not None:
            host.shape(rate_mbit, direction=direction, latency_ms=self.latency_ms)
        return host

    def close(self) -> list[str]:
        """Stop our processes and delete every namespace; returns what could not be deleted."""
        _OPEN_LANS.discard(self)
        self._open = False
        problems: list[str] = []
        for proc in self._procs:
            try:
                _stop(proc)
            except Exception as exc:  # keep going: the namespaces must go regardless
                problems.append(f"stopping pid {proc.pid}: {exc!r}")
        self._procs.clear()
        # Hosts first (their veths vanish with them), then the switch.
        for ns in reversed(self._namespaces):
            try:
                _kill_ns_pids(ns)
                _ip("netns", "del", ns, check=False)
            except Exception as exc:
                problems.append(f"deleting {ns}: {exc!r}")
        with contextlib.suppress(Exception):
            left = set(_list_netns())
            problems += [f"namespace {ns} still exists" for ns in self._namespaces if ns in left]
        self._namespaces.clear()
        return problems


class LanFactory(Protocol):
    def __call__(
        self, n: int, rate_mbit: float | None = None, *, latency_ms: float = DEFAULT_LATENCY_MS
    ) -> Lan: ...


@contextlib.contextmanager
def lans() -> Iterator[LanFactory]:
    """A factory of open Lans, every one closed on exit (the pytest fixture `lan_factory` wraps it)."""
    with contextlib.ExitStack() as stack:

        def make(n: int, rate_mbit: float | None = None, *, latency_ms: float = DEFAULT_LATENCY_MS) -> Lan:
            return stack.enter_context(Lan(n, rate_mbit, latency_ms=latency_ms))

        yield make
