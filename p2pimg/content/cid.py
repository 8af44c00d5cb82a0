"""Content identifiers: CIDv1 over sha2-256 and the OCI digests they mirror.

Only two kinds of CID name p2pimg's own content: `raw` (0x55) for bytes (chunks, manifests, whole
blobs) and `dag-cbor` (0x71) for DAG nodes (blob maps, image roots), both hashed with sha2-256.
A raw CID carries the same multihash as the OCI digest `sha256:<hex>` of the same bytes, so the
two convert into each other without touching the content.

A third, `dag-pb` (0x70), names UnixFS nodes: content added to IPFS by other software (nerdctl's
images). A `Cid` can hold one, but `parse` and `from_bytes` refuse it unless the caller asks for
it (`codecs=IPFS_CODECS`): p2pimg's own DAG never links to dag-pb, and places that parse CIDs of
its own content keep refusing what it cannot hold.

CIDs from outside are parsed by `multiformats` (any multibase, full validation). CIDs built here
from a digest take a fast path: the binary form is a fixed 4-byte prefix plus the digest, and
building thousands of them per blob map through the general library costs ~0.2 ms each.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import ClassVar

from multiformats import CID as _MfCID

from p2pimg.errors import DigestInvalid

RAW = 0x55
DAG_PB = 0x70
DAG_CBOR = 0x71
SHA2_256 = 0x12

_CODEC_NAMES = {RAW: "raw", DAG_PB: "dag-pb", DAG_CBOR: "dag-cbor"}
# What `parse` and `from_bytes` accept by default: the codecs of p2pimg's own content.
NATIVE_CODECS = frozenset({RAW, DAG_CBOR})
# Those plus UnixFS nodes, for content read from IPFS.
IPFS_CODECS = frozenset({RAW, DAG_PB, DAG_CBOR})
_DIGEST_RE = re.compile(r"sha256:([a-f0-9]{64})")
_MAX_CID_TEXT = 128


@dataclass(frozen=True, slots=True)
class Cid:
    """A CIDv1 with sha2-256: its codec and the 32-byte digest."""

    codec: int
    digest: bytes

    _PREFIXES: ClassVar[dict[int, bytes]] = {
        RAW: bytes([0x01, RAW, SHA2_256, 0x20]),
        DAG_PB: bytes([0x01, DAG_PB, SHA2_256, 0x20]),
        DAG_CBOR: bytes([0x01, DAG_CBOR, SHA2_256, 0x20]),
    }

    def __post_init__(self) -> None:
        if self.codec not in _CODEC_NAMES or len(self.digest) != 32:
            raise DigestInvalid(f"unsupported CID (codec {self.codec:#x}, {len(self.digest)}-byte digest)")

    @classmethod
    def of_raw(cls, data: bytes | bytearray | memoryview) -> Cid:
        """The raw CID of `data`."""
        return cls(RAW, hashlib.sha256(data).digest())

    @classmethod
    def of_dag_cbor(cls, block: bytes) -> Cid:
        return cls(DAG_CBOR, hashlib.sha256(block).digest())

    @classmethod
    def of_dag_pb(cls, block: bytes) -> Cid:
        return cls(DAG_PB, hashlib.sha256(block).digest())

    @classmethod
    def from_bytes(cls, data: bytes, *, codecs: AbstractSet[int] = NATIVE_CODECS) -> Cid:
        """Parse a binary CID (as carried in DAG-CBOR tag 42, after its 0x00 prefix)."""
        data = bytes(data)
        if len(data) == 36:
            for codec, prefix in cls._PREFIXES.items():
                if data.startswith(prefix) and codec in codecs:
                    return cls(codec, data[4:])
        try:
            parsed = _MfCID.decode(data)
        except Exception as exc:
            raise DigestInvalid(f"malformed binary CID: {exc}") from None
        return cls._from_multiformats(parsed, data.hex(), codecs)

    @classmethod
    def parse(cls, text: str, *, codecs: AbstractSet[int] = NATIVE_CODECS) -> Cid:
        """Parse a CID string from outside (any multibase multiformats knows)."""
        if not text or len(text) > _MAX_CID_TEXT or not text.isascii():
            raise DigestInvalid(f"invalid CID {text[:80]!r}")
        try:
            parsed = _MfCID.decode(text)
        except Exception as exc:
            raise DigestInvalid(f"invalid CID {text!r}: {exc}") from None
        return cls._from_multiformats(parsed, text, codecs)

    @classmethod
    def _from_multiformats(cls, parsed: _MfCID, shown: str, codecs: AbstractSet[int]) -> Cid:
        if parsed.version != 1:
            raise DigestInvalid(f"CID {shown} is CIDv{parsed.version}; p2pimg names content by CIDv1")
        if parsed.hashfun.name != "sha2-256":
            raise DigestInvalid(f"CID {shown} uses {parsed.hashfun.name}; only sha2-256 is supported")
        if parsed.codec.code not in codecs or parsed.codec.code not in _CODEC_NAMES:
            expected = " or ".join(_CODEC_NAMES[c] for c in sorted(codecs) if c in _CODEC_NAMES)
            raise DigestInvalid(f"CID {shown} has codec {parsed.codec.name}; expected {expected}")
        try:
            digest = bytes(parsed.raw_digest)  # multiformats checks the declared length only here
        except Exception as exc:
            raise DigestInvalid(f"invalid CID {shown}: {exc}") from None
        return cls(parsed.codec.code, digest)

    @classmethod
    def from_digest(cls, digest: str) -> Cid:
        """The raw CID carrying the same sha256 as an OCI digest."""
        return cls(RAW, bytes.fromhex(parse_digest(digest)))

    def to_bytes(self) -> bytes:
        return self._PREFIXES[self.codec] + self.digest

    def to_digest(self) -> str:
        """The OCI digest of the bytes this CID names."""
        return "sha256:" + self.digest.hex()

    @property
    def codec_name(self) -> str:
        return _CODEC_NAMES[self.codec]

    def __str__(self) -> str:
        # multibase 'b' = RFC 4648 base32, lower case, no padding: the CIDv1 default.
        return "b" + base64.b32encode(self.to_bytes()).decode("ascii").lower().rstrip("=")

    def __repr__(self) -> str:
        return f"Cid({self})"

    def matches(self, data: bytes | bytearray | memoryview) -> bool:
        return hashlib.sha256(data).digest() == self.digest


def parse_digest(digest: str) -> str:
    """Validate an OCI digest and return its hex part; only sha256 is supported."""
    if not isinstance(digest, str):
        raise DigestInvalid("invalid digest")
    m = _DIGEST_RE.fullmatch(digest) if len(digest) == 71 else None
    if m is None:
        algo = digest.split(":", 1)[0] if ":" in digest else ""
        if algo != "sha256" and len(algo) < 32 and re.fullmatch(r"[a-z0-9]+([+._-][a-z0-9]+)*", algo):
            raise DigestInvalid(f"unsupported digest algorithm {algo!r}: only sha256 is supported")
        raise DigestInvalid(f"invalid digest {digest[:80]!r}: expected sha256:<64 lowercase hex>")
    return m.group(1)


def digest_of(data: bytes | memoryview) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
