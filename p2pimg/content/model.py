"""The content model: chunks, blob maps, image roots and tag records (sans I/O).

    chunk      raw block, CIDv1(raw, sha2-256) of up to `chunk_size` bytes of a blob
    BlobMap    DAG-CBOR: one OCI blob as its digest, size, chunk size and chunk CIDs in order
    ImageRoot  DAG-CBOR: an image's top manifest or index and every manifest and blob below it,
               and the artifacts that refer to its manifests (OCI referrers: signatures, SBOMs);
               its CID is the image's identity (`ipfs/<root CID>`)
    TagRecord  DAG-CBOR: `name:tag` -> root CID, with a sequence number (newest wins), optionally
               signed by a publisher key (`key` id, `sig` over the record without `sig`)
    tag head   DAG-CBOR: copies of the blocks a pull of a tag reads first (its root, manifests and
               blob maps), each with its CID, so that one request brings what would take three
               one after another; a hint only, every block is checked against its CID when used

Manifests and indexes are small and are stored as raw blocks, byte for byte, so their CID and
their OCI digest carry the same sha256. Every chunk size is a power of two that divides one
64 MiB Storj segment, so no chunk straddles a segment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from p2pimg.content import dagcbor
from p2pimg.content.cid import DAG_CBOR, RAW, Cid, parse_digest
from p2pimg.errors import BlockInvalid, InvalidInput, NameInvalid, TagInvalid

SEGMENT_SIZE = 64 << 20
DEFAULT_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 4 << 10
MAX_MANIFEST_SIZE = 4 << 20
MAX_TAG_RECORD_SIZE = 64 << 10
MAX_TAG_HEAD_SIZE = 1 << 20

BLOB_MAP_TYPE = "p2pimg/blob-map@1"
IMAGE_ROOT_TYPE = "p2pimg/image@1"
TAG_RECORD_TYPE = "p2pimg/tag@1"
TAG_HEAD_TYPE = "p2pimg/tag-head@1"

MANIFEST_MEDIA_TYPES = frozenset(
    {
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)
INDEX_MEDIA_TYPES = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)

# distribution-spec grammar; each path component starts with [a-z0-9], so "." and ".." never
# match and a validated name is safe to use as a relative path.
_NAME_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_NAME_COMPONENT}(?:/{_NAME_COMPONENT})*")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
MAX_NAME_LENGTH = 255


def check_chunk_size(size: int) -> int:
    """A chunk size must be a power of two from 4 KiB up to one 64 MiB segment."""
    if not (MIN_CHUNK_SIZE <= size <= SEGMENT_SIZE) or size & (size - 1):
        raise InvalidInput(
            f"chunk size {size} is not a power of two between {MIN_CHUNK_SIZE} and {SEGMENT_SIZE}"
        )
    return size


def parse_size(value: str | int) -> int:
    """Sizes like 1048576, 1M, 1MiB, 64K."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"([0-9]{1,15})\s*([KMGT]?)(?:I?B)?", value.strip().upper())
    if m is None:
        raise InvalidInput(f"invalid size {value!r}: expected a number of bytes, or with K, M, G, T")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2)]


def chunk_count(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


def chunk_bounds(index: int, size: int, chunk_size: int) -> tuple[int, int]:
    """Byte range [start, end) of chunk `index` in a blob of `size` bytes."""
    start = index * chunk_size
    return start, min(start + chunk_size, size)


def check_name(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH or not NAME_RE.fullmatch(name):
        raise NameInvalid(f"invalid repository name {name[:100]!r}")
    return name


def check_tag(tag: str) -> str:
    if not TAG_RE.fullmatch(tag):
        raise TagInvalid(
            f"invalid tag {tag[:130]!r}: a tag is 1 to 128 letters, digits, '_', '.' and "
            "'-', not starting with '.' or '-'"
        )
    return tag


def parse_name_tag(ref: str) -> tuple[str, str]:
    """Split `NAME:TAG` (the tag is required: p2pimg never guesses `latest` for a publish)."""
    name, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:
        raise InvalidInput(f"expected NAME:TAG, got {ref[:100]!r}")
    return check_name(name), check_tag(tag)


def _field(node: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = node.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BlockInvalid(f"{what}: field {key!r} missing or of the wrong type")
    return value


def _node(value: object, type_name: str) -> dict[str, Any]:
    if not isinstance(value, dict) or value.get("type") != type_name:
        raise BlockInvalid(f"block is not a {type_name}")
    return value


@dataclass(frozen=True)
class BlobMap:
    """One OCI blob as an ordered list of chunk CIDs.

    A blob nobody has published chunk CIDs for (a mirrored upstream blob) has a map without them
    (`unchecked`, `checked` False): its chunks are addressed by index alone and only its digest
    can check its bytes (see docs/architecture.md, "Mirrored blobs through the swarm"). Such a
    map is never encoded or stored.

    `vouched`: the map was named by an image root this node trusts (one a tag record from its
    origin, or signed by a trusted key, points at): the publisher bound these chunk CIDs to this
    digest, so once every chunk matched its CID the whole blob's sha256 adds nothing and is not
    computed. A map reached only through a root named by CID is not vouched for: its digest is
    checked, since the cache is keyed by digest and another image may name the same one.
    """

    digest: str
    size: int
    chunk_size: int
    chunks: tuple[Cid, ...]
    checked: bool = True
    vouched: bool = field(default=False, compare=False, kw_only=True)

    def __post_init__(self) -> None:
        parse_digest(self.digest)
        try:
            check_chunk_size(self.chunk_size)
        except InvalidInput as exc:
            raise BlockInvalid(str(exc)) from None
        if self.size < 0:
            raise BlockInvalid(f"blob map for {self.digest}: negative size")
        if self.checked and len(self.chunks) != chunk_count(self.size, self.chunk_size):
            raise BlockInvalid(f"blob map for {self.digest}: chunk count does not match size")
        if not self.checked and self.chunks:
            raise BlockInvalid(f"blob map for {self.digest}: an unchecked map has no chunk CIDs")
        if any(c.codec != RAW for c in self.chunks):
            raise BlockInvalid(f"blob map for {self.digest}: chunks must be raw CIDs")

    @classmethod
    def unchecked(cls, digest: str, size: int, chunk_size: int) -> BlobMap:
        """The map of a blob known only by its digest and size."""
        return cls(digest, size, chunk_size, (), checked=False)

    @property
    def count(self) -> int:
        return len(self.chunks) if self.checked else chunk_count(self.size, self.chunk_size)

    def bounds(self, index: int) -> tuple[int, int]:
        return chunk_bounds(index, self.size, self.chunk_size)

    def to_node(self) -> dict[str, Any]:
        if not self.checked:
            raise ValueError(f"the map of {self.digest} has no chunk CIDs to encode")
        return {
            "type": BLOB_MAP_TYPE,
            "digest": self.digest,
            "size": self.size,
            "chunkSize": self.chunk_size,
            "chunks": list(self.chunks),
        }

    def encode(self) -> bytes:
        return dagcbor.encode(self.to_node())

    @classmethod
    def from_node(cls, value: object) -> BlobMap:
        node = _node(value, BLOB_MAP_TYPE)
        what = "blob map"
        chunks = _field(node, "chunks", list, what)
        if not all(isinstance(c, Cid) for c in chunks):
            raise BlockInvalid("blob map: chunks must be links")
        try:
            return cls(
                digest=_field(node, "digest", str, what),
                size=_field(node, "size", int, what),
                chunk_size=_field(node, "chunkSize", int, what),
                chunks=tuple(chunks),
            )
        except InvalidInput as exc:
            raise BlockInvalid(f"blob map: {exc}") from None


@dataclass(frozen=True)
class ManifestEntry:
    media_type: str
    size: int
    cid: Cid  # raw block holding the manifest bytes


@dataclass(frozen=True)
class BlobEntry:
    size: int
    map: Cid  # DAG-CBOR BlobMap


@dataclass(frozen=True)
class ImageRoot:
    """An image: its top manifest or index, every manifest below it, and every blob's map.

    `referrers` maps a manifest of the image (a subject) to the digests of the manifests whose
    `subject` it is (OCI 1.1 artifacts: signatures, SBOMs, attestations). The artifacts are
    ordinary `manifests` and their blobs ordinary `blobs`, fetched and verified like the image's
    own. The field is optional: written only when it has entries (a root without referrers encodes
    exactly as before it existed, so published images keep their CIDs), each list sorted and without
    duplicates, so that one set of referrers has one encoding.
    """

    top: str
    manifests: dict[str, ManifestEntry]
    blobs: dict[str, BlobEntry] = field(default_factory=dict)
    referrers: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.top not in self.manifests:
            raise BlockInvalid("image root: top manifest is not among its manifests")
        for subject, digests in self.referrers.items():
            if subject not in self.manifests:
                raise BlockInvalid(f"image root: referrers of {subject[:80]!r}, not one of its manifests")
            if not digests or list(digests) != sorted(set(digests)):
                raise BlockInvalid(
                    f"image root: the referrers of {subject} are not a sorted list of distinct digests"
                )
            for digest in digests:
                if digest not in self.manifests or digest == subject:
                    raise BlockInvalid(
                        f"image root: referrer {digest[:80]!r} of {subject} is not another of its manifests"
                    )
        for digest, m in self.manifests.items():
            parse_digest(digest)
            if m.cid.codec != RAW or m.cid.to_digest() != digest:
                raise BlockInvalid(f"image root: manifest {digest} linked by a mismatching CID")
            if not 0 <= m.size <= MAX_MANIFEST_SIZE:
                raise BlockInvalid(f"image root: manifest {digest} has an invalid size")
        for digest, b in self.blobs.items():
            parse_digest(digest)
            if b.map.codec != DAG_CBOR or b.size < 0:
                raise BlockInvalid(f"image root: blob {digest} has an invalid entry")

    @property
    def top_entry(self) -> ManifestEntry:
        return self.manifests[self.top]

    def to_node(self) -> dict[str, Any]:
        node: dict[str, Any] = {
            "type": IMAGE_ROOT_TYPE,
            "top": self.top,
            "manifests": {
                d: {"mediaType": m.media_type, "size": m.size, "block": m.cid}
                for d, m in self.manifests.items()
            },
            "blobs": {d: {"size": b.size, "map": b.map} for d, b in self.blobs.items()},
        }
        if self.referrers:
            node["referrers"] = {s: list(digests) for s, digests in self.referrers.items()}
        return node

    def referrers_of(self, subject: str) -> tuple[str, ...]:
        """The digests of the manifests whose subject is `subject` (none when it has none)."""
        return self.referrers.get(subject, ())

    def encode(self) -> bytes:
        return dagcbor.encode(self.to_node())

    @classmethod
    def from_node(cls, value: object) -> ImageRoot:
        node = _node(value, IMAGE_ROOT_TYPE)
        what = "image root"
        manifests: dict[str, ManifestEntry] = {}
        for d, m in _field(node, "manifests", dict, what).items():
            if not isinstance(m, dict):
                raise BlockInvalid("image root: malformed manifest entry")
            manifests[d] = ManifestEntry(
                media_type=_field(m, "mediaType", str, what),
                size=_field(m, "size", int, what),
                cid=_field(m, "block", Cid, what),
            )
        blobs: dict[str, BlobEntry] = {}
        for d, b in _field(node, "blobs", dict, what).items():
            if not isinstance(b, dict):
                raise BlockInvalid("image root: malformed blob entry")
            blobs[d] = BlobEntry(size=_field(b, "size", int, what), map=_field(b, "map", Cid, what))
        referrers: dict[str, tuple[str, ...]] = {}
        if "referrers" in node:
            # Present only with entries: an empty map would be a second encoding of "none".
            table = _field(node, "referrers", dict, what)
            if not table:
                raise BlockInvalid("image root: an empty referrers map (it is left out when empty)")
            for subject, digests in table.items():
                if not isinstance(digests, list) or not all(isinstance(d, str) for d in digests):
                    raise BlockInvalid("image root: malformed referrers entry")
                referrers[subject] = tuple(digests)
        try:
            return cls(
                top=_field(node, "top", str, what), manifests=manifests, blobs=blobs, referrers=referrers
            )
        except InvalidInput as exc:
            raise BlockInvalid(f"image root: {exc}") from None


MAX_KEY_ID_LENGTH = 64
MAX_SIGNATURE_LENGTH = 512


@dataclass(frozen=True)
class TagRecord:
    """`name:tag` -> image root, newest `seq` wins; `key` and `sig` when a publisher signed it.

    The signature covers `signed_bytes()`: the record's DAG-CBOR without `sig` (type, name, tag,
    root, seq and the key id), so it cannot be moved to another name, tag, root or seq. Checking it
    is `signing.TrustStore`'s job; the model only checks the fields' shape.
    """

    name: str
    tag: str
    root: Cid
    seq: int
    key: str | None = None
    sig: bytes | None = None

    def __post_init__(self) -> None:
        try:
            check_name(self.name)
            check_tag(self.tag)
        except InvalidInput as exc:
            raise BlockInvalid(f"tag record: {exc}") from None
        if self.root.codec != DAG_CBOR or self.seq < 0:
            raise BlockInvalid("tag record: invalid root or sequence number")
        if (self.key is None) != (self.sig is None):
            raise BlockInvalid("tag record: a key id needs a signature and a signature a key id")
        if self.key is not None and not 0 < len(self.key) <= MAX_KEY_ID_LENGTH:
            raise BlockInvalid("tag record: malformed key id")
        if self.sig is not None and not 0 < len(self.sig) <= MAX_SIGNATURE_LENGTH:
            raise BlockInvalid("tag record: malformed signature")

    @property
    def signed(self) -> bool:
        return self.sig is not None

    def _unsigned_node(self, key: str | None) -> dict[str, Any]:
        node: dict[str, Any] = {
            "type": TAG_RECORD_TYPE,
            "name": self.name,
            "tag": self.tag,
            "root": self.root,
            "seq": self.seq,
        }
        if key is not None:
            node["key"] = key
        return node

    def to_node(self) -> dict[str, Any]:
        node = self._unsigned_node(self.key)
        if self.sig is not None:
            node["sig"] = self.sig
        return node

    def signed_bytes(self, key: str | None = None) -> bytes:
        """What a signature covers: the canonical DAG-CBOR of the record without `sig`.

        `key` gives the key id to sign with (the record's own by default).
        """
        return dagcbor.encode(self._unsigned_node(key if key is not None else self.key))

    def encode(self) -> bytes:
        return dagcbor.encode(self.to_node())

    @classmethod
    def decode(cls, data: bytes, *, name: str, tag: str) -> TagRecord:
        """Decode a record and check it is the record for `name:tag` (not another's)."""
        node = _node(dagcbor.decode(data, max_size=MAX_TAG_RECORD_SIZE), TAG_RECORD_TYPE)
        what = "tag record"
        key = node.get("key")
        sig = node.get("sig")
        if key is not None and not isinstance(key, str):
            raise BlockInvalid("tag record: field 'key' of the wrong type")
        if sig is not None and not isinstance(sig, bytes):
            raise BlockInvalid("tag record: field 'sig' of the wrong type")
        record = cls(
            name=_field(node, "name", str, what),
            tag=_field(node, "tag", str, what),
            root=_field(node, "root", Cid, what),
            seq=_field(node, "seq", int, what),
            key=key,
            sig=sig,
        )
        if (record.name, record.tag) != (name, tag):
            raise BlockInvalid(f"tag record is for {record.name}:{record.tag}, not {name}:{tag}")
        return record


def encode_tag_head(blocks: list[tuple[Cid, bytes]], *, max_size: int = MAX_TAG_HEAD_SIZE) -> bytes:
    """A tag head of `blocks`, in order, as many as fit in `max_size` (a block that does not fit
    is left out, and the ones after it are tried)."""
    kept: list[list[Any]] = []
    room = max_size - 64
    for cid, data in blocks:
        cost = len(data) + len(str(cid)) + 16  # the CID binary is shorter than its text
        if cost <= room:
            kept.append([cid, data])
            room -= cost
    return dagcbor.encode({"type": TAG_HEAD_TYPE, "blocks": kept})


def decode_tag_head(data: bytes) -> dict[Cid, bytes]:
    """The blocks of a tag head by the CID each claims; whether a block matches its CID is the
    reader's check, when it uses the block."""
    node = _node(dagcbor.decode(data, max_size=MAX_TAG_HEAD_SIZE), TAG_HEAD_TYPE)
    blocks: dict[Cid, bytes] = {}
    for item in _field(node, "blocks", list, "tag head"):
        if not (isinstance(item, list) and len(item) == 2):
            raise BlockInvalid("tag head: malformed block entry")
        cid, block = item
        if not isinstance(cid, Cid) or not isinstance(block, bytes):
            raise BlockInvalid("tag head: malformed block entry")
        blocks[cid] = block
    return blocks
