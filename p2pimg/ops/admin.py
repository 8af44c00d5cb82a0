"""Looking after an origin: list tags, remove a tag, collect what no tag reaches any more."""

from __future__ import annotations

from dataclasses import dataclass, field

from p2pimg.content import dagcbor
from p2pimg.content.cid import Cid
from p2pimg.content.model import MAX_MANIFEST_SIZE, BlobMap, ImageRoot, TagRecord
from p2pimg.errors import BlockInvalid, NotFound, P2pimgError
from p2pimg.sources.origins import PREFIX, Origin, block_key, tag_key

_TAGS = f"{PREFIX}/tags/"


async def list_tags(origin: Origin) -> dict[str, list[str]]:
    """Published names and their tags."""
    names: dict[str, list[str]] = {}
    for key in await origin.list(_TAGS):
        name, _, tag = key[len(_TAGS):].rpartition("/")
        if name and tag:
            names.setdefault(name, []).append(tag)
    return {n: sorted(t) for n, t in sorted(names.items())}


async def untag(origin: Origin, name: str, tag: str) -> None:
    key = tag_key(name, tag)
    if not await origin.exists(key):
        raise NotFound(f"{name}:{tag} is not published in {origin.url}")
    await origin.delete(key)


@dataclass
class GcPlan:
    reachable_blocks: set[str] = field(default_factory=set)
    reachable_blobs: set[str] = field(default_factory=set)
    garbage: list[str] = field(default_factory=list)  # origin keys
    problems: list[str] = field(default_factory=list)


async def plan_gc(origin: Origin) -> GcPlan:
    """Mark everything a tag reaches; the rest of blobs/ and blocks/ is garbage.

    A tag whose image cannot be read keeps everything: deleting on partial knowledge could destroy
    what that image needs, so such a plan lists the problem and no garbage at all.
    """
    plan = GcPlan()
    for name, tags in (await list_tags(origin)).items():
        for tag in tags:
            try:
                record = TagRecord.decode(await origin.get(tag_key(name, tag), max_size=64 << 10),
                                          name=name, tag=tag)
                await _mark(origin, record.root, plan)
            except (P2pimgError, OSError) as exc:
                plan.problems.append(f"{name}:{tag}: {exc}")
    if plan.problems:
        return plan
    for key in await origin.list(f"{PREFIX}/blocks/"):
        if key.rpartition("/")[2] not in plan.reachable_blocks:
            plan.garbage.append(key)
    for key in await origin.list(f"{PREFIX}/blobs/sha256/"):
        if "sha256:" + key.rpartition("/")[2] not in plan.reachable_blobs:
            plan.garbage.append(key)
    return plan


async def _mark(origin: Origin, root_cid: Cid, plan: GcPlan) -> None:
    if str(root_cid) in plan.reachable_blocks:
        return
    data = await origin.get(block_key(root_cid), max_size=dagcbor.MAX_BLOCK_SIZE)
    root = ImageRoot.from_node(dagcbor.decode_verified(data, root_cid))
    plan.reachable_blocks.add(str(root_cid))
    for entry in root.manifests.values():
        if not entry.cid.matches(await origin.get(block_key(entry.cid), max_size=MAX_MANIFEST_SIZE)):
            raise BlockInvalid(f"manifest block {entry.cid} is damaged")
        plan.reachable_blocks.add(str(entry.cid))
    for digest, blob in root.blobs.items():
        plan.reachable_blocks.add(str(blob.map))
        plan.reachable_blobs.add(digest)
        bmap = BlobMap.from_node(dagcbor.decode_verified(
            await origin.get(block_key(blob.map), max_size=dagcbor.MAX_BLOCK_SIZE), blob.map))
        if bmap.digest != digest:
            raise BlockInvalid(f"blob map {blob.map} does not describe {digest}")


async def run_gc(origin: Origin, plan: GcPlan) -> int:
    """Delete the plan's garbage; returns how many objects went."""
    for key in plan.garbage:
        await origin.delete(key)
    return len(plan.garbage)


__all__ = ["GcPlan", "list_tags", "plan_gc", "run_gc", "untag"]
