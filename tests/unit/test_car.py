"""CAR v1: the writer and the push reader, round trips and malformed streams."""

from __future__ import annotations

import hashlib

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pimg.content.car import (
    IDENTITY_EMPTY,
    MAX_BLOCK,
    MAX_CID,
    MAX_HEADER,
    CarInvalid,
    CarReader,
    car_header,
    car_section,
    decode_varint,
    encode_varint,
    iter_car,
    read_cid,
    section_head,
    verify_block,
    write_car,
)
from p2pimg.content.cid import DAG_CBOR, DAG_PB, RAW, Cid
from p2pimg.errors import BlockInvalid, VerificationError

blocks_st = st.lists(
    st.tuples(st.sampled_from([RAW, DAG_CBOR, DAG_PB]), st.binary(max_size=300)),
    max_size=12,
).map(lambda items: [(Cid(codec, hashlib.sha256(data).digest()), data) for codec, data in items])


def read_all(data: bytes, cuts: list[int] | None = None) -> tuple[CarReader, list[tuple[Cid, bytes]]]:
    """Feed `data` cut at `cuts` (or whole), close, and return the reader and its blocks."""
    reader = CarReader()
    out: list[tuple[Cid, bytes]] = []
    last = 0
    for cut in sorted(cuts or []) + [len(data)]:
        out += reader.feed(data[last:cut])
        last = cut
    reader.close()
    return reader, out


# -- varints ----------------------------------------------------------------------------------------


@given(st.integers(min_value=0, max_value=(1 << 63) - 1))
def test_varint_round_trip(n: int) -> None:
    data = encode_varint(n)
    assert decode_varint(data, 0, len(data)) == (n, len(data))
    assert decode_varint(data[:-1], 0, len(data) - 1) is None  # more bytes needed


@pytest.mark.parametrize(
    "data",
    [
        bytes([0x80, 0x00]),  # 0 in two bytes
        bytes([0xFF, 0x00]),  # 127 in two bytes
        bytes([0x80] * 9 + [0x01]),  # ten bytes
        bytes([0xFF] * 9),  # nine bytes, and it goes on
    ],
)
def test_bad_varints_are_refused(data: bytes) -> None:
    with pytest.raises(CarInvalid):
        decode_varint(data, 0, len(data))


def test_known_varints() -> None:
    assert encode_varint(0) == b"\x00"
    assert encode_varint(127) == b"\x7f"
    assert encode_varint(128) == b"\x80\x01"
    assert encode_varint(300) == b"\xac\x02"


# -- the writer --------------------------------------------------------------------------------------


def test_header_layout() -> None:
    """{"roots": [link], "version": 1} in canonical DAG-CBOR, "roots" first, behind its length."""
    root = Cid.of_dag_cbor(b"\xa0")
    header = car_header([root])
    body = header[1:]
    assert header[0] == len(body)
    assert body.startswith(b"\xa2\x65roots\x81\xd8\x2a\x58\x25\x00" + root.to_bytes())
    assert body.endswith(b"\x67version\x01")


def test_probe_header_names_the_identity_cid() -> None:
    reader, blocks = read_all(car_header([IDENTITY_EMPTY]))
    assert blocks == [] and reader.root_cids == (IDENTITY_EMPTY,)
    assert reader.roots == ()  # no Cid can hold an identity CID


def test_section_layout() -> None:
    cid = Cid.of_raw(b"hello")
    assert car_section(cid, b"hello") == bytes([36 + 5]) + cid.to_bytes() + b"hello"
    assert section_head(cid, 5) + b"hello" == car_section(cid, b"hello")


def test_write_car_streams_blocks_as_given() -> None:
    """Pieces are the header, then each block's head and the block itself (not copied)."""
    big = b"x" * 1000
    pieces = list(write_car([Cid.of_raw(big)], [(Cid.of_raw(big), big)]))
    assert len(pieces) == 3 and pieces[2] is big


# -- round trips -------------------------------------------------------------------------------------


@settings(max_examples=200)
@given(blocks_st, st.lists(st.sampled_from([RAW, DAG_CBOR]), max_size=3), st.data())
def test_round_trip_fed_in_any_pieces(
    blocks: list[tuple[Cid, bytes]], root_codecs: list[int], data: st.DataObject
) -> None:
    roots = [Cid(codec, hashlib.sha256(bytes([i])).digest()) for i, codec in enumerate(root_codecs)]
    car = b"".join(write_car(roots, blocks))
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(car)), max_size=20))
    reader, got = read_all(car, cuts)
    assert got == blocks
    assert reader.roots == tuple(roots) and reader.version == 1 and reader.blocks == len(blocks)
    for cid, block in got:
        verify_block(cid, block)


@given(blocks_st, st.data())
def test_any_cut_before_the_end_is_a_truncated_stream(
    blocks: list[tuple[Cid, bytes]], data: st.DataObject
) -> None:
    car = b"".join(write_car([Cid.of_raw(b"r")], blocks))
    boundaries = {len(car_header([Cid.of_raw(b"r")]))}
    at = min(boundaries)
    for cid, block in blocks:
        at += len(car_section(cid, block))
        boundaries.add(at)
    cut = data.draw(st.integers(min_value=0, max_value=len(car) - 1))
    reader = CarReader()
    reader.feed(car[:cut])
    if cut in boundaries:
        reader.close()  # a stream may end after any whole section
    else:
        with pytest.raises(CarInvalid):
            reader.close()


def test_byte_by_byte_and_whole_agree() -> None:
    blocks = [(Cid.of_raw(bytes([i]) * i), bytes([i]) * i) for i in range(200)]
    car = b"".join(write_car([blocks[0][0]], blocks))
    assert read_all(car, list(range(len(car))))[1] == read_all(car)[1] == blocks


def test_iter_car_reads_pieces_and_checks_the_end() -> None:
    blocks = [(Cid.of_raw(b"a"), b"a"), (Cid.of_raw(b"b"), b"b")]
    car = b"".join(write_car([blocks[0][0]], blocks))
    reader = CarReader()
    assert list(iter_car([car[:10], car[10:]], reader)) == blocks and reader.roots == (blocks[0][0],)
    with pytest.raises(CarInvalid, match="inside a section"):
        list(iter_car([car[:-1]]))


def test_a_block_of_exactly_the_limit_is_taken() -> None:
    block = b"\x01" * MAX_BLOCK
    car = car_header([Cid.of_raw(block)]) + car_section(Cid.of_raw(block), block)
    assert read_all(car)[1] == [(Cid.of_raw(block), block)]


def test_cidv0_blocks_are_dag_pb() -> None:
    block = b"\x0a\x02\x08\x01"  # a dag-pb node
    digest = hashlib.sha256(block).digest()
    v0 = bytes([0x12, 0x20]) + digest
    car = car_header([v0]) + encode_varint(len(v0) + len(block)) + v0 + block
    reader, got = read_all(car)
    assert got == [(Cid(DAG_PB, digest), block)]
    assert reader.roots == (Cid(DAG_PB, digest),)


# -- malformed streams -------------------------------------------------------------------------------


def header_of(value: object) -> bytes:
    body = cbor2.dumps(value, canonical=True)
    return encode_varint(len(body)) + body


def link(cid: bytes) -> cbor2.CBORTag:
    return cbor2.CBORTag(42, b"\x00" + cid)


ROOT = Cid.of_raw(b"root").to_bytes()


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (header_of({"roots": [link(ROOT)], "version": 2}), "CARv2"),
        (header_of({"version": 2}), "CARv2"),  # the CARv2 pragma
        (header_of({"roots": [link(ROOT)], "version": 3}), "version"),
        (header_of({"roots": [link(ROOT)], "version": True}), "version"),
        (header_of({"roots": [link(ROOT)]}), "version"),
        (header_of({"version": 1}), "roots"),
        (header_of({"roots": [ROOT], "version": 1}), "roots"),  # bytes, not a link
        (header_of({"roots": link(ROOT), "version": 1}), "roots"),
        (header_of({"roots": [cbor2.CBORTag(43, b"\x00" + ROOT)], "version": 1}), "tag 43"),
        (header_of({"roots": [cbor2.CBORTag(42, ROOT)], "version": 1}), "not a link"),  # no 0x00
        (header_of({"roots": [link(ROOT + b"x")], "version": 1}), "after its CID"),
        (header_of({"roots": [link(ROOT[:-1])], "version": 1}), "runs past"),
        (header_of({"roots": [link(b"\x02\x55\x12\x20" + bytes(32))], "version": 1}), "version 2"),
        (header_of([1]), "not a map"),
        (b"\x03\xff\xff\xff", "not CBOR"),
        (b"\x00", "length 0"),
        (encode_varint(MAX_HEADER + 1), "over the"),
    ],
)
def test_bad_headers(header: bytes, message: str) -> None:
    with pytest.raises(CarInvalid, match=message):
        CarReader().feed(header)


def test_an_oversize_section_is_refused_from_its_length_alone() -> None:
    """Nothing of it is buffered: the length prefix is enough to refuse it."""
    reader = CarReader()
    reader.feed(car_header([Cid.of_raw(b"r")]))
    with pytest.raises(CarInvalid, match="over the"):
        reader.feed(encode_varint(MAX_BLOCK + 300))
    reader = CarReader(max_block=1000)
    reader.feed(car_header([Cid.of_raw(b"r")]))
    with pytest.raises(CarInvalid, match="block of 1001 bytes"):
        reader.feed(car_section(Cid.of_raw(b"x" * 1001), b"x" * 1001))


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (b"\x00", "length 0"),
        (b"\x80\x00", "minimally"),
        (b"\x02\x01\x55", "runs past"),  # a CID cut by its section's end
        (b"\x05\x12\x20\x00\x00\x00", "CIDv0 runs past"),
        (encode_varint(40) + b"\x03\x55\x12\x20" + bytes(36), "version 3"),
        (encode_varint(36) + b"\x01\x55\x12\x1f" + bytes(32), "digest"),  # sha2-256 of 31 bytes
    ],
)
def test_bad_sections(section: bytes, message: str) -> None:
    reader = CarReader()
    reader.feed(car_header([Cid.of_raw(b"r")]))
    with pytest.raises(CarInvalid, match=message):
        reader.feed(section)


def test_blocks_it_cannot_verify_are_skipped_not_refused() -> None:
    """Well-formed CIDs p2pimg cannot verify (sha2-512, an unknown codec, the identity hash) are
    skipped: the spec says clients MUST ignore unexpected blocks. The blocks around them are read,
    and a skipped section is bounded like any other."""
    a, b = (Cid.of_raw(b"a"), b"a"), (Cid.of_raw(b"b"), b"b")
    unverifiable = [
        encode_varint(68) + b"\x01\x55\x13\x40" + bytes(64),  # sha2-512 of nothing
        encode_varint(38) + b"\x01\xff\x7f\x12\x20" + bytes(33),  # codec 0x3fff
        encode_varint(5) + b"\x01\x55\x00\x01x",  # identity: the data is in the CID
        encode_varint(4) + IDENTITY_EMPTY,  # bafkqaaa as a block
    ]
    car = car_header([a[0]]) + car_section(*a) + b"".join(unverifiable) + car_section(*b)
    for cuts in (None, [1, 50, 51, 100, 130]):
        reader, got = read_all(car, cuts)
        assert got == [a, b] and reader.skipped == 4 and reader.blocks == 6
    reader = CarReader(max_block=1000)
    reader.feed(car_header([a[0]]))
    with pytest.raises(CarInvalid, match="over the"):
        reader.feed(encode_varint(1000 + MAX_CID + 1) + b"\x01\x55\x00")


def test_an_empty_stream_has_no_header() -> None:
    reader = CarReader()
    assert reader.feed(b"") == []
    with pytest.raises(CarInvalid, match="before its header"):
        reader.close()


def test_a_closed_reader_takes_nothing() -> None:
    reader = CarReader()
    reader.feed(car_header([]))
    reader.close()
    assert reader.roots == ()  # zero roots are read (see the module docstring)
    with pytest.raises(CarInvalid):
        reader.feed(b"\x01")


def test_car_errors_are_block_errors() -> None:
    """What a source sent wrong: a 502 at the edge, as for any other bad block."""
    assert issubclass(CarInvalid, BlockInvalid) and CarInvalid("x").http_status == 502


def test_read_cid_reads_any_well_formed_cid() -> None:
    sha512 = b"\x01\x71\x13\x40" + bytes(64)
    parts, end = read_cid(sha512 + b"tail", 0, len(sha512) + 4)
    assert end == len(sha512) and (parts.version, parts.codec, parts.hash_code) == (1, 0x71, 0x13)
    parts, end = read_cid(IDENTITY_EMPTY, 0, 4)
    assert (end, parts.codec, parts.hash_code, parts.digest) == (4, RAW, 0, b"")


def test_verify_block() -> None:
    verify_block(Cid.of_raw(b"a"), b"a")
    with pytest.raises(VerificationError):
        verify_block(Cid.of_raw(b"a"), b"b")
