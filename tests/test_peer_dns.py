"""Peers named by DNS (`serve --peer-dns NAME[:PORT]`): the names parsed, the answers turned into
peer URLs, a round of lookups diffed against the swarm (with an injected resolver and node-id
probe), the lookups repeated over (virtual) time, the mDNS follower leaving DNS peers alone, and
two real nodes on loopback finding each other, and not themselves, through "localhost"."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trio

from p2pimg.cli.commands import _config
from p2pimg.cli.main import build_parser
from p2pimg.errors import InvalidInput
from p2pimg.node import dnspeers
from p2pimg.node.config import load_config, parse_peer_dns
from p2pimg.node.dnspeers import RESOLVE_TIMEOUT, DnsPeers, peer_urls, resolve_addresses
from p2pimg.node.node import Node, Swarm, open_node
from p2pimg.web.peerapi import PeerService
from p2pimg.web.server import serve_connection

# --- names and answers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("p2pimg-peers.p2pimg.svc.cluster.local:5051", ("p2pimg-peers.p2pimg.svc.cluster.local", 5051)),
        ("peers.example.", ("peers.example.", 5051)),
        ("localhost:7000", ("localhost", 7000)),
        ("10.0.0.5", ("10.0.0.5", 5051)),
        ("[fd00::5]:6000", ("fd00::5", 6000)),
        ("fd00::5", ("fd00::5", 5051)),
    ],
)
def test_names_are_parsed_with_the_default_peer_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_peer_dns(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "peers:", "peers:0", "peers:65536", "peers:x", "http://peers:5051", "a b", "-peers", "a..b", "1.2.3",
     "[fd00::5", "[10.0.0.5]:1", "[fd00::5]x", "a:b:c"],
)  # fmt: skip
def test_malformed_names_are_refused(text: str) -> None:
    with pytest.raises(InvalidInput, match="expected NAME"):
        parse_peer_dns(text)


def test_the_flag_and_config_toml_reach_the_config(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text('peer_dns = ["from-file.example", "other.example:6000"]\n')
    assert load_config(home=str(home)).peer_dns == (("from-file.example", 5051), ("other.example", 6000))
    # The command line wins over the file, as for every setting; repeats count once.
    args = build_parser().parse_args(
        ["serve", "--home", str(home), "--peer-dns", "a.example", "--peer-dns", "a.example:5051"]
    )
    assert _config(args).peer_dns == (("a.example", 5051),)
    (home / "config.toml").write_text('peer_dns = "not-a-list.example"\n')
    with pytest.raises(InvalidInput, match="peer_dns must be a list"):
        load_config(home=str(home))


def test_answers_become_peer_urls() -> None:
    answer = ["10.0.0.5", "fd00::5", "10.0.0.5", "0.0.0.0", "224.0.0.251", "fe80::1", "::1", "junk"]
    assert peer_urls(answer, 5051) == [
        "http://10.0.0.5:5051",
        "http://[fd00::5]:5051",
        "http://[::1]:5051",
    ]
    assert peer_urls(["10.0.0.5"], 6000, "https") == ["https://10.0.0.5:6000"]


async def test_the_system_resolver_gives_localhost_and_no_such_name_is_an_empty_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert "127.0.0.1" in await resolve_addresses("localhost", 5051)

    # Names are not looked up beyond this machine in tests: the resolver's errors are simulated.
    def failing_with(errno: int) -> object:
        async def getaddrinfo(*_args: object, **_kwargs: object) -> object:
            raise socket.gaierror(errno, "simulated")

        return getaddrinfo

    for errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
        monkeypatch.setattr(trio.socket, "getaddrinfo", failing_with(errno))
        assert await resolve_addresses("gone.example", 5051) == []  # the name has no peers now
    monkeypatch.setattr(trio.socket, "getaddrinfo", failing_with(socket.EAI_AGAIN))
    with pytest.raises(OSError):  # the lookup failed: nothing is known
        await resolve_addresses("flaky.example", 5051)


# --- one round of lookups against a swarm -----------------------------------------------------------


@dataclass
class FakePeer:
    node_id: str | None


@dataclass
class FakeSwarm:
    own_id: str = "me"
    tls: bool = False
    client: httpx.AsyncClient | None = None
    peers: dict[str, FakePeer] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)

    def add(self, url: str, peer_node: str | None = None) -> bool:
        assert peer_node != self.own_id
        self.peers.setdefault(url, FakePeer(peer_node))
        self.log.append(f"+{url}")
        return True

    def remove(self, url: str) -> None:
        del self.peers[url]
        self.log.append(f"-{url}")


class World:
    """What DNS answers (or raises) per name, and which node answers at which URL."""

    def __init__(self) -> None:
        self.dns: dict[str, Sequence[str] | Exception] = {}
        self.nodes: dict[str, str] = {}  # URL -> node id; absent: does not answer
        self.probed: list[str] = []
        self.lookups = 0

    async def resolve(self, name: str, port: int) -> Sequence[str]:
        self.lookups += 1
        answer = self.dns[name]
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def probe(self, url: str) -> str | None:
        self.probed.append(url)
        return self.nodes.get(url)


def dns_peers(world: World, swarm: FakeSwarm, *names: tuple[str, int]) -> DnsPeers:
    return DnsPeers(swarm, names or (("peers", 5051),), resolve=world.resolve, probe=world.probe)


async def test_a_round_takes_other_nodes_skips_itself_and_drops_what_the_answer_lost() -> None:
    world, swarm = World(), FakeSwarm()
    world.dns["peers"] = ["10.0.0.1", "10.0.0.2", "10.0.0.9"]  # .9 is this node
    world.nodes = {"http://10.0.0.1:5051": "a", "http://10.0.0.2:5051": "b", "http://10.0.0.9:5051": "me"}
    dns = dns_peers(world, swarm)
    assert await dns.refresh()
    assert {u: p.node_id for u, p in swarm.peers.items()} == {
        "http://10.0.0.1:5051": "a",
        "http://10.0.0.2:5051": "b",
    }
    assert dns.owned == set(swarm.peers) and dns.own_urls == {"http://10.0.0.9:5051"}

    # Nothing new: nobody is asked again (its own address included), nothing changes.
    world.probed.clear()
    assert await dns.refresh()
    assert world.probed == [] and swarm.log == ["+http://10.0.0.1:5051", "+http://10.0.0.2:5051"]

    # .2 left the answer, .3 joined it.
    world.dns["peers"] = ["10.0.0.1", "10.0.0.3", "10.0.0.9"]
    world.nodes["http://10.0.0.3:5051"] = "c"
    assert await dns.refresh()
    assert sorted(swarm.peers) == ["http://10.0.0.1:5051", "http://10.0.0.3:5051"]
    assert swarm.log[2:] == ["-http://10.0.0.2:5051", "+http://10.0.0.3:5051"]


async def test_peers_found_otherwise_are_neither_taken_nor_dropped() -> None:
    world = World()
    swarm = FakeSwarm(peers={"http://10.0.0.1:5051": FakePeer("a")})  # a static --peer, or mDNS's
    world.dns["peers"] = ["10.0.0.1"]
    world.nodes = {"http://10.0.0.1:5051": "a"}
    dns = dns_peers(world, swarm)
    assert await dns.refresh()
    assert world.probed == [] and dns.owned == set()
    world.dns["peers"] = []
    assert await dns.refresh()
    assert list(swarm.peers) == ["http://10.0.0.1:5051"] and swarm.log == []


async def test_an_address_that_does_not_answer_is_retried_until_it_does() -> None:
    world, swarm = World(), FakeSwarm()
    world.dns["peers"] = ["10.0.0.1"]
    dns = dns_peers(world, swarm)
    assert not await dns.refresh()  # unsettled: run() comes back sooner
    assert swarm.peers == {} and world.probed == ["http://10.0.0.1:5051"]
    world.nodes["http://10.0.0.1:5051"] = "a"  # it started
    assert await dns.refresh()
    assert list(swarm.peers) == ["http://10.0.0.1:5051"]


async def test_one_node_at_several_addresses_is_one_peer() -> None:
    world, swarm = World(), FakeSwarm()
    world.dns["peers"] = ["10.0.0.1", "fd00::1"]
    world.nodes = {"http://10.0.0.1:5051": "a", "http://[fd00::1]:5051": "a"}
    dns = dns_peers(world, swarm)
    assert await dns.refresh()
    assert list(swarm.peers) == ["http://10.0.0.1:5051"]
    # When that address goes, the other one takes its place.
    world.dns["peers"] = ["fd00::1"]
    assert await dns.refresh()
    assert list(swarm.peers) == ["http://[fd00::1]:5051"]


async def test_a_failed_lookup_keeps_the_peers_and_no_such_name_drops_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    world, swarm = World(), FakeSwarm()
    world.dns = {"peers": ["10.0.0.1"], "more": ["10.0.0.2"]}
    world.nodes = {"http://10.0.0.1:5051": "a", "http://10.0.0.2:6000": "b"}
    dns = dns_peers(world, swarm, ("peers", 5051), ("more", 6000))
    assert await dns.refresh()
    assert sorted(swarm.peers) == ["http://10.0.0.1:5051", "http://10.0.0.2:6000"]
    world.dns["peers"] = OSError("DNS server timed out")
    with caplog.at_level(logging.WARNING, logger=dnspeers.__name__):
        assert not await dns.refresh()
        assert not await dns.refresh()
    assert sorted(swarm.peers) == ["http://10.0.0.1:5051", "http://10.0.0.2:6000"]
    assert [r.getMessage() for r in caplog.records] == [
        "peer DNS: cannot look up peers (DNS server timed out); keeping its 1 peers"
    ]  # once, not every round
    world.dns["peers"] = []  # answered: no such name now
    assert await dns.refresh()
    assert list(swarm.peers) == ["http://10.0.0.2:6000"]


async def test_peers_are_https_when_the_node_speaks_mutual_tls() -> None:
    world, swarm = World(), FakeSwarm(tls=True)
    world.dns["peers"] = ["10.0.0.1"]
    world.nodes = {"https://10.0.0.1:5051": "a"}
    assert await dns_peers(world, swarm).refresh()
    assert list(swarm.peers) == ["https://10.0.0.1:5051"]


async def test_lookups_repeat_every_interval_and_sooner_while_unsettled(
    autojump_clock: trio.abc.Clock,
) -> None:
    world, swarm = World(), FakeSwarm()
    world.dns["peers"] = ["10.0.0.1"]
    world.nodes = {"http://10.0.0.1:5051": "a"}
    dns = DnsPeers(swarm, [("peers", 5051)], resolve=world.resolve, probe=world.probe, interval=30)
    async with trio.open_nursery() as nursery:
        await nursery.start(dns.run)
        await trio.sleep(95)  # virtual time: lookups at 0, 30, 60 and 90 s
        assert world.lookups == 4 and list(swarm.peers) == ["http://10.0.0.1:5051"]
        world.dns["peers"] = OSError("unreachable")
        await trio.sleep(30 + 2 + 4 + 8 + 1)  # at 120 s it fails: again after 2, 4, 8 s...
        assert world.lookups == 8
        nursery.cancel_scope.cancel()


async def test_a_lookup_that_hangs_is_given_up(autojump_clock: trio.abc.Clock) -> None:
    world, swarm = World(), FakeSwarm()

    async def hangs(name: str, port: int) -> Sequence[str]:
        await trio.sleep_forever()
        raise AssertionError

    dns = DnsPeers(swarm, [("peers", 5051)], resolve=hangs, probe=world.probe)
    start = trio.current_time()
    assert not await dns.refresh()
    assert trio.current_time() - start == pytest.approx(RESOLVE_TIMEOUT)


# --- the swarm: DNS peers and the mDNS follower -----------------------------------------------------


class FakeFetcher:
    def add_source(self, source: object) -> None:
        pass

    def remove_source(self, name: str) -> None:
        pass


@dataclass
class Announcement:
    url: str
    node_id: str


class FakeDiscovery:
    def __init__(self) -> None:
        self.found: list[Announcement] = []
        self._changed = trio.Event()

    def announce(self, *found: Announcement) -> None:
        self.found = list(found)
        self._changed.set()
        self._changed = trio.Event()

    def peers(self) -> list[Announcement]:
        return self.found

    async def changed(self) -> None:
        await self._changed.wait()

    async def run(self) -> None:
        await trio.sleep_forever()


async def test_the_mdns_follower_leaves_dns_peers_alone() -> None:
    world, discovery = World(), FakeDiscovery()
    world.dns["peers"] = ["10.0.0.1"]
    world.nodes = {"http://10.0.0.1:5051": "a"}
    async with httpx.AsyncClient() as client, trio.open_nursery() as nursery:
        swarm = Swarm(FakeFetcher(), "me", [], client, discovery)  # type: ignore[arg-type]
        await nursery.start(swarm.run)
        swarm.dns = dns_peers(world, swarm)  # type: ignore[arg-type]
        assert await swarm.dns.refresh()
        discovery.announce(Announcement("http://10.0.0.2:5051", "b"))
        await wait_for(lambda: "http://10.0.0.2:5051" in swarm.peers)
        discovery.announce()  # mDNS's peer withdrew: it goes, the DNS peer stays
        await wait_for(lambda: "http://10.0.0.2:5051" not in swarm.peers)
        assert list(swarm.peers) == ["http://10.0.0.1:5051"]
        nursery.cancel_scope.cancel()


async def wait_for(condition: object, timeout: float = 10) -> None:
    assert callable(condition)
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


# --- real nodes on loopback -------------------------------------------------------------------------


@asynccontextmanager
async def peer_node(home: Path, listener: trio.SocketListener, peer_dns: list[str]) -> AsyncIterator[Node]:
    """A node with a peer listener, wired as `serve` wires it (the socket is bound first)."""
    config = load_config(home=str(home), mdns=False, peer_dns=peer_dns)
    async with open_node(config) as node:
        peers = PeerService.for_node(node)
        node.nursery.start_soon(
            trio.serve_listeners, serve_connection(peers.handle, gate=peers.gate), [listener]
        )
        yield node
        node.nursery.cancel_scope.cancel()


async def test_nodes_find_each_other_through_localhost_and_skip_themselves(tmp_path: Path) -> None:
    listeners = [(await trio.open_tcp_listeners(0, host="127.0.0.1"))[0] for _ in range(2)]
    port_a, port_b = (int(listener.socket.getsockname()[1]) for listener in listeners)
    # Each node is told the name of both: it must take the other one and not itself.
    names = [f"localhost:{port_a}", f"localhost:{port_b}"]
    async with (
        peer_node(tmp_path / "a", listeners[0], names) as a,
        peer_node(tmp_path / "b", listeners[1], names) as b,
    ):
        url_a, url_b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
        assert a.swarm.dns is not None and b.swarm.dns is not None
        await wait_for(lambda: url_b in a.swarm.peers and url_a in b.swarm.peers)
        await wait_for(lambda: url_a in a.swarm.dns.own_urls and url_b in b.swarm.dns.own_urls)  # type: ignore[union-attr]
        assert a.swarm.peers[url_b].node_id == b.node_id and b.swarm.peers[url_a].node_id == a.node_id
        # Neither keeps itself, at any of the addresses "localhost" gave (::1 too, where it does:
        # nobody listens there, so it is never a peer).
        assert set(a.swarm.peers) == {url_b} and set(b.swarm.peers) == {url_a}
        assert a.swarm.dns.owned == {url_b}
