"""`p2pimg ls`, `untag` and `gc` on the embedded origin, through the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from p2pimg.ops.sample import LayerSpec, write_oci_layout


def cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p2pimg", *args, "--home", str(home)],
                          capture_output=True, text=True, timeout=60, check=False)


def origin_keys(home: Path) -> set[str]:
    root = home / "origin"
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_ls_untag_gc(tmp_path: Path) -> None:
    home = tmp_path / "home"
    shared = LayerSpec(200 << 10)
    one = write_oci_layout(tmp_path / "one", [shared, LayerSpec(100 << 10)], tag="1", seed=1)
    # Same seed for the shared layer: the layer is byte-identical in both images.
    two = write_oci_layout(tmp_path / "two", [shared], tag="1", seed=1)
    for image, ref in ((one, "demo/one:1"), (two, "demo/two:1"), (two, "demo/two:latest")):
        assert cli("publish", f"oci:{image.path}:1", ref, home=home).returncode == 0

    listed = cli("ls", home=home)
    assert listed.returncode == 0
    assert listed.stdout.split() == ["demo/one:1", "demo/two:1", "demo/two:latest"]

    dry = cli("gc", home=home)
    assert dry.returncode == 0 and dry.stdout == "" and "0 objects" in dry.stderr

    before = origin_keys(home)
    assert cli("untag", "demo/one:1", home=home).returncode == 0
    missing = cli("untag", "demo/one:1", home=home)
    assert missing.returncode == 3 and "not published" in missing.stderr
    dry = cli("gc", home=home)
    garbage = set(dry.stdout.split())
    assert dry.returncode == 0 and garbage and origin_keys(home) == before - {"p2pimg/tags/demo/one/1"}
    # What only demo/one used: its unshared layer, config, manifest, blob maps and root.
    unshared = set(one.blob_digests) - set(two.blob_digests)
    assert {f"p2pimg/blobs/sha256/{d[7:]}" for d in unshared if d != one.top_digest} <= garbage
    shared_blobs = {f"p2pimg/blobs/sha256/{d[7:]}" for d in set(one.blob_digests) & set(two.blob_digests)}
    assert shared_blobs and not shared_blobs & garbage

    done = cli("gc", "--yes", home=home)
    assert done.returncode == 0 and f"deleted {len(garbage)} objects" in done.stderr
    assert origin_keys(home) == before - {"p2pimg/tags/demo/one/1"} - garbage
    assert cli("gc", home=home).stdout == ""
    # demo/two is whole: everything it reaches is still there.
    assert cli("resolve", "demo/two:1", home=home).returncode == 0


def test_gc_deletes_nothing_when_an_image_is_unreadable(tmp_path: Path) -> None:
    home = tmp_path / "home"
    image = write_oci_layout(tmp_path / "img", [LayerSpec(10 << 10)], tag="1")
    out = cli("publish", f"oci:{image.path}:1", "demo/app:1", home=home)
    root = out.stdout.split()[-1]
    (home / "origin" / "p2pimg" / "blocks" / root).write_bytes(b"damaged")
    before = origin_keys(home)
    result = cli("gc", "--yes", home=home)
    assert result.returncode == 5 and "nothing deleted" in result.stderr
    assert origin_keys(home) == before
