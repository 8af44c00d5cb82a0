"""Unit tests for p2pimg.content.dagcbor: strict DAG-CBOR encoding and decoding."""

from __future__ import annotations

import contextlib
import datetime
import decimal
import hashlib
import tracemalloc
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pimg.content.cid import DAG_CBOR, RAW, Cid
from p2pimg.content.dagcbor import MAX_BLOCK_SIZE, MAX_DEPTH, decode, decode_verified, encode
from p2pimg.errors import BlockInvalid

INT_MIN = -(2**64)  # CBOR major type 1 with a uint64 argument
INT_MAX = 2**64 - 1  # CBOR major type 0 with a uint64 argument

cids = st.builds(Cid, st.sampled_from([RAW, DAG_CBOR]), st.binary(min_size=32, max_size=32))
scalars = (
    st.none()
    | st.booleans()
    | st.integers(INT_MIN, INT_MAX)
    | st.integers(-(2**63), 2**63)
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | cids
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=25,
)


def node_depth(value: Any) -> int:
    """Depth as dagcbor counts it: the root is 0, each container adds one for its members."""
    if isinstance(value, list | dict):
        members = list(value.values()) if isinstance(value, dict) else value
        return 1 + max(map(node_depth, members)) if members else 0
    return 0


def nest(levels: int, leaf: Any) -> Any:
    for _ in range(levels):
        leaf = [leaf]
    return leaf


def refuses(data: bytes, **kwargs: Any) -> BlockInvalid:
    with pytest.raises(BlockInvalid) as info:
        decode(data, **kwargs)
    return info.value


def link_bytes(cid: Cid) -> bytes:
    """Tag 42 over a byte string 0x00 + binary CID (36 bytes -> 37-byte payload)."""
    payload = b"\x00" + cid.to_bytes()
    return b"\xd8\x2a" + bytes([0x58, len(payload)]) + payload


CID_A = Cid.of_raw(b"a")
CID_B = Cid.of_dag_cbor(b"\xa0")


# --- round trips ------------------------------------------------------------------------------------


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(value=values)
def test_round_trip(value: Any) -> None:
    if node_depth(value) > MAX_DEPTH:
        with pytest.raises(BlockInvalid):
            encode(value)
        return
    block = encode(value)
    assert isinstance(block, bytes)
    decoded = decode(block)
    assert decoded == value
    assert type(decoded) is type(value)
    # canonical: decoding and re-encoding reproduces the bytes exactly
    assert encode(decoded) == block


@given(value=values)
def test_every_strict_prefix_is_refused(value: Any) -> None:
    if node_depth(value) > MAX_DEPTH:
        return
    block = encode(value)
    for cut in range(len(block)):
        with pytest.raises(BlockInvalid):
            decode(block[:cut])


def test_known_encoding() -> None:
    value = {"bb": 1, "a": [None, True, False, -1, b"\x01", "x"], "c": CID_A}
    block = encode(value)
    # keys sorted length-first: "a", "c", "bb"
    expected = (
        b"\xa3"
        + b"\x61a"
        + b"\x86\xf6\xf5\xf4\x20\x41\x01\x61x"
        + b"\x61c"
        + link_bytes(CID_A)
        + b"\x62bb"
        + b"\x01"
    )
    assert block == expected
    assert decode(expected) == value


def test_link_decodes_to_cid() -> None:
    decoded = decode(encode([CID_A, CID_B]))
    assert decoded == [CID_A, CID_B]
    assert all(isinstance(c, Cid) for c in decoded)
    assert decoded[1].codec == DAG_CBOR


@pytest.mark.parametrize(
    "value", [0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, INT_MAX, -1, -24, -25, -256, -257, INT_MIN]
)
def test_integer_boundaries_round_trip(value: int) -> None:
    assert decode(encode(value)) == value


def test_tuple_encodes_as_list() -> None:
    assert decode(encode((1, 2))) == [1, 2]


def test_depth_limit_is_the_same_both_ways() -> None:
    leaves: list[Any] = [1, CID_A, "s", {}]
    for leaf in leaves:
        ok = nest(MAX_DEPTH, leaf)
        assert decode(encode(ok)) == ok
        with pytest.raises(BlockInvalid):
            encode(nest(MAX_DEPTH + 1, leaf))
    deepest_empty = nest(MAX_DEPTH, [])
    assert decode(encode(deepest_empty)) == deepest_empty


# --- encode refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1.5, [0.0], {"a": float("nan")}, {"a": [1, 2.0]}])
def test_encode_refuses_floats(value: Any) -> None:
    with pytest.raises(BlockInvalid):
        encode(value)


@pytest.mark.parametrize("value", [{1: "a"}, {b"k": 1}, {None: 1}, {"ok": {2: 3}}, {(1,): 1}])
def test_encode_refuses_non_string_keys(value: Any) -> None:
    with pytest.raises(BlockInvalid):
        encode(value)


def test_encode_refuses_unknown_objects() -> None:
    with pytest.raises(BlockInvalid):
        encode(object())
    with pytest.raises(BlockInvalid):
        encode({"a": [object()]})


def test_encode_refuses_oversized_nodes() -> None:
    with pytest.raises(BlockInvalid):
        encode(b"\x00" * MAX_BLOCK_SIZE)


@pytest.mark.parametrize(
    "value",
    [
        2**64,  # would need a bignum (tag 2): DAG-CBOR integers are limited to 64 bits
        -(2**64) - 1,  # would need a negative bignum (tag 3)
    ],
    ids=["2**64", "-2**64-1"],
)
def test_encode_refuses_integers_beyond_64_bits(value: Any) -> None:
    with pytest.raises(BlockInvalid):
        encode(value)


def test_encode_output_is_always_decodable() -> None:
    """encode promises strict DAG-CBOR: whatever it writes, decode must read back unchanged.

    Values outside the DAG data model must be refused by encode (as `_encode_default` intends),
    not written as CBOR that decode then refuses.
    """
    outside_the_model: list[Any] = [
        {1, 2},
        frozenset(),
        cbor2.CBORTag(1, 0),
        cbor2.CBORTag(42, b"garbage"),
        cbor2.undefined,
        datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC),
        decimal.Decimal("1.5"),
    ]
    written_but_unreadable = []
    for value in outside_the_model:
        try:
            block = encode(value)
        except BlockInvalid:
            continue
        try:
            ok = decode(block) == value
        except BlockInvalid:
            ok = False
        if not ok:
            written_but_unreadable.append((value, block.hex()))
    assert written_but_unreadable == []


# --- decode refusals ---------------------------------------------------------------------------------


def test_refuses_empty() -> None:
    refuses(b"")


@pytest.mark.parametrize(
    "hex_block",
    [
        "a262626201616102",  # {"bb": 1, "a": 2}: longer key first
        "a2616201616102",  # {"b": 1, "a": 2}: same length, bytewise descending
        "a361610162626202616303",  # {"a","bb","c"}: length-first order violated
    ],
)
def test_refuses_unsorted_map_keys(hex_block: str) -> None:
    exc = refuses(bytes.fromhex(hex_block))
    assert "canonical" in str(exc)


@pytest.mark.parametrize(
    "hex_block",
    [
        "1801",  # 1 in one extra byte
        "190001",
        "1a00000001",
        "1b0000000000000001",
        "1900ff",  # 255 fits in one byte
        "3800",  # -1 in one extra byte
        "5801ff",  # byte string length 1 in an extra byte
        "780161",  # text string length 1 in an extra byte
        "980101",  # array length 1 in an extra byte
        "b801616101",  # map length 1 in an extra byte
        "d9002a58250001551220" + "00" * 32,  # tag 42 written in two bytes
    ],
)
def test_refuses_non_minimal_encodings(hex_block: str) -> None:
    refuses(bytes.fromhex(hex_block))


@pytest.mark.parametrize(
    "hex_block",
    [
        "9f01ff",  # indefinite array
        "9fff",
        "bf616101ff",  # indefinite map
        "5f4101ff",  # indefinite byte string
        "7f6161ff",  # indefinite text string
        "ff",  # lone break
    ],
)
def test_refuses_indefinite_lengths(hex_block: str) -> None:
    refuses(bytes.fromhex(hex_block))


@pytest.mark.parametrize(
    "hex_block",
    ["f90000", "f93c00", "f97e00", "fa3fc00000", "fb3ff8000000000000", "8101f93c00", "a16161f97c00"],
)
def test_refuses_floats(hex_block: str) -> None:
    refuses(bytes.fromhex(hex_block))


@pytest.mark.parametrize(
    "hex_block",
    [
        "c074323032302d30312d30315430303a30303a30305a",  # tag 0 date string
        "c100",  # tag 1 epoch
        "c4822003",  # tag 4 decimal fraction
        "d81e820102",  # tag 30 rational
        "d82543000102",  # tag 37 uuid (bad)
        "d82b40",  # tag 43
        "d9010280",  # tag 258 set
        "d9d9f780",  # tag 55799 self-describe
        "d81c80",  # tag 28 shareable
        "c24101",  # tag 2 bignum holding 1
        "f7",  # undefined
        "e0",  # simple value 0
        "f820",  # simple value 32
    ],
)
def test_refuses_other_tags_and_simple_values(hex_block: str) -> None:
    refuses(bytes.fromhex(hex_block))


@pytest.mark.parametrize(
    "hex_block",
    [
        "c249010000000000000000",  # tag 2 bignum 2**64
        "c349010000000000000000",  # tag 3 negative bignum -2**64-1
    ],
    ids=["bignum", "negative-bignum"],
)
def test_refuses_bignum_tags(hex_block: str) -> None:
    """Tags 2 and 3 are not tag 42: DAG-CBOR has no bignums, only 64-bit integers."""
    refuses(bytes.fromhex(hex_block))


@pytest.mark.parametrize(
    "hex_block",
    [
        "a10101",  # int key
        "a1410101",  # bytes key
        "a1f401",  # bool key
        "a1f601",  # null key
        "a18001",  # list key
        "a1a000",  # map key
        "a1d82a58250001551220" + "00" * 32 + "01",  # link key
    ],
)
def test_refuses_non_string_keys(hex_block: str) -> None:
    refuses(bytes.fromhex(hex_block))


def test_refuses_duplicate_keys() -> None:
    refuses(bytes.fromhex("a2616101616102"))
    refuses(bytes.fromhex("a2616101616101"))


@given(value=values, extra=st.binary(min_size=1, max_size=8))
def test_refuses_trailing_bytes(value: Any, extra: bytes) -> None:
    if node_depth(value) > MAX_DEPTH:
        return
    refuses(encode(value) + extra)


def test_refuses_two_concatenated_items() -> None:
    exc = refuses(encode(1) + encode(2))
    assert "canonical" in str(exc)


def test_refuses_truncated() -> None:
    block = encode({"chunks": [CID_A, CID_B], "size": 123456})
    for cut in (1, 5, len(block) // 2, len(block) - 1):
        refuses(block[:cut])


def test_refuses_invalid_utf8() -> None:
    refuses(bytes.fromhex("61ff"))
    refuses(bytes.fromhex("a161ff01"))


def test_depth_limit_on_decode() -> None:
    assert decode(b"\x81" * MAX_DEPTH + b"\x01") == nest(MAX_DEPTH, 1)
    assert decode(b"\x81" * MAX_DEPTH + b"\x80") == nest(MAX_DEPTH, [])
    refuses(b"\x81" * (MAX_DEPTH + 1) + b"\x01")
    refuses(b"\x81" * (MAX_DEPTH + 1) + b"\xa0")
    refuses(b"\xa1\x61a" * (MAX_DEPTH + 1) + b"\x01")
    refuses(b"\x81" * MAX_DEPTH + b"\xa1\x61a\x01")
    refuses(b"\x81" * MAX_DEPTH + b"\x81" + link_bytes(CID_A))
    refuses(b"\x81" * 100_000 + b"\x01")


def test_size_limit_is_checked_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    block = encode({"a": b"x" * 100})
    assert decode(block, max_size=len(block)) == {"a": b"x" * 100}

    def no_decoding(*args: object, **kwargs: object) -> object:
        raise AssertionError("cbor2.loads called for an oversized block")

    monkeypatch.setattr(cbor2, "loads", no_decoding)
    exc = refuses(block, max_size=len(block) - 1)
    assert str(len(block)) in str(exc)
    exc = refuses(b"\x00" * (MAX_BLOCK_SIZE + 1))
    assert str(MAX_BLOCK_SIZE) in str(exc)


@pytest.mark.parametrize(
    "header",
    [
        b"\x5b" + (1 << 40).to_bytes(8, "big"),  # byte string of 1 TiB
        b"\x5a" + (1 << 30).to_bytes(4, "big"),  # byte string of 1 GiB
        b"\x7b" + (1 << 40).to_bytes(8, "big"),  # text string of 1 TiB
        b"\x9b" + (1 << 40).to_bytes(8, "big"),  # array of 2**40 items
        b"\xbb" + (1 << 40).to_bytes(8, "big"),  # map of 2**40 pairs
        b"\x5b" + (2**64 - 1).to_bytes(8, "big"),
    ],
)
def test_huge_declared_length_does_not_allocate(header: bytes) -> None:
    tracemalloc.start()
    try:
        refuses(header + b"abc")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


@pytest.mark.parametrize(
    "payload",
    [
        Cid.of_raw(b"a").to_bytes(),  # binary CID without the 0x00 multibase prefix
        b"\x01" + Cid.of_raw(b"a").to_bytes(),  # wrong prefix byte
        b"\x00",  # prefix only
        b"",
        b"\x00garbage",
        b"\x00" + bytes([0x01, 0x70, 0x12, 0x20]) + b"\x00" * 32,  # dag-pb CID
        b"\x00" + bytes([0x12, 0x20]) + b"\x00" * 32,  # CIDv0
        b"\x00" + Cid.of_raw(b"a").to_bytes() + b"\x00",  # trailing byte inside the CID
        b"\x00" + Cid.of_raw(b"a").to_bytes()[:-1],  # truncated CID
    ],
)
def test_refuses_malformed_link_payloads(payload: bytes) -> None:
    block = b"\xd8\x2a" + cbor2.dumps(payload)
    refuses(block)
    refuses(b"\x81" + block)


@pytest.mark.parametrize("inner", ["6161", "01", "80", "a0", "f6", "d82a4100"])
def test_refuses_link_tag_over_non_bytes(inner: str) -> None:
    refuses(bytes.fromhex("d82a" + inner))


@settings(max_examples=400)
@given(data=st.binary(max_size=64))
def test_arbitrary_bytes_decode_or_raise_block_invalid(data: bytes) -> None:
    with contextlib.suppress(BlockInvalid):
        decode(data)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(value=values, position=st.integers(min_value=0), byte=st.integers(0, 255))
def test_mutated_blocks_decode_or_raise_block_invalid(value: Any, position: int, byte: int) -> None:
    if node_depth(value) > MAX_DEPTH:
        return
    block = bytearray(encode(value))
    block[position % len(block)] = byte
    try:
        decoded = decode(bytes(block))
    except BlockInvalid:
        return
    # anything accepted is canonical
    assert encode(decoded) == bytes(block)


# --- decode_verified ---------------------------------------------------------------------------------


def test_decode_verified_accepts_matching_block() -> None:
    value = {"type": "x", "links": [CID_A]}
    block = encode(value)
    assert decode_verified(block, Cid.of_dag_cbor(block)) == value


def test_decode_verified_refuses_mismatching_cid() -> None:
    block = encode({"a": 1})
    other = encode({"a": 2})
    with pytest.raises(BlockInvalid) as info:
        decode_verified(block, Cid.of_dag_cbor(other))
    assert str(Cid.of_dag_cbor(other)) in str(info.value)


def test_decode_verified_refuses_raw_cid() -> None:
    block = encode({"a": 1})
    with pytest.raises(BlockInvalid):
        decode_verified(block, Cid(RAW, hashlib.sha256(block).digest()))


def test_decode_verified_refuses_oversized_before_hashing() -> None:
    block = encode({"a": b"x" * 100})
    cid = Cid.of_dag_cbor(block)
    with pytest.raises(BlockInvalid) as info:
        decode_verified(block, cid, max_size=len(block) - 1)
    assert "limit" in str(info.value)
    assert decode_verified(block, cid, max_size=len(block)) == {"a": b"x" * 100}


def test_decode_verified_refuses_non_canonical_block_even_if_cid_matches() -> None:
    block = bytes.fromhex("a262626201616102")
    with pytest.raises(BlockInvalid):
        decode_verified(block, Cid.of_dag_cbor(block))
