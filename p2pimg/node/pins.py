"""Pins: an image's blobs kept out of cache eviction, named by the ref they were pinned as."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
import trio

from p2pimg.content.cid import Cid
from p2pimg.errors import NotFound
from p2pimg.fetch.nerdctl import NerdctlImages
from p2pimg.fetch.resolver import Resolver
from p2pimg.node.config import Config
from p2pimg.sources.gateway import Gateways
from p2pimg.store.cache import pins
from p2pimg.store.chunks import ChunkStore


@contextlib.asynccontextmanager
async def reading_ipfs(resolver: Resolver, config: Config) -> AsyncIterator[Resolver]:
    """Let a resolver made outside a node (`p2pimg cache pin`) name images nerdctl pushed to IPFS:
    read from the cache (a warmed image needs nothing more), else from the configured IPFS
    gateways; every block checked against its CID as in a node."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, connect=5.0)) as client:
        gateways = Gateways(config.ipfs_gateways, client)
        resolver.nerdctl = NerdctlImages(resolver.store, gateways, chunk_size=config.chunk_size)
        try:
            yield resolver
        finally:
            resolver.nerdctl = None


async def resolve_root(resolver: Resolver, ref: str) -> Cid:
    """The image root a `NAME:TAG` or `ipfs/<CID>` names."""
    from p2pimg.node.warm import parse_ref

    parsed = parse_ref(ref)
    return parsed if isinstance(parsed, Cid) else await resolver.resolve_tag(*parsed)


async def pin(store: ChunkStore, resolver: Resolver, ref: str) -> tuple[Cid, list[str]]:
    """Pin every blob of an image (it need not be cached yet: pins only stop eviction)."""
    root_cid = await resolve_root(resolver, ref)
    root = await resolver.image(root_cid)  # a p2pimg root, or a nerdctl image
    digests = sorted(root.blobs)
    text = f"# p2pimg pin\n# ref {ref}\n" + "".join(f"{d}\n" for d in digests)
    await trio.to_thread.run_sync(store.write_small, store.root / "pins" / str(root_cid), text.encode())
    return root_cid, digests


async def unpin(store: ChunkStore, resolver: Resolver, ref: str) -> list[str]:
    """Remove the pins of `ref` (found by the ref they were pinned as, else by resolving it);
    returns the root CIDs unpinned, and raises NotFound when nothing was pinned."""
    current = await trio.to_thread.run_sync(pins, store)
    roots = [root for root, (pinned_as, _d) in current.items() if pinned_as == ref]
    if not roots:
        root_cid = str(await resolve_root(resolver, ref))
        if root_cid not in current:
            raise NotFound(f"{ref} ({root_cid}) is not pinned")
        roots = [root_cid]
    for root in roots:
        with contextlib.suppress(FileNotFoundError):
            (store.root / "pins" / root).unlink()
    return roots
