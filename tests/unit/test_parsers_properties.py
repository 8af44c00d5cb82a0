"""Property tests: every parser that sees outside data accepts it or raises its documented error.

"Documented" is the error class in each parser's contract (all subclasses of P2pimgError); any
other exception would surface as a 500 or a crashed task. Each example is bounded in time by the
hypothesis deadline. The fuzz targets under fuzz/ get a short deterministic smoke run at the end.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import re
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from p2pimg.content import dagcbor
from p2pimg.content import graph as sources
from p2pimg.content.cid import DAG_CBOR, IPFS_CODECS, RAW, Cid, parse_digest
from p2pimg.content.model import (
    BLOB_MAP_TYPE,
    IMAGE_ROOT_TYPE,
    MANIFEST_MEDIA_TYPES,
    TAG_RECORD_TYPE,
    BlobMap,
    ImageRoot,
    TagRecord,
    check_name,
    check_tag,
    parse_name_tag,
    parse_size,
)
from p2pimg.errors import (
    BlockInvalid,
    DigestInvalid,
    InvalidInput,
    NameInvalid,
    RangeInvalid,
    RangeNotSatisfiable,
    SourceInvalid,
    TagInvalid,
)
from p2pimg.node import config, warm
from p2pimg.web import ranges, registry

FUZZ_DIR = Path(__file__).resolve().parents[2] / "fuzz"
FAST = settings(max_examples=200, deadline=timedelta(seconds=1), suppress_health_check=[HealthCheck.too_slow])

# -- strategies ---------------------------------------------------------------------------------

hexes = st.text("0123456789abcdef", min_size=64, max_size=64)
digests = hexes.map(lambda h: "sha256:" + h)
cids = st.builds(Cid, st.sampled_from([RAW, DAG_CBOR]), st.binary(min_size=32, max_size=32))
name_parts = st.from_regex(r"[a-z0-9]{1,8}([._-][a-z0-9]{1,4}){0,2}", fullmatch=True)
names = st.lists(name_parts, min_size=1, max_size=4).map("/".join)
tags = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,20}", fullmatch=True)
nasty_chars = st.sampled_from(
    [
        "",
        ":",
        "/",
        "..",
        "@",
        "\r\n",
        "\x00",
        "%2e",
        "²",
        "٣",
        "Ａ",
        "ſ",
        "K",
        "\ud800",
        "-",
        "_",
        "__",
        " ",
        "ipfs/",
        "sha256:",
        "A",
    ]
)
# Text built from near-miss pieces hits the edges of the grammars far more often than noise.
nasty_text = st.lists(st.one_of(nasty_chars, name_parts, tags, st.text(max_size=5)), max_size=12).map("".join)
any_text = st.one_of(st.text(max_size=300), nasty_text, st.text(max_size=3000))


def refused(exc_type: type[BaseException], fn: Any, *args: Any, **kwargs: Any) -> Any:
    """fn(*args) or None if it raised exc_type; anything else fails the test."""
    try:
        return fn(*args, **kwargs)
    except exc_type as exc:
        assert isinstance(exc.message, str) and exc.message  # type: ignore[attr-defined]
        return None


def mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    out = bytearray(data)
    for op, pos, value in edits:
        if op == 0 and out:
            out[pos % len(out)] = value
        elif op == 1:
            out.insert(pos % (len(out) + 1), value)
        elif op == 2 and out:
            del out[pos % len(out)]
        else:
            del out[pos % (len(out) + 1) :]
    return bytes(out)


edit_lists = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=6
)

# -- names, tags, references ------------------------------------------------------------------


@FAST
@given(st.one_of(any_text, names))
def test_check_name(text: str) -> None:
    if refused(NameInvalid, check_name, text) is not None:
        assert len(text) <= 255 and all(part not in ("", ".", "..") for part in text.split("/"))


@FAST
@given(st.one_of(any_text, tags))
def test_check_tag(text: str) -> None:
    if refused(TagInvalid, check_tag, text) is not None:
        assert 1 <= len(text) <= 128 and text.isascii()


@FAST
@given(st.one_of(any_text, st.builds("{}:{}{}".format, names, tags, nasty_text)))
def test_parse_name_tag(text: str) -> None:
    parsed = refused(InvalidInput, parse_name_tag, text)
    if parsed is not None:
        assert ":".join(parsed) == text


@FAST
@given(st.one_of(any_text, names, st.builds("ipfs/{}".format, st.one_of(cids.map(str), nasty_text))))
def test_check_repository(text: str) -> None:
    if refused(NameInvalid, registry.check_repository, text) is not None:
        assert check_name(text) == text


@FAST
@given(
    st.one_of(
        any_text,
        st.builds("{}:{}".format, names, tags),
        st.builds("ipfs/{}".format, st.one_of(cids.map(str), nasty_text)),
    )
)
def test_warm_parse_ref(text: str) -> None:
    parsed = refused(InvalidInput, warm.parse_ref, text)
    if isinstance(parsed, Cid):  # a p2pimg root, or a nerdctl image's raw or dag-pb CID
        assert parsed.codec in IPFS_CODECS


# -- digests and CIDs --------------------------------------------------------------------------


@FAST
@given(
    st.one_of(
        any_text,
        digests,
        st.builds("{}:{}".format, nasty_text, nasty_text),
        hexes.map(lambda h: "sha256:" + h.upper()),
        hexes.map(lambda h: "sha512:" + h * 2),
    )
)
def test_parse_digest(text: str) -> None:
    hex_part = refused(DigestInvalid, parse_digest, text)
    if hex_part is not None:
        assert re.fullmatch(r"[0-9a-f]{64}", hex_part) and text == "sha256:" + hex_part


@FAST
@given(
    st.one_of(
        any_text,
        cids.map(str),
        cids.map(lambda c: str(c)[:-1]),
        cids.map(lambda c: str(c).upper()),
        st.builds(lambda c, t: str(c) + t, cids, nasty_text),
        st.just("QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"),
    )
)
def test_cid_parse(text: str) -> None:
    cid = refused(DigestInvalid, Cid.parse, text)
    if cid is not None:
        assert Cid.parse(str(cid)) == cid


@FAST
@given(
    st.one_of(
        st.binary(max_size=80), cids.map(Cid.to_bytes), st.builds(mutate, cids.map(Cid.to_bytes), edit_lists)
    )
)
def test_cid_from_bytes(data: bytes) -> None:
    cid = refused(DigestInvalid, Cid.from_bytes, data)
    if cid is not None:
        assert Cid.from_bytes(cid.to_bytes()) == cid


# -- Range headers -----------------------------------------------------------------------------

numbers = st.one_of(
    st.integers(0, 2**70).map(str),
    st.just(""),
    st.just("9" * 199),
    st.just("-1"),
    st.just("²"),
    st.just("0x10"),
    st.just(" 1"),
    st.just("1_0"),
)
range_headers = st.one_of(
    any_text,
    st.builds(
        "{}={}-{}".format,
        st.sampled_from(["bytes", "BYTES", "Bytes ", "byteſ", "items", "", "bytes "]),
        numbers,
        numbers,
    ),
    st.builds("bytes={}-{},{}-{}".format, numbers, numbers, numbers, numbers),
    st.builds("bytes={}{}".format, numbers, nasty_text),
)


@FAST
@given(range_headers, st.one_of(st.integers(0, 2**64), st.sampled_from([0, 1, 4096])))
def test_parse_range(header: str, size: int) -> None:
    try:
        rng = ranges.parse_range(header, size)
    except RangeNotSatisfiable as exc:
        assert exc.size == size
        return
    except RangeInvalid:
        return
    if rng is not None:
        start, end = rng
        assert 0 <= start < end <= size
        assert ranges.content_range(start, end, size).startswith("bytes ")


# -- DAG-CBOR blocks and the nodes in them ------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64 - 1),
    st.text(max_size=20),
    st.binary(max_size=20),
    cids,
    digests,
    st.sampled_from([BLOB_MAP_TYPE, IMAGE_ROOT_TYPE, TAG_RECORD_TYPE]),
)
keys = st.one_of(
    st.sampled_from(
        [
            "type",
            "digest",
            "size",
            "chunkSize",
            "chunks",
            "top",
            "manifests",
            "blobs",
            "mediaType",
            "block",
            "map",
            "name",
            "tag",
            "root",
            "seq",
        ]
    ),
    digests,
    st.text(max_size=6),
)
dag_values = st.recursive(
    scalars,
    lambda kids: st.one_of(st.lists(kids, max_size=5), st.dictionaries(keys, kids, max_size=6)),
    max_leaves=30,
)


@st.composite
def valid_blob_maps(draw: st.DrawFn) -> BlobMap:
    chunk_size = 1 << draw(st.integers(12, 26))
    count = draw(st.integers(0, 5))
    size = 0 if count == 0 else (count - 1) * chunk_size + draw(st.integers(1, chunk_size))
    return BlobMap(draw(digests), size, chunk_size, tuple(Cid.of_raw(bytes([i])) for i in range(count)))


@st.composite
def valid_roots(draw: st.DrawFn) -> ImageRoot:
    root = ImageRoot.from_node(dagcbor.decode(_seeds().image_root().encode()))
    return root if draw(st.booleans()) else ImageRoot(root.top, root.manifests, {})


def _seeds() -> Any:
    """fuzz/_seeds.py: the known-good blocks and manifests the fuzz targets mutate."""
    if str(FUZZ_DIR) not in sys.path:
        sys.path.insert(0, str(FUZZ_DIR))
    return importlib.import_module("_seeds")


@st.composite
def wrong_nodes(draw: st.DrawFn) -> object:
    """A valid node with fields replaced, removed or added: decodable, but maybe not a valid node."""
    good = draw(
        st.one_of(
            valid_blob_maps().map(BlobMap.to_node),
            valid_roots().map(ImageRoot.to_node),
            st.just(_seeds().tag_record().to_node()),
        )
    )
    node = dict(good)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.one_of(st.sampled_from(sorted(node) or ["type"]), keys))
        action = draw(st.integers(0, 2))
        if action == 0:
            node.pop(key, None)
        elif action == 1:
            node[key] = draw(dag_values)
        elif isinstance(node.get(key), dict) and node[key]:
            inner = dict(node[key])
            inner[draw(st.sampled_from(sorted(inner)))] = draw(dag_values)
            node[key] = inner
    return node


blocks = st.one_of(
    st.binary(max_size=200),
    dag_values.map(dagcbor.encode),
    st.builds(mutate, dag_values.map(dagcbor.encode), edit_lists),
    st.builds(mutate, valid_blob_maps().map(BlobMap.encode), edit_lists),
    st.builds(mutate, valid_roots().map(ImageRoot.encode), edit_lists),
    st.builds(
        mutate,
        st.sampled_from(
            [
                b"\x9f\x01\xff",
                b"\xbf\x61a\x01\xff",
                b"\xf9\x3c\x00",
                b"\xc2\x41\x01",
                b"\xd8\x2a\x41\x00",
                b"\x82" * 40,
            ]
        ),
        edit_lists,
    ),
)


@FAST
@given(blocks)
def test_dagcbor_decode(data: bytes) -> None:
    value = refused(BlockInvalid, dagcbor.decode, data)
    if value is None:
        return
    assert dagcbor.encode(value) == data
    for parse in (BlobMap.from_node, ImageRoot.from_node):
        refused(BlockInvalid, parse, value)


@FAST
@given(st.one_of(dag_values, wrong_nodes()))
def test_nodes_from_wrong_values(value: object) -> None:
    block = dagcbor.encode(value)
    node = dagcbor.decode(block)  # what a peer could send: decodes, but is it a valid node?
    bmap = refused(BlockInvalid, BlobMap.from_node, node)
    if bmap is not None:
        assert BlobMap.from_node(dagcbor.decode(bmap.encode())) == bmap
    root = refused(BlockInvalid, ImageRoot.from_node, node)
    if root is not None:
        assert ImageRoot.from_node(dagcbor.decode(root.encode())) == root
    record = refused(BlockInvalid, TagRecord.decode, block, name="demo/app", tag="1")
    if record is not None:
        assert (record.name, record.tag) == ("demo/app", "1")


@FAST
@given(
    st.one_of(
        wrong_nodes().map(dagcbor.encode),
        blocks,
        st.builds(mutate, st.just(_seeds().tag_record().encode()), edit_lists),
    )
)
@example(b"")
def test_tag_record_decode(data: bytes) -> None:
    record = refused(BlockInvalid, TagRecord.decode, data, name="demo/app", tag="1")
    if record is not None:
        assert TagRecord.decode(record.encode(), name="demo/app", tag="1") == record


# -- manifests and indexes ------------------------------------------------------------------------

json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False),
        st.text(max_size=10),
        digests,
        st.sampled_from(sorted(MANIFEST_MEDIA_TYPES)),
    ),
    lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.dictionaries(
            st.sampled_from(
                ["schemaVersion", "mediaType", "config", "layers", "manifests", "digest", "size"]
            ),
            kids,
            max_size=5,
        ),
    ),
    max_leaves=20,
)
manifest_docs = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.builds(mutate, st.sampled_from(_seeds().MANIFESTS), edit_lists),
    st.builds(lambda depth: b"[" * depth + b"]" * depth, st.integers(1, 50)),
)
declared = st.sampled_from(["", *sorted(MANIFEST_MEDIA_TYPES), "text/plain"])


@FAST
@given(manifest_docs, declared)
def test_manifest_parsers(data: bytes, media: str) -> None:
    found = refused(SourceInvalid, sources.manifest_media_type, data, media, "test manifest")
    assert found is None or found in MANIFEST_MEDIA_TYPES
    for kind in (found or media, sources.OCI_INDEX):
        children = refused(SourceInvalid, sources.manifest_children, data, kind, "test manifest")
        for digest, size, _ in [d for part in children or () for d in part]:
            assert parse_digest(digest) and size >= 0


@pytest.mark.parametrize("depth", [100_000])
def test_manifest_parsers_deep_nesting(depth: int) -> None:
    """A 200 KB manifest of nested arrays (well under the 4 MiB manifest limit) is just invalid.

    BUG: json.loads raises RecursionError, which _parse_json does not catch: it escapes as a
    crash instead of SourceInvalid (publish) / ManifestUnsupported (upstream mirror).
    """
    data = b"[" * depth + b"]" * depth
    with pytest.raises(SourceInvalid):
        sources.manifest_media_type(data, "", "deep manifest")
    with pytest.raises(SourceInvalid):
        sources.manifest_children(data, sources.OCI_MANIFEST, "deep manifest")


# -- config values ---------------------------------------------------------------------------------


@FAST
@given(
    st.one_of(
        any_text, st.builds("{}{}".format, numbers, st.sampled_from(["", "K", "M", "G", "KiB", "mb", "x"]))
    )
)
def test_parse_size(text: str) -> None:
    size = refused(InvalidInput, parse_size, text)
    assert size is None or isinstance(size, int)


@FAST
@given(
    st.one_of(
        any_text,
        st.builds("{}:{}".format, st.sampled_from(["127.0.0.1", "[::1]", "", "host", "::"]), numbers),
    )
)
@example("127.0.0.1:²")  # "²".isdigit() is True but int("²") raises ValueError
@example("127.0.0.1:" + "9" * 5000)  # int() refuses more than 4300 digits with ValueError
def test_parse_listen(text: str) -> None:
    """BUG: parse_listen checks `port.isdigit()`, then int(port) raises ValueError, not InvalidInput."""
    parsed = refused(InvalidInput, config.parse_listen, text)
    if parsed is not None:
        assert parsed[0] and 0 <= parsed[1] <= 65535


# -- the HTTP edge: raw request targets and headers ------------------------------------------------

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: [^\r\n]*)?\r\n")
_VALID = b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n"


async def _exchange(port: int, raw: bytes) -> int | None:
    """Send raw request bytes; the response's status, or None if the server closed without one."""
    sock = trio.socket.socket()
    with sock:
        await sock.connect(("127.0.0.1", port))
        with trio.fail_after(10):
            # The server may refuse a huge header and close while we still send.
            with contextlib.suppress(OSError):
                await _send_all(sock, raw)
            buf = b""
            while b"\r\n" not in buf:
                try:
                    data = await sock.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    assert not buf, f"partial status line {buf[:100]!r}"
                    return None
                buf += data
    m = _STATUS_LINE.match(buf)
    assert m is not None, f"malformed status line {buf[:200]!r}"
    return int(m.group(1))


async def _send_all(sock: trio.socket.SocketType, raw: bytes) -> None:
    view = memoryview(raw)
    while view:
        view = view[await sock.send(view) :]


path_pieces = st.one_of(
    st.sampled_from(
        [
            "/v2/",
            "/v2",
            "/v2/demo/app/manifests/1",
            "/v2/demo/app/tags/list",
            "/metrics",
            "/v2/demo/app/blobs/",
            "/v2/ipfs/",
            "/manifests/",
            "/blobs/",
            "?n=",
            "&last=",
            "?ns=",
            "%",
            "%00",
            "%0d%0a",
            "%C2%B2",
            "%ff",
            "..",
            "/../",
            "//",
            "#",
            " ",
            "\t",
            "\r\n",
            "\r\nX-Injected: 1\r\n",
            "sha256:",
            "latest",
            "/tags/list",
            "*",
            "http://x/",
        ]
    ),
    names,
    tags,
    digests,
    cids.map(str),
    st.text(max_size=8),
)
targets = st.one_of(
    st.lists(path_pieces, max_size=10).map(lambda parts: "".join(parts).encode("utf-8", "surrogatepass")),
    st.binary(max_size=60),
    st.builds(lambda n: b"/v2/" + b"a" * n + b"/manifests/1", st.integers(0, 20_000)),
)
header_values = st.one_of(
    range_headers.map(lambda v: v.encode("utf-8", "surrogatepass")),
    st.binary(max_size=60),
    st.sampled_from(
        [
            b"bytes=0-0",
            b"bytes=-1",
            b"bytes=0-\r\nX-Injected: 1",
            b"bytes=" + b"9" * 300,
            b"bytes=" + b"1" * 20_000 + b"-",
            "bytes=\u00b2-".encode(),
            b"\xff\xfe",
            b"\x00",
        ]
    ),
)
methods = st.sampled_from([b"GET", b"HEAD", b"POST", b"DELETE", b"G\x00T", b"get", b"PATCH" * 40])


@st.composite
def raw_requests(draw: st.DrawFn, blob_paths: list[bytes]) -> bytes:
    target = draw(st.one_of(targets, st.sampled_from(blob_paths)))
    headers = [b"Host: registry"]
    for _ in range(draw(st.integers(0, 3))):
        name = draw(
            st.sampled_from(
                [b"Range", b"range", b"Accept", b"Authorization", b"X-" + b"a" * 50, b"Bad Name", b""]
            )
        )
        headers.append(name + b": " + draw(header_values))
    if draw(st.booleans()):
        headers.append(b"Range: " + draw(header_values))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"", b"HTTP/1.1 extra"]))
    return draw(methods) + b" " + target + b" " + version + b"\r\n" + b"\r\n".join(headers) + b"\r\n\r\n"


async def test_http_edge_raw_requests(node: Any) -> None:
    """Malformed requests get a 4xx (or a closed connection), never a 500; the server keeps serving."""
    port = int(node.url.rsplit(":", 1)[1])
    manifest = (await node.client.get("/v2/demo/app/manifests/1")).json()
    blob_paths = [f"/v2/demo/app/blobs/{d['digest']}".encode() for d in manifest["layers"]]
    seen: list[tuple[bytes, int | None]] = []
    problems: list[str] = []

    @settings(
        max_examples=120,
        deadline=timedelta(seconds=10),
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(raw_requests(blob_paths))
    def check(raw: bytes) -> None:
        status = trio.from_thread.run(_exchange, port, raw)
        seen.append((raw, status))
        assert status is None or 100 <= status < 600
        if status is not None and status >= 500:
            problems.append(f"{status} for {raw[:300]!r}")
        assert status is None or status < 500, f"{status} for malformed input {raw[:300]!r}"
        assert trio.from_thread.run(_exchange, port, _VALID) == 200

    await trio.to_thread.run_sync(check)
    assert any(s is not None and 400 <= s < 500 for _, s in seen)
    assert (await node.client.get("/v2/")).status_code == 200


@pytest.mark.parametrize("query", ["n=%C2%B2", "n=" + "9" * 5000])
async def test_http_tags_list_bad_n(node: Any, query: str) -> None:
    """BUG: `?n=` is checked with str.isdigit() then int(): "²" or 5000 digits raise ValueError -> 500."""
    status = await _exchange(
        int(node.url.rsplit(":", 1)[1]),
        f"GET /v2/demo/app/tags/list?{query} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    )
    assert status is not None and status < 500


@pytest.mark.parametrize("ref", ["ipfs/bafyreiqaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"])
def test_oversized_sha256_multihash(ref: str) -> None:
    """BUG: a CIDv1 whose sha2-256 multihash claims 34 digest bytes escapes as MultihashValueError.

    Cid._from_multiformats reads `parsed.raw_digest` outside the try that maps multiformats errors
    to DigestInvalid, so Cid.parse / Cid.from_bytes / check_repository / parse_ref raise a bare
    ValueError (a 500 for GET /v2/ipfs/<cid>/manifests/latest).
    """
    binary = bytes([0x01, 0x71, 0x12, 0x22]) + bytes(34)
    with pytest.raises(DigestInvalid):
        Cid.from_bytes(binary)
    with pytest.raises(DigestInvalid):
        Cid.parse(ref.removeprefix("ipfs/"))
    with pytest.raises(NameInvalid):
        registry.check_repository(ref)
    with pytest.raises(InvalidInput):
        warm.parse_ref(ref)


# -- the fuzz targets, as a CI smoke run -----------------------------------------------------------

FUZZ_TARGETS = [
    "fuzz_refs",
    "fuzz_digests",
    "fuzz_ranges",
    "fuzz_dagcbor",
    "fuzz_manifests",
    "fuzz_tag_records",
]


@pytest.mark.parametrize("target", FUZZ_TARGETS)
def test_fuzz_target_smoke(target: str) -> None:
    _seeds()  # puts fuzz/ on sys.path
    harness = importlib.import_module("_harness")
    module = importlib.import_module(target)
    assert harness.run_smoke(module.test_one_input, 500, seed=1) == 500
