"""The chunk index: where in which blob the bytes a raw block CID names may be.

A chunk is a raw block, but the cache keeps it inside its blob's file, never under its CID: to
serve `/ipfs/<chunk cid>` a node must know where the block is in a blob. The index learns places
from blob maps as the node reads them (resolving an image, warming) and from the leaves of the
UnixFS files of nerdctl images (any layout: a leaf is `size` bytes at `offset` of its blob), and,
at start, from the blob maps of the blobs already complete in the cache.

A place is only a claim: a blob map or a UnixFS file names chunk CIDs and a digest side by side,
and nothing binds the two until the bytes are read (a hostile nerdctl image may claim a real
digest with another blob's chunks). So a place is served only once the bytes at it were found to
match the CID (`verified`, remembered per place: a complete blob's bytes never change), and a
CID keeps a few places, so that a false claim cannot hide a true one.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable

import trio

from p2pimg.content.cid import RAW, Cid
from p2pimg.content.model import BlobMap
from p2pimg.store.chunks import ChunkStore

log = logging.getLogger(__name__)

_PLACES_PER_CID = 4  # places kept for one CID (the newest; verified ones are kept first)
_READ = 1 << 20  # bytes read at a time when checking a place


class Place:
    """`size` bytes at `offset` of blob `digest`, claimed to be the block a CID names."""

    __slots__ = ("digest", "offset", "size", "verified")

    def __init__(self, digest: str, offset: int, size: int) -> None:
        self.digest = digest
        self.offset = offset
        self.size = size
        self.verified = False

    def same(self, other: Place) -> bool:
        return (self.digest, self.offset, self.size) == (other.digest, other.offset, other.size)


def _matches_file(path: os.PathLike[str] | str, cid: Cid, offset: int, size: int) -> bool | None:
    """Whether bytes [offset, offset + size) of the file are the block `cid` names (read in
    pieces, never whole); None when the file is not there."""
    h = hashlib.sha256()
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        at, end = offset, offset + size
        while at < end:
            piece = os.pread(fd, min(_READ, end - at), at)
            if not piece:
                return False  # shorter than the place says
            h.update(piece)
            at += len(piece)
    finally:
        os.close(fd)
    return h.digest() == cid.digest


class ChunkIndex:
    """Raw block CID digests -> the places claimed for them, for the blob maps and UnixFS files a
    node has seen."""

    def __init__(self) -> None:
        self._places: dict[bytes, Place | list[Place]] = {}

    def _put(self, key: bytes, place: Place) -> None:
        found = self._places.get(key)
        if found is None:
            self._places[key] = place
            return
        places = found if isinstance(found, list) else [found]
        if any(p.same(place) for p in places):
            return
        places.append(place)
        if len(places) > _PLACES_PER_CID:  # drop the oldest unverified claim
            drop = next((p for p in places if not p.verified), places[0])
            places.remove(drop)
        self._places[key] = places[0] if len(places) == 1 else places

    def add(self, bmap: BlobMap) -> None:
        """Make a blob's chunks findable by CID (claims until checked)."""
        for i, cid in enumerate(bmap.chunks):
            lo, hi = bmap.bounds(i)
            self._put(cid.digest, Place(bmap.digest, lo, hi - lo))

    def add_leaves(self, digest: str, leaves: Iterable[tuple[Cid, int, int]]) -> None:
        """Make the raw leaves of a blob's UnixFS file findable by CID: (cid, offset, size)."""
        for cid, offset, size in leaves:
            if cid.codec == RAW:
                self._put(cid.digest, Place(digest, offset, size))

    def claim(self, cid: Cid, digest: str, offset: int, size: int) -> Place:
        """The index's place for this claim (added if new), so that its check is remembered."""
        place = Place(digest, offset, size)
        for known in self.find(cid):
            if known.same(place):
                return known
        if cid.codec == RAW:
            self._put(cid.digest, place)
        return place

    def find(self, cid: Cid) -> list[Place]:
        """The places claimed for the block `cid` names (verified ones first); [] when unknown."""
        found = self._places.get(cid.digest)
        if found is None:
            return []
        places = found if isinstance(found, list) else [found]
        return sorted(places, key=lambda p: not p.verified)

    def forget(self, cid: Cid, place: Place) -> None:
        """Drop a place whose bytes turned out not to be the block."""
        places = self.find(cid)
        kept = [p for p in places if p is not place]
        if not kept:
            self._places.pop(cid.digest, None)
        else:
            self._places[cid.digest] = kept[0] if len(kept) == 1 else kept

    async def check(self, store: ChunkStore, cid: Cid, place: Place) -> bool:
        """Whether `place` in the complete cached blob holds the block `cid` names: read and
        hashed the first time, remembered after; a place found wrong is forgotten. False when
        the blob is not complete here (nothing is remembered then)."""
        if place.verified:
            return True
        path = store.blob_path(place.digest)
        ok = await trio.to_thread.run_sync(_matches_file, path, cid, place.offset, place.size)
        if ok is None:
            return False
        if ok:
            place.verified = True
        else:
            log.warning(
                "bytes %d+%d of %s are not %s: that claim is dropped",
                place.offset,
                place.size,
                place.digest,
                cid,
            )
            self.forget(cid, place)
        return ok

    def __len__(self) -> int:
        return len(self._places)

    async def add_cached(self, store: ChunkStore) -> None:
        """Index the chunks of the blobs already complete in `store` (otherwise they would be
        findable by CID only once something read their blob maps again)."""
        maps = await trio.to_thread.run_sync(lambda: list(store.complete_blob_maps()))
        for bmap in maps:
            self.add(bmap)
        log.debug("indexed the chunks of %d cached blobs", len(maps))
