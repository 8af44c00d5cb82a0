"""Fixtures shared by the in-process tests: sample images, a published home, a live registry."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
from _support import Node, published_home, start_registry

from p2pimg.ops.sample import LayerSpec, SampleImage, write_oci_layout

# Every p2pimg process a test starts inherits this: mDNS would send multicast on the machine's
# real interfaces. Tests that create network namespaces turn it on inside them.
os.environ["P2PIMG_MDNS"] = "0"
from p2pimg.store.chunks import ChunkStore


@pytest.fixture(scope="session")
def sample(tmp_path_factory: pytest.TempPathFactory) -> SampleImage:
    """Three layers: ~1 MiB gzip, ~300 KiB plain, and an empty-payload layer."""
    return write_oci_layout(
        tmp_path_factory.mktemp("img") / "layout",
        [LayerSpec(1 << 20, files=3), LayerSpec(300 << 10, "none"), LayerSpec(0)],
        tag="1",
        seed=7,
    )


@pytest.fixture
async def node(tmp_path: Path, sample: SampleImage, nursery: trio.Nursery) -> AsyncIterator[Node]:
    origin, root = await published_home(tmp_path, sample)
    store = ChunkStore(tmp_path / "cache")
    url = await start_registry(nursery, store, origin)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        yield Node(tmp_path, origin, store, root, url, client)
