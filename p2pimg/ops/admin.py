"""Looking after an origin: list tags, remove a tag, collect what no tag reaches any more."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from p2pimg.content import dagcbor
from p2pimg.content.cid import Cid
from p2pimg.content.model import MAX_MANIFEST_SIZE, BlobMap, ImageRoot, TagRecord
from p2pimg.errors import BlockInvalid, InvalidInput, NotFound, P2pimgError
from p2pimg.sources.origins import PREFIX, Origin, block_key, tag_key

_TAGS = f"{PREFIX}/tags/"

# gc spares unreachable objects written less than this long ago: a publish uploads an image's
# blobs and blocks first and its tag last, so until then they are reachable from nothing.
DEFAULT_GRACE = 3600.0
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds of `90`, `90s`, `30m`, `1h` or `2d`."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\s*", text.lower())
    if not match:
        raise InvalidInput(
            f"invalid duration {text[:40]!r}: expected a number of seconds, or with "
            "s, m, h or d (e.g. 30m, 1h)"
        )
    return float(match[1]) * _UNITS[match[2]]


async def list_tags(origin: Origin) -> dict[str, list[str]]:
    """Published names and their tags."""
    names: dict[str, list[str]] = {}
    for key in await origin.list(_TAGS):
        name, _, tag = key[len(_TAGS) :].rpartition("/")
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
    young: list[str] = field(default_factory=list)  # unreachable, but within the grace period: kept


async def plan_gc(origin: Origin, *, grace: float = DEFAULT_GRACE, now: float | None = None) -> GcPlan:
    """Mark everything a tag reaches; the rest of blobs/ and blocks/ is garbage, except what was
    written less than `grace` seconds before `now` (default: when the plan starts), which may be
    a concurrent publish's, whose tag is not written yet.

    A tag whose image cannot be read keeps everything: deleting on partial knowledge could destroy
    what that image needs, so such a plan lists the problem and no garbage at all.
    """
    # Ages count from before the tags are read: any publish whose tag this plan does not see
    # wrote its tag later, so an object stays young for at least `grace` of that publish's time.
    now = time.time() if now is None else now
    plan = GcPlan()
    for name, tags in (await list_tags(origin)).items():
        for tag in tags:
            try:
                record = TagRecord.decode(
                    await origin.get(tag_key(name, tag), max_size=64 << 10), name=name, tag=tag
                )
                await _mark(origin, record.root, plan)
            except (P2pimgError, OSError) as exc:
                plan.problems.append(f"{name}:{tag}: {exc}")
    if plan.problems:
        return plan
    unreachable = [
        info
        for info in await origin.list_info(f"{PREFIX}/blocks/")
        if info.key.rpartition("/")[2] not in plan.reachable_blocks
    ]
    unreachable += [
        info
        for info in await origin.list_info(f"{PREFIX}/blobs/sha256/")
        if "sha256:" + info.key.rpartition("/")[2] not in plan.reachable_blobs
    ]
    for info in unreachable:
        # Young, or dated in the future (a store's clock ahead of ours): kept.
        (plan.young if now - info.modified < grace else plan.garbage).append(info.key)
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
        bmap = BlobMap.from_node(
            dagcbor.decode_verified(
                await origin.get(block_key(blob.map), max_size=dagcbor.MAX_BLOCK_SIZE), blob.map
            )
        )
        if bmap.digest != digest:
            raise BlockInvalid(f"blob map {blob.map} does not describe {digest}")


async def run_gc(origin: Origin, plan: GcPlan) -> int:
    """Delete the plan's garbage; returns how many objects went."""
    for key in plan.garbage:
        await origin.delete(key)
    return len(plan.garbage)


__all__ = ["DEFAULT_GRACE", "GcPlan", "list_tags", "parse_duration", "plan_gc", "run_gc", "untag"]
