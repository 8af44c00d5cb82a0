"""Peers named by DNS (`serve --peer-dns NAME[:PORT]`): every address a name resolves to is a
peer listener at PORT. This is how the pods of a Kubernetes DaemonSet find each other through a
headless Service, whose name resolves to the address of every ready pod.

A node resolves each name at start and every 30 s (sooner while something is left to retry),
asks each new address for its node id (`GET /p2pimg/v1/info`, with the node's own peer client:
swarm key, mutual TLS) and takes it as a peer only when it answers with another node's id. So a
node never keeps itself (its own address is in the answer) and never takes an address that does
not speak the peer protocol, and one node reachable at several addresses is one peer. A peer is
dropped when no name gives its address any more, and only the peers taken here are: static
`--peer`s and those mDNS found stay.

A name that does not exist (or has no address) gives no peers; a failed lookup (a timeout, a DNS
server error) keeps the peers its last answer gave, since a DNS hiccup is not a departure.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Protocol

import httpx
import trio

from p2pimg.sources.peer import get_json

log = logging.getLogger(__name__)

INTERVAL = 30.0  # seconds between lookups while every address is settled
RETRY_FIRST = 2.0  # then doubled up to INTERVAL, while a lookup failed or an address did not answer
RESOLVE_TIMEOUT = 5.0  # one lookup of one name
PROBE_TIMEOUT = 2.0  # one address's /info answer
PROBES_AT_ONCE = 16
# getaddrinfo's "no such name" / "no address for it": an answer, unlike a failure to get one.
_NO_SUCH_NAME = {socket.EAI_NONAME} | {getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}

Resolve = Callable[[str, int], Awaitable[Sequence[str]]]  # (name, port) -> addresses; OSError
Probe = Callable[[str], Awaitable[str | None]]  # peer URL -> its node id, None when it did not say


class _Peer(Protocol):
    @property
    def node_id(self) -> str | None: ...


class SwarmView(Protocol):
    """What this needs of the node's `Swarm`."""

    @property
    def own_id(self) -> str: ...
    @property
    def tls(self) -> bool: ...
    @property
    def client(self) -> httpx.AsyncClient: ...
    @property
    def peers(self) -> Mapping[str, _Peer]: ...
    def add(self, url: str, peer_node: str | None = None) -> bool: ...
    def remove(self, url: str) -> None: ...


async def resolve_addresses(name: str, port: int) -> list[str]:
    """The addresses `name` resolves to (system resolver: /etc/hosts, DNS); [] when there is no
    such name or it has no address; OSError when the lookup failed."""
    try:
        answer = await trio.socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno in _NO_SUCH_NAME:
            return []
        raise
    return [str(sockaddr[0]) for *_, sockaddr in answer]


def peer_urls(addresses: Iterable[str], port: int, scheme: str = "http") -> list[str]:
    """`scheme://ADDR:PORT` for each usable address, in the answer's order, without repeats.
    Unspecified, multicast and link-local IPv6 addresses (meaningless without their interface)
    are left out."""
    urls: dict[str, None] = {}
    for address in addresses:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            continue
        if ip.is_unspecified or ip.is_multicast or (ip.version == 6 and ip.is_link_local):
            continue
        host = f"[{ip.compressed}]" if ip.version == 6 else ip.compressed
        urls[f"{scheme}://{host}:{port}"] = None
    return list(urls)


class DnsPeers:
    """Keeps the swarm's peers in line with what `names` resolve to (see the module's doc)."""

    def __init__(
        self,
        swarm: SwarmView,
        names: Sequence[tuple[str, int]],
        *,
        resolve: Resolve = resolve_addresses,
        probe: Probe | None = None,
        interval: float = INTERVAL,
    ) -> None:
        self.swarm = swarm
        self.names = tuple(dict.fromkeys(names))
        self.resolve = resolve
        self.probe = probe if probe is not None else self._info
        self.interval = interval
        self.owned: set[str] = set()  # peers added here: only these are removed here
        self.own_urls: set[str] = set()  # addresses that turned out to be this very node
        self._answers: dict[tuple[str, int], list[str]] = {}  # each name's last answer, as URLs
        self._failing: set[tuple[str, int]] = set()  # names whose last lookup failed

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Look up the names now, then every `interval` (sooner while something is unsettled)."""
        task_status.started()
        retry = RETRY_FIRST
        while True:
            if await self.refresh():
                retry = RETRY_FIRST
                await trio.sleep(self.interval)
            else:
                await trio.sleep(min(retry, self.interval))
                retry = min(retry * 2, self.interval)

    async def refresh(self) -> bool:
        """One round: look every name up, drop the peers no answer names any more, ask the new
        addresses who they are and take the other nodes. True when nothing is left to retry
        (every lookup answered and every new address said who it is)."""
        settled = await self._look_up()
        wanted = dict.fromkeys(url for urls in self._answers.values() for url in urls)
        for url in sorted(self.owned - wanted.keys()):
            self.owned.discard(url)
            self.swarm.remove(url)
        self.own_urls &= wanted.keys()
        new = [
            u for u in wanted if u not in self.owned and u not in self.own_urls and u not in self.swarm.peers
        ]
        nodes = await self._probe_all(new)
        known = {peer.node_id for peer in self.swarm.peers.values()}
        for url in new:
            node = nodes.get(url)
            if node is None:
                log.debug("peer DNS: %s did not say who it is (yet)", url)
                settled = False
            elif node == self.swarm.own_id:
                self.own_urls.add(url)
                log.info("peer DNS: %s is this node", url)
            elif node not in known and self.swarm.add(url, node):
                # (A node already known at another of its addresses is left there.)
                self.owned.add(url)
                known.add(node)
        return settled

    async def _look_up(self) -> bool:
        settled = True
        scheme = "https" if self.swarm.tls else "http"
        for name, port in self.names:
            try:
                with trio.fail_after(RESOLVE_TIMEOUT):
                    addresses = await self.resolve(name, port)
            except (OSError, trio.TooSlowError) as exc:
                settled = False
                if (name, port) not in self._failing:
                    self._failing.add((name, port))
                    kept = len(self._answers.get((name, port), ()))
                    log.warning(
                        "peer DNS: cannot look up %s (%s); keeping its %d peers", name, exc or "timeout", kept
                    )
                continue
            self._failing.discard((name, port))
            urls = peer_urls(addresses, port, scheme)
            if urls != self._answers.get((name, port)):
                log.info("peer DNS: %s (port %d) gives %s", name, port, ", ".join(urls) or "no addresses")
            self._answers[(name, port)] = urls
        return settled

    async def _probe_all(self, urls: list[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        limit = trio.CapacityLimiter(PROBES_AT_ONCE)

        async def one(url: str) -> None:
            async with limit:
                with trio.move_on_after(PROBE_TIMEOUT + 1):
                    node = await self.probe(url)
                    if node is not None:
                        found[url] = node

        async with trio.open_nursery() as nursery:
            for url in urls:
                nursery.start_soon(one, url)
        return found

    async def _info(self, url: str) -> str | None:
        """The node id a peer listener gives in `/p2pimg/v1/info`; None without a usable answer."""
        with contextlib.suppress(httpx.HTTPError):
            info = await get_json(
                self.swarm.client, f"{url}/p2pimg/v1/info", limit=4096, timeout=PROBE_TIMEOUT
            )
            node = info.get("node") if isinstance(info, dict) else None
            if isinstance(node, str) and node:
                return node
        return None
