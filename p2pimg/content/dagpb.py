"""Strict dag-pb (https://ipld.io/specs/codecs/dag-pb/spec/) and the protobuf wire format under it.

`PBNode {repeated PBLink Links = 2; optional bytes Data = 1}`, `PBLink {Hash = 1, Name = 2,
Tsize = 3}`. Decoding is strict as the spec asks: link fields in field order, each at most once,
a link without Hash refused, no other field or wire type, minimal varints. Links are written
before Data; a decoder must accept Data first too ("IPFS data exists in both forms"), so it does,
but never the two interleaved. A link's Hash must be a CID that `Cid` can hold (CIDv1, sha2-256;
raw, dag-pb or dag-cbor): a CIDv0 link, which only CIDv0 (pre-`--cid-version=1`) adds make, is
refused. The wire helpers are shared with UnixFS (`unixfs.py`), whose messages are ordinary
protobuf inside a node's Data.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from p2pimg.content.cid import IPFS_CODECS, Cid
from p2pimg.errors import P2pimgError, UnixfsInvalid

__all__ = [
    "U64",
    "WIRE_I32",
    "WIRE_I64",
    "WIRE_LEN",
    "WIRE_VARINT",
    "PbLink",
    "PbNode",
    "bytes_field",
    "decode_pb_node",
    "encode_pb_node",
    "encode_varint",
    "expect_wire",
    "field_key",
    "iter_fields",
    "read_varint",
]

WIRE_VARINT, WIRE_I64, WIRE_LEN, WIRE_I32 = 0, 1, 2, 5
U64 = 1 << 64


# --- protobuf wire format -------------------------------------------------------------------------


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """A minimal base-128 varint of at most 64 bits at `pos`; returns it and the next position."""
    value = shift = 0
    start = pos
    while True:
        if pos >= len(buf):
            raise UnixfsInvalid("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
        shift += 7
        if shift >= 70:
            raise UnixfsInvalid("varint longer than 10 bytes")
    if value >= U64:
        raise UnixfsInvalid("varint overflows 64 bits")
    if byte == 0 and pos - start > 1:
        # A trailing zero group adds nothing: a second encoding of the same number.
        raise UnixfsInvalid("varint is not minimally encoded")
    return value, pos


def iter_fields(buf: bytes, what: str) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of each field of a protobuf message, in wire order. A
    length-delimited value is its bytes, a fixed32/64 one its little-endian integer."""
    pos = 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise UnixfsInvalid(f"{what}: field number 0")
        if wire == WIRE_VARINT:
            value, pos = read_varint(buf, pos)
            yield number, wire, value
        elif wire == WIRE_LEN:
            length, pos = read_varint(buf, pos)
            if length > len(buf) - pos:
                raise UnixfsInvalid(f"{what}: field {number} runs past the end ({length} bytes)")
            yield number, wire, buf[pos : pos + length]
            pos += length
        elif wire in (WIRE_I64, WIRE_I32):
            width = 8 if wire == WIRE_I64 else 4
            if width > len(buf) - pos:
                raise UnixfsInvalid(f"{what}: truncated fixed-width field {number}")
            yield number, wire, int.from_bytes(buf[pos : pos + width], "little")
            pos += width
        else:
            raise UnixfsInvalid(f"{what}: field {number} has wire type {wire}, which is not used")


def encode_varint(value: int) -> bytes:
    if not 0 <= value < U64:
        raise ValueError(f"{value} does not fit an unsigned 64-bit varint")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field_key(number: int, wire: int) -> bytes:
    return encode_varint(number << 3 | wire)


def bytes_field(number: int, payload: bytes) -> bytes:
    return field_key(number, WIRE_LEN) + encode_varint(len(payload)) + payload


def expect_wire(wire: int, want: int, what: str, name: str) -> None:
    if wire != want:
        raise UnixfsInvalid(f"{what}: {name} has wire type {wire}, expected {want}")


# --- dag-pb ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PbLink:
    """A dag-pb link: the target's CID, an optional name (file links have none, or an empty one)
    and the optional cumulative size of everything below it (a hint, never trusted)."""

    cid: Cid
    name: str | None = None
    tsize: int | None = None


@dataclass(frozen=True, slots=True)
class PbNode:
    links: tuple[PbLink, ...] = ()
    data: bytes | None = None


def _decode_link(buf: bytes) -> PbLink:
    what = "dag-pb link"
    cid: Cid | None = None
    name: str | None = None
    tsize: int | None = None
    last = 0
    for number, wire, value in iter_fields(buf, what):
        if number <= last or number > 3:
            raise UnixfsInvalid(f"{what}: field {number} out of order, repeated or unknown")
        last = number
        if number == 1:
            expect_wire(wire, WIRE_LEN, what, "Hash")
            assert isinstance(value, bytes)
            try:
                cid = Cid.from_bytes(value, codecs=IPFS_CODECS)
            except P2pimgError as exc:
                raise UnixfsInvalid(f"{what}: unusable Hash: {exc.message}") from None
        elif number == 2:
            expect_wire(wire, WIRE_LEN, what, "Name")
            assert isinstance(value, bytes)
            try:
                name = value.decode("utf-8")
            except UnicodeDecodeError:
                raise UnixfsInvalid(f"{what}: Name is not UTF-8") from None
        else:
            expect_wire(wire, WIRE_VARINT, what, "Tsize")
            assert isinstance(value, int)
            tsize = value
    if cid is None:
        raise UnixfsInvalid(f"{what} without a Hash")
    return PbLink(cid, name, tsize)


def decode_pb_node(data: bytes) -> PbNode:
    """Decode a dag-pb block strictly (see the module's docstring); the links keep their order."""
    data = bytes(data)
    links: list[PbLink] = []
    body: bytes | None = None
    links_done = False  # a run of links ended (by Data): one more would interleave them
    for number, wire, value in iter_fields(data, "dag-pb node"):
        if number == 2:
            expect_wire(wire, WIRE_LEN, "dag-pb node", "Links")
            if links_done:
                raise UnixfsInvalid("dag-pb node: Links interleaved with Data")
            assert isinstance(value, bytes)
            links.append(_decode_link(value))
        elif number == 1:
            expect_wire(wire, WIRE_LEN, "dag-pb node", "Data")
            if body is not None:
                raise UnixfsInvalid("dag-pb node: Data appears twice")
            assert isinstance(value, bytes)
            body = value
            links_done = bool(links)
        else:
            raise UnixfsInvalid(f"dag-pb node: unknown field {number}")
    return PbNode(tuple(links), body)


def encode_pb_node(node: PbNode) -> bytes:
    """The canonical dag-pb encoding: every link (fields in order) before Data. Links must be
    sorted by name bytes (the spec's rule for encoders; file links all have the same name)."""
    names = [(link.name or "").encode() for link in node.links]
    if names != sorted(names):
        raise ValueError("dag-pb links must be sorted by name")
    out = bytearray()
    for link in node.links:
        body = bytes_field(1, link.cid.to_bytes())
        if link.name is not None:
            body += bytes_field(2, link.name.encode())
        if link.tsize is not None:
            body += field_key(3, WIRE_VARINT) + encode_varint(link.tsize)
        out += bytes_field(2, body)
    if node.data is not None:
        out += bytes_field(1, node.data)
    return bytes(out)
