"""Signed tag records: publisher keys, the trust store, and the resolver's tag record policy."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import socket
import stat
from pathlib import Path

import pytest

from p2pimg.content.cid import Cid
from p2pimg.content.model import TagRecord
from p2pimg.content.signing import (
    KeyFileError,
    Signer,
    TagSignatureError,
    TrustStore,
    generate_key,
    key_id,
    load_signer,
    parse_public_key,
    private_key_path,
)
from p2pimg.errors import BlockInvalid, InvalidInput, OriginError
from p2pimg.fetch.resolver import Resolver
from p2pimg.ops.publish import publish
from p2pimg.ops.sample import LayerSpec, SampleImage, write_oci_layout
from p2pimg.sources.origins import FileOrigin, open_origin, tag_key
from p2pimg.store.chunks import ChunkStore

CHUNK = 4 << 10
NAME = "demo/app"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[SampleImage, SampleImage]:
    base = tmp_path_factory.mktemp("signing-img")
    return (
        write_oci_layout(base / "a", [LayerSpec(8 << 10)], tag="1", seed=1),
        write_oci_layout(base / "b", [LayerSpec(8 << 10)], tag="1", seed=2),
    )


def make_signer(home: Path) -> Signer:
    generate_key(home)
    signer = load_signer(home)
    assert signer is not None
    return signer


async def publish_as(
    image: SampleImage, origin: FileOrigin, tag: str = "1", signer: Signer | None = None
) -> TagRecord:
    report = await publish(f"oci:{image.path}:1", NAME, tag, origin, chunk_size=CHUNK, signer=signer)
    return report.record


async def origin_record(origin: FileOrigin, tag: str = "1") -> TagRecord:
    return TagRecord.decode(await origin.get(tag_key(NAME, tag), max_size=64 << 10), name=NAME, tag=tag)


def resolver(tmp: Path, origin: FileOrigin, trust: TrustStore | None) -> Resolver:
    return Resolver(ChunkStore(tmp / "cache"), origin, tag_ttl=0, trust=trust)


# --- keys ------------------------------------------------------------------------------------------


def test_generate_key_writes_the_pair_and_refuses_to_overwrite(tmp_path: Path) -> None:
    home = tmp_path / "home"
    pub = generate_key(home)
    assert pub == home / "keys" / "publisher.pub"
    assert stat.S_IMODE(private_key_path(home).stat().st_mode) == 0o600
    assert private_key_path(home).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    key_lines = [ln for ln in pub.read_text().splitlines() if not ln.startswith("#")]
    assert len(key_lines) == 1 and key_lines[0].startswith("p2pimg-ed25519 ")
    signer = load_signer(home)
    assert signer is not None
    assert parse_public_key(pub.read_text(), source="x") == signer.public_raw
    assert signer.key_id == key_id(signer.public_raw) and len(signer.key_id) == 16
    before = private_key_path(home).read_bytes()
    with pytest.raises(KeyFileError, match="already exists"):
        generate_key(home)
    assert private_key_path(home).read_bytes() == before
    assert load_signer(tmp_path / "nokey") is None


# --- resolving signed records ----------------------------------------------------------------------


async def test_sign_and_resolve(tmp_path: Path, images: tuple[SampleImage, SampleImage]) -> None:
    home = tmp_path / "home"
    signer = make_signer(home)
    origin = FileOrigin(tmp_path / "origin")
    record = await publish_as(images[0], origin, signer=signer)
    stored = await origin_record(origin)
    assert stored == record and stored.key == signer.key_id and stored.sig is not None
    trust = TrustStore.load(home)
    assert trust.key_ids == [signer.key_id]
    assert trust.check(stored) == signer.key_id
    assert await resolver(tmp_path, origin, trust).resolve_tag(NAME, "1") == record.root


async def test_unsigned_refused_when_a_key_is_trusted(
    tmp_path: Path, images: tuple[SampleImage, SampleImage]
) -> None:
    home = tmp_path / "home"
    make_signer(home)
    origin = FileOrigin(tmp_path / "origin")
    await publish_as(images[0], origin)
    with pytest.raises(TagSignatureError, match=r"demo/app:1 .*unsigned"):
        await resolver(tmp_path, origin, TrustStore.load(home)).resolve_tag(NAME, "1")


async def test_record_resigned_for_another_tag_refused(
    tmp_path: Path, images: tuple[SampleImage, SampleImage]
) -> None:
    home = tmp_path / "home"
    signer = make_signer(home)
    origin = FileOrigin(tmp_path / "origin")
    signed = await publish_as(images[0], origin, signer=signer)
    res = resolver(tmp_path, origin, TrustStore.load(home))
    # The record of tag 1, moved to tag 2 with tag 1's signature.
    moved = dataclasses.replace(signed, tag="2")
    await origin.put_bytes(tag_key(NAME, "2"), moved.encode())
    with pytest.raises(TagSignatureError, match=r"demo/app:2 .*bad signature"):
        await res.resolve_tag(NAME, "2")
    # Tag 1's record as it is, under tag 2's key: the name:tag check refuses it.
    await origin.put_bytes(tag_key(NAME, "2"), signed.encode())
    with pytest.raises(BlockInvalid, match="demo/app:1, not demo/app:2"):
        await res.resolve_tag(NAME, "2")


async def test_tampered_root_refused(tmp_path: Path, images: tuple[SampleImage, SampleImage]) -> None:
    home = tmp_path / "home"
    signer = make_signer(home)
    origin = FileOrigin(tmp_path / "origin")
    signed = await publish_as(images[0], origin, signer=signer)
    tampered = dataclasses.replace(signed, root=Cid.of_dag_cbor(b"\xa0"))
    await origin.put_bytes(tag_key(NAME, "1"), tampered.encode())
    with pytest.raises(TagSignatureError, match="bad signature"):
        await resolver(tmp_path, origin, TrustStore.load(home)).resolve_tag(NAME, "1")
    bumped = dataclasses.replace(signed, seq=signed.seq + 1)
    await origin.put_bytes(tag_key(NAME, "1"), bumped.encode())
    with pytest.raises(TagSignatureError, match="bad signature"):
        await resolver(tmp_path, origin, TrustStore.load(home)).resolve_tag(NAME, "1")


async def test_unknown_key_refused(tmp_path: Path, images: tuple[SampleImage, SampleImage]) -> None:
    home = tmp_path / "home"
    make_signer(home)
    stranger = make_signer(tmp_path / "stranger")
    origin = FileOrigin(tmp_path / "origin")
    await publish_as(images[0], origin, signer=stranger)
    with pytest.raises(TagSignatureError, match=f"key {stranger.key_id}, which is not trusted"):
        await resolver(tmp_path, origin, TrustStore.load(home)).resolve_tag(NAME, "1")


async def test_downgrade_refused_and_the_newer_record_keeps_serving(
    tmp_path: Path, images: tuple[SampleImage, SampleImage], caplog: pytest.LogCaptureFixture
) -> None:
    home = tmp_path / "home"
    signer = make_signer(home)
    origin = FileOrigin(tmp_path / "origin")
    old = await publish_as(images[0], origin, signer=signer)
    old_bytes = await origin.get(tag_key(NAME, "1"), max_size=64 << 10)
    new = await publish_as(images[1], origin, signer=signer)
    assert new.seq > old.seq and new.root != old.root
    res = resolver(tmp_path, origin, TrustStore.load(home))
    assert await res.resolve_tag(NAME, "1") == new.root
    await origin.put_bytes(tag_key(NAME, "1"), old_bytes)  # a validly signed replay of seq `old`
    with caplog.at_level(logging.ERROR, logger="p2pimg.fetch.resolver"):
        assert await res.resolve_tag(NAME, "1") == new.root
        # A fresh resolver on the same cache (a restart) refuses it too.
        assert await resolver(tmp_path, origin, TrustStore.load(home)).resolve_tag(NAME, "1") == new.root
    assert f"its seq {old.seq}" in caplog.text and f"still serving seq {new.seq}" in caplog.text
    assert ChunkStore(tmp_path / "cache").get_tag_record(NAME, "1") == new
    # Same seq, another root: refused as well.
    forged = signer.sign(dataclasses.replace(new, root=old.root))
    await origin.put_bytes(tag_key(NAME, "1"), forged.encode())
    assert await res.resolve_tag(NAME, "1") == new.root


# --- trusting other publishers ---------------------------------------------------------------------


async def test_trust_another_publisher(tmp_path: Path, images: tuple[SampleImage, SampleImage]) -> None:
    publisher = tmp_path / "publisher"
    signer = make_signer(publisher)
    pub = publisher / "keys" / "publisher.pub"
    origin = FileOrigin(tmp_path / "origin")
    record = await publish_as(images[0], origin, signer=signer)
    consumer = tmp_path / "consumer"
    consumer.mkdir()
    assert len(TrustStore.load(consumer)) == 0

    by_flag = TrustStore.load(consumer, [pub])
    assert by_flag.key_ids == [signer.key_id]
    res = Resolver(ChunkStore(tmp_path / "c1"), origin, trust=by_flag)
    assert await res.resolve_tag(NAME, "1") == record.root

    (consumer / "trust").mkdir()
    shutil.copy(pub, consumer / "trust" / "team.pub")
    (consumer / "trust" / "README").write_text("not a key, not read\n")
    by_dir = TrustStore.load(consumer)
    assert by_dir.key_ids == [signer.key_id]
    res = Resolver(ChunkStore(tmp_path / "c2"), origin, trust=by_dir)
    assert await res.resolve_tag(NAME, "1") == record.root

    # The consumer's own key is trusted too, and a record of theirs passes next to the publisher's.
    own = make_signer(consumer)
    both = TrustStore.load(consumer, [pub])
    assert set(both.key_ids) == {signer.key_id, own.key_id}
    await publish_as(images[1], origin, tag="2", signer=own)
    assert await Resolver(ChunkStore(tmp_path / "c3"), origin, trust=both).resolve_tag(NAME, "2")


VALID_B64 = "A" * 43 + "="  # 32 zero bytes


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected one"),
        ("# only a comment\n", "expected one"),
        (f"ssh-ed25519 {VALID_B64}\n", "not a p2pimg public key"),
        ("p2pimg-ed25519\n", "not a p2pimg public key"),
        ("p2pimg-ed25519 not*base64\n", "not valid base64"),
        ("p2pimg-ed25519 AAAA\n", "has 32 bytes, this one 3"),
        (f"p2pimg-ed25519 {VALID_B64}\np2pimg-ed25519 {VALID_B64}\n", "found 2"),
    ],
)
def test_malformed_public_key_files(tmp_path: Path, text: str, message: str) -> None:
    bad = tmp_path / "bad.pub"
    bad.write_text(text)
    with pytest.raises(KeyFileError, match=message) as info:
        TrustStore.load(tmp_path / "home", [bad])
    assert str(bad) in info.value.message
    assert isinstance(info.value, InvalidInput)
    (tmp_path / "home" / "trust").mkdir(parents=True)
    shutil.copy(bad, tmp_path / "home" / "trust" / "x.pub")
    with pytest.raises(KeyFileError, match=message):
        TrustStore.load(tmp_path / "home")


def test_missing_and_binary_key_files(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="no such public key file"):
        TrustStore.load(tmp_path, [tmp_path / "absent.pub"])
    binary = tmp_path / "bin.pub"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(KeyFileError, match="not a text file"):
        TrustStore.load(tmp_path, [binary])


def test_malformed_private_key(tmp_path: Path) -> None:
    path = private_key_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("-----BEGIN PRIVATE KEY-----\nnonsense\n-----END PRIVATE KEY-----\n")
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match=f"{path}: not an unencrypted PEM private key"):
        load_signer(tmp_path)


# --- nothing trusted -------------------------------------------------------------------------------


async def test_unsigned_accepted_with_a_warning_when_nothing_is_trusted(
    tmp_path: Path, images: tuple[SampleImage, SampleImage], caplog: pytest.LogCaptureFixture
) -> None:
    origin = FileOrigin(tmp_path / "origin")
    record = await publish_as(images[0], origin)
    assert record.key is None and record.sig is None
    res = resolver(tmp_path, origin, TrustStore.load(tmp_path / "home"))
    with caplog.at_level(logging.WARNING, logger="p2pimg.fetch.resolver"):
        assert await res.resolve_tag(NAME, "1") == record.root
        assert await res.resolve_tag(NAME, "1") == record.root  # tag_ttl=0: read again
    warnings = [r for r in caplog.records if "no publisher key is trusted" in r.getMessage()]
    assert len(warnings) == 1 and "demo/app:1" in warnings[0].getMessage()
    # The default (no trust store given) behaves the same.
    assert await Resolver(ChunkStore(tmp_path / "c2"), origin).resolve_tag(NAME, "1") == record.root


async def test_the_unsigned_warning_is_given_once_per_home(
    tmp_path: Path, images: tuple[SampleImage, SampleImage], caplog: pytest.LogCaptureFixture
) -> None:
    origin = FileOrigin(tmp_path / "origin")
    await publish_as(images[0], origin, "1")
    await publish_as(images[1], origin, "2")
    home = tmp_path / "home"

    async def warnings_of(home: Path, *tags: str) -> list[str]:
        caplog.clear()
        res = Resolver(ChunkStore(tmp_path / "cache"), origin, tag_ttl=0, trust=TrustStore(), home=home)
        with caplog.at_level(logging.WARNING, logger="p2pimg.fetch.resolver"):
            for tag in tags:
                await res.resolve_tag(NAME, tag)
        return [r.getMessage() for r in caplog.records if "no publisher key is trusted" in r.getMessage()]

    first = await warnings_of(home, "1", "2", "1")
    assert len(first) == 1 and f"p2pimg keygen --home {home}" in first[0] and "once for this home" in first[0]
    assert await warnings_of(home, "1", "2") == []  # a later command on the same home: silence
    assert len(await warnings_of(tmp_path / "other-home", "2")) == 1
    # A home that cannot keep the note hears it every time rather than never.
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the home should be")
    assert len(await warnings_of(blocked / "home", "1")) == 1
    assert len(await warnings_of(blocked / "home", "1")) == 1


# --- the record itself -----------------------------------------------------------------------------


def test_signed_record_round_trip_and_shape(tmp_path: Path) -> None:
    signer = make_signer(tmp_path)
    record = signer.sign(TagRecord(name=NAME, tag="1", root=Cid.of_dag_cbor(b"\xa0"), seq=5))
    assert record.key == signer.key_id and record.sig is not None and len(record.sig) == 64
    assert TagRecord.decode(record.encode(), name=NAME, tag="1") == record
    assert set(record.to_node()) == {"type", "name", "tag", "root", "seq", "key", "sig"}
    assert record.signed_bytes() != record.encode()
    unsigned = TagRecord(name=NAME, tag="1", root=record.root, seq=5)
    assert set(unsigned.to_node()) == {"type", "name", "tag", "root", "seq"}
    with pytest.raises(BlockInvalid):
        TagRecord(name=NAME, tag="1", root=record.root, seq=5, key=signer.key_id)
    with pytest.raises(BlockInvalid):
        TagRecord(name=NAME, tag="1", root=record.root, seq=5, sig=b"x" * 64)
    # Re-signing replaces the old signature.
    other = make_signer(tmp_path / "other")
    assert TrustStore.load(tmp_path / "other").check(other.sign(record)) == other.key_id


def test_cli_keygen_publish_and_trust(tmp_path: Path) -> None:
    """The commands as a user runs them: keygen, publish signs, --trust on another home."""
    import subprocess
    import sys

    from p2pimg.ops.sample import LayerSpec, write_oci_layout

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "p2pimg", *args], capture_output=True, text=True, timeout=60, check=False
        )

    publisher, consumer, stranger = tmp_path / "publisher", tmp_path / "consumer", tmp_path / "stranger"
    made = cli("keygen", "--home", str(publisher))
    assert made.returncode == 0, made.stderr
    pub = Path(made.stdout.strip().splitlines()[-1])
    assert pub.is_file() and pub.suffix == ".pub"
    assert cli("keygen", "--home", str(publisher)).returncode == 2  # never overwrites a key
    image = write_oci_layout(tmp_path / "img", [LayerSpec(10 << 10)], tag="1")
    origin = (tmp_path / "origin").as_uri()
    published = cli(
        "publish", f"oci:{image.path}:1", "demo/app:1", "--home", str(publisher), "--origin", origin
    )
    assert published.returncode == 0, published.stderr
    root = published.stdout.split()[-1]
    trusted = cli("resolve", "demo/app:1", "--home", str(consumer), "--origin", origin, "--trust", str(pub))
    assert trusted.returncode == 0 and trusted.stdout.strip() == root, trusted.stderr
    # A home that trusts only its own, different key refuses the publisher's tag.
    assert cli("keygen", "--home", str(stranger)).returncode == 0
    refused = cli("resolve", "demo/app:1", "--home", str(stranger), "--origin", origin)
    assert refused.returncode != 0 and "demo/app:1" in refused.stderr and "Traceback" not in refused.stderr
    bad = tmp_path / "bad.pub"
    bad.write_text("not a key\n")
    broken = cli("resolve", "demo/app:1", "--home", str(consumer), "--origin", origin, "--trust", str(bad))
    assert broken.returncode == 2 and "bad.pub" in broken.stderr


# --- tag records from LAN peers --------------------------------------------------------------------


async def test_tag_records_from_peers_need_a_trusted_signature(
    tmp_path: Path, images: tuple[SampleImage, SampleImage], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the origin unreachable, a record a peer offers is used only when a trusted key signed
    it for this very name and tag, and only when it is newer than what this node already has."""
    for key, value in (
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        monkeypatch.setenv(key, value)
    publisher = tmp_path / "publisher"
    signer = make_signer(publisher)
    stranger = make_signer(tmp_path / "stranger")
    origin = FileOrigin(tmp_path / "origin")
    first = await publish_as(images[0], origin, signer=signer)
    second = await publish_as(images[1], origin, signer=signer)
    other_tag = signer.sign(TagRecord(NAME, "2", second.root, second.seq + 1))
    by_stranger = stranger.sign(TagRecord(NAME, "1", first.root, second.seq + 5))
    unsigned = TagRecord(NAME, "1", first.root, second.seq + 6)
    # Nothing listens on this port: every origin request fails as with a dead network.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"s3://bucket?endpoint=http://127.0.0.1:{s.getsockname()[1]}"
    offered: list[bytes] = []
    asked: list[str] = []

    async def offer(name: str, tag: str) -> list[bytes]:
        assert (name, tag) == (NAME, "1")
        asked.append(tag)
        return list(offered)

    def node(cache: str, trust: TrustStore) -> Resolver:
        res = Resolver(ChunkStore(tmp_path / cache), open_origin(dead, tmp_path), tag_ttl=0, trust=trust)
        res.peer_tags = offer
        return res

    trusting = TrustStore.load(tmp_path / "consumer", [publisher / "keys" / "publisher.pub"])
    # No peer has anything: the origin's failure is the answer.
    with pytest.raises(OriginError):
        await node("c0", trusting).resolve_tag(NAME, "1")
    # A node that trusts no key takes no record from peers, not even a validly signed one: it does
    # not even ask, and says why.
    offered[:] = [second.encode()]
    asked.clear()
    with pytest.raises(OriginError, match="demo/app:1.*takes none from LAN peers because it trusts no"):
        await node("c1", TrustStore()).resolve_tag(NAME, "1")
    assert not asked
    # Garbage, another tag's record, a stranger's and an unsigned one are skipped; the good one wins.
    offered[:] = [
        b"\xa1junk",
        other_tag.encode(),
        by_stranger.encode(),
        unsigned.encode(),
        first.encode(),
        second.encode(),
    ]
    res = node("c2", trusting)
    assert await res.resolve_tag(NAME, "1") == second.root
    assert ChunkStore(tmp_path / "c2").get_tag_record(NAME, "1") == second  # kept for next time
    # A node with a record of its own uses it and does not wait on peers in an outage; an older
    # peer record never replaces it.
    offered[:] = [first.encode()]
    asked.clear()
    assert await node("c2", trusting).resolve_tag(NAME, "1") == second.root
    assert not asked
    assert ChunkStore(tmp_path / "c2").get_tag_record(NAME, "1") == second
    # Only records a trusted key did not sign: refused, with the reason.
    offered[:] = [by_stranger.encode()]
    with pytest.raises(TagSignatureError, match="not trusted"):
        await node("c3", trusting).resolve_tag(NAME, "1")
