"""`p2pimg serve`: a node with its registry listener and, when asked for, its peer listener."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import signal
import sys
from functools import partial

import trio

from p2pimg.errors import InvalidInput
from p2pimg.node.config import Config, parse_listen
from p2pimg.node.node import Node, clear_serve_info, open_node, write_serve_info
from p2pimg.sources.upstream.dockerconfig import docker_config_path, load_credentials
from p2pimg.sources.upstream.refs import is_loopback, registry_base
from p2pimg.web.peerapi import PeerService
from p2pimg.web.registry import Registry, error_response
from p2pimg.web.server import UNIX, Handler, Request, Response, listen, listen_unix, serve_connection
from p2pimg.web.ui import Dashboard, Denied, foreign_origin, json_body, literal_host

log = logging.getLogger(__name__)

# Connections one LAN address may hold open to the peer listener (a node's own client uses up
# to 64): no single host can take all of them.
PEER_CONNECTIONS = 128


def local_control(
    node: Node, registry: Registry, peers: PeerService, dashboard: Dashboard | None = None
) -> Handler:
    """The registry listener's handler: the OCI API for everyone, plus the node's own control
    endpoints (warm jobs, the peer list; `peers` is the peer API the peer listener serves) and
    the dashboard (`/ui/`) for clients on this machine only."""

    async def handle(request: Request) -> Response:
        if dashboard is not None and dashboard.wants(request):
            return await dashboard.handle(request)
        if request.path.startswith("/p2pimg/v1/") and request.from_this_machine:
            refused = _foreign_page(request)
            if refused is not None:
                return error_response(Denied(refused))
            if request.path in ("/p2pimg/v1/peers", "/p2pimg/v1/timeline"):
                doc: object = (
                    sorted(node.swarm.peers)
                    if request.path == "/p2pimg/v1/peers"
                    else {"now": node.metrics.timeline.now(), "events": node.metrics.timeline.snapshot()}
                )
                body = json.dumps(doc).encode()
                return Response(
                    200, [("content-type", "application/json"), ("content-length", str(len(body)))], body
                )
            return await peers.handle_local(request)
        return await registry.handle(request)

    return handle


def _foreign_page(request: Request) -> str | None:
    """Why a control request from this machine may come from a web page of another site (and is
    refused), or None. Browsers send a page's requests to 127.0.0.1 too: under the page's own
    name after a DNS rebinding (so the Host must be written out), and a cross-site POST as a
    "simple" request with no preflight unless its body is JSON (so it must be, as the CLI's are)."""
    if request.client == UNIX:
        return None
    if not literal_host(request.headers.get("host", "")):
        return "control requests need Host: localhost or an IP address"
    if (origin := foreign_origin(request)) is not None:
        return f"a control request from another origin ({origin[:100]}) is refused"
    if request.method == "POST" and not json_body(request):
        return "a control request's body must be JSON (Content-Type: application/json)"
    return None


def check_public_mirror(config: Config) -> None:
    """A mirror pulling with the user's registry credentials serves what they reach to every
    client of its registry listener: beyond loopback, that is anyone who can reach the address.
    Refused (InvalidInput) unless `allow_public_mirror`, which logs a warning instead."""
    host = parse_listen(config.listen)[0]
    if not config.upstreams or is_loopback(host):
        return
    hosts = [registry_base(url)[1] for url in config.upstreams]
    credentialed = [h for h in hosts if load_credentials(h) is not None]
    if not credentialed:
        return
    what = (
        f"the mirror pulls from {', '.join(credentialed)} with your credentials (from {docker_config_path()})"
    )
    if config.allow_public_mirror:
        log.warning(
            "%s and its registry listens on %s, beyond this machine: anyone who can reach it "
            "can pull the private images those credentials reach (--allow-public-mirror)",
            what,
            config.listen,
        )
        return
    raise InvalidInput(
        f"not serving on {config.listen}: {what}, so anyone who can reach that address "
        "could pull your private images; listen on 127.0.0.1, or pass "
        "--allow-public-mirror if that is what you want"
    )


def _raise_open_file_limit(wanted: int = 8192) -> None:
    """Every connection and open blob holds a descriptor: lift the soft limit (often 1024) toward
    the hard one, so the listeners' connection caps are reached before the descriptors run out."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _address(listeners: list[trio.SocketListener]) -> str:
    host, port = listeners[0].socket.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve(config: Config, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until SIGINT/SIGTERM (or cancellation); `task_status` gets the bound HOST:PORT."""
    check_public_mirror(config)  # before listening: nothing is served, not even for a moment
    _raise_open_file_limit()
    host, port = parse_listen(config.listen)
    listeners = await listen(host, port)  # before anything else: a busy port is a clear error
    peer_listeners = await listen(*parse_listen(config.peer_listen)) if config.peer_listen else []
    advertise = None
    if peer_listeners:
        peer_host = parse_listen(config.peer_listen or "")[0]
        advertise = (peer_host, int(peer_listeners[0].socket.getsockname()[1]))
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_node(config, advertise=advertise) as node:
            registry = Registry(node.store, node.resolver, node.fetcher, node.metrics, node.mirror)
            peers = PeerService.for_node(node)
            address = _address(listeners)
            dashboard = Dashboard(node, peers, registry=address)
            handler = local_control(node, registry, peers, dashboard)
            node.nursery.start_soon(partial(trio.serve_listeners, serve_connection(handler), listeners))
            if config.ui_socket:
                unix = await listen_unix(config.ui_socket)
                node.nursery.start_soon(partial(trio.serve_listeners, serve_connection(handler), unix))
            peer_address = None
            if peer_listeners:
                tls = node.tls.server_context() if node.tls is not None else None
                node.nursery.start_soon(
                    partial(
                        trio.serve_listeners,
                        serve_connection(peers.handle, tls, gate=peers.gate, per_client=PEER_CONNECTIONS),
                        peer_listeners,
                    )
                )
                peer_address = _address(peer_listeners)
            write_serve_info(config, address, peer_address)
            try:
                extra = "".join(f", mirroring {u}" for u in config.upstreams)
                if peer_address:
                    extra += f", peers on {'https' if node.tls else 'http'}://{peer_address}"
                    extra += " (mutual TLS)" if node.tls else ""
                print(
                    f"p2pimg: serving registry on http://{address} (origin {node.origin.url}{extra}); "
                    f"dashboard on http://{address}/ui/",
                    file=sys.stderr,
                    flush=True,
                )
                task_status.started(address)
                async for signum in signals:
                    print(
                        f"p2pimg: {signal.Signals(signum).name}, shutting down", file=sys.stderr, flush=True
                    )
                    break
            finally:
                clear_serve_info(config)
                if config.ui_socket:
                    with contextlib.suppress(OSError):
                        os.unlink(config.ui_socket)
