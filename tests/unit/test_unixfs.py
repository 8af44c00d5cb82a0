"""Unit tests for p2pimg.content.unixfs (and the dag-pb codec under it): the strict codecs, the
file walker over any layout, the refusals, and the Kubo-compatible streaming importer.

The pinned CIDs were produced by npm's ipfs-unixfs-importer (tests/integration/test_unixfs_js.py
runs it for more sizes), so CI checks the importer without Node."""

from __future__ import annotations

import contextlib
import hashlib
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pimg.content.cid import DAG_CBOR, DAG_PB, RAW, Cid
from p2pimg.content.unixfs import (
    CHUNK_SIZE,
    MAX_BLOCK_SIZE,
    DataType,
    FileLeaf,
    FileNode,
    PbLink,
    PbNode,
    UnixfsData,
    UnixTime,
    check_leaf,
    decode_pb_node,
    decode_unixfs,
    encode_pb_node,
    encode_unixfs,
    expand_file,
    file_root,
    import_file,
    read_file,
    walk_file,
)
from p2pimg.errors import BlockInvalid, UnixfsInvalid, VerificationError

Blocks = dict[Cid, bytes]


def stream(n: int) -> bytes:
    """n deterministic bytes (the same as the JS cross-check's inputs)."""
    return b"".join(hashlib.sha256(i.to_bytes(8, "big")).digest() for i in range(n // 32 + 1))[:n]


def imported(data: bytes, **kw: int) -> tuple[Cid, Blocks]:
    blocks: Blocks = {}
    root = None
    for cid, block in import_file([data], **kw):
        blocks[cid] = block
        root = cid
    assert root is not None
    return root, blocks


def read_all(root: Cid, blocks: Blocks, size: int | None = None) -> bytes:
    return b"".join(read_file(root, blocks.__getitem__, size=size))


def file_node(blocks: Blocks, links: list[tuple[Cid, int]], data: bytes | None = None, **kw: Any) -> Cid:
    """Put a UnixFS File node over `links` (cid, file bytes) into `blocks`; kw overrides fields."""
    fields: dict[str, Any] = {
        "type": DataType.FILE,
        "data": data,
        "filesize": len(data or b"") + sum(size for _, size in links),
        "blocksizes": tuple(size for _, size in links),
    }
    fields.update(kw)
    names = fields.pop("names", [""] * len(links))
    node = PbNode(
        tuple(PbLink(cid, name, 1) for (cid, _), name in zip(links, names, strict=True)),
        encode_unixfs(UnixfsData(**fields)),
    )
    block = encode_pb_node(node)
    cid = Cid.of_dag_pb(block)
    blocks[cid] = block
    return cid


def raw(blocks: Blocks, data: bytes) -> tuple[Cid, int]:
    cid = Cid.of_raw(data)
    blocks[cid] = data
    return cid, len(data)


# --- importer: Kubo's CIDs -------------------------------------------------------------------------

# (size, chunk size, max links) -> root CID, from ipfs-unixfs-importer 17 at these settings.
JS_VECTORS = [
    (0, CHUNK_SIZE, 174, "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"),
    (262145, CHUNK_SIZE, 174, "bafybeiavfl3mrv5rig3iqfle6aheyo3crcdzseal3jfwykhuwtmc4vtyjy"),
    (100_000, 4096, 8, "bafybeigtbrz7twqgjat35ccjwln42pphfb52brcgxi6p35qhexzzrvzzg4"),
    (4096 * 8 * 8 + 1, 4096, 8, "bafybeig4htcwklbdjrr5l4jfqzfq2h4bqig2y4nnctlajzbwqidpvs5ova"),
    (100_000, 1000, 3, "bafybeihcyo54gr4to5aj4tqbqbh7wrmxnqjscpstncohgscodnuiusfto4"),
]


@pytest.mark.parametrize("size,chunk,links,expected", JS_VECTORS)
def test_importer_gives_the_js_importers_cids(size: int, chunk: int, links: int, expected: str) -> None:
    data = stream(size)
    root, blocks = imported(data, chunk_size=chunk, max_links=links)
    assert str(root) == expected
    assert read_all(root, blocks, size) == data


def test_a_file_of_one_chunk_is_one_raw_block() -> None:
    for data in (b"", b"x", stream(CHUNK_SIZE)):
        out = list(import_file([data]))
        assert out == [(Cid.of_raw(data), data)]


def test_importer_chunks_whatever_the_pieces() -> None:
    data = stream(3 * CHUNK_SIZE + 5)
    pieces = [data[i : i + 1000] for i in range(0, len(data), 1000)]
    assert list(import_file(pieces)) == list(import_file([data]))
    assert list(import_file([b"", data, b""])) == list(import_file([data]))


def test_importer_tree_shape() -> None:
    # 175 chunks at 174 links: a root over a full node and a node over the last chunk.
    root, blocks = imported(stream(174 * 100 + 1), chunk_size=100)
    top = decode_pb_node(blocks[root])
    assert [len(decode_pb_node(blocks[link.cid]).links) for link in top.links] == [174, 1]
    fs = decode_unixfs(top.data or b"")
    assert fs == UnixfsData(DataType.FILE, filesize=17401, blocksizes=(17400, 1))
    assert all(link.name == "" and link.tsize for link in top.links)


def test_importer_is_streaming() -> None:
    """Blocks come out while the input is still being read, and memory stays bounded."""
    consumed = 0

    def pieces() -> Iterator[bytes]:
        nonlocal consumed
        for i in range(64):
            consumed = i + 1
            yield stream(32) * (1 << 15)  # 1 MiB

    tracemalloc.start()
    try:
        gen = import_file(pieces())
        next(gen)
        assert consumed == 1
        last = None
        for item in gen:
            last = item
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert last is not None and last[0].codec == DAG_PB
    assert peak < 8 << 20


@pytest.mark.parametrize("kw", [{"chunk_size": 0}, {"chunk_size": MAX_BLOCK_SIZE + 1}, {"max_links": 1}])
def test_importer_refuses_bad_settings(kw: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        list(import_file([b"x"], **kw))


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(max_size=3000),
    chunk=st.integers(1, 300),
    links=st.integers(2, 6),
)
def test_import_then_walk_round_trips(data: bytes, chunk: int, links: int) -> None:
    root, blocks = imported(data, chunk_size=chunk, max_links=links)
    assert read_all(root, blocks, len(data)) == data
    leaves = list(walk_file(root, blocks.__getitem__, size=len(data)))
    # Leaves tile the file: contiguous, in order, each a chunk (the last one shorter).
    offset = 0
    for leaf in leaves:
        assert leaf.offset == offset and 0 < leaf.size <= chunk or not data
        offset += leaf.size
    assert offset == len(data)


# --- walker: layouts ---------------------------------------------------------------------------------


def test_walker_over_a_raw_root() -> None:
    blocks: Blocks = {}
    cid, _ = raw(blocks, b"hello")
    assert file_root(cid, 5) == FileLeaf(cid, 0, 5)
    assert list(walk_file(cid, blocks.__getitem__, size=5)) == [FileLeaf(cid, 0, 5)]
    # Size unknown: the root is fetched as a node and its bytes come back inline.
    assert [leaf.inline for leaf in walk_file(cid, blocks.__getitem__)] == [b"hello"]
    assert read_all(cid, blocks) == read_all(cid, blocks, 5) == b"hello"


def test_walker_over_inline_leaves_data_in_inner_nodes_and_uneven_depths() -> None:
    """A trickle-like DAG: dag-pb leaves carrying data, a node with data ahead of its links, raw
    leaves of different sizes, subtrees of different depths."""
    blocks: Blocks = {}
    leaf1 = file_node(blocks, [], data=b"AAAA")
    leaf2 = (file_node(blocks, [], data=b"BB", type=DataType.RAW), 2)  # legacy Raw leaf
    deep = file_node(blocks, [(file_node(blocks, [raw(blocks, b"CCC")]), 3), raw(blocks, b"D")])
    mid = file_node(blocks, [leaf2, (deep, 4)], data=b"xy")
    root = file_node(blocks, [(leaf1, 4), (mid, 8), raw(blocks, b"EEEEE")])
    assert read_all(root, blocks, 17) == b"AAAAxyBBCCCDEEEEE"
    leaves = list(walk_file(root, blocks.__getitem__))
    assert [(leaf.offset, leaf.size, leaf.inline is not None) for leaf in leaves] == [
        (0, 4, True),
        (4, 2, True),
        (6, 2, True),
        (8, 3, False),
        (11, 1, False),
        (12, 5, False),
    ]
    assert leaves[1].cid == mid  # a node's own data is a leaf named by the node


def test_walker_over_empty_files() -> None:
    blocks: Blocks = {}
    empty_node = file_node(blocks, [])
    assert list(walk_file(empty_node, blocks.__getitem__, size=0)) == []
    cid, _ = raw(blocks, b"")
    assert read_all(cid, blocks, 0) == read_all(cid, blocks) == b""


def test_expand_gives_absolute_offsets_for_parallel_fetching() -> None:
    root, blocks = imported(stream(5000), chunk_size=100, max_links=4)
    start = file_root(root, 5000)
    assert isinstance(start, FileNode)
    children = expand_file(start, blocks[root])
    assert [c.offset for c in children] == [0, 1600, 3200, 4800]
    assert all(isinstance(c, FileNode) and c.depth == 1 for c in children)


# --- walker: refusals ------------------------------------------------------------------------------


def refused(root: Cid, blocks: Blocks, size: int | None = None, match: str = "") -> UnixfsInvalid:
    with pytest.raises(UnixfsInvalid, match=match) as info:
        list(read_file(root, blocks.__getitem__, size=size))
    assert isinstance(info.value, BlockInvalid)  # callers that catch bad blocks catch these too
    return info.value


def test_refuses_wrong_codecs() -> None:
    with pytest.raises(UnixfsInvalid, match="dag-cbor"):
        file_root(Cid.of_dag_cbor(b"\xa0"))
    blocks: Blocks = {}
    bad = Cid.of_dag_cbor(b"\xa0")
    root = file_node(blocks, [(bad, 1)])
    refused(root, blocks, match="dag-cbor")


@pytest.mark.parametrize(
    "kind", [DataType.DIRECTORY, DataType.SYMLINK, DataType.HAMT_SHARD, DataType.METADATA]
)
def test_refuses_what_is_not_a_file(kind: DataType) -> None:
    blocks: Blocks = {}
    root = file_node(blocks, [], data=b"x", type=kind, filesize=None)
    refused(root, blocks, match="not a file")


def test_refuses_a_dag_pb_node_without_unixfs_data() -> None:
    blocks: Blocks = {}
    block = encode_pb_node(PbNode())
    blocks[Cid.of_dag_pb(block)] = block
    assert str(Cid.of_dag_pb(block)) == "bafybeihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
    refused(Cid.of_dag_pb(block), blocks, match="no UnixFS data")


def test_refuses_sizes_that_do_not_add_up() -> None:
    blocks: Blocks = {}
    leaf = raw(blocks, b"abc")
    refused(file_node(blocks, [leaf], filesize=4), blocks, match="add up")
    refused(file_node(blocks, [leaf], blocksizes=(3, 1)), blocks, match="blocksizes")
    refused(file_node(blocks, [], data=b"ab", filesize=None), blocks, match="add up")
    # The parent says 4 bytes, the child node holds 3.
    child = file_node(blocks, [leaf])
    refused(file_node(blocks, [(child, 4)]), blocks, match="parent says")
    # A raw leaf that is not the size its parent says.
    lying = file_node(blocks, [(leaf[0], 5)])
    refused(lying, blocks, match="parent says")
    # The root is not the size the caller expects (a descriptor's size).
    good = file_node(blocks, [leaf])
    refused(good, blocks, size=4, match="parent says")
    assert read_all(good, blocks, 3) == b"abc"


def test_refuses_named_links_and_empty_parts() -> None:
    blocks: Blocks = {}
    leaf = raw(blocks, b"abc")
    refused(file_node(blocks, [leaf], names=["x"]), blocks, match="name")
    empty = raw(blocks, b"")
    refused(file_node(blocks, [leaf, empty]), blocks, match="empty")


def test_refuses_depth_bombs() -> None:
    blocks: Blocks = {}
    node = raw(blocks, b"z")
    for _ in range(40):
        node = (file_node(blocks, [node]), 1)
    refused(node[0], blocks, match="deeper")
    with pytest.raises(UnixfsInvalid, match="deeper"):
        list(walk_file(node[0], blocks.__getitem__, max_depth=10))


def test_refuses_wide_nodes() -> None:
    blocks: Blocks = {}
    leaf = raw(blocks, b"z")
    root = file_node(blocks, [leaf] * 20)
    assert read_all(root, blocks) == b"z" * 20
    with pytest.raises(UnixfsInvalid, match="links"):
        list(walk_file(root, blocks.__getitem__, max_links=19))


def test_refuses_blocks_over_2_mib() -> None:
    big = b"\x00" * (MAX_BLOCK_SIZE + 1)
    with pytest.raises(UnixfsInvalid, match="limit"):
        file_root(Cid.of_raw(big), len(big))
    with pytest.raises(UnixfsInvalid, match="limit"):
        expand_file(FileNode(Cid.of_raw(big), 0, None), big)
    blocks: Blocks = {}
    refused(file_node(blocks, [(Cid.of_raw(big), len(big))]), blocks, match="limit")


def test_blocks_that_do_not_match_their_cid() -> None:
    blocks: Blocks = {}
    leaf_cid, _ = raw(blocks, b"abc")
    root = file_node(blocks, [(leaf_cid, 3)])
    with pytest.raises(VerificationError):
        expand_file(FileNode(root, 0, 3), blocks[root] + b"\x00")
    with pytest.raises(VerificationError):
        check_leaf(FileLeaf(leaf_cid, 0, 3), b"abd")
    blocks[leaf_cid] = b"abd"
    with pytest.raises(VerificationError):
        read_all(root, blocks)


# --- dag-pb codec ----------------------------------------------------------------------------------

cids = st.builds(Cid, st.sampled_from([RAW, DAG_PB, DAG_CBOR]), st.binary(min_size=32, max_size=32))
links = st.builds(PbLink, cids, st.none() | st.text(max_size=12), st.none() | st.integers(0, 2**64 - 1)).map(
    lambda link: link
)
nodes = st.builds(
    lambda ls, data: PbNode(tuple(sorted(ls, key=lambda link: (link.name or "").encode())), data),
    st.lists(links, max_size=6),
    st.none() | st.binary(max_size=64),
)


@given(node=nodes)
def test_pb_node_round_trips(node: PbNode) -> None:
    block = encode_pb_node(node)
    assert decode_pb_node(block) == node
    assert encode_pb_node(decode_pb_node(block)) == block


def test_pb_node_known_bytes() -> None:
    cid = Cid.of_raw(b"")
    block = encode_pb_node(PbNode((PbLink(cid, "", 0),), b"\x08\x02"))
    assert block == b"\x12\x2a\x0a\x24" + cid.to_bytes() + b"\x12\x00\x18\x00" + b"\x0a\x02\x08\x02"
    assert decode_pb_node(b"") == PbNode()


def test_pb_node_accepts_data_before_links() -> None:
    """The spec: decoders accept either order, as IPFS data exists in both forms."""
    cid = Cid.of_raw(b"")
    link = b"\x12\x26\x0a\x24" + cid.to_bytes()
    assert decode_pb_node(b"\x0a\x01x" + link + link) == PbNode((PbLink(cid), PbLink(cid)), b"x")


def test_encoder_refuses_unsorted_links() -> None:
    cid = Cid.of_raw(b"")
    with pytest.raises(ValueError):
        encode_pb_node(PbNode((PbLink(cid, "b"), PbLink(cid, "a"))))


HASH = b"\x0a\x24" + Cid.of_raw(b"").to_bytes()


def link_field(body: bytes) -> bytes:
    return b"\x12" + bytes([len(body)]) + body


@pytest.mark.parametrize(
    "block,match",
    [
        (b"\x0a", "truncated varint"),
        (b"\x0a\x80", "truncated varint"),
        (b"\x0a\x05ab", "past the end"),
        (b"\x0a\x80\x00", "minimally"),
        (b"\x0a" + b"\xff" * 10 + b"\x01", "longer than 10"),
        (b"\x0a" + b"\xff" * 9 + b"\x02", "overflows"),
        (b"\x08\x01", "wire type 0"),  # Data as a varint
        (b"\x0b", "wire type 3"),  # a group
        (b"\x1a\x00", "unknown field 3"),
        (b"\x00\x00", "field number 0"),
        (b"\x0a\x00\x0a\x00", "twice"),
        (link_field(HASH) + b"\x0a\x00" + link_field(HASH), "interleaved"),
        (link_field(b"\x12\x00"), "without a Hash"),
        (link_field(b"\x12\x00" + HASH), "out of order"),
        (link_field(HASH + HASH), "out of order"),
        (link_field(HASH + b"\x18\x01\x12\x00"), "out of order"),
        (link_field(HASH + b"\x22\x00"), "unknown"),
        (link_field(HASH + b"\x1a\x00"), "Tsize has wire type 2"),
        (link_field(HASH + b"\x12\x02\xff\xfe"), "UTF-8"),
        (link_field(b"\x0a\x03abc"), "Hash"),
        (link_field(b"\x0a\x22\x12\x20" + b"\x00" * 32), "CIDv0"),
        (b"\x12\x01\x0a", "truncated varint"),  # inside a link
    ],
)
def test_pb_node_refuses_malformed_blocks(block: bytes, match: str) -> None:
    with pytest.raises(UnixfsInvalid, match=match):
        decode_pb_node(block)


@given(data=st.binary(max_size=200))
def test_pb_decoder_gives_a_node_or_unixfs_invalid(data: bytes) -> None:
    with contextlib.suppress(UnixfsInvalid):  # anything else (an IndexError...) fails the test
        decode_pb_node(data)


# --- UnixFS Data ----------------------------------------------------------------------------------

unixfs_messages = st.builds(
    UnixfsData,
    st.sampled_from(list(DataType)),
    st.none() | st.binary(max_size=32),
    st.none() | st.integers(0, 2**64 - 1),
    st.lists(st.integers(0, 2**64 - 1), max_size=5).map(tuple),
    st.none() | st.integers(0, 2**64 - 1),
    st.none() | st.integers(0, 1024),
    st.none() | st.integers(0, 2**32 - 1),
    st.none()
    | st.builds(UnixTime, st.integers(-(2**63), 2**63 - 1), st.none() | st.integers(1, 999_999_999)),
)


@given(msg=unixfs_messages)
def test_unixfs_data_round_trips(msg: UnixfsData) -> None:
    data = encode_unixfs(msg)
    assert decode_unixfs(data) == msg
    assert encode_unixfs(decode_unixfs(data)) == data


def test_unixfs_known_bytes_and_packed_blocksizes() -> None:
    msg = UnixfsData(DataType.FILE, filesize=300, blocksizes=(200, 100))
    assert encode_unixfs(msg) == b"\x08\x02\x18\xac\x02\x20\xc8\x01\x20\x64"
    assert decode_unixfs(b"\x08\x02\x18\xac\x02\x22\x03\xc8\x01\x64") == msg  # packed form
    assert encode_unixfs(UnixfsData(DataType.FILE, mtime=UnixTime(5, 0))) == b"\x08\x02\x42\x02\x08\x05"


@pytest.mark.parametrize(
    "data,match",
    [
        (b"", "without a Type"),
        (b"\x08\x09", "unknown Type 9"),
        (b"\x08\x02\x08\x02", "out of order"),
        (b"\x18\x01\x08\x02", "out of order"),
        (b"\x08\x02\x20\x01\x18\x01\x20\x01", "out of order"),  # blocksizes not contiguous
        (b"\x08\x02\x48\x01", "unknown"),
        (b"\x0a\x00", "wire type 2"),
        (b"\x08\x02\x10\x01", "wire type 0"),
        (b"\x08\x02\x22\x01\x80", "truncated varint"),
        (b"\x08\x02\x38\x80\x80\x80\x80\x10", "32 bits"),
        (b"\x08\x02\x42\x00", "without Seconds"),
        (b"\x08\x02\x42\x07\x08\x01\x15\x00\x00\x00\x00", "out of range"),
        (b"\x08\x02\x42\x03\x08\x01\x15", "truncated"),
        (b"\x08\x02\x42\x02\x10\x01", "wire type 0"),
    ],
)
def test_unixfs_refuses_malformed_data(data: bytes, match: str) -> None:
    with pytest.raises(UnixfsInvalid, match=match):
        decode_unixfs(data)


@given(data=st.binary(max_size=100))
def test_unixfs_decoder_gives_data_or_unixfs_invalid(data: bytes) -> None:
    with contextlib.suppress(UnixfsInvalid):  # anything else (an IndexError...) fails the test
        decode_unixfs(data)
