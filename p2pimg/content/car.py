"""CAR v1 (Content Addressable aRchives), written and read as streams (sans I/O).

    car      = header section*
    header   = varint(len(H)) H           H: DAG-CBOR {"roots": [link, ...], "version": 1}
    section  = varint(len(C) + len(B)) C B   C: a binary CID, B: the block's bytes

(https://ipld.io/specs/transport/car/carv1/.) Varints are unsigned LEB128, minimally encoded, at
most 9 bytes, as multiformats' unsigned-varint says.

The writer makes pieces to send or write: `car_header`, `section_head` (a section's length and
CID, so that a block's bytes can follow from a file without being copied) or `car_section`, and
`write_car`, which streams a whole CAR holding one block at a time.

The reader is a push parser: `CarReader.feed(data)` takes whatever bytes arrived and returns the
blocks they completed; `close()` says whether the stream ended on a section boundary. It keeps at
most one unfinished section, and refuses, as soon as a length prefix says so and before buffering
any of it, a header over 1 MiB or a section over one block (2 MiB, what IPFS peers exchange) plus
its CID. It does not verify blocks: the caller checks each one against its CID (`verify_block`),
since what to do with a wrong one (penalise a source, fail a pull) is the caller's decision.

Roots are kept whatever they are (`root_cids`, binary): the trustless-gateway spec tells clients
to ignore them, and a gateway's answer to the `bafkqaaa` probe names an identity CID no `Cid`
can hold. Blocks are named by a `Cid` (raw, dag-pb or dag-cbor, sha2-256; a CIDv0 is a dag-pb
CIDv1 with the same digest). A block under any other well-formed CID (the identity hash, another
hash function, another codec) could not be verified, so it is skipped, not passed on (`skipped`
counts them): the spec says clients MUST ignore blocks they did not expect, and a CAR that
carries one is still a CAR. Skipped sections are bounded like the others.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import cbor2

from p2pimg.content.cid import DAG_PB, IPFS_CODECS, SHA2_256, Cid
from p2pimg.errors import BlockInvalid, DigestInvalid, VerificationError

MAX_HEADER = 1 << 20
MAX_BLOCK = 2 << 20  # the block limit of IPFS peers (trustless-gateway spec, "Block Limits")
MAX_CID = 256  # a binary CID: version, codec, hash function and length varints, and the digest
_MAX_VARINT = 9
_LINK_TAG = 42

# `bafkqaaa`: CIDv1, raw, identity multihash of nothing: the trustless-gateway probe.
IDENTITY_EMPTY = bytes([0x01, 0x55, 0x00, 0x00])
IDENTITY = 0x00  # the identity "hash": the digest is the data itself


class CarInvalid(BlockInvalid):
    """A CAR stream that breaks the format, or this reader's bounds."""


# -- varints and binary CIDs ------------------------------------------------------------------


def encode_varint(n: int) -> bytes:
    if not 0 <= n < 1 << 63:
        raise ValueError(f"varint out of range: {n}")
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def decode_varint(data: bytes | bytearray | memoryview, pos: int, end: int) -> tuple[int, int] | None:
    """The varint at `data[pos:end]` and where it ends; None when it runs past `end` (more bytes
    are needed). A varint longer than 9 bytes or not minimally encoded is refused."""
    value = shift = 0
    for i in range(pos, min(end, pos + _MAX_VARINT)):
        byte = data[i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if byte == 0 and i > pos:
                raise CarInvalid("a varint is not minimally encoded")
            return value, i + 1
        shift += 7
    if end - pos >= _MAX_VARINT:
        raise CarInvalid("a varint is longer than 9 bytes")
    return None


def _varint_within(data: bytes | bytearray | memoryview, pos: int, end: int, what: str) -> tuple[int, int]:
    got = decode_varint(data, pos, end)
    if got is None:
        raise CarInvalid(f"{what} runs past the end of its section")
    return got


@dataclass(frozen=True)
class CidParts:
    """The fields of a binary CID (any version 0 or 1, any codec and hash function)."""

    version: int
    codec: int
    hash_code: int
    digest: bytes

    def to_cid(self) -> Cid:
        """The `Cid` of these fields; DigestInvalid when p2pimg cannot verify such a CID."""
        if self.version == 0:  # CIDv0 is dag-pb over sha2-256: the same block as this CIDv1
            return Cid(DAG_PB, self.digest)
        if self.hash_code != SHA2_256 or self.codec not in IPFS_CODECS:
            raise DigestInvalid(
                f"CID with codec {self.codec:#x} and hash function {self.hash_code:#x}: p2pimg verifies "
                "raw, dag-pb and dag-cbor blocks over sha2-256 only"
            )
        return Cid(self.codec, self.digest)


def read_cid(data: bytes | bytearray | memoryview, pos: int, end: int) -> tuple[CidParts, int]:
    """The binary CID at `data[pos:end]` and where it ends; CarInvalid when malformed or cut."""
    if end - pos >= 2 and data[pos] == 0x12 and data[pos + 1] == 0x20:
        if end - pos < 34:
            raise CarInvalid("a CIDv0 runs past the end of its section")
        return CidParts(0, DAG_PB, SHA2_256, bytes(data[pos + 2 : pos + 34])), pos + 34
    version, at = _varint_within(data, pos, end, "a CID")
    if version != 1:
        raise CarInvalid(f"CID version {version}: only CIDv0 and CIDv1 exist")
    codec, at = _varint_within(data, at, end, "a CID")
    hash_code, at = _varint_within(data, at, end, "a CID")
    length, at = _varint_within(data, at, end, "a CID")
    if at + length > end or at + length - pos > MAX_CID:
        raise CarInvalid(f"a CID's {length}-byte digest runs past its section or the {MAX_CID}-byte bound")
    return CidParts(1, codec, hash_code, bytes(data[at : at + length])), at + length


def _verifiable(parts: CidParts) -> bool:
    """Whether a block under this CID can be checked here (else it is skipped, never trusted)."""
    return parts.version == 0 or (parts.hash_code == SHA2_256 and parts.codec in IPFS_CODECS)


def _shown(cid: bytes) -> str:
    return "b" + base64.b32encode(cid).decode("ascii").lower().rstrip("=")


# -- writing -----------------------------------------------------------------------------------


def car_header(roots: Iterable[Cid | bytes]) -> bytes:
    """The header of a CAR v1 naming `roots` (a `Cid`, or any binary CID such as `IDENTITY_EMPTY`),
    with its length prefix."""
    links = [
        cbor2.CBORTag(_LINK_TAG, b"\x00" + (r.to_bytes() if isinstance(r, Cid) else bytes(r))) for r in roots
    ]
    # Canonical (length-first) key order puts "roots" before "version", as DAG-CBOR wants.
    body: bytes = cbor2.dumps({"roots": links, "version": 1}, canonical=True)
    return encode_varint(len(body)) + body


def section_head(cid: Cid, size: int) -> bytes:
    """What precedes a block of `size` bytes in a CAR: the section's length, then the CID."""
    binary = cid.to_bytes()
    return encode_varint(len(binary) + size) + binary


def car_section(cid: Cid, block: bytes) -> bytes:
    return section_head(cid, len(block)) + block


def write_car(roots: Iterable[Cid | bytes], blocks: Iterable[tuple[Cid, bytes]]) -> Iterator[bytes]:
    """A CAR v1 as pieces: the header, then each block's head and bytes (taken one at a time from
    `blocks`, never copied). The caller verified the blocks; they are written as given."""
    yield car_header(roots)
    for cid, block in blocks:
        yield section_head(cid, len(block))
        yield block


# -- reading -----------------------------------------------------------------------------------


class _Link:
    """A DAG-CBOR link in a CAR header, kept as its binary CID."""

    def __init__(self, cid: bytes) -> None:
        self.cid = cid


def _header_tag(*args: object) -> object:
    # cbor2 5 calls tag hooks with (decoder, tag), cbor2 6 with (tag, immutable).
    tag = next(a for a in args if isinstance(a, cbor2.CBORTag))
    if tag.tag != _LINK_TAG or not isinstance(tag.value, bytes) or not tag.value.startswith(b"\x00"):
        raise CarInvalid(f"the CAR header holds CBOR tag {tag.tag}, not a link")
    return _Link(tag.value[1:])


def _decode_header(data: bytes) -> tuple[int, tuple[bytes, ...]]:
    try:
        value = cbor2.loads(
            data, tag_hook=_header_tag, semantic_decoders={}, allow_indefinite=False, max_depth=4
        )
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError, MemoryError) as exc:
        if isinstance(exc.__cause__, CarInvalid):  # cbor2 wraps what a tag hook raised
            raise exc.__cause__ from None
        raise CarInvalid(f"the CAR header is not CBOR: {exc}") from None
    if not isinstance(value, dict):
        raise CarInvalid("the CAR header is not a map")
    version = value.get("version")
    if version != 1 or isinstance(version, bool):
        what = "CARv2 (read its inner CARv1 instead)" if version == 2 else repr(version)[:40]
        raise CarInvalid(f"CAR version {what}: only CAR v1 is read")
    roots = value.get("roots")
    # Zero roots are taken: the spec wants one or more, but leaves it unresolved, and writers
    # (go-car's v2 storage, the JavaScript one) produce CARs without any.
    if not isinstance(roots, list) or not all(isinstance(r, _Link) for r in roots):
        raise CarInvalid("the CAR header's roots are not a list of links")
    for root in roots:
        if read_cid(root.cid, 0, len(root.cid))[1] != len(root.cid):
            raise CarInvalid("a root of the CAR header has bytes after its CID")
    return 1, tuple(r.cid for r in roots)


class CarReader:
    """Push parser of one CAR v1 stream (see the module docstring). Feed it bytes as they come:

    reader = CarReader()
    for piece in pieces:
        for cid, block in reader.feed(piece):
            verify_block(cid, block)  # the reader does not
    reader.close()                  # CarInvalid when the stream was cut short
    """

    def __init__(self, *, max_header: int = MAX_HEADER, max_block: int = MAX_BLOCK) -> None:
        self.max_header = max_header
        self.max_block = max_block
        self.version: int | None = None  # 1 once the header is read
        self.root_cids: tuple[bytes, ...] = ()  # every root, as a binary CID
        self.blocks = 0  # sections read so far
        self.skipped = 0  # of which blocks under CIDs p2pimg cannot verify (not passed on)
        self._buffer = bytearray()
        self._closed = False

    @property
    def header_read(self) -> bool:
        return self.version is not None

    @property
    def roots(self) -> tuple[Cid, ...]:
        """The roots a `Cid` can name (the others, such as an identity CID, only in `root_cids`)."""
        found = []
        for binary in self.root_cids:
            try:
                found.append(read_cid(binary, 0, len(binary))[0].to_cid())
            except (CarInvalid, DigestInvalid):
                continue
        return tuple(found)

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[Cid, bytes]]:
        """Take the next bytes of the stream; the blocks they complete, in order."""
        if self._closed:
            raise CarInvalid("bytes fed to a closed CAR reader")
        buffer = self._buffer
        buffer += data
        found: list[tuple[Cid, bytes]] = []
        pos = 0
        while True:
            got = decode_varint(buffer, pos, len(buffer))
            if got is None:
                break
            length, start = got
            limit = self.max_header if self.version is None else self.max_block + MAX_CID
            if length == 0:
                raise CarInvalid("a CAR section (or header) of length 0")
            if length > limit:
                what = "header" if self.version is None else "section"
                raise CarInvalid(f"a CAR {what} of {length} bytes is over the {limit}-byte bound")
            end = start + length
            if end > len(buffer):
                break
            if self.version is None:
                self.version, self.root_cids = _decode_header(bytes(buffer[start:end]))
            else:
                parts, at = read_cid(buffer, start, end)
                if end - at > self.max_block:
                    raise CarInvalid(
                        f"a CAR block of {end - at} bytes is over the {self.max_block}-byte bound"
                    )
                self.blocks += 1
                if not _verifiable(parts):
                    self.skipped += 1
                else:
                    try:
                        cid = parts.to_cid()
                    except DigestInvalid as exc:  # a sha2-256 digest of the wrong length: malformed
                        shown = _shown(bytes(buffer[start:at])) if parts.version else "a CIDv0"
                        raise CarInvalid(f"CAR block {shown[:100]}: {exc.message}") from None
                    found.append((cid, bytes(buffer[at:end])))
            pos = end
        if pos:
            del buffer[:pos]
        return found

    def close(self) -> None:
        """The stream ended: CarInvalid unless it ended right after a whole section (or header)."""
        self._closed = True
        if self.version is None:
            raise CarInvalid("the CAR stream ended before its header")
        if self._buffer:
            raise CarInvalid(f"the CAR stream ends inside a section ({len(self._buffer)} bytes left over)")


def iter_car(pieces: Iterable[bytes], reader: CarReader | None = None) -> Iterator[tuple[Cid, bytes]]:
    """The blocks of a CAR read from `pieces` (a file read in chunks, a response body), checked
    for completeness at the end; `reader` gives access to the header (its roots) while reading."""
    reader = reader or CarReader()
    for piece in pieces:
        yield from reader.feed(piece)
    reader.close()


def verify_block(cid: Cid, data: bytes | bytearray | memoryview) -> None:
    """VerificationError unless `data` is the block `cid` names."""
    if not cid.matches(data):
        raise VerificationError(f"a block does not match its CID {cid}")
