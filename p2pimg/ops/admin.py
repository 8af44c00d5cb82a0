"""Looking after an origin: list tags, remove a tag, collect what no tag reaches any more."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from p2pimg.content import dagcbor
from p2pimg.content.cid import Cid
from p2pimg.content.model import MAX_MANIFEST_SIZE, BlobMap, ImageRoot, TagRecord
from p2pimg.errors import BlockInvalid, InvalidInput, NotFound, OriginError, P2pimgError
from p2pimg.ops.lease import gc_hold, read_leases
from p2pimg.sources.origins import HEADS, PREFIX, Origin, block_key, head_key, list_tags, tag_key
from p2pimg.sources.origins.multipart import COMPLETED, stamped_key

_STAMPS = f"{PREFIX}/{COMPLETED}/"

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


async def untag(origin: Origin, name: str, tag: str) -> None:
    key = tag_key(name, tag)
    if not await origin.exists(key):
        raise NotFound(f"{name}:{tag} is not published in {origin.url}")
    await origin.delete(key)
    await origin.delete(head_key(name, tag))  # gc takes a head left behind


@dataclass
class GcPlan:
    reachable_blocks: set[str] = field(default_factory=set)
    reachable_blobs: set[str] = field(default_factory=set)
    garbage: list[str] = field(default_factory=list)  # origin keys
    problems: list[str] = field(default_factory=list)
    young: list[str] = field(default_factory=list)  # unreachable, but within the grace period: kept
    leased: list[str] = field(default_factory=list)  # unreachable, but a running publish's: kept
    marked_roots: set[str] = field(default_factory=set)  # roots of the tags read
    grace: float = DEFAULT_GRACE


def _subject(key: str) -> str:
    """The object a key is about: a completion stamp's object, else the key itself."""
    return stamped_key(key) if key.startswith(_STAMPS) else key


async def plan_gc(origin: Origin, *, grace: float = DEFAULT_GRACE, now: float | None = None) -> GcPlan:
    """Mark everything a tag reaches; the rest of blobs/ and blocks/ is garbage, except what was
    written less than `grace` seconds before `now` (default: when the plan starts), which may be
    a concurrent publish's, whose tag is not written yet, and what a live publish lease names
    (`ops.lease`: a publish reusing an old object). `run_gc` looks at the leases again.

    An object completed from a multipart upload (S3, Storj) is dated by its completion stamp
    (`multipart.completion_key`) when that is later than the object's own date, which for such an
    object is when its upload began. A stamp goes with its object; a stamp whose object is not
    there (its upload never completed) is garbage once past the grace, like an object.

    A tag whose image cannot be read keeps everything: deleting on partial knowledge could destroy
    what that image needs, so such a plan lists the problem and no garbage at all.
    """
    # Ages count from before the tags are read: any publish whose tag this plan does not see
    # wrote its tag later, so an object stays young for at least `grace` of that publish's time.
    now = time.time() if now is None else now
    plan = GcPlan(grace=grace)
    listed_tags = await _mark_tags(origin, plan)
    if plan.problems:
        return plan
    leases = await read_leases(origin, now=now)  # after the tags: see `ops.lease`
    stamps = {stamped_key(info.key): info for info in await origin.list_info(_STAMPS)}
    objects = await origin.list_info(f"{PREFIX}/blocks/")
    objects += await origin.list_info(f"{PREFIX}/blobs/sha256/")
    listed = {info.key for info in objects}
    for info in objects:
        name = info.key.rpartition("/")[2]
        if name in plan.reachable_blocks or "sha256:" + name in plan.reachable_blobs:
            continue
        stamp = stamps.get(info.key)
        keys = [info.key] if stamp is None else [info.key, stamp.key]
        modified = info.modified if stamp is None else max(info.modified, stamp.modified)
        _sort(plan, keys, now - modified, leases.keys)
    for key, stamp in stamps.items():
        if key not in listed:  # an orphan stamp
            _sort(plan, [stamp.key], now - stamp.modified, leases.keys)
    # A tag's head goes with its tag (`untag` removes both; one left behind, or written by a
    # publish that never wrote its tag, is garbage past the grace).
    tagged = {head_key(name, tag) for name, tags in listed_tags.items() for tag in tags}
    for info in await origin.list_info(HEADS):
        if info.key not in tagged:
            _sort(plan, [info.key], now - info.modified, leases.keys)
    plan.garbage += leases.stale
    return plan


async def _tagged_head(origin: Origin, key: str) -> bool:
    """Whether `key` is the head of a tag the origin holds now (a stray key is no one's head)."""
    name, _, tag = key.removeprefix(HEADS).rpartition("/")
    try:
        return key.startswith(HEADS) and await origin.exists(tag_key(name, tag))
    except InvalidInput:
        return False


def _sort(plan: GcPlan, keys: list[str], age: float, leased: set[str]) -> None:
    # Young, or dated in the future (a store's clock ahead of ours): kept.
    if _subject(keys[0]) in leased:
        plan.leased += keys
    elif age < plan.grace:
        plan.young += keys
    else:
        plan.garbage += keys


async def _mark_tags(origin: Origin, plan: GcPlan) -> dict[str, list[str]]:
    """Mark from every tag whose root is not marked yet; the tags it listed."""
    listed = await list_tags(origin)
    for name, tags in listed.items():
        for tag in tags:
            try:
                record = TagRecord.decode(
                    await origin.get(tag_key(name, tag), max_size=64 << 10), name=name, tag=tag
                )
                if str(record.root) not in plan.marked_roots:
                    await _mark(origin, record.root, plan)
                    plan.marked_roots.add(str(record.root))
            except (P2pimgError, OSError) as exc:
                plan.problems.append(f"{name}:{tag}: {exc}")
    return listed


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


_BATCH = 1000


async def run_gc(origin: Origin, plan: GcPlan, *, now: float | None = None) -> int:
    """Delete the plan's garbage, batch by batch; returns how many objects went.

    Before each batch, under a gc hold (`ops.lease`), the leases are listed again and the tags
    read again: what a live lease names, or a tag written since the plan reaches, is spared (with
    its stamp). A stamp is deleted after its object, so a crash between them leaves an orphan
    stamp (garbage for the next gc), never an object without the stamp that dates it.
    """
    deleted = 0
    async with gc_hold(origin) as hold:
        for start in range(0, len(plan.garbage), _BATCH):
            await hold()
            leases = await read_leases(origin, now=now)
            await _mark_tags(origin, plan)
            if plan.problems:
                raise OriginError(
                    f"gc stopped after deleting {deleted} objects: cannot read {plan.problems[0]}"
                )
            for key in plan.garbage[start : start + _BATCH]:
                subject = _subject(key)
                name = subject.rpartition("/")[2]
                if (
                    subject in leases.keys
                    or key in leases.live  # a stale lease refreshed since the plan
                    or name in plan.reachable_blocks
                    or "sha256:" + name in plan.reachable_blobs
                    or await _tagged_head(origin, key)
                ):
                    continue
                await origin.delete(key)
                deleted += 1
    return deleted


__all__ = ["DEFAULT_GRACE", "GcPlan", "list_tags", "parse_duration", "plan_gc", "run_gc", "untag"]
