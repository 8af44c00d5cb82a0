"""Two real Discovery instances find each other over mDNS, and see each other leave.

Multicast on `lo` does not reliably work, so each side runs in its own network namespace, the two
joined by a veth pair created directly inside them (nothing is configured outside them). The
addresses 10.77.0.1 and 10.77.0.2 exist only on that pair; all traffic stays on it.

Each side is this very file run as a script (`peer` mode) under `ip netns exec`: it advertises
and browses, prints its peer set as a JSON line on every change, and stops on a line from stdin.
Skipped when namespaces cannot be created (not root, no CAP_SYS_ADMIN, no veth) or when multicast
does not cross the veth pair.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import queue
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

PREFIX = 24
ADDR_A = "10.77.0.1"
ADDR_B = "10.77.0.2"
PORT_A = 5051
PORT_B = 5052
URL_A = f"http://{ADDR_A}:{PORT_A}"
URL_B = f"http://{ADDR_B}:{PORT_B}"
# Registration probes for ~1.5 s and the first browse answers come right after; 10 s is generous.
DISCOVERY_TIMEOUT = 10.0
# Goodbye packets make a peer expire one second after it leaves.
WITHDRAWAL_TIMEOUT = 5.0
STOP_TIMEOUT = 10.0
# Administratively scoped group for the multicast probe, distinct from mDNS's own.
PROBE_GROUP = "239.255.77.77"
PROBE_PORT = 15353

_THIS = Path(__file__).resolve()


# --- the namespaces ----------------------------------------------------------------------------


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


@dataclass(frozen=True)
class Link:
    """Two namespaces joined by a veth pair, each end with one address."""

    ns_a: str
    ns_b: str


def _child_env() -> dict[str, str]:
    # The developer's own p2pimg settings must not leak into the children.
    return {k: v for k, v in os.environ.items() if not k.startswith("P2PIMG_")}


def _multicast_works(link: Link) -> str | None:
    """None if a multicast datagram from A reaches B over the veth pair, else why not."""
    recv = subprocess.Popen(
        ["ip", "netns", "exec", link.ns_b, sys.executable, str(_THIS), "mcast-recv", ADDR_B],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_child_env(),
    )
    try:
        assert recv.stdout is not None
        if recv.stdout.readline().strip() != "ready":
            return f"multicast probe receiver did not start: {recv.communicate(timeout=5)[1]}"
        send = subprocess.run(
            ["ip", "netns", "exec", link.ns_a, sys.executable, str(_THIS), "mcast-send", ADDR_A],
            capture_output=True,
            text=True,
            timeout=30,
            env=_child_env(),
            check=False,
        )
        if send.returncode != 0:
            return f"multicast probe sender failed: {send.stderr.strip()}"
        out, err = recv.communicate(timeout=10)
        if "got" not in out:
            return f"multicast does not cross the veth pair: {err.strip() or 'nothing received'}"
        return None
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()


@pytest.fixture(scope="module")
def link() -> Iterator[Link]:
    if shutil.which("ip") is None:
        pytest.skip("the `ip` tool (iproute2) is not installed")
    tag = f"{os.getpid()}-{secrets.token_hex(3)}"  # unique per run: parallel runs must not collide
    ns_a, ns_b = f"p2pimg-mdns-a-{tag}", f"p2pimg-mdns-b-{tag}"
    veth_a, veth_b = f"p2pa{tag[-6:]}", f"p2pb{tag[-6:]}"  # interface names: at most 15 chars
    created: list[str] = []
    try:
        for ns in (ns_a, ns_b):
            proc = _ip("netns", "add", ns, check=False)
            if proc.returncode != 0:
                pytest.skip(
                    f"cannot create a network namespace (needs root/CAP_SYS_ADMIN): {proc.stderr.strip()}"
                )
            created.append(ns)
        # Created inside ns_a with its peer inside ns_b: the pair never exists in our namespace.
        proc = _ip(
            "-n",
            ns_a,
            "link",
            "add",
            veth_a,
            "type",
            "veth",
            "peer",
            "name",
            veth_b,
            "netns",
            ns_b,
            check=False,
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot create a veth pair: {proc.stderr.strip()}")
        for ns, dev, addr in ((ns_a, veth_a, ADDR_A), (ns_b, veth_b, ADDR_B)):
            _ip("-n", ns, "addr", "add", f"{addr}/{PREFIX}", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up", "multicast", "on")
            _ip("-n", ns, "link", "set", "lo", "up")
        result = Link(ns_a, ns_b)
        reason = _multicast_works(result)
        if reason is not None:
            pytest.skip(reason)
        yield result
    finally:
        for ns in reversed(created):
            _ip("netns", "del", ns, check=False)


# --- the peer processes ------------------------------------------------------------------------


@dataclass
class Peer:
    """A Discovery running in a child process inside a namespace."""

    name: str
    proc: subprocess.Popen[str]
    stderr_path: Path
    started_at: float
    events: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)
    urls: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:  # the only reader: closes the pipe at its end
            for line in self.proc.stdout:
                try:
                    self.events.put(json.loads(line))
                except ValueError:
                    self.events.put({"event": "garbage", "line": line})
        self.events.put({"event": "eof"})

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-4000:]

    def wait_until(self, what: str, predicate: Callable[[Peer], bool], timeout: float) -> float:
        """Wait for `predicate(self)` after some event; return the seconds it took."""
        start = time.monotonic()
        deadline = start + timeout
        while not predicate(self):
            remaining = deadline - time.monotonic()
            try:
                event = self.events.get(timeout=max(remaining, 0.0)) if remaining > 0 else None
            except queue.Empty:
                event = None
            if event is None:
                raise AssertionError(
                    f"{self.name}: not {what} after {timeout:.0f}s; last peers {self.urls}\n"
                    f"events: {self.history}\n--- stderr ---\n{self.log()}"
                )
            self.history.append(event)
            if event["event"] == "peers":
                self.urls = event["urls"]
            elif event["event"] == "eof" and not predicate(self):
                raise AssertionError(
                    f"{self.name}: exited ({self.proc.wait()}) before {what}\n--- stderr ---\n{self.log()}"
                )
        return time.monotonic() - start

    def stop(self) -> int:
        """Ask the peer to stop (cancelling its Discovery) and wait for it to exit."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write("stop\n")
            self.proc.stdin.close()
        except OSError:
            pass  # already gone: wait() reports how it ended
        try:
            return self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"{self.name}: still running {STOP_TIMEOUT:.0f}s after stop\n{self.log()}"
            ) from None


@pytest.fixture
def start_peer(tmp_path: Path) -> Iterator[Callable[..., Peer]]:
    peers: list[Peer] = []

    def start(name: str, ns: str, advertise: str, interfaces: list[str] | None = None) -> Peer:
        argv = [
            "ip",
            "netns",
            "exec",
            ns,
            sys.executable,
            str(_THIS),
            "peer",
            "--node",
            f"node-{name}",
            "--advertise",
            advertise,
        ]
        for interface in interfaces or ():
            argv += ["--interface", interface]
        stderr_path = tmp_path / f"{name}.stderr.log"
        with stderr_path.open("w") as err:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                bufsize=1,
                env=_child_env(),
            )
        peer = Peer(name, proc, stderr_path, time.monotonic())
        threading.Thread(target=peer._read, daemon=True).start()
        peers.append(peer)
        return peer

    try:
        yield start
    finally:
        for peer in peers:
            if peer.proc.poll() is None:
                peer.proc.kill()
                peer.proc.wait()
            assert peer.proc.stdin is not None
            # stop() closes it, unless the test ended before that or the child was gone already.
            with contextlib.suppress(OSError):  # flushing what a dead child did not take
                peer.proc.stdin.close()


def _first(peer: Peer, kind: str, match: Callable[[dict[str, Any]], bool] = lambda e: True) -> float:
    """Child-side time of the first `kind` event that matches."""
    return min(float(e["t"]) for e in peer.history if e["event"] == kind and match(e))


def _start_pair(link: Link, start_peer: Callable[..., Peer]) -> tuple[Peer, Peer]:
    # A enumerates the namespace's addresses itself; B is told which one to use.
    a = start_peer("a", link.ns_a, f"0.0.0.0:{PORT_A}")
    b = start_peer("b", link.ns_b, f"0.0.0.0:{PORT_B}", interfaces=[ADDR_B])
    return a, b


def test_two_peers_find_each_other(link: Link, start_peer: Callable[..., Peer]) -> None:
    a, b = _start_pair(link, start_peer)
    a.wait_until(f"seeing {URL_B}", lambda p: URL_B in p.urls, DISCOVERY_TIMEOUT)
    b.wait_until(f"seeing {URL_A}", lambda p: URL_A in p.urls, DISCOVERY_TIMEOUT)
    # Neither sees itself, and there is nobody else on this link.
    assert a.urls == [URL_B]
    assert b.urls == [URL_A]
    found = max(
        _first(a, "peers", lambda e: URL_B in e["urls"]), _first(b, "peers", lambda e: URL_A in e["urls"])
    )
    started = max(_first(a, "started"), _first(b, "started"))
    print(
        f"processes up {started - min(a.started_at, b.started_at):.1f}s after spawn (imports, probing); "
        f"mutual discovery {found - started:.1f}s after both were started"
    )
    assert a.stop() == 0, a.log()
    assert b.stop() == 0, b.log()


def test_a_stopped_peer_disappears(link: Link, start_peer: Callable[..., Peer]) -> None:
    a, b = _start_pair(link, start_peer)
    a.wait_until(f"seeing {URL_B}", lambda p: URL_B in p.urls, DISCOVERY_TIMEOUT)
    stopping = time.monotonic()
    assert b.stop() == 0, b.log()
    stopped = time.monotonic() - stopping
    a.wait_until(f"rid of {URL_B}", lambda p: URL_B not in p.urls, WITHDRAWAL_TIMEOUT)
    gone = _first(a, "peers", lambda e: e["t"] > stopping and URL_B not in e["urls"]) - stopping
    print(
        f"b exited {stopped * 1000:.0f} ms after the stop request; "
        f"a dropped it {gone * 1000:.0f} ms after the request"
    )
    assert a.urls == []
    assert a.stop() == 0, a.log()


# --- the child side (run as a script inside a namespace) -------------------------------------


async def _peer_main(node: str, advertise: str, interfaces: list[str] | None) -> None:
    import trio

    from p2pimg.node.discovery import Discovery

    host, _, port = advertise.rpartition(":")
    discovery = Discovery(node_id=node, advertise=(host, int(port)), interfaces=interfaces)

    def emit(**event: Any) -> None:
        # CLOCK_MONOTONIC is system-wide on Linux: the parent can compare these with its own clock.
        print(json.dumps({**event, "t": time.monotonic()}), flush=True)

    async def report() -> None:
        while True:
            emit(event="peers", urls=[p.url for p in discovery.peers()])
            await discovery.changed()

    async with trio.open_nursery() as nursery:
        await nursery.start(discovery.run)
        emit(event="started")
        nursery.start_soon(report)
        # Any line (or EOF) on stdin means stop; abandon_on_cancel: the read never returns otherwise.
        await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        nursery.cancel_scope.cancel()
    emit(event="stopped")


def _mcast_recv(addr: str) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("", PROBE_PORT))
    sock.setsockopt(
        socket.IPPROTO_IP,
        socket.IP_ADD_MEMBERSHIP,
        struct.pack("4s4s", socket.inet_aton(PROBE_GROUP), socket.inet_aton(addr)),
    )
    sock.settimeout(5)
    print("ready", flush=True)
    try:
        sock.recvfrom(64)
        print("got", flush=True)
    except TimeoutError:
        print("timeout", file=sys.stderr, flush=True)


def _mcast_send(addr: str) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(addr))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)  # link-local: never routed
    for _ in range(5):  # bounded: the receiver may still be joining the group
        sock.sendto(b"probe", (PROBE_GROUP, PROBE_PORT))
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="mode", required=True)
    peer = sub.add_parser("peer")
    peer.add_argument("--node", required=True)
    peer.add_argument("--advertise", required=True)
    peer.add_argument("--interface", action="append")
    sub.add_parser("mcast-recv").add_argument("addr")
    sub.add_parser("mcast-send").add_argument("addr")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    if args.mode == "peer":
        import trio

        trio.run(_peer_main, args.node, args.advertise, args.interface)
    elif args.mode == "mcast-recv":
        _mcast_recv(args.addr)
    else:
        _mcast_send(args.addr)


if __name__ == "__main__":
    main()
