"""Images that `nerdctl push ipfs://` put into IPFS, served as `ipfs/<CID>:latest`.

What nerdctl stores (stargz-snapshotter's `ipfs/converter.go`, through Kubo's `add
--cid-version=1`): every blob -- each layer, config, manifest and the index -- is its own UnixFS
file, and each descriptor gets `urls: ["ipfs://<file CID>"]`, which rewrites the manifests and the
index (so their digests are nerdctl's, not the original image's). The image CID is one more UnixFS
file, in practice a single raw block, holding the JSON of the top descriptor.

The translation gives the resolver what a p2pimg image root gives it (`NerdctlImage`: manifests
by digest, blobs by digest), read from the DAG:

- the top descriptor, then every manifest and index it reaches, each read as a file, checked
  against its descriptor's digest and size, and cached as a raw block under that digest (served
  byte for byte as nerdctl wrote it);
- for each blob, when it is first asked for, its file's layout (`sources.gateway.FileLayout`): the
  file's dag-pb nodes are fetched (and cached, so LAN peers can walk it from this node) and its
  leaves listed at their offsets. When the leaves are raw blocks of one power-of-two size (all but
  the last), as Kubo's default chunker makes, the leaves ARE the chunks of a checked `BlobMap`:
  peers and gateways send chunks the engine checks by their CIDs. Any other layout (other chunk
  sizes, uneven or inline leaves) gets an unchecked map: the gateway source checks every block it
  reads by its CID, the engine checks the whole blob by its digest, and nothing is held in memory
  beyond a span. Either way the raw leaves go to the chunk index with their offsets, so that the
  peer listener can serve them by CID once the blob is here (after checking the bytes).

Nothing binds a file's leaves to the digest its descriptor claims: any image can name a real
digest with another file. So a map is a `FileMap`, which names its file (two files claiming one
digest give two maps, never one cached under the digest alone), the registry holds back the last
byte of such a blob until the whole-digest check passed, the engine does not let a reader with
one map join a fetch running with another, and the gateway sources are given a file's layout when
a fetch with its map starts (`started`), not when a map is made. A hostile DAG is refused before
it costs much: the pieces of a file are counted as each node is read, before they are listed,
and the layouts kept are bounded by their pieces in all.

Blocks come from the cache, then LAN peers, then the gateways (`Gateways.block`), each checked
against its CID before anything reads it.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from p2pimg.content.cid import IPFS_CODECS, RAW, Cid, digest_of, parse_digest
from p2pimg.content.model import (
    INDEX_MEDIA_TYPES,
    MANIFEST_MEDIA_TYPES,
    MAX_MANIFEST_SIZE,
    MIN_CHUNK_SIZE,
    BlobMap,
    ManifestEntry,
)
from p2pimg.content.unixfs import MAX_BLOCK_SIZE, FileLeaf, FileNode, check_leaf, expand_file, file_root
from p2pimg.errors import (
    BlockInvalid,
    DigestInvalid,
    ManifestUnknown,
    NameUnknown,
    OriginNotFound,
    P2pimgError,
    VerificationError,
)
from p2pimg.sources.gateway import FileLayout, GatewayMissing, Gateways, Piece
from p2pimg.store.chunks import ChunkStore
from p2pimg.tasks import SingleFlight, first_failure_nursery

log = logging.getLogger(__name__)

MAX_DESCRIPTOR = 1 << 20  # the top descriptor's JSON
MAX_MANIFESTS = 1024  # manifests and indexes of one image
MAX_NESTING = 4  # indexes inside indexes
MAX_PIECES = 1 << 18  # leaves of one blob's file (~300 bytes each in memory while kept)
_WALKERS = 8  # dag-pb nodes of one file fetched at once
_KEPT = 256  # images remembered
_KEPT_PIECES = 2 * MAX_PIECES  # pieces of the maps' layouts remembered, in all


async def _no_peer_block(_cid: Cid, _max_size: int) -> bytes | None:
    return None


@dataclass(frozen=True)
class FileBlob:
    """A blob of a nerdctl image: `size` bytes in the UnixFS file `file`."""

    size: int
    file: Cid


@dataclass(frozen=True)
class NerdctlImage:
    """A nerdctl image as the resolver sees an image root (it has no referrers)."""

    cid: Cid
    top: str
    manifests: dict[str, ManifestEntry]
    blobs: dict[str, FileBlob]
    referrers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Its UnixFS files as nerdctl walks them: the top manifest or index, then depth first each
    # manifest before its config and layers (the order of the image's blocks in a CAR export).
    files: tuple[Cid, ...] = ()

    @property
    def top_entry(self) -> ManifestEntry:
        return self.manifests[self.top]

    def referrers_of(self, subject: str) -> tuple[str, ...]:
        return ()


@dataclass(frozen=True)
class _Descriptor:
    media_type: str
    digest: str
    size: int
    file: Cid | None  # the first ipfs:// URL, if any


def _descriptor(value: object, what: str) -> _Descriptor:
    if not isinstance(value, dict):
        raise BlockInvalid(f"{what} is not a JSON object")
    media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(media_type, str) or not isinstance(digest, str):
        raise BlockInvalid(f"{what} has no mediaType or digest")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise BlockInvalid(f"{what} has no valid size")
    try:
        parse_digest(digest)
    except DigestInvalid as exc:
        raise BlockInvalid(f"{what}: {exc.message}") from None
    urls = value.get("urls")
    file = None
    for url in urls if isinstance(urls, list) else []:
        if isinstance(url, str) and url.startswith("ipfs://"):
            try:
                file = Cid.parse(url[len("ipfs://") :], codecs=IPFS_CODECS)
            except DigestInvalid as exc:
                raise BlockInvalid(f"{what}: unusable URL {url[:100]!r}: {exc.message}") from None
            break
    return _Descriptor(media_type, digest, size, file)


@dataclass(frozen=True)
class FileMap(BlobMap):
    """The map of a blob of a nerdctl image, as read from the UnixFS file `file`: equal only to
    the map of the same file (a `BlobMap` of the same digest is another map). Its chunk CIDs, if
    any, are the file's leaves: checked as chunks arrive, but bound to the digest by no one."""

    file: Cid | None = None
    layout: FileLayout | None = field(default=None, compare=False, repr=False)


def checked_map(digest: str, size: int, pieces: list[Piece]) -> BlobMap | None:
    """The blob's map with its leaves as chunks, when they can be: raw leaves of one power-of-two
    size from 4 KiB (all but the last, which is not larger); None for any other layout."""
    if size == 0:
        return BlobMap(digest, 0, MIN_CHUNK_SIZE, ())
    if any(p.inline or p.cid.codec != RAW for p in pieces):
        return None
    if len(pieces) == 1:
        chunk = max(MIN_CHUNK_SIZE, 1 << (size - 1).bit_length())
    else:
        chunk = pieces[0].size
        if any(p.size != chunk for p in pieces[:-1]) or pieces[-1].size > chunk:
            return None
    if chunk < MIN_CHUNK_SIZE or chunk & (chunk - 1):
        return None
    return BlobMap(digest, size, chunk, tuple(p.cid for p in pieces))


class NerdctlImages:
    """Translates nerdctl images (by their CID) and their blobs for the resolver."""

    def __init__(
        self,
        store: ChunkStore,
        gateways: Gateways,
        *,
        chunk_size: int,
        peer_block: Callable[[Cid, int], Awaitable[bytes | None]] = _no_peer_block,
    ) -> None:
        self.store = store
        self.gateways = gateways
        self.chunk_size = chunk_size  # of unchecked maps: the same on every node, as the mirror's
        self.peer_block = peer_block  # a block by CID from LAN peers (the node wires it)
        # The chunk index: a blob's raw leaves (cid, offset, size), claims it checks before use.
        self.on_leaves: Callable[[str, list[tuple[Cid, int, int]]], None] = lambda _d, _leaves: None
        self.on_image: Callable[[NerdctlImage], None] = lambda _image: None  # first read of an image
        self._images: OrderedDict[Cid, NerdctlImage] = OrderedDict()
        self._maps: OrderedDict[tuple[str, Cid], FileMap] = OrderedDict()  # (digest, file)
        self._kept_pieces = 0
        self._image_flights: SingleFlight[Cid, NerdctlImage] = SingleFlight()
        self._map_flights: SingleFlight[tuple[str, Cid], FileMap] = SingleFlight()
        self._block_flights: SingleFlight[Cid, bytes] = SingleFlight()

    # -- blocks ------------------------------------------------------------------------------

    async def block(self, cid: Cid, what: str, *, keep: bool = True) -> bytes:
        """Block `cid` (part of `what`) from the cache, else LAN peers, else the gateways; checked
        against its CID, and cached when `keep`."""
        data = await trio.to_thread.run_sync(self.store.get_block, cid)
        if data is not None:
            return data
        data, _ = await self._block_flights.run(cid, lambda: self._fetch_block(cid, what))
        if keep:
            await trio.to_thread.run_sync(self.store.put_block, cid, data)
        return data

    async def _fetch_block(self, cid: Cid, what: str) -> bytes:
        data = await self.peer_block(cid, MAX_BLOCK_SIZE)
        if data is not None and cid.matches(data):
            return data
        if not self.gateways:
            raise GatewayMissing(
                f"block {cid} of {what} is neither cached nor held by a LAN peer, and no IPFS "
                "gateway is configured (--ipfs-gateway URL)"
            )
        try:
            return await self.gateways.block(cid)
        except P2pimgError as exc:
            raise type(exc)(f"{what}: {exc.message}") from None

    # -- files -------------------------------------------------------------------------------

    async def read_file(self, cid: Cid, size: int | None, limit: int, what: str) -> bytes:
        """A small UnixFS file (a descriptor, a manifest) whole: at most `limit` bytes."""
        out = bytearray()
        stack: list[FileNode | FileLeaf] = [file_root(cid, size)]
        while stack:
            item = stack.pop()
            if isinstance(item, FileNode):
                stack.extend(reversed(expand_file(item, await self.block(item.cid, what))))
                continue
            if item.inline is not None:
                out += item.inline
            else:
                block = await self.block(item.cid, what)
                check_leaf(item, block)
                out += block
            if len(out) > limit:
                raise BlockInvalid(f"{what} (ipfs://{cid}) is larger than {limit} bytes")
        return bytes(out)

    async def layout(self, cid: Cid, size: int, what: str) -> FileLayout:
        """The leaves of a blob's file at their offsets, walking its dag-pb nodes level by level
        (`_WALKERS` at a time)."""
        root = file_root(cid, size)
        if isinstance(root, FileLeaf):
            return FileLayout(cid, size, [Piece(cid, 0, size)])
        pieces: list[Piece] = []
        level: list[FileNode] = [root]
        limiter = trio.CapacityLimiter(_WALKERS)
        # A level's blocks are counted before any of them is listed: each distinct node is read
        # once (a DAG may link the same subtree again and again: a tiny one can name millions of
        # blocks that way), its children counted as many times as it occurs, and the file is
        # refused as soon as that passes MAX_PIECES, having listed at most MAX_PIECES blocks.
        counted = [1]
        too_many = f"{what} (ipfs://{cid}) has more than {MAX_PIECES} blocks"
        while level:
            firsts: dict[tuple[Cid, int | None, int], FileNode] = {}
            weight: collections.Counter[tuple[Cid, int | None, int]] = collections.Counter()
            for node in level:
                key = (node.cid, node.size, node.depth)
                firsts.setdefault(key, node)
                weight[key] += 1
            decoded: dict[tuple[Cid, int | None, int], list[FileNode | FileLeaf]] = {}
            async with first_failure_nursery() as nursery:
                for key, node in firsts.items():
                    nursery.start_soon(
                        self._expand, node, what, limiter, decoded, weight[key], counted, too_many
                    )
            below: list[FileNode] = []
            for node in level:
                key = (node.cid, node.size, node.depth)
                shift = node.offset - firsts[key].offset  # the same subtree elsewhere in the file
                for c in decoded[key]:
                    if isinstance(c, FileNode):
                        below.append(FileNode(c.cid, c.offset + shift, c.size, c.depth))
                    else:
                        pieces.append(Piece(c.cid, c.offset + shift, c.size, c.inline is not None))
            level = below
        pieces.sort(key=lambda p: p.offset)
        return FileLayout(cid, size, pieces)

    async def _expand(
        self,
        node: FileNode,
        what: str,
        limiter: trio.CapacityLimiter,
        into: dict[tuple[Cid, int | None, int], list[FileNode | FileLeaf]],
        times: int,
        counted: list[int],
        too_many: str,
    ) -> None:
        """Read one node of a file (`times` occurrences of it in this level) and count what it
        is made of; a node is kept in the cache only when it is structure (links), not when it
        is data carried inline, which the blob's file holds anyway."""
        async with limiter:
            block = await self.block(node.cid, what, keep=False)
            children = expand_file(node, block)  # at most unixfs.MAX_LINKS
            counted[0] += times * len(children)
            if counted[0] > MAX_PIECES:
                raise BlockInvalid(too_many)
            if any(isinstance(c, FileNode) or c.inline is None for c in children):
                await trio.to_thread.run_sync(self.store.put_block, node.cid, block)
        into[(node.cid, node.size, node.depth)] = children

    # -- images ------------------------------------------------------------------------------

    async def image(self, cid: Cid) -> NerdctlImage:
        if (hit := self._images.get(cid)) is not None:
            self._images.move_to_end(cid)
            return hit
        image, fetched = await self._image_flights.run(cid, lambda: self._translate(cid))
        if fetched:
            self._images[cid] = image
            while len(self._images) > _KEPT:
                self._images.popitem(last=False)
            self.on_image(image)
        return image

    async def _translate(self, cid: Cid) -> NerdctlImage:
        what = f"image {cid}"
        try:
            data = await self.read_file(cid, None, MAX_DESCRIPTOR, f"the descriptor of {what}")
        except OriginNotFound as exc:
            raise NameUnknown(f"no image with CID {cid}: {exc.message}") from None
        try:
            top = _descriptor(json.loads(data), f"the descriptor of {what}")
        except (ValueError, RecursionError, BlockInvalid) as exc:
            raise ManifestUnknown(
                f"{cid} is neither a p2pimg image root nor a nerdctl image: {exc}"
            ) from None
        if top.media_type not in MANIFEST_MEDIA_TYPES:
            raise ManifestUnknown(f"{cid} names a {top.media_type[:100]}, not an image manifest or index")
        manifests: dict[str, ManifestEntry] = {}
        blobs: dict[str, FileBlob] = {}
        files: list[Cid] = []
        await self._manifest(top, manifests, blobs, files, 0, what)
        return NerdctlImage(cid, top.digest, manifests, blobs, files=tuple(files))

    async def _manifest(
        self,
        desc: _Descriptor,
        manifests: dict[str, ManifestEntry],
        blobs: dict[str, FileBlob],
        files: list[Cid],
        depth: int,
        what: str,
    ) -> None:
        """Read the manifest or index `desc` names, check it, cache it by its digest, and follow it."""
        if desc.digest in manifests:
            return
        if desc.file is None:
            raise BlockInvalid(f"{what}: manifest {desc.digest} has no ipfs:// URL")
        if depth > MAX_NESTING or len(manifests) >= MAX_MANIFESTS:
            raise BlockInvalid(f"{what}: more than {MAX_MANIFESTS} manifests, or indexes nested too deep")
        if desc.size > MAX_MANIFEST_SIZE:
            raise BlockInvalid(f"{what}: manifest {desc.digest} of {desc.size} bytes is too large")
        data = await self.read_file(
            desc.file, desc.size, MAX_MANIFEST_SIZE, f"manifest {desc.digest} of {what}"
        )
        if digest_of(data) != desc.digest:
            raise VerificationError(f"{what}: ipfs://{desc.file} is not manifest {desc.digest}")
        entry = ManifestEntry(desc.media_type, desc.size, Cid.from_digest(desc.digest))
        await trio.to_thread.run_sync(self.store.put_block, entry.cid, data)
        manifests[desc.digest] = entry
        files.append(desc.file)
        try:
            doc: Any = json.loads(data)
        except (ValueError, RecursionError):
            raise BlockInvalid(f"{what}: manifest {desc.digest} is not JSON") from None
        if not isinstance(doc, dict):
            raise BlockInvalid(f"{what}: manifest {desc.digest} is not a JSON object")
        if desc.media_type in INDEX_MEDIA_TYPES:
            children = doc.get("manifests")
            for i, child in enumerate(children if isinstance(children, list) else []):
                child_desc = _descriptor(child, f"entry {i} of index {desc.digest}")
                if child_desc.file is None:  # not pushed (another platform): a client cannot have it
                    log.info(
                        "%s: index %s names %s without an ipfs:// URL", what, desc.digest, child_desc.digest
                    )
                    continue
                await self._manifest(child_desc, manifests, blobs, files, depth + 1, what)
            return
        layers = doc.get("layers")
        for i, value in enumerate([doc.get("config"), *(layers if isinstance(layers, list) else [])]):
            blob = _descriptor(value, f"{'layer' if i else 'config'} of manifest {desc.digest}")
            if blob.file is None:
                log.info("%s: blob %s has no ipfs:// URL; it cannot be served", what, blob.digest)
                continue
            blobs[blob.digest] = FileBlob(blob.size, blob.file)
            files.append(blob.file)

    # -- blob maps ---------------------------------------------------------------------------

    async def blob_map(self, entry: FileBlob, digest: str) -> FileMap:
        """The map of a blob of a nerdctl image, read from the file its descriptor names (one map
        per digest and file: another image may claim the same digest with another file)."""
        key = (digest, entry.file)
        if (hit := self._maps.get(key)) is not None and hit.size == entry.size:
            self._maps.move_to_end(key)
            return hit
        bmap, _ = await self._map_flights.run(key, lambda: self._map(entry, digest))
        return bmap

    def started(self, bmap: BlobMap) -> None:
        """A fetch of `bmap` starts (the engine's `on_start`): the gateway sources read the blob
        from the layout of that map's file. Only one fetch of a digest runs at a time, so this
        layout stays the blob's while it runs."""
        if isinstance(bmap, FileMap) and bmap.layout is not None:
            self.gateways.files.put(bmap.digest, bmap.layout)
            self._index(bmap.layout, bmap.digest)

    def _index(self, layout: FileLayout, digest: str) -> None:
        """Tell the chunk index where the file's raw leaves are in the blob: when the blob is
        fetched or already here, not when a map is merely read (a hostile image could make it
        learn millions of claims for nothing)."""
        self.on_leaves(digest, [(p.cid, p.offset, p.size) for p in layout.pieces if not p.inline])

    async def _map(self, entry: FileBlob, digest: str) -> FileMap:
        what = f"blob {digest}"
        layout = await self.layout(entry.file, entry.size, what)
        found = checked_map(digest, entry.size, list(layout.pieces))
        if found is not None and len(layout.pieces) == 1 and layout.pieces[0].cid.to_digest() != digest:
            raise VerificationError(f"ipfs://{entry.file} is one block, and not blob {digest}")
        if found is None:
            found = BlobMap.unchecked(digest, entry.size, self.chunk_size)
        elif found.chunks:
            # Kept as a block, so that a restarted node knows the chunks of the blob by CID (a
            # claim: the chunk index checks the bytes before it serves one).
            encoded = found.encode()
            with contextlib.suppress(P2pimgError):
                await trio.to_thread.run_sync(self.store.put_block, Cid.of_dag_cbor(encoded), encoded)
        bmap = FileMap(
            found.digest, found.size, found.chunk_size, found.chunks, found.checked, entry.file, layout
        )
        if await trio.to_thread.run_sync(self.store.has_blob, digest):
            self._index(layout, digest)
        if self.gateways.files.get(digest) is None:  # a fetch that starts later gives its own
            self.gateways.files.put(digest, layout)
        key = (digest, entry.file)
        if (old := self._maps.pop(key, None)) is not None and old.layout is not None:
            self._kept_pieces -= len(old.layout.pieces)
        self._maps[key] = bmap
        self._kept_pieces += len(layout.pieces)
        while len(self._maps) > 1 and (self._kept_pieces > _KEPT_PIECES or len(self._maps) > 16 * _KEPT):
            _, dropped = self._maps.popitem(last=False)
            self._kept_pieces -= len(dropped.layout.pieces) if dropped.layout is not None else 0
        return bmap
