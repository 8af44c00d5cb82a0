"""Unit tests for p2pimg.content.cid: CIDv1(sha2-256) over raw / dag-cbor, and OCI sha256 digests."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable

import multiformats
import pytest
from hypothesis import given
from hypothesis import strategies as st
from multiformats import multihash

from p2pimg.content.cid import (
    DAG_CBOR,
    DAG_PB,
    IPFS_CODECS,
    RAW,
    SHA2_256,
    Cid,
    digest_of,
    parse_digest,
)
from p2pimg.errors import DigestInvalid, InvalidInput

digests = st.binary(min_size=32, max_size=32)
codecs = st.sampled_from([RAW, DAG_CBOR])
CODEC_NAME = {RAW: "raw", DAG_CBOR: "dag-cbor", DAG_PB: "dag-pb"}

EMPTY_SHA256 = bytes.fromhex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
# The well-known CIDv1(raw, sha2-256) of the empty byte string.
EMPTY_RAW_CID = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
HEX64 = "ab" * 32


def mf_cid(codec: int, digest: bytes, base: str = "base32", hashfun: str = "sha2-256") -> multiformats.CID:
    return multiformats.CID(base, 1, CODEC_NAME.get(codec, codec), multihash.wrap(digest, hashfun))


# --- construction --------------------------------------------------------------------------------


def test_of_raw_hashes_the_bytes() -> None:
    c = Cid.of_raw(b"")
    assert c.codec == RAW
    assert c.digest == EMPTY_SHA256
    assert str(c) == EMPTY_RAW_CID
    assert c.codec_name == "raw"


def test_of_raw_accepts_memoryview() -> None:
    data = b"hello world"
    assert Cid.of_raw(memoryview(data)) == Cid.of_raw(data)
    assert Cid.of_raw(data).digest == hashlib.sha256(data).digest()


def test_of_dag_cbor_uses_the_dag_cbor_codec() -> None:
    block = b"\xa0"
    c = Cid.of_dag_cbor(block)
    assert c.codec == DAG_CBOR
    assert c.codec_name == "dag-cbor"
    assert c.digest == hashlib.sha256(block).digest()
    assert str(c) == str(mf_cid(DAG_CBOR, hashlib.sha256(block).digest()))
    assert c != Cid.of_raw(block)


def test_to_bytes_layout() -> None:
    d = bytes(range(32))
    assert Cid(RAW, d).to_bytes() == bytes([0x01, 0x55, SHA2_256, 0x20]) + d
    assert Cid(DAG_CBOR, d).to_bytes() == bytes([0x01, 0x71, SHA2_256, 0x20]) + d


@pytest.mark.parametrize("codec", [0x00, 0x01, 0x72, 0x0129, -1])
def test_constructor_refuses_other_codecs(codec: int) -> None:
    with pytest.raises(DigestInvalid):
        Cid(codec, b"\x00" * 32)


def test_dag_pb_cids_are_parsed_only_when_asked_for() -> None:
    block = b"\x0a\x02\x08\x02"  # a UnixFS File node with no links
    c = Cid.of_dag_pb(block)
    assert c.codec == DAG_PB and c.codec_name == "dag-pb"
    assert c.to_bytes() == bytes([0x01, 0x70, SHA2_256, 0x20]) + hashlib.sha256(block).digest()
    assert str(c) == str(mf_cid(DAG_PB, hashlib.sha256(block).digest()))
    assert Cid.parse(str(c), codecs=IPFS_CODECS) == c
    assert Cid.from_bytes(c.to_bytes(), codecs=IPFS_CODECS) == c
    assert Cid.parse(str(Cid.of_raw(block)), codecs=IPFS_CODECS) == Cid.of_raw(block)
    # p2pimg's own content never links to dag-pb: the defaults keep refusing it.
    assert "dag-pb" in str(_raises_digest_invalid(Cid.parse, str(c)))
    _raises_digest_invalid(Cid.from_bytes, c.to_bytes())


@pytest.mark.parametrize("length", [0, 1, 31, 33, 64])
def test_constructor_refuses_digest_of_wrong_length(length: int) -> None:
    with pytest.raises(DigestInvalid):
        Cid(RAW, b"\x00" * length)


def test_matches() -> None:
    c = Cid.of_raw(b"abc")
    assert c.matches(b"abc")
    assert c.matches(memoryview(b"abc"))
    assert not c.matches(b"abd")


def test_repr_shows_the_cid() -> None:
    c = Cid.of_raw(b"")
    assert repr(c) == f"Cid({EMPTY_RAW_CID})"


# --- round trips and agreement with multiformats ---------------------------------------------------


@given(codec=codecs, digest=digests)
def test_str_round_trips_through_parse(codec: int, digest: bytes) -> None:
    c = Cid(codec, digest)
    text = str(c)
    assert text.startswith("b")
    assert text == text.lower()
    assert "=" not in text
    assert Cid.parse(text) == c


@given(codec=codecs, digest=digests)
def test_bytes_round_trip_through_from_bytes(codec: int, digest: bytes) -> None:
    c = Cid(codec, digest)
    assert Cid.from_bytes(c.to_bytes()) == c
    assert Cid.from_bytes(bytearray(c.to_bytes())) == c  # type: ignore[arg-type]


@given(codec=codecs, digest=digests)
def test_agrees_with_multiformats(codec: int, digest: bytes) -> None:
    ours = Cid(codec, digest)
    theirs = mf_cid(codec, digest)
    assert str(ours) == str(theirs)
    assert ours.to_bytes() == bytes(theirs)
    assert Cid.parse(str(theirs)) == ours


@given(codec=codecs, digest=digests, base=st.sampled_from(["base58btc", "base16", "base32upper", "base64"]))
def test_parse_accepts_other_multibases(codec: int, digest: bytes, base: str) -> None:
    text = str(mf_cid(codec, digest, base=base))
    assert Cid.parse(text) == Cid(codec, digest)


def test_parse_base58btc_known_value() -> None:
    text = str(mf_cid(RAW, EMPTY_SHA256, base="base58btc"))
    assert text.startswith("z")
    c = Cid.parse(text)
    assert c == Cid(RAW, EMPTY_SHA256)
    assert str(c) == EMPTY_RAW_CID


@given(digest=digests)
def test_digest_round_trip(digest: bytes) -> None:
    c = Cid(RAW, digest)
    oci = c.to_digest()
    assert oci == "sha256:" + digest.hex()
    assert parse_digest(oci) == digest.hex()
    assert Cid.from_digest(oci) == c


@given(digest=digests)
def test_from_digest_always_gives_raw_codec(digest: bytes) -> None:
    c = Cid(DAG_CBOR, digest)
    back = Cid.from_digest(c.to_digest())
    assert back.codec == RAW
    assert back.digest == digest


@given(data=st.binary(max_size=256))
def test_digest_of_matches_raw_cid(data: bytes) -> None:
    assert digest_of(data) == Cid.of_raw(data).to_digest()
    assert digest_of(memoryview(data)) == "sha256:" + hashlib.sha256(data).hexdigest()


# --- parse refusals ---------------------------------------------------------------------------------


def _raises_digest_invalid(fn: Callable[..., object], *args: object) -> DigestInvalid:
    with pytest.raises(DigestInvalid) as info:
        fn(*args)
    assert type(info.value) is DigestInvalid
    return info.value


def test_parse_refuses_cidv0() -> None:
    v0 = multiformats.CID("base58btc", 0, "dag-pb", multihash.wrap(EMPTY_SHA256, "sha2-256"))
    text = str(v0)
    assert text.startswith("Qm")
    exc = _raises_digest_invalid(Cid.parse, text)
    assert "CIDv0" in str(exc)


def test_parse_refuses_other_hash_functions() -> None:
    sha512 = multiformats.CID("base32", 1, "raw", multihash.digest(b"x", "sha2-512"))
    exc = _raises_digest_invalid(Cid.parse, str(sha512))
    assert "sha2-512" in str(exc)
    identity = multiformats.CID("base32", 1, "raw", multihash.digest(b"x", "identity"))
    exc = _raises_digest_invalid(Cid.parse, str(identity))
    assert "identity" in str(exc)


def test_parse_refuses_truncated_sha256_multihash() -> None:
    short = multiformats.CID("base32", 1, "raw", multihash.wrap(EMPTY_SHA256[:16], "sha2-256"))
    _raises_digest_invalid(Cid.parse, str(short))


@pytest.mark.parametrize("codec", ["dag-pb", "dag-json", "libp2p-key"])
def test_parse_refuses_unsupported_codecs(codec: str) -> None:
    text = str(multiformats.CID("base32", 1, codec, multihash.wrap(EMPTY_SHA256, "sha2-256")))
    exc = _raises_digest_invalid(Cid.parse, text)
    assert codec in str(exc)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "b",
        "bafy",
        "not a cid",
        "hello world",
        EMPTY_RAW_CID[:-1],  # truncated
        EMPTY_RAW_CID + "a",  # overlong by one character
        " " + EMPTY_RAW_CID,
        EMPTY_RAW_CID + "\n",
        "sha256:" + HEX64,
        "b" + "a" * 200,  # overlong
        "z" + "1" * 127,
        EMPTY_RAW_CID[:10] + "é" + EMPTY_RAW_CID[11:],  # non-ASCII
        "ｂ" + EMPTY_RAW_CID[1:],  # full-width multibase prefix
        "b\x00afkrei",
    ],
)
def test_parse_refuses_garbage(text: str) -> None:
    _raises_digest_invalid(Cid.parse, text)


@given(text=st.text(max_size=200))
def test_parse_of_arbitrary_text_returns_cid_or_digest_invalid(text: str) -> None:
    try:
        c = Cid.parse(text)
    except DigestInvalid:
        return
    assert isinstance(c, Cid)
    assert c.codec in (RAW, DAG_CBOR)


# --- from_bytes refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x01",
        bytes([0x01, 0x55, 0x12, 0x20]),  # prefix without digest
        bytes([0x01, 0x55, 0x12, 0x20]) + b"\x00" * 31,  # digest one byte short
        bytes([0x01, 0x55, 0x12, 0x20]) + b"\x00" * 33,  # trailing byte
        bytes([0x01, 0x70, 0x12, 0x20]) + b"\x00" * 32,  # dag-pb
        bytes([0x01, 0x55, 0x13, 0x40]) + b"\x00" * 64,  # sha2-512
        bytes([0x12, 0x20]) + b"\x00" * 32,  # CIDv0 (bare multihash)
        bytes([0x02, 0x55, 0x12, 0x20]) + b"\x00" * 32,  # unknown CID version
        b"\xff" * 36,
    ],
)
def test_from_bytes_refuses(data: bytes) -> None:
    _raises_digest_invalid(Cid.from_bytes, data)


def test_from_bytes_refuses_multiformats_cidv0() -> None:
    v0 = multiformats.CID("base58btc", 0, "dag-pb", multihash.wrap(EMPTY_SHA256, "sha2-256"))
    exc = _raises_digest_invalid(Cid.from_bytes, bytes(v0))
    assert "CIDv0" in str(exc)


# --- parse_digest ------------------------------------------------------------------------------------


@given(digest=digests)
def test_parse_digest_returns_hex(digest: bytes) -> None:
    assert parse_digest("sha256:" + digest.hex()) == digest.hex()


@pytest.mark.parametrize(
    "digest",
    [
        "",
        "sha256",
        "sha256:",
        ":" + HEX64,
        HEX64,
        "sha256:" + HEX64.upper(),  # uppercase hex
        "sha256:" + "AB" + HEX64[2:],
        "SHA256:" + HEX64,
        "sha256:" + HEX64[:-1],  # short
        "sha256:" + HEX64 + "0",  # long
        "sha256:" + "g" * 64,
        "sha256: " + HEX64,
        "sha256:" + HEX64 + " ",
        " sha256:" + HEX64,
        "sha256:../../etc/passwd",
        "sha256:" + HEX64 + "/../../etc/passwd",
        "sha256:../" + HEX64[3:],
        "sha256:" + HEX64[:32] + "/" + HEX64[33:],
        "sha256:" + "a" * 1000,
        "sha256:" + HEX64 + "\x00",
    ],
)
def test_parse_digest_refuses(digest: str) -> None:
    exc = _raises_digest_invalid(parse_digest, digest)
    assert "only sha256 is supported" not in str(exc)


def test_parse_digest_refuses_trailing_newline() -> None:
    # `re.match` with a `$` anchor also matches just before a final "\n", so this slips through.
    _raises_digest_invalid(parse_digest, "sha256:" + HEX64 + "\n")


def test_from_digest_refuses_trailing_newline() -> None:
    _raises_digest_invalid(Cid.from_digest, "sha256:" + HEX64 + "\n")


@pytest.mark.parametrize(
    ("algorithm", "hex_length"),
    [
        ("sha512", 128),  # the other OCI-registered algorithm: a real client can send this
        ("sha384", 96),
        ("blake3", 64),
        ("md5", 32),
        ("sha1", 40),
    ],
)
def test_parse_digest_names_the_unsupported_algorithm(algorithm: str, hex_length: int) -> None:
    exc = _raises_digest_invalid(parse_digest, f"{algorithm}:" + "a" * hex_length)
    assert algorithm in str(exc)
    assert "only sha256 is supported" in str(exc)


@pytest.mark.parametrize("value", [None, b"sha256:" + HEX64.encode(), 42])
def test_parse_digest_refuses_non_strings(value: object) -> None:
    _raises_digest_invalid(parse_digest, value)


@given(text=st.text(max_size=120))
def test_parse_digest_accepts_exactly_the_grammar(text: str) -> None:
    if re.fullmatch(r"sha256:[0-9a-f]{64}", text):
        assert parse_digest(text) == text[7:]
    else:
        with pytest.raises(DigestInvalid):
            parse_digest(text)


@pytest.mark.parametrize(
    ("prefix", "suffix"),
    [(" ", ""), ("\n", ""), ("x", ""), ("", " "), ("", "\r\n"), ("", "\t"), ("", "0"), ("", "/")],
)
def test_parse_digest_refuses_any_padding(prefix: str, suffix: str) -> None:
    _raises_digest_invalid(parse_digest, prefix + "sha256:" + HEX64 + suffix)


def test_digest_invalid_is_invalid_input() -> None:
    assert issubclass(DigestInvalid, InvalidInput)
    assert DigestInvalid.oci_code == "DIGEST_INVALID"
    assert DigestInvalid.http_status == 400
