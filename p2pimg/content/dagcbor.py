"""Strict DAG-CBOR: the encoding of every DAG node p2pimg writes or reads.

Encoding is cbor2's canonical form (definite lengths, shortest integers, map keys sorted
length-first then bytewise), links as tag 42 over a 0x00-prefixed binary CID. Decoding is
strict: a block is accepted only if it re-encodes to exactly the same bytes, holds nothing but
null, bool, int, text, bytes, lists, text-keyed maps and links, and stays within the size and
depth limits, which are checked before anything is allocated from it.
"""

from __future__ import annotations

from typing import Any

import cbor2

from p2pimg.content.cid import Cid
from p2pimg.errors import BlockInvalid

MAX_BLOCK_SIZE = 8 << 20
MAX_DEPTH = 16
_LINK_TAG = 42
_MIN_INT, _MAX_INT = -(2**64), 2**64 - 1

DagValue = Any  # None | bool | int | str | bytes | list[DagValue] | dict[str, DagValue] | Cid


def _encode_default(encoder: cbor2.CBOREncoder, value: object) -> None:
    if isinstance(value, Cid):
        encoder.encode(cbor2.CBORTag(_LINK_TAG, b"\x00" + value.to_bytes()))
        return
    raise BlockInvalid(f"cannot encode {type(value).__name__} in DAG-CBOR")


def _check_value(value: object, depth: int = 0) -> None:
    """Only the data model p2pimg uses: null, bool, 64-bit ints, text, bytes, lists, maps, links."""
    if depth > MAX_DEPTH:
        raise BlockInvalid("DAG node nested too deeply")
    if value is None or isinstance(value, bool | str | bytes | Cid):
        return
    if isinstance(value, int):
        if not _MIN_INT <= value <= _MAX_INT:
            raise BlockInvalid("integer outside the 64-bit range of DAG-CBOR")
        return
    if isinstance(value, list | tuple):
        for v in value:
            _check_value(v, depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise BlockInvalid("DAG-CBOR map keys must be strings")
            _check_value(v, depth + 1)
        return
    raise BlockInvalid(f"{type(value).__name__} is not allowed in a p2pimg DAG node")


def encode(value: DagValue) -> bytes:
    """Encode a node as strict DAG-CBOR."""
    _check_value(value)
    data: bytes = cbor2.dumps(value, canonical=True, default=_encode_default)
    if len(data) > MAX_BLOCK_SIZE:
        raise BlockInvalid(f"DAG node of {len(data)} bytes exceeds the {MAX_BLOCK_SIZE}-byte limit")
    return data


def _tag_hook(*args: object) -> object:
    tag = args[0] if isinstance(args[0], cbor2.CBORTag) else args[1]
    assert isinstance(tag, cbor2.CBORTag)
    if tag.tag != _LINK_TAG:
        raise BlockInvalid(f"CBOR tag {tag.tag} is not allowed in DAG-CBOR")
    raw = tag.value
    if not isinstance(raw, bytes) or not raw.startswith(b"\x00"):
        raise BlockInvalid("malformed DAG-CBOR link")
    try:
        return Cid.from_bytes(raw[1:])
    except Exception as exc:
        raise BlockInvalid(f"malformed DAG-CBOR link: {exc}") from None


def decode(data: bytes, *, max_size: int = MAX_BLOCK_SIZE) -> DagValue:
    """Decode a strict DAG-CBOR block; anything non-canonical or out of bounds is refused."""
    if len(data) > max_size:
        raise BlockInvalid(f"block of {len(data)} bytes exceeds the {max_size}-byte limit")
    if not data:
        raise BlockInvalid("empty block")
    try:
        value = cbor2.loads(
            data,
            tag_hook=_tag_hook,
            semantic_decoders={},
            max_depth=MAX_DEPTH + 1,
            allow_indefinite=False,
            allow_duplicate_keys=False,
        )
    except BlockInvalid:
        raise
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError, MemoryError) as exc:
        raise BlockInvalid(f"not valid CBOR: {exc}") from None
    _check_value(value)
    try:
        canonical = cbor2.dumps(value, canonical=True, default=_encode_default)
    except Exception as exc:
        raise BlockInvalid(f"not valid DAG-CBOR: {exc}") from None
    if canonical != data:
        raise BlockInvalid("block is not canonical DAG-CBOR (key order, lengths or trailing bytes)")
    return value


def decode_verified(data: bytes, cid: Cid, *, max_size: int = MAX_BLOCK_SIZE) -> DagValue:
    """Check a block against its CID, then decode it strictly."""
    if cid.codec_name != "dag-cbor":
        raise BlockInvalid(f"{cid} does not name a DAG-CBOR block")
    if len(data) > max_size:
        raise BlockInvalid(f"block of {len(data)} bytes exceeds the {max_size}-byte limit")
    if not cid.matches(data):
        raise BlockInvalid(f"block does not match its CID {cid}")
    return decode(data, max_size=max_size)
