"""Fuzz target: tag records fetched from origins and peers for a given name:tag, and the tag heads
read beside them from origins."""

from __future__ import annotations

import _harness  # first: puts the project on sys.path
import _seeds

from p2pimg.content import model
from p2pimg.content.cid import Cid

_HEAD = model.encode_tag_head([(Cid.of_dag_cbor(b), b) for b in _seeds.BLOCKS[:3]])
SEEDS = [_seeds.tag_record().encode(), _seeds.tag_record("a/b", "x").encode(), _HEAD] + _seeds.BLOCKS


def test_one_input(data: bytes) -> None:
    record = _harness.allowed(model.TagRecord.decode, _harness.seeded(data, SEEDS), name="demo/app", tag="1")
    if record is not None:
        assert (record.name, record.tag) == ("demo/app", "1") and record.seq >= 0
    head = _harness.allowed(model.decode_tag_head, _harness.seeded(data, SEEDS))
    if head is not None:
        assert all(isinstance(block, bytes) for block in head.values())


if __name__ == "__main__":
    _harness.main(test_one_input)
