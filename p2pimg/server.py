"""`p2pimg serve`: wire the cache, origin, resolver, fetcher and registry into one trio process."""

from __future__ import annotations

import logging
import signal
import sys
from functools import partial

import trio

from .config import Config, parse_listen
from .fetch import Fetcher, OriginSource
from .http import listen, serve_connection
from .metrics import Metrics
from .mirror import Mirror
from .origins import open_origin
from .policy import policy_named
from .registry import Registry
from .resolver import Resolver
from .store import ChunkStore
from .upstream import UpstreamClient

log = logging.getLogger(__name__)


async def serve(config: Config, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until SIGINT/SIGTERM (or cancellation); `task_status` gets the bound HOST:PORT."""
    host, port = parse_listen(config.listen)
    listeners = await listen(host, port)  # before anything else: a busy port is a clear error
    store = ChunkStore(config.cache_dir)
    origin = open_origin(config.origin, config.home)
    policy = policy_named(config.policy)
    upstreams = [UpstreamClient(url) for url in config.upstreams]
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                metrics = Metrics()
                fetcher = Fetcher(store, [OriginSource(origin)], nursery, metrics=metrics, policy=policy)
                mirror = Mirror(store, upstreams, nursery, metrics, tag_ttl=config.upstream_tag_ttl,
                                chunk_size=config.chunk_size) if upstreams else None
                registry = Registry(store, Resolver(store, origin), fetcher, metrics, mirror)
                nursery.start_soon(partial(trio.serve_listeners, serve_connection(registry.handle),
                                           listeners))
                bound = listeners[0].socket.getsockname()
                address = f"{bound[0]}:{bound[1]}"
                mirrored = "".join(f", mirroring {u.url}" for u in upstreams)
                print(f"p2pimg: serving registry on http://{address} (origin {origin.url}{mirrored})",
                      file=sys.stderr, flush=True)
                task_status.started(address)
                async for signum in signals:
                    print(f"p2pimg: {signal.Signals(signum).name}, shutting down",
                          file=sys.stderr, flush=True)
                    nursery.cancel_scope.cancel()
                    break
    finally:
        for upstream in upstreams:
            await upstream.aclose()
        await origin.aclose()
