"""Fuzz target: DAG-CBOR blocks from peers and origins, and the blob maps and image roots in them."""

from __future__ import annotations

import _harness  # first: puts the project on sys.path
import _seeds

from p2pimg.content import dagcbor, model

SEEDS = _seeds.BLOCKS


def test_one_input(data: bytes) -> None:
    block = _harness.seeded(data, SEEDS)
    value = _harness.allowed(dagcbor.decode, block)
    if value is None:
        return
    assert dagcbor.encode(value) == block  # strict: only canonical blocks decode
    bmap = _harness.allowed(model.BlobMap.from_node, value)
    if bmap is not None:
        assert model.BlobMap.from_node(dagcbor.decode(bmap.encode())) == bmap
    root = _harness.allowed(model.ImageRoot.from_node, value)
    if root is not None:
        assert root.top_entry.cid.to_digest() == root.top


if __name__ == "__main__":
    _harness.main(test_one_input)
