"""Proves the namespace LAN harness (netns.py) before p2pimg tests rely on it.

Each property a multi-node test will lean on is checked directly: hosts reach each other over
the bridge and nothing else, multicast crosses the bridge, tbf shaping really limits a link
(and only the link it is put on), and a real `p2pimg serve` runs on a namespace address.
Helpers run as small Python programs inside the namespaces; their output is JSON or one line.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import netns
import pytest
from conftest import client_env
from netns import Host, LanFactory

pytestmark = pytest.mark.integration

# Imported by name so pytest finds the fixture in this module (conftest.py here is not ours).
lan_factory = netns.lan_factory

# Prints its port, then echoes one message per connection for argv[2] connections.
ECHO_SERVER = """
import socket, sys
srv = socket.create_server((sys.argv[1], 0))
srv.settimeout(20)
print(srv.getsockname()[1], flush=True)
for _ in range(int(sys.argv[2])):
    conn, _ = srv.accept()
    with conn:
        conn.settimeout(10)
        data = b""
        while not data.endswith(b"\\n"):
            chunk = conn.recv(1024)
            if not chunk:
                break
            data += chunk
        conn.sendall(data)
"""

# Sends a line to each addr:port in argv[2:], prints {target: reply}.
ECHO_CLIENT = """
import json, socket, sys
replies = {}
for target in sys.argv[2:]:
    host, port = target.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        conn.sendall(f"hello from {sys.argv[1]}\\n".encode())
        conn.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := conn.recv(1024):
            data += chunk
    replies[target] = data.decode()
print(json.dumps(replies))
"""

# Prints the outcome of one TCP connect: "connected" or the exception's class name.
CONNECT_PROBE = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
    print("connected")
except OSError as exc:
    print(type(exc).__name__)
"""

MCAST_GROUP = "239.255.77.77"
MCAST_PORT = 45454

# Joins the group without naming an interface (as naive code does; the harness's multicast
# route makes that pick eth0), prints "ready", then prints the first datagram as JSON.
MCAST_RECEIVER = """
import json, socket, struct, sys
group, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", port))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
             struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton("0.0.0.0")))
print("ready", flush=True)
s.settimeout(5)
data, src = s.recvfrom(2048)
print(json.dumps({"data": data.decode(), "src": src[0]}))
"""

# Sends a few copies (UDP gives no delivery guarantee; one is plenty on a bridge), TTL 1 as mDNS.
MCAST_SENDER = """
import socket, sys, time
group, port, msg = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
for _ in range(5):
    s.sendto(msg, (group, port))
    time.sleep(0.05)
"""

# Prints its port, accepts one connection, reads to EOF; prints bytes and seconds from the
# first byte to EOF (measured at the receiver, so the sender's socket buffers cannot flatter it).
SINK = """
import json, socket, sys, time
srv = socket.create_server((sys.argv[1], 0))
srv.settimeout(20)
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.settimeout(30)
total, start = 0, None
while chunk := conn.recv(1 << 16):
    if start is None:
        start = time.monotonic()
    total += len(chunk)
elapsed = time.monotonic() - start
conn.close()
print(json.dumps({"bytes": total, "seconds": elapsed}))
"""

SOURCE = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as conn:
    conn.settimeout(30)
    conn.sendall(bytes(int(sys.argv[3])))
    conn.shutdown(socket.SHUT_WR)
    while conn.recv(1024):  # wait for the sink to finish reading before exiting
        pass
"""

# GET url until it answers (at most argv[2] s); prints {"status", "api_version"} or {"error"}.
# No proxies: a proxy in the environment is unreachable from inside a namespace.
HTTP_POLL = """
import json, sys, time, urllib.error, urllib.request
url, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
while True:
    try:
        with opener.open(url, timeout=2) as resp:
            print(json.dumps({"status": resp.status,
                              "api_version": resp.headers.get("Docker-Distribution-API-Version")}))
            break
    except (urllib.error.URLError, OSError) as exc:
        if time.monotonic() > deadline:
            print(json.dumps({"error": repr(exc)}))
            break
        time.sleep(0.1)
"""


def start(host: Host, script: str, *args: str) -> tuple[subprocess.Popen[str], str]:
    """Start a helper script in `host` and return it with its first output line."""
    proc = host.popen(
        [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    first = proc.stdout.readline().strip()
    if not first:
        proc.wait(10)
        assert proc.stderr is not None
        pytest.fail(f"helper in {host} exited early: {proc.stderr.read()}")
    return proc, first


def finish(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return out


def transfer(src: Host, dst: Host, nbytes: int) -> tuple[float, float]:
    """Send `nbytes` over TCP from src to dst; return (Mbit/s, seconds) seen by the receiver."""
    sink, port = start(dst, SINK, dst.addr)
    sent = src.python(SOURCE, dst.addr, port, str(nbytes), capture_output=True, text=True)
    assert sent.returncode == 0, sent.stderr
    result = json.loads(finish(sink))
    assert result["bytes"] == nbytes
    seconds = float(result["seconds"])
    return nbytes * 8 / seconds / 1e6, seconds


def test_hosts_reach_each_other_over_the_bridge(lan_factory: LanFactory) -> None:
    lan = lan_factory(3)
    addrs = [h.addr for h in lan.hosts]
    assert len(set(addrs)) == 3 and all(a.startswith(f"10.{lan.octet}.0.") for a in addrs)
    servers = {h.addr: start(h, ECHO_SERVER, h.addr, "2") for h in lan.hosts}
    for host in lan.hosts:
        targets = [f"{addr}:{port}" for addr, (_, port) in servers.items() if addr != host.addr]
        result = host.python(ECHO_CLIENT, host.addr, *targets, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {t: f"hello from {host.addr}\n" for t in targets}
    for proc, _ in servers.values():
        finish(proc)
    if shutil.which("ping"):  # ICMP too, where the tool exists (it is not installed everywhere)
        for host in lan.hosts:
            for other in lan.hosts:
                ping = host.run(["ping", "-c1", "-W1", other.addr], capture_output=True, text=True)
                assert ping.returncode == 0, ping.stdout + ping.stderr


def test_host_cannot_reach_root_namespace(lan_factory: LanFactory) -> None:
    lan = lan_factory(1)
    host = lan.hosts[0]
    with socket.create_server(("127.0.0.1", 0)) as root_service:
        port = root_service.getsockname()[1]
        probe = host.python(CONNECT_PROBE, "127.0.0.1", str(port), capture_output=True, text=True)
        assert probe.stdout.strip() == "ConnectionRefusedError", probe.stdout + probe.stderr
        root_service.setblocking(False)
        with pytest.raises(BlockingIOError):
            root_service.accept()  # nothing arrived at the root-namespace listener
    # No default route: traffic to anything beyond the LAN fails locally, it never leaves.
    routes = host.run([netns.IP, "-4", "route", "show"], capture_output=True, text=True, check=True)
    assert "default" not in routes.stdout
    assert lan.subnet in routes.stdout


def test_multicast_crosses_the_bridge(lan_factory: LanFactory) -> None:
    lan = lan_factory(3)
    sender, *receivers = lan.hosts
    procs = [start(r, MCAST_RECEIVER, MCAST_GROUP, str(MCAST_PORT))[0] for r in receivers]
    sent = sender.python(
        MCAST_SENDER, MCAST_GROUP, str(MCAST_PORT), "p2pimg-hello", capture_output=True, text=True
    )
    assert sent.returncode == 0, sent.stderr
    for proc in procs:
        got = json.loads(finish(proc))
        assert got == {"data": "p2pimg-hello", "src": sender.addr}
    link = sender.run([netns.IP, "link", "show", netns.HOST_IF], capture_output=True, text=True, check=True)
    assert "MULTICAST" in link.stdout


def test_tbf_limits_throughput(lan_factory: LanFactory) -> None:
    rate = 20.0
    lan = lan_factory(2, rate_mbit=rate)
    a, b = lan.hosts
    nbytes = 2 * 1024 * 1024
    shaped, seconds = transfer(a, b, nbytes)
    print(f"\ntbf {rate:g} Mbit/s: {nbytes} B in {seconds:.3f} s = {shaped:.1f} Mbit/s")
    # Loose bounds: the rate is clearly capped, and the link still works at a sane speed.
    assert shaped < 2 * rate
    assert shaped > rate / 4
    a.unshape()
    b.unshape()
    unshaped, seconds = transfer(a, b, nbytes)
    print(f"unshaped: {nbytes} B in {seconds:.3f} s = {unshaped:.1f} Mbit/s")
    assert unshaped > 2 * rate


def test_origin_uplink_is_shaped_separately(lan_factory: LanFactory) -> None:
    netns.require_shaping()
    lan = lan_factory(2)
    origin_rate = 10.0
    origin = lan.add_origin_host(rate_mbit=origin_rate)
    assert origin.addr not in {h.addr for h in lan.hosts}
    assert origin.addr.startswith(f"10.{lan.octet}.0.")
    nbytes = 1024 * 1024
    from_origin, seconds = transfer(origin, lan.hosts[0], nbytes)
    print(f"\norigin uplink {origin_rate:g} Mbit/s: {nbytes} B in {seconds:.3f} s = {from_origin:.1f} Mbit/s")
    assert origin_rate / 4 < from_origin < 2 * origin_rate
    peer, seconds = transfer(lan.hosts[0], lan.hosts[1], nbytes)
    print(f"peer to peer (unshaped): {nbytes} B in {seconds:.3f} s = {peer:.1f} Mbit/s")
    assert peer > 2 * origin_rate


def test_p2pimg_serve_on_a_namespace_address(lan_factory: LanFactory, tmp_path: Path) -> None:
    lan = lan_factory(2)
    server, client = lan.hosts
    home = tmp_path / "home"
    home.mkdir()
    log = tmp_path / "serve.log"
    listen = f"{server.addr}:5050"  # each namespace has its own port space: no clash possible
    with log.open("wb") as out:
        proc = server.popen(
            [sys.executable, "-m", "p2pimg", "serve", "--listen", listen],
            env=client_env(P2PIMG_HOME=str(home), PYTHONUNBUFFERED="1"),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    polled = client.python(HTTP_POLL, f"http://{listen}/v2/", "20", capture_output=True, text=True)
    assert polled.returncode == 0, polled.stderr
    answer = json.loads(polled.stdout)
    assert answer == {"status": 200, "api_version": "registry/2.0"}, log.read_text()[-4000:]
    # From its own loopback the server's address-bound listener is not there.
    probe = client.python(CONNECT_PROBE, "127.0.0.1", "5050", capture_output=True, text=True)
    assert probe.stdout.strip() == "ConnectionRefusedError"
    proc.terminate()
    assert proc.wait(10) == 0, log.read_text()[-4000:]
