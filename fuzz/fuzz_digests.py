"""Fuzz target: OCI digests, CID strings and binary CIDs."""

from __future__ import annotations

import _harness  # first: puts the project on sys.path

from p2pimg.content import cid

_DIGEST = b"sha256:" + b"0123456789abcdef" * 4
_BIN = bytes([0x01, 0x71, 0x12, 0x20]) + bytes(range(32))
SEEDS = [
    _DIGEST,
    _BIN,
    bytes([0x01, 0x55, 0x12, 0x20]) + bytes(32),
    str(cid.Cid.from_bytes(_BIN)).encode(),
    b"QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG",
]


def test_one_input(data: bytes) -> None:
    raw = _harness.seeded(data, SEEDS)
    s = _harness.text(raw)
    hex_part = _harness.allowed(cid.parse_digest, s)
    if hex_part is not None:
        assert cid.Cid.from_digest(s).to_digest() == s
    parsed = _harness.allowed(cid.Cid.parse, s)
    if parsed is not None:
        assert cid.Cid.parse(str(parsed)) == parsed
    binary = _harness.allowed(cid.Cid.from_bytes, raw)
    if binary is not None:
        assert cid.Cid.from_bytes(binary.to_bytes()) == binary


if __name__ == "__main__":
    _harness.main(test_one_input)
