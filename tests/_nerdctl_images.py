"""nerdctl-format images for tests: the committed fixtures (tests/fixtures/nerdctl) and images
pushed here with other chunkings, read from their blocks the way nerdctl reads them back (each
descriptor's `ipfs://` URL), so that a pull can be checked digest for digest."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _ipfs_gateway import read_car

from p2pimg.content.cid import IPFS_CODECS, Cid
from p2pimg.content.unixfs import read_file
from p2pimg.ops.sample import LayerSpec, write_oci_layout

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "nerdctl"
NAMES = ("single", "multi", "multi-amd64", "small-chunks")
INDEXES = frozenset({"application/vnd.oci.image.index.v1+json"})


@dataclass
class Image:
    """A nerdctl image: its CID, every block, and what a pull must give, read from its blocks."""

    cid: Cid
    blocks: dict[Cid, bytes]
    top: dict[str, Any]

    def file(self, desc: dict[str, Any]) -> bytes:
        cid = Cid.parse(desc["urls"][0].removeprefix("ipfs://"), codecs=IPFS_CODECS)
        return b"".join(read_file(cid, self.blocks.__getitem__, size=desc["size"]))

    def file_cid(self, desc: dict[str, Any]) -> Cid:
        return Cid.parse(desc["urls"][0].removeprefix("ipfs://"), codecs=IPFS_CODECS)

    def manifests(self) -> Iterator[tuple[dict[str, Any], bytes]]:
        """Every manifest and index (descriptor, bytes), from the top down."""
        todo = [self.top]
        while todo:
            desc = todo.pop(0)
            data = self.file(desc)
            yield desc, data
            if desc["mediaType"] in INDEXES:
                todo += json.loads(data)["manifests"]

    @property
    def name(self) -> str:
        return f"ipfs/{self.cid}"

    def digests(self) -> set[str]:
        """Every manifest's and blob's digest."""
        return {d["digest"] for d, _ in self.manifests()} | set(self.blobs())

    def blobs(self) -> dict[str, dict[str, Any]]:
        found = {}
        for desc, data in self.manifests():
            if desc["mediaType"] not in INDEXES:
                doc = json.loads(data)
                for blob in [doc["config"], *doc["layers"]]:
                    found[blob["digest"]] = blob
        return found


def fixture(name: str) -> Image:
    root, blocks = read_car(FIXTURES / f"{name}.car")
    top = json.loads(b"".join(read_file(root, blocks.__getitem__)))
    return Image(root, blocks, top)


def pushed(tmp: Path, chunk_size: int, max_links: int) -> Image:
    """An image pushed as nerdctl would, with another chunking than Kubo's default."""
    if str(REPO) not in sys.path:
        sys.path.append(str(REPO))
    from tools.nerdctl_fixture import push

    layout = tmp / "layout"
    write_oci_layout(layout, [LayerSpec(200 << 10, "none"), LayerSpec(30 << 10, "gzip")], seed=9)
    image = push(layout, chunk_size=chunk_size, max_links=max_links)
    return Image(image.image_cid, dict(image.blocks), image.top)
