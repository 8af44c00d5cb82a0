"""Fuzz target: manifests and indexes (publish sources, upstream registries): media type and children."""

from __future__ import annotations

import _harness  # first: puts the project on sys.path
import _seeds

from p2pimg.content import graph as sources
from p2pimg.content import model

SEEDS = _seeds.MANIFESTS
DECLARED = ["", sources.OCI_MANIFEST, sources.OCI_INDEX, "text/plain"]


def test_one_input(data: bytes) -> None:
    doc = _harness.seeded(data, SEEDS)
    declared = DECLARED[data[-1] % len(DECLARED)] if data else ""
    media = _harness.allowed(sources.manifest_media_type, doc, declared, "fuzz manifest")
    if media is not None:
        assert media in model.MANIFEST_MEDIA_TYPES
    for kind in (media or sources.OCI_MANIFEST, sources.OCI_INDEX):
        found = _harness.allowed(sources.manifest_children, doc, kind, "fuzz manifest")
        for digest, size, child_media in [d for part in found or () for d in part]:
            assert digest.startswith("sha256:") and size >= 0 and isinstance(child_media, str)


if __name__ == "__main__":
    _harness.main(test_one_input)
