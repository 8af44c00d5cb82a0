"""Tag heads: the blocks a pull of a tag reads first, in one request beside the tag record.

A cold pull by tag reads the tag record, then the image root it names, then the top manifest and
the blob maps the root names: three origin round trips one after another before the first byte
of a layer moves. `p2pimg publish` also writes the tag's head (`content.model.encode_tag_head`:
the root, the manifests and the blob maps, each with its CID) and the resolver reads it alongside
the record, so the blocks are here once the record is.

A head is a hint, never trusted: its blocks wait here until the resolver asks for one by CID,
and each goes through the same checks as a block from the origin (it matches the CID, it
parses) before it is used or cached. A head that is missing, damaged, stale or of another root
costs nothing but its own request: the resolver asks the origin for the blocks as before.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import trio

from p2pimg.content.cid import Cid
from p2pimg.content.model import MAX_TAG_HEAD_SIZE, decode_tag_head
from p2pimg.metrics import Timeline
from p2pimg.sources.origins import Origin, head_key

log = logging.getLogger(__name__)

# Blocks from heads not asked for yet, at most this many bytes (the oldest go first).
HELD_BYTES = 4 * MAX_TAG_HEAD_SIZE


class TagHeads:
    def __init__(self, origin: Origin, *, held_bytes: int = HELD_BYTES) -> None:
        self.origin = origin
        self.held_bytes = held_bytes
        self._held: OrderedDict[Cid, bytes] = OrderedDict()
        self._size = 0

    async def read(self, name: str, tag: str, done: trio.Event, timeline: Timeline) -> None:
        """Fetch `name:tag`'s head and hold its blocks (noted in `timeline`); `done` is set however
        it ends. Any failure is only logged: the blocks are then read one by one, as without a head."""
        began = Timeline.now()
        try:
            data = await self.origin.get(head_key(name, tag), max_size=MAX_TAG_HEAD_SIZE)
            blocks = decode_tag_head(data)
            timeline.add("head", began, Timeline.now(), name=name, tag=tag, bytes=len(data))
            for cid, block in blocks.items():
                self._hold(cid, block)
        except Exception as exc:  # noqa: BLE001 - a hint that failed: read without it
            log.debug("no usable head for %s:%s: %s", name, tag, exc)
        finally:
            done.set()

    def _hold(self, cid: Cid, block: bytes) -> None:
        if len(block) > self.held_bytes:
            return
        if (old := self._held.pop(cid, None)) is not None:
            self._size -= len(old)
        self._held[cid] = block
        self._size += len(block)
        while self._size > self.held_bytes:
            _cid, dropped = self._held.popitem(last=False)
            self._size -= len(dropped)

    def take(self, cid: Cid) -> bytes | None:
        """The block a head brought for `cid`, unchecked (the caller checks it), once."""
        block = self._held.pop(cid, None)
        if block is not None:
            self._size -= len(block)
        return block

    def __len__(self) -> int:
        return len(self._held)
