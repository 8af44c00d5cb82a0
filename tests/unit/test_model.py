"""Unit tests for p2pimg.content.model: chunking, names and tags, and the DAG node types."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pimg.content import dagcbor
from p2pimg.content.cid import DAG_CBOR, Cid
from p2pimg.content.model import (
    BLOB_MAP_TYPE,
    IMAGE_ROOT_TYPE,
    MAX_MANIFEST_SIZE,
    MAX_NAME_LENGTH,
    MIN_CHUNK_SIZE,
    SEGMENT_SIZE,
    TAG_RECORD_TYPE,
    BlobEntry,
    BlobMap,
    ImageRoot,
    ManifestEntry,
    TagRecord,
    check_chunk_size,
    check_name,
    check_tag,
    chunk_bounds,
    chunk_count,
    parse_name_tag,
)
from p2pimg.errors import BlockInvalid, InvalidInput, NameInvalid, TagInvalid

CHUNK_SIZES = [1 << k for k in range(12, 27)]  # 4 KiB .. 64 MiB
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def raw_cid(seed: bytes) -> Cid:
    return Cid.of_raw(seed)


def dag_cid(seed: bytes) -> Cid:
    return Cid.of_dag_cbor(seed)


def digest(seed: bytes) -> str:
    return "sha256:" + hashlib.sha256(seed).hexdigest()


def blob_map(size: int, chunk_size: int = MIN_CHUNK_SIZE, seed: bytes = b"blob") -> BlobMap:
    n = chunk_count(size, chunk_size)
    return BlobMap(
        digest=digest(seed),
        size=size,
        chunk_size=chunk_size,
        chunks=tuple(raw_cid(seed + i.to_bytes(4, "big")) for i in range(n)),
    )


def image_root() -> ImageRoot:
    index = b'{"manifests":[]}'
    manifest = b'{"layers":[]}'
    return ImageRoot(
        top=digest(index),
        manifests={
            digest(index): ManifestEntry(OCI_INDEX, len(index), raw_cid(index)),
            digest(manifest): ManifestEntry(OCI_MANIFEST, len(manifest), raw_cid(manifest)),
        },
        blobs={
            digest(b"layer"): BlobEntry(size=123, map=dag_cid(b"layer-map")),
            digest(b"config"): BlobEntry(size=0, map=dag_cid(b"config-map")),
        },
    )


def round_trip_node(node: dict[str, Any]) -> Any:
    return dagcbor.decode(dagcbor.encode(node))


# --- chunk sizes and bounds -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", CHUNK_SIZES)
def test_check_chunk_size_accepts_powers_of_two(size: int) -> None:
    assert check_chunk_size(size) == size


@pytest.mark.parametrize(
    "size",
    [
        0,
        1,
        -4096,
        2048,
        MIN_CHUNK_SIZE - 1,
        MIN_CHUNK_SIZE + 1,
        3 * 4096,
        5 << 20,
        SEGMENT_SIZE - 1,
        SEGMENT_SIZE + 1,
        SEGMENT_SIZE * 2,
        1 << 40,
    ],
)
def test_check_chunk_size_refuses(size: int) -> None:
    with pytest.raises(InvalidInput) as info:
        check_chunk_size(size)
    assert type(info.value) is InvalidInput


@given(size=st.integers(-(2**30), 2**30))
def test_check_chunk_size_accepts_exactly_the_listed_sizes(size: int) -> None:
    if size in CHUNK_SIZES:
        assert check_chunk_size(size) == size
    else:
        with pytest.raises(InvalidInput):
            check_chunk_size(size)


@pytest.mark.parametrize(
    ("size", "chunk_size", "expected"),
    [
        (0, 4096, 0),
        (1, 4096, 1),
        (4096, 4096, 1),
        (4097, 4096, 2),
        (8192, 4096, 2),
        (SEGMENT_SIZE, 1 << 20, 64),
    ],
)
def test_chunk_count(size: int, chunk_size: int, expected: int) -> None:
    assert chunk_count(size, chunk_size) == expected


@given(chunk_size=st.sampled_from(CHUNK_SIZES), data=st.data())
def test_chunk_bounds_tile_the_blob(chunk_size: int, data: st.DataObject) -> None:
    n = data.draw(st.integers(0, 300))
    size = 0 if n == 0 else data.draw(st.integers((n - 1) * chunk_size + 1, n * chunk_size))
    assert chunk_count(size, chunk_size) == n
    position = 0
    for i in range(n):
        start, end = chunk_bounds(i, size, chunk_size)
        assert start == position
        assert start < end <= size
        assert end - start <= chunk_size
        if i < n - 1:
            assert end - start == chunk_size
        # no chunk straddles a 64 MiB segment
        assert start // SEGMENT_SIZE == (end - 1) // SEGMENT_SIZE
        position = end
    assert position == size


@given(chunk_size=st.sampled_from(CHUNK_SIZES), size=st.integers(0, 1 << 40))
def test_chunk_count_is_ceiling(chunk_size: int, size: int) -> None:
    n = chunk_count(size, chunk_size)
    assert (n - 1) * chunk_size < size <= n * chunk_size or (size == 0 and n == 0)
    if n:
        assert chunk_bounds(n - 1, size, chunk_size)[1] == size


# --- names and tags --------------------------------------------------------------------------------------


VALID_NAMES = [
    "a",
    "0",
    "demo/app",
    "a.b-c__d/e",
    "a---b",
    "a_b",
    "library/ubuntu",
    "x/y/z/w",
    "ipfs/bafyreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku",
    "a" * MAX_NAME_LENGTH,
    "/".join(["ab"] * 85),  # 254 characters
]

INVALID_NAMES = [
    "",
    "A",
    "Demo/app",
    "demo/App",
    "..",
    ".",
    "a/../b",
    "a/./b",
    "../a",
    "/a",
    "a/",
    "/",
    "a//b",
    "a" * (MAX_NAME_LENGTH + 1),
    "a" * 1000,
    "_a",
    "a_",
    "a___b",
    "a..b",
    ".a",
    "a.",
    "-a",
    "a-",
    "a.-b",
    "a b",
    "a:b",
    "a@b",
    "é",
    "a\\b",
    "a\x00",
    "demo/app\n",
    "a\n",
    "\na",
]


@pytest.mark.parametrize("name", VALID_NAMES)
def test_check_name_accepts(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_check_name_refuses(name: str) -> None:
    with pytest.raises(NameInvalid):
        check_name(name)


@given(name=st.text(alphabet="ab./_-", max_size=12))
def test_accepted_names_are_safe_relative_paths(name: str) -> None:
    try:
        check_name(name)
    except NameInvalid:
        return
    parts = name.split("/")
    assert all(p and p not in (".", "..") for p in parts)
    assert name[0].isalnum() and name[-1].isalnum()


VALID_TAGS = ["latest", "1", "v1.0.0", "_x", "A-b_c.D", "a" * 128, "X" + "." * 127]
INVALID_TAGS = ["", ".x", "-x", "a" * 129, "a/b", "a:b", "a b", "é", "v1\n", "latest\n", "\nlatest", "a@b"]


@pytest.mark.parametrize("tag", VALID_TAGS)
def test_check_tag_accepts(tag: str) -> None:
    assert check_tag(tag) == tag


@pytest.mark.parametrize("tag", INVALID_TAGS)
def test_check_tag_refuses(tag: str) -> None:
    with pytest.raises(TagInvalid):
        check_tag(tag)


def test_parse_name_tag() -> None:
    assert parse_name_tag("demo/app:1") == ("demo/app", "1")
    assert parse_name_tag("a:latest") == ("a", "latest")
    assert parse_name_tag("ipfs/x:v1.2") == ("ipfs/x", "v1.2")


@pytest.mark.parametrize("ref", ["demo/app", "host:5000/app", "a:b/c", ""])
def test_parse_name_tag_requires_a_tag(ref: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_name_tag(ref)
    assert type(info.value) is InvalidInput


@pytest.mark.parametrize(
    ("ref", "error"),
    [
        ("host:5000/app:1", NameInvalid),  # registry host with port is not part of a name
        (":1", NameInvalid),
        ("Demo/app:1", NameInvalid),
        ("demo//app:1", NameInvalid),
        ("demo/app:", TagInvalid),
        ("demo/app:.x", TagInvalid),
        ("demo/app::1", NameInvalid),
        ("demo/app:1\n", TagInvalid),
    ],
)
def test_parse_name_tag_refuses(ref: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_name_tag(ref)


# --- BlobMap --------------------------------------------------------------------------------------------


@given(
    chunk_size=st.sampled_from(CHUNK_SIZES[:6]),
    data=st.data(),
    seed=st.binary(max_size=8),
)
def test_blob_map_round_trip(chunk_size: int, data: st.DataObject, seed: bytes) -> None:
    n = data.draw(st.integers(0, 40))
    size = 0 if n == 0 else data.draw(st.integers((n - 1) * chunk_size + 1, n * chunk_size))
    bm = blob_map(size, chunk_size, seed)
    assert bm.count == n
    node = bm.to_node()
    assert node["type"] == BLOB_MAP_TYPE
    block = bm.encode()
    assert block == dagcbor.encode(node)
    back = BlobMap.from_node(dagcbor.decode(block))
    assert back == bm
    assert back.encode() == block
    for i in range(n):
        assert back.bounds(i) == chunk_bounds(i, size, chunk_size)


def test_blob_map_node_shape() -> None:
    bm = blob_map(5000)
    assert bm.to_node() == {
        "type": BLOB_MAP_TYPE,
        "digest": digest(b"blob"),
        "size": 5000,
        "chunkSize": MIN_CHUNK_SIZE,
        "chunks": list(bm.chunks),
    }


def _blob_map_node(**changes: Any) -> dict[str, Any]:
    node = blob_map(5000).to_node()
    node.update(changes)
    return node


@pytest.mark.parametrize(
    "node",
    [
        None,
        [],
        "p2pimg/blob-map@1",
        _blob_map_node(type=IMAGE_ROOT_TYPE),
        _blob_map_node(type=TAG_RECORD_TYPE),
        _blob_map_node(type=None),
        {k: v for k, v in _blob_map_node().items() if k != "type"},
        {k: v for k, v in _blob_map_node().items() if k != "digest"},
        {k: v for k, v in _blob_map_node().items() if k != "size"},
        {k: v for k, v in _blob_map_node().items() if k != "chunkSize"},
        {k: v for k, v in _blob_map_node().items() if k != "chunks"},
        _blob_map_node(size=4096),  # one chunk fewer than the list holds
        _blob_map_node(size=8193),  # one chunk more
        _blob_map_node(size=-1),
        _blob_map_node(size="5000"),
        _blob_map_node(size=True),
        _blob_map_node(chunkSize=True),
        _blob_map_node(chunkSize=3000),
        _blob_map_node(chunkSize=SEGMENT_SIZE * 2),
        _blob_map_node(chunkSize=8192),  # valid size, but then 5000 bytes is one chunk, not two
        _blob_map_node(digest="sha256:../../etc/passwd"),
        _blob_map_node(digest="sha512:" + "a" * 128),
        _blob_map_node(digest=b"sha256:" + b"a" * 64),
        _blob_map_node(chunks=[raw_cid(b"1"), dag_cid(b"2")]),  # non-raw chunk CID
        _blob_map_node(chunks=[raw_cid(b"1"), str(raw_cid(b"2"))]),  # chunk as a string
        _blob_map_node(chunks=[raw_cid(b"1"), None]),
        _blob_map_node(chunks=tuple(blob_map(5000).chunks)),
    ],
)
def test_blob_map_from_node_refuses(node: Any) -> None:
    with pytest.raises(BlockInvalid):
        BlobMap.from_node(node)


def test_blob_map_refuses_non_raw_chunks_directly() -> None:
    with pytest.raises(BlockInvalid):
        BlobMap(digest=digest(b"x"), size=1, chunk_size=MIN_CHUNK_SIZE, chunks=(dag_cid(b"x"),))


def test_blob_map_refuses_wrong_count_directly() -> None:
    with pytest.raises(BlockInvalid):
        BlobMap(digest(b"x"), size=MIN_CHUNK_SIZE + 1, chunk_size=MIN_CHUNK_SIZE, chunks=(raw_cid(b"x"),))
    with pytest.raises(BlockInvalid):
        BlobMap(digest(b"x"), size=0, chunk_size=MIN_CHUNK_SIZE, chunks=(raw_cid(b"x"),))


# --- ImageRoot ------------------------------------------------------------------------------------------


def test_image_root_round_trip() -> None:
    root = image_root()
    block = root.encode()
    assert block == dagcbor.encode(root.to_node())
    back = ImageRoot.from_node(dagcbor.decode(block))
    assert back == root
    assert back.encode() == block
    assert back.top_entry == root.manifests[root.top]
    assert back.top_entry.media_type == OCI_INDEX


@given(
    manifests=st.lists(st.binary(max_size=16), min_size=1, max_size=5, unique=True),
    blobs=st.dictionaries(st.binary(max_size=8), st.integers(0, 2**63), max_size=5),
    top_index=st.integers(0, 4),
)
def test_image_root_round_trip_generated(
    manifests: list[bytes], blobs: dict[bytes, int], top_index: int
) -> None:
    root = ImageRoot(
        top=digest(manifests[top_index % len(manifests)]),
        manifests={digest(m): ManifestEntry(OCI_MANIFEST, len(m), raw_cid(m)) for m in manifests},
        blobs={digest(b): BlobEntry(size=s, map=dag_cid(b)) for b, s in blobs.items()},
    )
    assert ImageRoot.from_node(round_trip_node(root.to_node())) == root


def test_image_root_node_shape() -> None:
    root = image_root()
    node = root.to_node()
    assert node["type"] == IMAGE_ROOT_TYPE
    assert node["top"] == root.top
    m = root.manifests[root.top]
    assert node["manifests"][root.top] == {"mediaType": m.media_type, "size": m.size, "block": m.cid}
    assert node["blobs"][digest(b"layer")] == {"size": 123, "map": dag_cid(b"layer-map")}


def _root_node(**changes: Any) -> dict[str, Any]:
    node = image_root().to_node()
    node.update(changes)
    return node


def _with_manifest(**entry_changes: Any) -> dict[str, Any]:
    node = image_root().to_node()
    top = node["top"]
    node["manifests"][top] = {**node["manifests"][top], **entry_changes}
    return node


def _with_blob(key: str | None = None, **entry_changes: Any) -> dict[str, Any]:
    node = image_root().to_node()
    d = digest(b"layer")
    entry = {**node["blobs"].pop(d), **entry_changes}
    node["blobs"][key or d] = entry
    return node


@pytest.mark.parametrize(
    "node",
    [
        None,
        _root_node(type=BLOB_MAP_TYPE),
        _root_node(top=digest(b"not there")),  # top missing from manifests
        _root_node(top=None),
        _root_node(manifests={}),
        _root_node(manifests=[]),
        _root_node(blobs=[]),
        _root_node(blobs=None),
        _with_manifest(block=raw_cid(b"other bytes")),  # CID does not match the digest key
        _with_manifest(block=Cid(DAG_CBOR, bytes.fromhex(image_root().top[7:]))),  # same hash, wrong codec
        _with_manifest(block=str(raw_cid(b'{"manifests":[]}'))),
        _with_manifest(size=-1),
        _with_manifest(size=MAX_MANIFEST_SIZE + 1),
        _with_manifest(size=False),
        _with_manifest(mediaType=None),
        _root_node(manifests={**image_root().to_node()["manifests"], "top": {}}),
        _root_node(manifests={**image_root().to_node()["manifests"], digest(b"x"): "entry"}),
        _with_blob(map=raw_cid(b"layer-map")),  # blob map must be a DAG-CBOR link
        _with_blob(size=-1),
        _with_blob(size=None),
        _with_blob(map=None),
        _with_blob(key="sha256:../../etc/passwd"),
        _with_blob(key="sha256:" + "A" * 64),
        _root_node(blobs={digest(b"layer"): 5}),
    ],
)
def test_image_root_from_node_refuses(node: Any) -> None:
    with pytest.raises(BlockInvalid):
        ImageRoot.from_node(node)


def test_image_root_refuses_manifest_key_with_invalid_digest() -> None:
    node = image_root().to_node()
    entry = node["manifests"].pop(node["top"])
    node["manifests"]["sha256:../../etc/passwd"] = entry
    node["top"] = "sha256:../../etc/passwd"
    with pytest.raises(BlockInvalid):
        ImageRoot.from_node(node)


def test_image_root_refuses_blob_digest_with_trailing_newline() -> None:
    node = _with_blob(key=digest(b"layer") + "\n")
    with pytest.raises(BlockInvalid):
        ImageRoot.from_node(node)


def test_image_root_accepts_manifest_at_size_limit() -> None:
    node = _with_manifest(size=MAX_MANIFEST_SIZE)
    assert ImageRoot.from_node(node).top_entry.size == MAX_MANIFEST_SIZE


# --- TagRecord ------------------------------------------------------------------------------------------


def tag_record(name: str = "demo/app", tag: str = "1", seq: int = 7) -> TagRecord:
    return TagRecord(name=name, tag=tag, root=dag_cid(b"root"), seq=seq)


@given(
    name=st.sampled_from(VALID_NAMES),
    tag=st.sampled_from(VALID_TAGS),
    seq=st.integers(0, 2**64 - 1),
    seed=st.binary(max_size=8),
)
def test_tag_record_round_trip(name: str, tag: str, seq: int, seed: bytes) -> None:
    record = TagRecord(name=name, tag=tag, root=dag_cid(seed), seq=seq)
    block = record.encode()
    assert block == dagcbor.encode(record.to_node())
    assert TagRecord.decode(block, name=name, tag=tag) == record


def test_tag_record_node_shape() -> None:
    record = tag_record()
    assert record.to_node() == {
        "type": TAG_RECORD_TYPE,
        "name": "demo/app",
        "tag": "1",
        "root": dag_cid(b"root"),
        "seq": 7,
    }


@pytest.mark.parametrize(
    ("name", "tag"),
    [("demo/other", "1"), ("demo/app", "2"), ("demo", "1"), ("demo/app/x", "1"), ("demo/app", "1.0")],
)
def test_tag_record_decode_refuses_another_name_or_tag(name: str, tag: str) -> None:
    block = tag_record().encode()
    with pytest.raises(BlockInvalid) as info:
        TagRecord.decode(block, name=name, tag=tag)
    assert "demo/app:1" in str(info.value)


def _record_block(**changes: Any) -> bytes:
    node = tag_record().to_node()
    node.update(changes)
    return dagcbor.encode(node)


@pytest.mark.parametrize(
    "block",
    [
        b"",
        b"\xa0",
        b"\xf6",
        b"garbage",
        dagcbor.encode([1, 2]),
        _record_block(type=BLOB_MAP_TYPE),
        _record_block(seq=-1),
        _record_block(seq=True),
        _record_block(seq="7"),
        _record_block(root=raw_cid(b"root")),  # root must be a DAG-CBOR link
        _record_block(root=str(dag_cid(b"root"))),
        _record_block(name="Demo/app"),
        _record_block(tag=".1"),
        _record_block(name=None),
        dagcbor.encode({k: v for k, v in tag_record().to_node().items() if k != "seq"}),
        dagcbor.encode({k: v for k, v in tag_record().to_node().items() if k != "root"}),
        bytes.fromhex("a1616101") + b"\x00",  # trailing bytes
        _record_block(pad=b"x" * (64 << 10)),  # above the 64 KiB record limit
    ],
)
def test_tag_record_decode_refuses(block: bytes) -> None:
    with pytest.raises(BlockInvalid):
        TagRecord.decode(block, name="demo/app", tag="1")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"seq": -1},
        {"name": "Demo"},
        {"name": "a//b"},
        {"tag": ""},
        {"tag": "a/b"},
        {"name": "demo/app\n"},
        {"tag": "1\n"},
    ],
    ids=[
        "negative-seq",
        "uppercase-name",
        "empty-component",
        "empty-tag",
        "slash-tag",
        "name-newline",
        "tag-newline",
    ],
)
def test_tag_record_constructor_refuses(kwargs: dict[str, Any]) -> None:
    with pytest.raises(BlockInvalid):
        tag_record(**kwargs)


def test_tag_record_constructor_refuses_raw_root() -> None:
    with pytest.raises(BlockInvalid):
        TagRecord(name="demo/app", tag="1", root=raw_cid(b"root"), seq=0)
