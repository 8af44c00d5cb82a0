"""UnixFS files over dag-pb: the strict codec, a file walker and Kubo's importer (pure, no I/O).

How IPFS software such as `nerdctl push ipfs://` (through Kubo) stores a blob: a file of up to one
chunk is a single `raw` block; a larger one is a tree of `dag-pb` nodes whose UnixFS `File` data
lists the byte size under each link (`blocksizes`), over raw leaves. Other adders use other chunk
sizes, widths, layouts (trickle), leaves with the data inline in a dag-pb node, or data in an
inner node ahead of its children; the walker takes any of them, and refuses what is not a file.

The dag-pb codec itself is in `dagpb.py` (re-exported here); UnixFS `Data` messages are
ordinary protobuf, decoded strictly too: fields in number order, each once, none unknown.

Walking is a step function so that the async fetch code can drive it: `file_root` gives the first
item, `expand_file` turns a fetched node into its children in file order, each a `FileNode` (a
dag-pb block to fetch and expand in turn) or a `FileLeaf` (bytes at an offset: a raw block to fetch,
or data that was inline in the node). Offsets and sizes come from the parents' `blocksizes`, so
leaves can be fetched in any order and in parallel; every node is checked to hold exactly the
bytes its parent said. `walk_file` and `read_file` are the synchronous drivers.

Bounds against hostile DAGs: blocks of at most 2 MiB (what IPFS peers exchange), at most
`MAX_DEPTH` levels and `MAX_LINKS` links per node, no link to an empty subtree (so the number of
blocks is bounded by the file's size times the depth), and a root whose size is the one expected.
Identical subtrees may repeat (zero-filled chunks do): a CID names its content, so no real cycle
can exist, and the depth bound stops any attempt to fake one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum

from p2pimg.content.cid import DAG_PB, RAW, Cid
from p2pimg.content.dagpb import (
    U64,
    WIRE_I32,
    WIRE_LEN,
    WIRE_VARINT,
    PbLink,
    PbNode,
    bytes_field,
    decode_pb_node,
    encode_pb_node,
    encode_varint,
    expect_wire,
    field_key,
    iter_fields,
    read_varint,
)
from p2pimg.errors import UnixfsInvalid, VerificationError

__all__ = [
    "CHUNK_SIZE",
    "KUBO_MAX_LINKS",
    "MAX_BLOCK_SIZE",
    "MAX_DEPTH",
    "MAX_LINKS",
    "DataType",
    "FileLeaf",
    "FileNode",
    "PbLink",
    "PbNode",
    "UnixTime",
    "UnixfsData",
    "check_leaf",
    "decode_pb_node",
    "decode_unixfs",
    "encode_pb_node",
    "encode_unixfs",
    "expand_file",
    "file_root",
    "import_file",
    "read_file",
    "walk_file",
]

MAX_BLOCK_SIZE = 2 << 20
MAX_DEPTH = 32
MAX_LINKS = 4096
CHUNK_SIZE = 256 << 10  # Kubo's default chunker: size-262144
KUBO_MAX_LINKS = 174  # Kubo's (and js-ipfs-unixfs-importer's) widest balanced node

# --- UnixFS Data ----------------------------------------------------------------------------------


class DataType(IntEnum):
    RAW = 0  # legacy: a leaf wrapped in dag-pb (read, never written)
    DIRECTORY = 1
    FILE = 2
    METADATA = 3
    SYMLINK = 4
    HAMT_SHARD = 5


@dataclass(frozen=True, slots=True)
class UnixTime:
    seconds: int
    nanos: int | None = None  # 1..999999999 when present


@dataclass(frozen=True, slots=True)
class UnixfsData:
    type: DataType
    data: bytes | None = None
    filesize: int | None = None
    blocksizes: tuple[int, ...] = ()
    hash_type: int | None = None
    fanout: int | None = None
    mode: int | None = None
    mtime: UnixTime | None = None


def _decode_time(buf: bytes) -> UnixTime:
    what = "UnixFS mtime"
    seconds: int | None = None
    nanos: int | None = None
    last = 0
    for number, wire, value in iter_fields(buf, what):
        if number <= last or number > 2:
            raise UnixfsInvalid(f"{what}: field {number} out of order, repeated or unknown")
        last = number
        assert isinstance(value, int)
        if number == 1:
            expect_wire(wire, WIRE_VARINT, what, "Seconds")
            seconds = value - U64 if value >= 1 << 63 else value  # int64: two's complement
        else:
            expect_wire(wire, WIRE_I32, what, "FractionalNanoseconds")
            if not 1 <= value <= 999_999_999:
                raise UnixfsInvalid(f"{what}: FractionalNanoseconds {value} out of range")
            nanos = value
    if seconds is None:
        raise UnixfsInvalid(f"{what} without Seconds")
    return UnixTime(seconds, nanos)


def decode_unixfs(data: bytes) -> UnixfsData:
    """Decode a UnixFS `Data` message (a dag-pb node's Data). Fields must come in field-number
    order, each once (blocksizes: one contiguous run, packed or not); unknown fields are refused."""
    what = "UnixFS data"
    values: dict[int, int | bytes | UnixTime] = {}
    sizes: list[int] = []
    last = 0
    for number, wire, value in iter_fields(bytes(data), what):
        if number < last or (number == last and number != 4) or number > 8:
            raise UnixfsInvalid(f"{what}: field {number} out of order, repeated or unknown")
        last = number
        if number == 4:
            if wire == WIRE_LEN:  # packed: parsers must take both forms of a repeated number
                assert isinstance(value, bytes)
                pos = 0
                while pos < len(value):
                    size, pos = read_varint(value, pos)
                    sizes.append(size)
            else:
                expect_wire(wire, WIRE_VARINT, what, "blocksizes")
                assert isinstance(value, int)
                sizes.append(value)
        elif number in (2, 8):
            expect_wire(wire, WIRE_LEN, what, "Data" if number == 2 else "mtime")
            assert isinstance(value, bytes)
            values[number] = value if number == 2 else _decode_time(value)
        else:
            expect_wire(wire, WIRE_VARINT, what, f"field {number}")
            values[number] = value
    type_number = values.get(1)
    if not isinstance(type_number, int):
        raise UnixfsInvalid(f"{what} without a Type")
    try:
        kind = DataType(type_number)
    except ValueError:
        raise UnixfsInvalid(f"{what}: unknown Type {type_number}") from None
    mode = values.get(7)
    if isinstance(mode, int) and mode >= 1 << 32:
        raise UnixfsInvalid(f"{what}: mode does not fit 32 bits")

    def number_of(n: int) -> int | None:
        v = values.get(n)
        return v if isinstance(v, int) else None

    body = values.get(2)
    mtime = values.get(8)
    return UnixfsData(
        type=kind,
        data=body if isinstance(body, bytes) else None,
        filesize=number_of(3),
        blocksizes=tuple(sizes),
        hash_type=number_of(5),
        fanout=number_of(6),
        mode=number_of(7),
        mtime=mtime if isinstance(mtime, UnixTime) else None,
    )


def encode_unixfs(msg: UnixfsData) -> bytes:
    """Fields in number order, blocksizes unpacked: as Kubo and js-ipfs-unixfs write them."""
    out = bytearray(field_key(1, WIRE_VARINT) + encode_varint(int(msg.type)))
    if msg.data is not None:
        out += bytes_field(2, msg.data)
    if msg.filesize is not None:
        out += field_key(3, WIRE_VARINT) + encode_varint(msg.filesize)
    for size in msg.blocksizes:
        out += field_key(4, WIRE_VARINT) + encode_varint(size)
    for number, value in ((5, msg.hash_type), (6, msg.fanout), (7, msg.mode)):
        if value is not None:
            out += field_key(number, WIRE_VARINT) + encode_varint(value)
    if msg.mtime is not None:
        t = field_key(1, WIRE_VARINT) + encode_varint(msg.mtime.seconds % U64)
        if msg.mtime.nanos:  # a fraction of 0 is never written (the spec's rule)
            t += field_key(2, WIRE_I32) + msg.mtime.nanos.to_bytes(4, "little")
        out += bytes_field(8, t)
    return bytes(out)


# --- walking a file -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileNode:
    """A block to fetch and give to `expand_file`: the root, or a dag-pb node inside the file.
    `size` is the number of file bytes under it (None: a root whose size is not known)."""

    cid: Cid
    offset: int
    size: int | None
    depth: int = 0


@dataclass(frozen=True, slots=True)
class FileLeaf:
    """`size` bytes of the file at `offset`. With `inline` None the raw block `cid` holds exactly
    them (fetch it, then `check_leaf`); else they are `inline`, carried in the node `cid`."""

    cid: Cid
    offset: int
    size: int
    inline: bytes | None = field(default=None, repr=False)


def file_root(cid: Cid, size: int | None = None) -> FileNode | FileLeaf:
    """Where walking the file `cid` starts. A raw root of known size is a leaf: one block."""
    if cid.codec not in (RAW, DAG_PB):
        raise UnixfsInvalid(f"{cid} is {cid.codec_name}, not a UnixFS file (raw or dag-pb)")
    if size is not None and size < 0:
        raise ValueError("a file size cannot be negative")
    if cid.codec == RAW and size is not None:
        if size > MAX_BLOCK_SIZE:
            raise UnixfsInvalid(f"a single-block file of {size} bytes is over the block size limit")
        return FileLeaf(cid, 0, size)
    return FileNode(cid, 0, size)


def check_leaf(leaf: FileLeaf, block: bytes) -> None:
    """Raise unless `block` is the raw leaf `leaf` names: its CID and its size."""
    if leaf.inline is not None:
        raise ValueError("an inline leaf has no block of its own")
    if not leaf.cid.matches(block):
        raise VerificationError(f"block does not match its CID {leaf.cid}")
    if len(block) != leaf.size:
        raise UnixfsInvalid(f"leaf {leaf.cid} holds {len(block)} bytes, its parent says {leaf.size}")


def expand_file(
    node: FileNode, block: bytes, *, max_depth: int = MAX_DEPTH, max_links: int = MAX_LINKS
) -> list[FileNode | FileLeaf]:
    """Check `block` against `node` (its CID; a UnixFS file node holding `node.size` bytes) and
    return what it is made of, in file order, at absolute offsets. Raises `VerificationError` if
    the block is not the one named, `UnixfsInvalid` if it is not a well-formed part of a file."""
    if len(block) > MAX_BLOCK_SIZE:
        raise UnixfsInvalid(f"block {node.cid} of {len(block)} bytes is over the {MAX_BLOCK_SIZE}-byte limit")
    if not node.cid.matches(block):
        raise VerificationError(f"block does not match its CID {node.cid}")
    if node.cid.codec == RAW:  # a single-block file of unknown size: the block is the data
        if node.size is not None and len(block) != node.size:
            raise UnixfsInvalid(f"raw block {node.cid} holds {len(block)} bytes, expected {node.size}")
        return [FileLeaf(node.cid, node.offset, len(block), bytes(block))] if block else []
    if node.cid.codec != DAG_PB:
        raise UnixfsInvalid(f"{node.cid} is {node.cid.codec_name}, not part of a UnixFS file")

    pb = decode_pb_node(block)
    if pb.data is None:
        raise UnixfsInvalid(f"dag-pb node {node.cid} has no UnixFS data")
    fs = decode_unixfs(pb.data)
    if fs.type not in (DataType.FILE, DataType.RAW):
        raise UnixfsInvalid(f"{node.cid} is a UnixFS {fs.type.name.lower()}, not a file")
    if len(pb.links) != len(fs.blocksizes):
        raise UnixfsInvalid(f"{node.cid}: {len(pb.links)} links but {len(fs.blocksizes)} blocksizes")
    if fs.type == DataType.RAW and pb.links:
        raise UnixfsInvalid(f"{node.cid}: a legacy Raw node has links")
    if len(pb.links) > max_links:
        raise UnixfsInvalid(f"{node.cid} has {len(pb.links)} links, over the limit of {max_links}")
    if pb.links and node.depth >= max_depth:
        raise UnixfsInvalid(f"file DAG deeper than {max_depth} levels at {node.cid}")
    inline = fs.data or b""
    total = len(inline) + sum(fs.blocksizes)
    if (fs.filesize or 0) != total:
        raise UnixfsInvalid(f"{node.cid}: filesize {fs.filesize} but its parts add up to {total}")
    if node.size is not None and total != node.size:
        raise UnixfsInvalid(f"{node.cid} holds {total} bytes of the file, its parent says {node.size}")

    out: list[FileNode | FileLeaf] = []
    offset = node.offset
    if inline:
        out.append(FileLeaf(node.cid, offset, len(inline), inline))
        offset += len(inline)
    for link, size in zip(pb.links, fs.blocksizes, strict=True):
        if link.name:
            raise UnixfsInvalid(f"{node.cid}: a file's link has a name ({link.name[:40]!r})")
        if size == 0:
            raise UnixfsInvalid(f"{node.cid}: a link to an empty part of the file")
        if link.cid.codec == RAW:
            if size > MAX_BLOCK_SIZE:
                raise UnixfsInvalid(f"{node.cid}: a raw leaf of {size} bytes is over the block size limit")
            out.append(FileLeaf(link.cid, offset, size))
        elif link.cid.codec == DAG_PB:
            out.append(FileNode(link.cid, offset, size, node.depth + 1))
        else:
            raise UnixfsInvalid(f"{node.cid} links to {link.cid.codec_name} {link.cid} inside a file")
        offset += size
    return out


def walk_file(
    root: Cid,
    get_block: Callable[[Cid], bytes],
    *,
    size: int | None = None,
    max_depth: int = MAX_DEPTH,
    max_links: int = MAX_LINKS,
) -> Iterator[FileLeaf]:
    """The file's leaves in order, fetching (by `get_block`) only its dag-pb nodes, depth first:
    at most `max_depth` x `max_links` items are pending at any time."""
    stack: list[FileNode | FileLeaf] = [file_root(root, size)]
    while stack:
        item = stack.pop()
        if isinstance(item, FileLeaf):
            yield item
        else:
            children = expand_file(item, get_block(item.cid), max_depth=max_depth, max_links=max_links)
            stack.extend(reversed(children))


def read_file(root: Cid, get_block: Callable[[Cid], bytes], *, size: int | None = None) -> Iterator[bytes]:
    """The file's bytes, leaf by leaf, every block checked against its CID and its size."""
    for leaf in walk_file(root, get_block, size=size):
        if leaf.inline is not None:
            yield leaf.inline
        else:
            block = get_block(leaf.cid)
            check_leaf(leaf, block)
            yield block


# --- importing a file as Kubo does --------------------------------------------------------------


@dataclass(slots=True)
class _Level:
    """The links gathered for the next node of one level of the tree: (cid, file bytes, tsize)."""

    links: list[tuple[Cid, int, int]] = field(default_factory=list)


def _parent(links: list[tuple[Cid, int, int]]) -> tuple[Cid, bytes, int, int]:
    sizes = tuple(size for _, size, _ in links)
    data = encode_unixfs(UnixfsData(DataType.FILE, filesize=sum(sizes), blocksizes=sizes))
    block = encode_pb_node(PbNode(tuple(PbLink(cid, "", tsize) for cid, _, tsize in links), data))
    return Cid.of_dag_pb(block), block, sum(sizes), len(block) + sum(t for _, _, t in links)


def _chunks(pieces: Iterable[bytes], chunk_size: int) -> Iterator[bytes]:
    """Fixed-size chunks (the last one shorter), whatever the sizes of the pieces; at least one."""
    buf = bytearray()
    emitted = False
    for piece in pieces:
        buf += piece
        while len(buf) >= chunk_size:
            yield bytes(buf[:chunk_size])
            del buf[:chunk_size]
            emitted = True
    if buf or not emitted:  # an empty file is one empty chunk
        yield bytes(buf)


def import_file(
    pieces: Iterable[bytes], *, chunk_size: int = CHUNK_SIZE, max_links: int = KUBO_MAX_LINKS
) -> Iterator[tuple[Cid, bytes]]:
    """Add a file as `ipfs add --cid-version=1` does by default (fixed chunks, raw leaves, a
    balanced tree at most `max_links` wide, CIDv1 sha2-256), streaming: every block is yielded as
    soon as it is made, children before parents, and the last one is the root. A file of one
    chunk (or none) is that one raw block. Identical chunks are yielded each time they occur.

    The tree is the one Kubo's balanced builder makes: leaves are grouped `max_links` at a time
    under parents, those parents grouped the same way, and so on up to a single root; a last group
    of one is still given a parent (only a file of a single chunk is its own root)."""
    if not 1 <= chunk_size <= MAX_BLOCK_SIZE:
        raise ValueError(f"chunk size must be 1..{MAX_BLOCK_SIZE} bytes")
    if max_links < 2:
        raise ValueError("a node needs room for at least two links")
    levels: list[_Level] = [_Level()]
    for chunk in _chunks(pieces, chunk_size):
        cid = Cid.of_raw(chunk)
        yield cid, chunk
        levels[0].links.append((cid, len(chunk), len(chunk)))
        # A full level becomes a node of the next one as soon as it fills, so memory holds at
        # most `max_links` links per level.
        k = 0
        while len(levels[k].links) == max_links:
            pcid, block, size, tsize = _parent(levels[k].links)
            yield pcid, block
            levels[k].links = []
            if k + 1 == len(levels):
                levels.append(_Level())
            levels[k + 1].links.append((pcid, size, tsize))
            k += 1
    for k, level in enumerate(levels):
        above = any(upper.links for upper in levels[k + 1 :])
        if not level.links:
            continue
        if len(level.links) == 1 and not above:
            return  # this one entry is the root, and it was yielded when it was made
        pcid, block, size, tsize = _parent(level.links)
        yield pcid, block
        if k + 1 == len(levels):
            levels.append(_Level())
        levels[k + 1].links.append((pcid, size, tsize))
