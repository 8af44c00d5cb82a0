"""Which blocks a CAR response of the peer listener's trustless gateway (`web/gateway.py`) holds,
and in which order: https://specs.ipfs.tech/http-gateways/trustless-gateway/.

CAR responses walk the DAG depth-first, each block once (`order=dfs; dups=n`), links in the order
their node encodes them. `dag-scope`:

- `block`: the block alone.
- `entity`: the block and the blocks it links to directly. For a blob map that is the whole
  blob, like a UnixFS file: the map and its chunks. For an image root it is the image's
  structure without its layer bytes, like a UnixFS directory's listing: the root, its manifests
  and its blob maps. A UnixFS file's entity is all of its blocks. A raw block is its own entity.
- `all` (the default): everything reachable: for an image root, the root, each blob map
  followed by its chunks, and the manifests (what `p2pimg export` writes).

dag-pb blocks (UnixFS content from other IPFS software, when this node holds it) are walked by
their links too.

`entity-bytes=from:to` (inclusive offsets, negative from the end, `to` may be `*`) narrows the
entity of a byte-like thing to the minimal set of blocks that proves those bytes, as the spec
requires: for a blob map, the map and the chunks holding them; for a UnixFS file, the nodes on
the way from the root down to the leaves holding them (each node's UnixFS `blocksizes` say which
children hold which bytes) and those leaves. A range that holds none of the entity's bytes gives
the block alone (the spec's `dag-scope=block` equivalent: the client learns the size from it).
Anything else (an image root, a directory) ignores the range, as the spec says.

Only blocks are skipped, never what they lead to: with `dups=n`, a subtree that occurs twice in a
file (zero-filled chunks) is sent once, but when the range covered only part of it the first time,
the second occurrence is walked again (without sending its blocks again) for the part it needs.
A subtree the range covered whole is never walked twice, so a file whose nodes link the same
subtree thousands of times costs no more than the blocks it holds plus two paths per level (the
range's two ends).

The walk holds one block per level (and each dag-pb node's list of children), never a whole blob:
the caller's `section` turns a block into body parts (bytes, or a region of a blob file).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from p2pimg.content import dagcbor
from p2pimg.content.car import MAX_BLOCK, car_header
from p2pimg.content.cid import DAG_CBOR, DAG_PB, Cid
from p2pimg.content.dagpb import decode_pb_node
from p2pimg.content.model import BLOB_MAP_TYPE, BlobMap
from p2pimg.content.unixfs import DataType, FileLeaf, FileNode, decode_unixfs, expand_file
from p2pimg.errors import P2pimgError
from p2pimg.web.server import AbortResponse, BodyPart

log = logging.getLogger(__name__)

MAX_DEPTH = 64  # DAG-CBOR levels a CAR follows (p2pimg's images have three)
SCOPES = ("block", "entity", "all")

EntityBytes = tuple[int, int | None]  # first and last offset (negative from the end; None for `*`)
Chunk = tuple[BlobMap, int]  # a chunk of a blob: its map and index


class Held(Protocol):
    """A verified block the node holds: its size, and its bytes unless it is a region of a blob."""

    @property
    def size(self) -> int: ...
    @property
    def data(self) -> bytes | None: ...


H = TypeVar("H", bound=Held)


@dataclass(frozen=True, slots=True)
class Link:
    """A block to walk to: for a chunk, where it is in its blob; for a node of a UnixFS file
    walked for a byte range, its place in the file."""

    cid: Cid
    chunk: Chunk | None = None
    part: FileNode | None = None


def byte_span(size: int, entity_bytes: EntityBytes) -> tuple[int, int] | None:
    """The offsets [first, last] of an entity of `size` bytes that `entity-bytes` selects, clipped
    to it; None when it selects none of them."""
    start, end = entity_bytes
    first = max(0, size + start if start < 0 else start)
    last = size - 1 if end is None else min(size - 1, size + end if end < 0 else end)
    return (first, last) if first <= last else None


def chunk_span(bmap: BlobMap, entity_bytes: EntityBytes | None) -> range:
    """The chunks of a blob holding the bytes `entity-bytes` asks for (all without a range; none
    when the range selects nothing of the blob: the answer is then the map alone)."""
    if entity_bytes is None:
        return range(bmap.count)
    span = byte_span(bmap.size, entity_bytes)
    if span is None:
        return range(0)
    return range(span[0] // bmap.chunk_size, span[1] // bmap.chunk_size + 1)


def unixfs_file_size(cid: Cid, held: Held) -> int | None:
    """The size of the UnixFS file whose root is this dag-pb block; None when it is not one."""
    if cid.codec != DAG_PB or held.data is None:
        return None
    try:
        node = decode_pb_node(held.data)
        fs = decode_unixfs(node.data or b"")
    except P2pimgError:
        return None
    if node.data is None or fs.type not in (DataType.FILE, DataType.RAW):
        return None
    return len(fs.data or b"") + sum(fs.blocksizes)


async def car_body(
    root: Cid,
    held: H,
    scope: str,
    entity_bytes: EntityBytes | None,
    locate: Callable[[Cid, Chunk | None], Awaitable[H | None]],
    section: Callable[[Cid, H], Iterator[BodyPart]],
    also: Sequence[Cid] = (),
) -> AsyncIterator[BodyPart]:
    """The CAR body: depth-first from `root` (held: found by the caller), each block once; then
    the DAGs of `also`. `locate` finds a block (None when it is not here), `section` gives its
    body parts. A block that is missing (or too large) cuts the stream there (AbortResponse)."""
    depth_limit = {"block": 0, "entity": 1, "all": MAX_DEPTH}[scope]
    file_size = unixfs_file_size(root, held) if depth_limit else None
    yield car_header([root])
    for part in section(root, held):
        yield part
    # `also` at the bottom of the stack: walked after the root's own links, as if it were more.
    stack: list[tuple[Iterator[Link], int]] = [((Link(cid) for cid in also), 1)]
    span = None
    if file_size is not None and entity_bytes is not None:
        span = byte_span(file_size, entity_bytes)
        if span is not None:  # (else none of the file's bytes: the root alone, as dag-scope=block)
            stack.append((_file_parts(FileNode(root, 0, file_size), held, span), 1))
    elif depth_limit:
        if file_size is not None:
            depth_limit = MAX_DEPTH  # a UnixFS file's entity is all of its blocks
        stack.append((_links(root, held, entity_bytes), 1))
    sent = {root}  # blocks in the body so far
    done = {root}  # blocks sent whose subtrees need no more walking
    while stack:
        links, depth = stack[-1]
        link = next(links, None)
        if link is None:
            stack.pop()
            continue
        cid = link.cid
        if cid in done:
            continue
        child = await locate(cid, link.chunk)
        if child is None or child.size > MAX_BLOCK:
            why = "not held here" if child is None else f"{child.size} bytes, over the block limit"
            log.info("CAR of %s cut at %s: %s", root, cid, why)
            raise AbortResponse(f"block {cid} of the DAG of {root}: {why}")
        if cid not in sent:
            sent.add(cid)
            for part in section(cid, child):
                yield part
        if link.part is None or (span is not None and _within(link.part, span)):
            done.add(cid)
        if link.part is not None and span is not None:
            stack.append((_file_parts(link.part, child, span), depth + 1))
        elif depth < depth_limit:
            stack.append((_links(cid, child, None), depth + 1))


def _within(part: FileNode, span: tuple[int, int]) -> bool:
    return span[0] <= part.offset and part.offset + (part.size or 0) - 1 <= span[1]


def _file_parts(part: FileNode, held: Held, span: tuple[int, int]) -> Iterator[Link]:
    """The children of a node of a UnixFS file that hold any of the bytes [first, last] of the
    file, in file order (the data a node carries itself is in its own block)."""
    try:
        children = expand_file(part, held.data or b"")
    except P2pimgError as exc:  # verified bytes that are not a part of a file: cut, as if missing
        raise AbortResponse(f"block {part.cid} is not a node of a UnixFS file: {exc.message}") from None
    first, last = span
    return iter(
        [
            Link(child.cid, part=child if isinstance(child, FileNode) else None)
            for child in children
            if not (isinstance(child, FileLeaf) and child.inline is not None)
            and child.offset <= last
            and child.offset + (child.size or 0) > first
        ]
    )


def _links(cid: Cid, held: Held, entity_bytes: EntityBytes | None) -> Iterator[Link]:
    """The blocks a DAG-CBOR or dag-pb node links to, in the order it encodes them (a blob map's
    chunks in order, those `entity_bytes` selects); raw blocks link to nothing."""
    if held.data is None:
        return iter(())
    if cid.codec == DAG_PB:  # UnixFS content another IPFS node added (nerdctl's images)
        try:
            return (Link(link.cid) for link in decode_pb_node(held.data).links)
        except P2pimgError as exc:
            raise AbortResponse(f"block {cid} is not dag-pb: {exc.message}") from None
    if cid.codec != DAG_CBOR:
        return iter(())
    try:
        node = dagcbor.decode(held.data)
    except P2pimgError as exc:  # verified bytes that do not decode: cut the CAR, as if missing
        raise AbortResponse(f"block {cid} is not DAG-CBOR: {exc.message}") from None
    if isinstance(node, dict) and node.get("type") == BLOB_MAP_TYPE:
        try:
            bmap = BlobMap.from_node(node)
        except P2pimgError as exc:
            raise AbortResponse(f"block {cid} is not a blob map: {exc.message}") from None
        return (Link(bmap.chunks[i], (bmap, i)) for i in chunk_span(bmap, entity_bytes))
    return (Link(link) for link in _node_links(node))


def _node_links(value: Any) -> Iterator[Cid]:
    """The links of a decoded DAG-CBOR value, in encoding order (decoded maps keep it)."""
    if isinstance(value, Cid):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _node_links(item)
    elif isinstance(value, list):
        for item in value:
            yield from _node_links(item)
