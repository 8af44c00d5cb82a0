"""One p2pimg node: the cache, origin, resolver, fetch engine, mirror, peers and warm jobs of a
home, with the lifetime of a trio nursery. `serve` puts HTTP listeners in front of it; `warm`
without a running server uses one for the length of the warm."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from p2pimg.content.cid import Cid
from p2pimg.content.model import MAX_TAG_RECORD_SIZE, ImageRoot
from p2pimg.content.signing import TrustStore
from p2pimg.errors import P2pimgError
from p2pimg.fetch.engine import Fetcher
from p2pimg.fetch.mirror import Mirror
from p2pimg.fetch.nerdctl import NerdctlImage, NerdctlImages
from p2pimg.fetch.policy import policy_named
from p2pimg.fetch.resolver import Resolver
from p2pimg.metrics import Metrics
from p2pimg.node import swarmkey
from p2pimg.node.config import Config
from p2pimg.node.dnspeers import DnsPeers
from p2pimg.node.peertls import PeerTls, load_peer_tls
from p2pimg.node.warm import WarmJobs
from p2pimg.sources.base import OriginSource
from p2pimg.sources.gateway import Gateways
from p2pimg.sources.httpbody import read_capped
from p2pimg.sources.origins import Origin, open_origin
from p2pimg.sources.peer import PeerSource, get_json
from p2pimg.sources.upstream.client import UpstreamClient
from p2pimg.store.chunks import ChunkStore
from p2pimg.store.index import ChunkIndex
from p2pimg.tasks import guarded

log = logging.getLogger(__name__)

_MAX_ASKED_PEERS = 16  # peers asked for a block or a tag record when the origin cannot give it
_ASK_TIMEOUT = httpx.Timeout(3.0, connect=1.0)  # a block or a tag record from a peer
_BLOCK_ASKS = 4  # peers read from at once for one block (each answer up to the block's limit)
_BLOCK_WAIT = 5.0  # seconds all the peers together have to send a block
_SMALL_BLOB = 256 << 10  # blobs this small (image configs) are fetched when their image is first read
_SMALL_BLOBS = 32  # at most this many of them per image


def node_id(home: os.PathLike[str] | str) -> str:
    """A stable random identity of the node owning a home (peers use it to skip themselves)."""
    path = os.path.join(home, "node-id")
    try:
        with open(path) as f:
            value = f.read().strip()
        if len(value) == 32 and all(c in "0123456789abcdef" for c in value):
            return value
    except OSError:
        pass
    value = secrets.token_hex(16)
    os.makedirs(home, exist_ok=True)
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(value)
    os.replace(tmp, path)
    return value


@dataclass
class Swarm:
    """The node's peers: static ones (`--peer`), those mDNS finds and those DNS names give
    (`--peer-dns`), as fetch sources."""

    fetcher: Fetcher
    own_id: str
    static: list[str]
    client: httpx.AsyncClient
    discovery: object | None = None
    peers: dict[str, PeerSource] = field(default_factory=dict)
    tls: bool = False  # peers must speak mutual TLS (https) with the swarm CA's certificates
    peer_dns: tuple[tuple[str, int], ...] = ()  # (name, port): every address of the name is a peer
    dns: DnsPeers | None = None  # keeps the peers of `peer_dns`, once running
    _refused: set[str] = field(default_factory=set)

    def add(self, url: str, peer_node: str | None = None) -> bool:
        """Take a peer as a source; False when it is this node or cannot be used."""
        if peer_node == self.own_id:
            return False
        if url in self.peers:
            return True
        if self.tls and not url.startswith("https://"):
            if url not in self._refused:
                self._refused.add(url)
                log.warning("peer %s ignored: this node talks to peers only over mutual TLS (https://)", url)
            return False
        source = PeerSource(url, self.client, node_id=peer_node)
        self.peers[url] = source
        self.fetcher.add_source(source)
        log.info("peer %s joined", url)
        return True

    async def block(self, cid: Cid, max_size: int) -> bytes | None:
        """A block by CID from the first peer that sends it whole (checked against the CID here
        too). Peers are asked at once, `_BLOCK_ASKS` at a time (so at most that many answers of
        up to `max_size` are read at once), and the first good answer stops the others.

        Asked on `/p2pimg/v1/blocks/`, not `/ipfs/`: a peer's IPFS gateway sends no block over
        2 MiB, as the spec says, while a manifest may be 4 MiB and a root or blob map 8 MiB; and
        the size of a block is not known before it arrives, so one path for all, one request."""
        found: list[bytes] = []
        limit = trio.CapacityLimiter(_BLOCK_ASKS)

        async def ask(source: PeerSource, done: trio.CancelScope) -> None:
            async with limit:
                with contextlib.suppress(httpx.HTTPError):
                    async with self.client.stream(
                        "GET", f"{source.url}/p2pimg/v1/blocks/{cid}", timeout=_ASK_TIMEOUT
                    ) as r:
                        data = await read_capped(r, max_size) if r.status_code == 200 else None
                        if data is not None and cid.matches(data):
                            found.append(data)
                            done.cancel()

        with trio.move_on_after(_BLOCK_WAIT):
            async with trio.open_nursery() as nursery:
                for source in list(self.peers.values())[:_MAX_ASKED_PEERS]:
                    nursery.start_soon(ask, source, nursery.cancel_scope)
        return found[0] if found else None

    async def tag_records(self, name: str, tag: str) -> list[bytes]:
        """Encoded tag records of `name:tag` that peers hold (unchecked: the resolver decides),
        asked of every peer at once, each answer bounded in size and time."""
        found: list[bytes] = []

        async def ask(source: PeerSource) -> None:
            with contextlib.suppress(httpx.HTTPError):
                async with self.client.stream(
                    "GET", f"{source.url}/p2pimg/v1/tags/{name}/{tag}", timeout=_ASK_TIMEOUT
                ) as r:
                    data = await read_capped(r, MAX_TAG_RECORD_SIZE) if r.status_code == 200 else None
                    if data is not None:
                        found.append(data)

        with trio.move_on_after(5):
            async with trio.open_nursery() as nursery:
                for source in list(self.peers.values())[:_MAX_ASKED_PEERS]:
                    nursery.start_soon(ask, source)
        return found

    def found_by(self, url: str) -> str:
        """How a peer was found: "static" (--peer), "dns" (--peer-dns) or "mdns"."""
        if url in self.static:
            return "static"
        if self.dns is not None and url in self.dns.owned:
            return "dns"
        return "mdns"

    def remove(self, url: str) -> None:
        if self.peers.pop(url, None) is not None:
            self.fetcher.remove_source(f"peer {url.rstrip('/')}")
            log.info("peer %s left", url)

    async def _check_static(self, url: str) -> None:
        """Learn a static peer's node id (dropping it if it is this very node); it may start
        after us, so ask a few times."""
        for attempt in range(30):
            with contextlib.suppress(httpx.HTTPError):
                info = await get_json(self.client, f"{url.rstrip('/')}/p2pimg/v1/info", limit=4096, timeout=2)
                peer_node = info.get("node") if isinstance(info, dict) else None
                if peer_node == self.own_id:
                    self.remove(url)
                    return
                if isinstance(peer_node, str) and url in self.peers:
                    self.peers[url].node_id = peer_node  # lets block ownership name it
                    return
            await trio.sleep(min(10.0, 0.5 * 2 ** min(attempt, 4)))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for url in self.static:
                if self.add(url):
                    nursery.start_soon(guarded, f"static peer {url}", self._check_static, url)
            if self.peer_dns:
                self.dns = DnsPeers(self, self.peer_dns)
                nursery.start_soon(guarded, "DNS peer discovery", self.dns.run)
            if self.discovery is not None:
                # Not nursery.start: announcing first probes the LAN for name clashes (~2 s), and
                # serving must not wait for that.
                nursery.start_soon(guarded, "mDNS discovery", self.discovery.run)  # type: ignore[attr-defined]
                nursery.start_soon(guarded, "following mDNS discovery", self._follow_discovery)
            task_status.started()

    async def _follow_discovery(self) -> None:
        assert self.discovery is not None
        while True:
            found = {p.url: p.node_id for p in self.discovery.peers()}  # type: ignore[attr-defined]
            for url, peer_node in found.items():
                self.add(url, peer_node)
            kept = set(self.static) | (self.dns.owned if self.dns is not None else set())  # not mDNS's
            for url in [u for u in self.peers if u not in found and u not in kept]:
                self.remove(url)
            await self.discovery.changed()  # type: ignore[attr-defined]


@dataclass
class Node:
    config: Config
    nursery: trio.Nursery
    node_id: str
    store: ChunkStore
    origin: Origin
    metrics: Metrics
    fetcher: Fetcher
    resolver: Resolver
    mirror: Mirror | None
    chunk_index: ChunkIndex  # chunk CID -> its blob, for the peer API's /ipfs/<chunk cid>
    swarm: Swarm
    tls: PeerTls | None
    swarm_key: bytes | None  # peers must prove it (and send it) when set
    warm: WarmJobs = field(init=False)

    def __post_init__(self) -> None:
        self.warm = WarmJobs(self.resolver, self.store, self.fetcher, self.chunk_index, self.nursery)


async def first_look(resolver: Resolver, fetcher: Fetcher, root: ImageRoot | NerdctlImage) -> None:
    """A node reads an image's root for the first time (a client asked for its manifest): fetch
    all its blob maps at once, then its small blobs (image configs, which a client always asks
    for, often last, after the layers), so that neither waits for the origin's round trip then."""
    await resolver.prefetch_maps(root)
    small = [(d, e) for d, e in root.blobs.items() if e.size <= _SMALL_BLOB][:_SMALL_BLOBS]
    for digest, entry in small:
        if not fetcher.store.has_blob(digest):
            with contextlib.suppress(P2pimgError):
                await fetcher.open(await resolver.blob_map(entry, digest), warm=True)


def peer_client(key: bytes | None, tls: PeerTls | None, **options: Any) -> httpx.AsyncClient:
    """The HTTP client for talking to peers: signed with the swarm key, presenting our certificate
    when peers speak mutual TLS, and never through a proxy (peers are on the LAN)."""
    return httpx.AsyncClient(
        auth=swarmkey.SwarmAuth(key) if key is not None else None,
        verify=tls.client_context() if tls is not None else True,
        trust_env=False,
        **options,
    )


@contextlib.asynccontextmanager
async def open_node(config: Config, *, advertise: tuple[str, int] | None = None) -> AsyncIterator[Node]:
    """A running node; everything it started stops when the block ends."""
    store = ChunkStore(config.cache_dir)
    origin = open_origin(config.origin, config.home)
    policy = policy_named(config.policy)
    upstreams = [UpstreamClient(url) for url in config.upstreams]
    key = swarmkey.load_swarm_key(config.home, config.swarm_key_file, given=config.swarm_key_file_given)
    tls = load_peer_tls(config.home, *config.peer_tls)
    client = peer_client(
        key,
        tls,
        timeout=httpx.Timeout(30, connect=1.0),
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
    )
    # IPFS gateways may be anywhere (a local Kubo, a public one): through a proxy if one is set.
    gateway_client = httpx.AsyncClient(
        timeout=httpx.Timeout(30, connect=5.0), limits=httpx.Limits(max_connections=32)
    )
    own_id = await trio.to_thread.run_sync(node_id, config.home)
    trust = TrustStore.load(config.home, [Path(p) for p in config.trust])  # a bad key file fails at start
    discovery = None
    if config.mdns:
        from p2pimg.node.discovery import Discovery

        discovery = Discovery(node_id=own_id, advertise=advertise, tls=tls is not None)
    try:
        async with trio.open_nursery() as nursery:
            metrics = Metrics()
            origin.prepare()  # not on the first pull's critical path
            origin_source = OriginSource(origin)
            fetcher = Fetcher(store, [origin_source], nursery, metrics=metrics, policy=policy, node_id=own_id)
            mirror = (
                Mirror(
                    store,
                    upstreams,
                    nursery,
                    metrics,
                    tag_ttl=config.upstream_tag_ttl,
                    chunk_size=config.chunk_size,
                )
                if upstreams
                else None
            )
            resolver = Resolver(store, origin, trust=trust, home=config.home)
            index = ChunkIndex()
            swarm = Swarm(fetcher, own_id, list(config.peers), client, discovery, tls=tls is not None)
            swarm.peer_dns = config.peer_dns
            node = Node(
                config,
                nursery,
                own_id,
                store,
                origin,
                metrics,
                fetcher,
                resolver,
                mirror,
                index,
                swarm,
                tls,
                key,
            )
            resolver.on_blob_map = index.add
            if mirror is not None:  # upstream blobs go through the engine, manifests by digest via peers
                for upstream_source in mirror.sources.values():
                    fetcher.add_source(upstream_source)
                mirror.peer_block = swarm.block
            resolver.peer_block = swarm.block
            resolver.timeline = metrics.timeline
            resolver.on_root = lambda root: nursery.start_soon(
                guarded, "a first look at an image", first_look, resolver, fetcher, root
            )
            resolver.peer_tags = swarm.tag_records
            # `ipfs/<CID>` of an image nerdctl pushed: blocks from peers and gateways, blobs through
            # the engine, the gateways being sources of it.
            gateways = Gateways(config.ipfs_gateways, gateway_client, stats=fetcher.stats.get)
            for gateway_source in gateways.sources:
                fetcher.add_source(gateway_source)
            nerdctl = NerdctlImages(store, gateways, chunk_size=config.chunk_size, peer_block=swarm.block)
            nerdctl.on_leaves = index.add_leaves
            fetcher.on_start = nerdctl.started  # a fetch of a nerdctl blob reads its own map's file
            nerdctl.on_image = lambda image: nursery.start_soon(
                guarded, "a first look at an image", first_look, resolver, fetcher, image
            )
            resolver.nerdctl = nerdctl
            origin_source.elsewhere = lambda digest: gateways.files.get(digest) is not None
            await nursery.start(swarm.run)
            if config.peer_listen:  # only the peer listener serves chunks by CID
                nursery.start_soon(guarded, "indexing cached chunks", index.add_cached, store)
            if config.cache_max is not None:
                from p2pimg.store.cache import enforce_limit

                limit = functools.partial(
                    enforce_limit,
                    store,
                    config.cache_max,
                    lambda digest: fetcher.fetch_of(digest) is not None,
                    evicted=lambda item: metrics.evicted(item.size),
                )
                nursery.start_soon(guarded, "cache size limit", limit)
            yield node
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await client.aclose()
            await gateway_client.aclose()
            for upstream in upstreams:
                await upstream.aclose()
            await origin.aclose()


def write_serve_info(config: Config, registry: str, peer: str | None) -> None:
    """Tell `p2pimg warm` on the same home where the running server is."""
    path = config.home / "serve.json"
    tmp = path.with_suffix(f".{os.getpid()}")
    tmp.write_text(json.dumps({"pid": os.getpid(), "registry": registry, "peer": peer}))
    os.replace(tmp, path)


def read_serve_info(config: Config) -> dict[str, object] | None:
    try:
        info = json.loads((config.home / "serve.json").read_text())
        os.kill(int(info["pid"]), 0)  # still alive?
        return info if isinstance(info, dict) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def clear_serve_info(config: Config) -> None:
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        info = json.loads((config.home / "serve.json").read_text())
        if int(info["pid"]) == os.getpid():
            (config.home / "serve.json").unlink()
