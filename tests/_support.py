"""Helpers shared by the in-process tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

from p2pimg.content.cid import Cid
from p2pimg.fetch.engine import FetchConfig, Fetcher
from p2pimg.fetch.resolver import Resolver
from p2pimg.metrics import Metrics
from p2pimg.ops.publish import publish
from p2pimg.ops.sample import SampleImage
from p2pimg.sources.base import OriginSource
from p2pimg.sources.origins import FileOrigin, Origin
from p2pimg.store.chunks import ChunkStore
from p2pimg.web.registry import Registry
from p2pimg.web.server import serve_http

CHUNK = 64 << 10  # small chunks so small test blobs span many chunks


@dataclass
class Node:
    home: Path
    origin: FileOrigin
    store: ChunkStore
    root: Cid
    url: str
    client: httpx.AsyncClient


async def published_home(tmp: Path, sample: SampleImage) -> tuple[FileOrigin, Cid]:
    origin = FileOrigin(tmp / "origin")
    report = await publish(f"oci:{sample.path}:1", "demo/app", "1", origin, chunk_size=CHUNK)
    return origin, report.root


async def start_registry(
    nursery: trio.Nursery,
    store: ChunkStore,
    origin: Origin,
    config: FetchConfig | None = None,
    metrics: Metrics | None = None,
) -> str:
    metrics = metrics or Metrics()
    fetcher = Fetcher(
        store, [OriginSource(origin)], nursery, metrics=metrics, config=config or FetchConfig(tick=0.05)
    )
    registry = Registry(store, Resolver(store, origin), fetcher, metrics)
    listeners = await nursery.start(serve_http, registry.handle, "127.0.0.1", 0)
    host, port = listeners[0].socket.getsockname()[:2]
    return f"http://{host}:{port}"


async def wait_cached(store: ChunkStore, digest: str, timeout: float = 10) -> None:
    """The last chunk reaches the client before the whole-blob check renames it into place."""
    with trio.fail_after(timeout):
        while not store.has_blob(digest):
            await trio.sleep(0.01)
