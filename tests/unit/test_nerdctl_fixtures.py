"""The committed nerdctl-format fixtures (tests/fixtures/nerdctl): every block matches its CID, the
image CID holds the top descriptor, every blob reached through `ipfs://` URLs walks as a UnixFS
file to bytes of its descriptor's digest, nothing in the CAR is unreachable, and
`tools/nerdctl_fixture.py` makes the same bytes again."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from p2pimg.content.car import CarReader
from p2pimg.content.cid import IPFS_CODECS, Cid
from p2pimg.content.unixfs import FileNode, expand_file, file_root, read_file, walk_file

# pytest puts tests/ on sys.path, not the repository root that holds `tools`.
REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

from tools.nerdctl_fixture import FIXTURES, build_fixture  # noqa: E402

FIXTURE_DIR = REPO / "tests" / "fixtures" / "nerdctl"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def load(name: str) -> tuple[Cid, dict[Cid, bytes], dict[str, Any]]:
    reader = CarReader()
    blocks = dict(reader.feed((FIXTURE_DIR / f"{name}.car").read_bytes()))
    reader.close()
    for cid, block in blocks.items():
        assert cid.matches(block), cid
    (root,) = reader.roots
    return root, blocks, json.loads((FIXTURE_DIR / f"{name}.json").read_bytes())


class Walk:
    """Follows an image the way nerdctl reads it back: each descriptor's ipfs:// URL."""

    def __init__(self, blocks: dict[Cid, bytes]) -> None:
        self.blocks = blocks
        self.used: set[Cid] = set()
        self.manifests: list[str] = []
        self.files: dict[str, Cid] = {}

    def get(self, cid: Cid) -> bytes:
        self.used.add(cid)
        return self.blocks[cid]

    def blob(self, desc: dict[str, Any]) -> bytes:
        (url,) = desc["urls"]
        assert url.startswith("ipfs://")
        cid = Cid.parse(url.removeprefix("ipfs://"), codecs=IPFS_CODECS)
        data = b"".join(read_file(cid, self.get, size=desc["size"]))
        assert "sha256:" + hashlib.sha256(data).hexdigest() == desc["digest"]
        self.files[desc["digest"]] = cid
        assert "docker" not in desc["mediaType"]
        if desc["mediaType"] == OCI_INDEX:
            index = json.loads(data)
            assert index["mediaType"] == OCI_INDEX
            for entry in index["manifests"]:
                self.blob(entry)
        elif desc["mediaType"] == OCI_MANIFEST:
            self.manifests.append(desc["digest"])
            manifest = json.loads(data)
            assert manifest["mediaType"] == OCI_MANIFEST
            for entry in [manifest["config"], *manifest["layers"]]:
                self.blob(entry)
        return data


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_is_a_complete_verified_nerdctl_image(name: str) -> None:
    root, blocks, side = load(name)
    assert str(root) == side["image_cid"]
    assert root.codec_name == "raw"  # the image CID is one raw block: the top descriptor's JSON
    top = json.loads(blocks[root])
    assert top == side["top"] and top["digest"] == side["top_digest"]
    walk = Walk(blocks)
    walk.used.add(root)
    walk.blob(top)
    assert walk.manifests == side["manifests"]
    assert {d: str(c) for d, c in walk.files.items()} == side["blobs"]
    assert walk.used == set(blocks)  # nothing in the CAR that the image does not reach


def test_fixture_shapes() -> None:
    _, blocks, side = load("single")
    big = [Cid.parse(c, codecs=IPFS_CODECS) for c in side["blobs"].values() if c.startswith("bafy")]
    assert big, "a blob over 256 KiB is a dag-pb file"
    for cid in big:
        assert all(leaf.cid.codec_name == "raw" for leaf in walk_file(cid, blocks.__getitem__))

    _, _, side = load("multi")
    assert side["platforms"] == ["linux/amd64", "linux/arm64/v8"]
    assert side["top"]["mediaType"] == OCI_INDEX and len(side["manifests"]) == 2
    _, _, side = load("multi-amd64")
    assert side["platforms"] == ["linux/amd64"]
    assert side["top"]["mediaType"] == OCI_INDEX and len(side["manifests"]) == 1

    _, blocks, side = load("small-chunks")
    assert (side["chunk_size"], side["max_links"]) == (4096, 8)
    deepest = 0
    for text in side["blobs"].values():
        pending = [file_root(Cid.parse(text, codecs=IPFS_CODECS))]
        while pending:
            item = pending.pop()
            if isinstance(item, FileNode):
                deepest = max(deepest, item.depth)
                pending += expand_file(item, blocks[item.cid])
    assert deepest == 2  # root, two levels of nodes below it, then the raw leaves


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_regenerates_byte_for_byte(name: str, tmp_path: Path) -> None:
    car, side = build_fixture(name, tmp_path)
    assert car == (FIXTURE_DIR / f"{name}.car").read_bytes()
    assert side == (FIXTURE_DIR / f"{name}.json").read_bytes()
