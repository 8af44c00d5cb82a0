"""The chunk index: which blob (and which chunk of it) a chunk CID names.

A chunk is a raw block, but the cache keeps it inside its blob's file, never under its CID: to
serve `/ipfs/<chunk cid>` a node must know the blob map the chunk belongs to. The index learns
blob maps as the node reads them (resolving an image, mirroring an upstream blob, warming) and,
at start, from the blobs already complete in the cache. It only maps names to places: whether
the bytes are there, and who may have them, is for whoever serves them to check.
"""

from __future__ import annotations

import logging

import trio

from p2pimg.content.cid import Cid
from p2pimg.content.model import BlobMap
from p2pimg.store.chunks import ChunkStore

log = logging.getLogger(__name__)


class ChunkIndex:
    """Chunk CID digests -> (blob map, chunk index), for the blob maps a node has seen."""

    def __init__(self) -> None:
        self._chunks: dict[bytes, tuple[BlobMap, int]] = {}

    def add(self, bmap: BlobMap) -> None:
        """Make a blob's chunks findable by CID."""
        for i, cid in enumerate(bmap.chunks):
            self._chunks[cid.digest] = (bmap, i)

    def find(self, cid: Cid) -> tuple[BlobMap, int] | None:
        """The blob map holding the chunk `cid` names, and its place in it; None when unknown."""
        return self._chunks.get(cid.digest)

    def __len__(self) -> int:
        return len(self._chunks)

    async def add_cached(self, store: ChunkStore) -> None:
        """Index the chunks of the blobs already complete in `store` (otherwise they would be
        findable by CID only once something read their blob maps again)."""
        maps = await trio.to_thread.run_sync(lambda: list(store.complete_blob_maps()))
        for bmap in maps:
            self.add(bmap)
        log.debug("indexed the chunks of %d cached blobs", len(maps))
