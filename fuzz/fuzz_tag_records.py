"""Fuzz target: tag records fetched from origins and peers for a given name:tag."""

from __future__ import annotations

import _harness  # first: puts the project on sys.path
import _seeds

from p2pimg.content import model

SEEDS = [_seeds.tag_record().encode(), _seeds.tag_record("a/b", "x").encode()] + _seeds.BLOCKS


def test_one_input(data: bytes) -> None:
    record = _harness.allowed(model.TagRecord.decode, _harness.seeded(data, SEEDS), name="demo/app", tag="1")
    if record is not None:
        assert (record.name, record.tag) == ("demo/app", "1") and record.seq >= 0


if __name__ == "__main__":
    _harness.main(test_one_input)
