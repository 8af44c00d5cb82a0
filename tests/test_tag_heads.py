"""Tag heads (`p2pimg.fetch.heads`): a cold look at a tag costs one round of origin requests
(the record and its head, side by side) instead of three one after another, and a head that is
missing, damaged or lying costs nothing but its own request: every block is still checked
against its CID, and what does not match never reaches the cache."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio
from _support import CHUNK, published_home

from p2pimg.content import dagcbor
from p2pimg.content.cid import Cid
from p2pimg.content.model import BlobMap, decode_tag_head, encode_tag_head
from p2pimg.fetch.resolver import Resolver
from p2pimg.metrics import Timeline
from p2pimg.ops.admin import plan_gc, run_gc, untag
from p2pimg.ops.publish import attach, publish
from p2pimg.ops.sample import SampleImage
from p2pimg.sources.origins import FileOrigin, block_key, head_key, tag_key
from p2pimg.store.chunks import ChunkStore


class CountingOrigin(FileOrigin):
    """A real FileOrigin that notes the key of every whole-object GET."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gets: list[str] = []

    async def get(self, key: str, *, max_size: int) -> bytes:
        self.gets.append(key)
        return await super().get(key, max_size=max_size)


async def look(resolver: Resolver) -> tuple[bytes, dict[str, BlobMap]]:
    """What a pull reads before its first layer byte: the manifest and every blob map."""
    manifest = await resolver.manifest_for("demo/app", "1")
    root = await resolver.root(await resolver.resolve_tag("demo/app", "1"))
    maps = {d: await resolver.blob_map(e, d) for d, e in root.blobs.items()}
    return manifest.data, maps


async def test_a_cold_look_at_a_tag_reads_root_manifest_and_maps_from_its_head(
    tmp_path: Path, sample: SampleImage
) -> None:
    _origin, root_cid = await published_home(tmp_path, sample)
    origin = CountingOrigin(tmp_path / "origin")
    store = ChunkStore(tmp_path / "cache")
    resolver = Resolver(store, origin)
    resolver.timeline = Timeline()  # as a node does: its metrics' timeline, set after the fact
    manifest, maps = await look(resolver)
    assert sorted(origin.gets) == sorted([tag_key("demo/app", "1"), head_key("demo/app", "1")])
    # Where the time went shows the head (`GET /p2pimg/v1/timeline`).
    assert sorted(e["what"] for e in resolver.timeline.snapshot()) == ["head", "tag"]
    # What the head brought was checked and cached as if it came block by block.
    root_data = store.get_block(root_cid)
    assert root_data is not None and root_cid.matches(root_data)
    assert Cid.from_digest(sample.top_digest).matches(manifest)
    assert maps and all(m.vouched for m in maps.values())
    assert len(resolver.heads) == 0  # every block the head held was asked for and taken
    # The next look at the tag (after its ttl) reads the record again, not the head.
    resolver.tag_ttl = 0.0
    origin.gets.clear()
    await look(resolver)
    assert origin.gets and set(origin.gets) == {tag_key("demo/app", "1")}


def _lying_heads(root_cid: Cid, head: bytes) -> dict[str, bytes]:
    blocks = decode_tag_head(head)
    other = {"type": "p2pimg/image@1", "top": "x"}
    return {
        # the root's CID with other bytes (the head's other blocks left as they are)
        "wrong-bytes": encode_tag_head(
            [(root_cid, dagcbor.encode(other))] + [(c, b) for c, b in blocks.items() if c != root_cid]
        ),
        # every CID with another block's bytes
        "shuffled": encode_tag_head(list(zip(blocks, [*list(blocks.values())[1:], head], strict=True))),
        "not-a-head": b"\xa1\x64type\x63tag",
        "empty": encode_tag_head([]),
        "missing": b"",
    }


@pytest.mark.parametrize("lie", ["wrong-bytes", "shuffled", "not-a-head", "empty", "missing"])
async def test_a_head_that_is_missing_or_lies_costs_only_its_own_request(
    tmp_path: Path, sample: SampleImage, lie: str
) -> None:
    origin_dir = tmp_path / "origin"
    _origin, root_cid = await published_home(tmp_path, sample)
    honest = await look(Resolver(ChunkStore(tmp_path / "honest"), FileOrigin(origin_dir)))
    head_file = origin_dir / head_key("demo/app", "1")
    bad = _lying_heads(root_cid, head_file.read_bytes())[lie]
    if lie == "missing":
        head_file.unlink()
    else:
        head_file.write_bytes(bad)

    origin = CountingOrigin(origin_dir)
    store = ChunkStore(tmp_path / "cache")
    assert await look(Resolver(store, origin)) == honest
    # The blocks the head did not bring came from the origin ...
    assert block_key(root_cid) in origin.gets
    # ... and only bytes that match their CIDs were cached.
    for cid in [root_cid, Cid.from_digest(sample.top_digest), *(m for m in _map_cids(store, root_cid))]:
        data = store.get_block(cid)
        assert data is not None and cid.matches(data)


def _map_cids(store: ChunkStore, root_cid: Cid) -> list[Cid]:
    from p2pimg.content.model import ImageRoot

    data = store.get_block(root_cid)
    assert data is not None
    return [e.map for e in ImageRoot.from_node(dagcbor.decode_verified(data, root_cid)).blobs.values()]


async def test_a_head_never_delays_a_tag_beyond_its_record(tmp_path: Path, sample: SampleImage) -> None:
    """An origin whose head request hangs: the tag resolves once the record is in (the head is
    waited for at most as long as the record took), and the blocks come from the origin."""
    await published_home(tmp_path, sample)

    class SlowHead(CountingOrigin):
        async def get(self, key: str, *, max_size: int) -> bytes:
            if key == head_key("demo/app", "1"):
                await trio.sleep_forever()
            return await super().get(key, max_size=max_size)

    origin = SlowHead(tmp_path / "origin")
    with trio.fail_after(10):
        manifest, maps = await look(Resolver(ChunkStore(tmp_path / "cache"), origin))
    assert Cid.from_digest(sample.top_digest).matches(manifest) and maps
    assert any(key.startswith(block_key(Cid.from_digest(sample.top_digest))) for key in origin.gets)


async def test_untag_and_gc_take_a_tags_head_with_it(tmp_path: Path, sample: SampleImage) -> None:
    origin, _root = await published_home(tmp_path, sample)
    head = tmp_path / "origin" / head_key("demo/app", "1")
    assert head.exists()
    later = time.time() + 10
    # While its tag is there, a head is no garbage, however old.
    assert head_key("demo/app", "1") not in (await plan_gc(origin, grace=0, now=later)).garbage
    # A head whose tag is gone (a publish that stopped between the two writes) is.
    orphan = tmp_path / "origin" / head_key("demo/app", "2")
    orphan.write_bytes(head.read_bytes())
    stray = tmp_path / "origin" / "p2pimg" / "heads" / "stray"  # no name/tag: nobody's head
    stray.write_bytes(b"x")
    plan = await plan_gc(origin, grace=0, now=later)
    assert {head_key("demo/app", "2"), "p2pimg/heads/stray"} <= set(plan.garbage)
    await run_gc(origin, plan, now=later)
    assert not orphan.exists() and not stray.exists() and head.exists()
    await untag(origin, "demo/app", "1")
    assert not head.exists()


async def test_attach_writes_a_whole_head_for_the_moved_tag(tmp_path: Path, sample: SampleImage) -> None:
    """After an attach (a signature, an SBOM) the tag's head still carries the image's top
    manifest and blob maps, besides the new root and the artifact's: a cold look at the moved tag
    is again one round of requests."""
    origin, _root = await published_home(tmp_path, sample)
    note = tmp_path / "sbom.json"
    note.write_text("{}")
    report = await attach(
        Resolver(ChunkStore(tmp_path / "publisher"), origin),
        "demo/app",
        "1",
        [note],
        origin,
        artifact_type="application/spdx+json",
    )
    counting = CountingOrigin(tmp_path / "origin")
    resolver = Resolver(ChunkStore(tmp_path / "cache"), counting)
    manifest, maps = await look(resolver)
    assert await resolver.resolve_tag("demo/app", "1") == report.root
    assert Cid.from_digest(sample.top_digest).matches(manifest) and len(maps) >= 3
    assert sorted(counting.gets) == sorted([tag_key("demo/app", "1"), head_key("demo/app", "1")])


class GatedOrigin(FileOrigin):
    """A real FileOrigin that holds every tag record's GET until `want` of them wait at once."""

    def __init__(self, root: Path, want: int) -> None:
        super().__init__(root)
        self.want = want
        self.waiting = 0
        self.all_asked = trio.Event()

    async def get(self, key: str, *, max_size: int) -> bytes:
        if key.startswith(tag_key("demo/app", "")):
            self.waiting += 1
            if self.waiting >= self.want:
                self.all_asked.set()
            await self.all_asked.wait()
        return await super().get(key, max_size=max_size)


async def test_a_names_tags_are_read_side_by_side(tmp_path: Path, sample: SampleImage) -> None:
    """A blob asked for by digest under a name of many tags: the tags are read at once (one
    after another, this test would wait forever for the third record's GET)."""
    origin, root = await published_home(tmp_path, sample)
    for tag in ("2", "3"):
        await publish(f"oci:{sample.path}:1", "demo/app", tag, origin, chunk_size=CHUNK)
    resolver = Resolver(ChunkStore(tmp_path / "cache"), GatedOrigin(tmp_path / "origin", want=3))
    digest = next(iter((await Resolver(ChunkStore(tmp_path / "other"), origin).root(root)).blobs))
    with trio.fail_after(10):
        entry = await resolver.blob_for("demo/app", digest)
    assert entry.size > 0
