"""`p2pimg ls`, `untag` and `gc` on the embedded origin, through the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2pimg.errors import InvalidInput
from p2pimg.ops import admin
from p2pimg.ops.publish import publish
from p2pimg.ops.sample import LayerSpec, write_oci_layout
from p2pimg.sources.origins import FileOrigin


def cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pimg", *args, "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


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

    dry = cli("gc", "--grace", "0", home=home)
    assert dry.returncode == 0 and dry.stdout == "" and "0 objects" in dry.stderr

    before = origin_keys(home)
    assert cli("untag", "demo/one:1", home=home).returncode == 0
    missing = cli("untag", "demo/one:1", home=home)
    assert missing.returncode == 3 and "not published" in missing.stderr
    young = cli("gc", home=home)  # all of it was written just now: within the default grace
    assert young.returncode == 0 and young.stdout == "" and "kept" in young.stderr
    dry = cli("gc", "--grace", "0", home=home)
    garbage = set(dry.stdout.split())
    assert dry.returncode == 0 and garbage and origin_keys(home) == before - {"p2pimg/tags/demo/one/1"}
    # What only demo/one used: its unshared layer, config, manifest, blob maps and root.
    unshared = set(one.blob_digests) - set(two.blob_digests)
    assert {f"p2pimg/blobs/sha256/{d[7:]}" for d in unshared if d != one.top_digest} <= garbage
    shared_blobs = {f"p2pimg/blobs/sha256/{d[7:]}" for d in set(one.blob_digests) & set(two.blob_digests)}
    assert shared_blobs and not shared_blobs & garbage

    done = cli("gc", "--yes", "--grace", "0", home=home)
    assert done.returncode == 0 and f"deleted {len(garbage)} objects" in done.stderr
    assert origin_keys(home) == before - {"p2pimg/tags/demo/one/1"} - garbage
    assert cli("gc", "--grace", "0", home=home).stdout == ""
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


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_gc_spares_what_a_concurrent_publish_just_wrote(tmp_path: Path) -> None:
    """A publish writes blobs and blocks first and its tag last: until then they are unreachable.
    gc deletes an unreachable object only once it is older than the grace period (1 h)."""
    home = tmp_path / "home"
    image = write_oci_layout(tmp_path / "img", [LayerSpec(10 << 10)], tag="1")
    assert cli("publish", f"oci:{image.path}:1", "demo/app:1", home=home).returncode == 0
    blobs = home / "origin" / "p2pimg" / "blobs" / "sha256"
    for path in (home / "origin").rglob("*"):
        if path.is_file():
            _age(path, 2 * 3600)  # published long ago
    # An unreferenced blob, as a publish in progress leaves it before writing its tag...
    in_flight = blobs / ("ab" * 32)
    in_flight.write_bytes(b"a layer a publish just uploaded")
    # ...and one left by an image untagged long ago.
    stale = blobs / ("cd" * 32)
    stale.write_bytes(b"a layer nothing uses any more")
    _age(stale, 3600 + 60)

    done = cli("gc", "--yes", home=home)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [f"p2pimg/blobs/sha256/{stale.name}"]
    assert "kept 1 unreachable objects written less than 1h ago" in done.stderr
    assert in_flight.exists() and not stale.exists()
    assert cli("resolve", "demo/app:1", home=home).returncode == 0

    # Past the grace, what the publish that never wrote its tag left is garbage, and goes.
    _age(in_flight, 3600 + 60)
    done = cli("gc", "--yes", home=home)
    assert done.returncode == 0 and done.stdout.split() == [f"p2pimg/blobs/sha256/{in_flight.name}"]
    assert not in_flight.exists()
    bad = cli("gc", "--yes", "--grace", "soon", home=home)
    assert bad.returncode == 2 and "invalid duration" in bad.stderr


async def test_gc_plan_by_age_with_a_clock(tmp_path: Path) -> None:
    """plan_gc by a clock of the test's choosing, over what FileOrigin lists (file mtimes)."""
    origin = FileOrigin(tmp_path / "origin")
    image = write_oci_layout(tmp_path / "img", [LayerSpec(10 << 10)], tag="1")
    await publish(f"oci:{image.path}:1", "demo/app", "1", origin)
    written = time.time()
    orphan = "p2pimg/blobs/sha256/" + "ef" * 32
    await origin.put_bytes(orphan, b"unreferenced")
    infos = await origin.list_info("p2pimg/")
    assert [info.key for info in infos] == await origin.list("p2pimg/")
    assert all(abs(info.modified - written) < 60 for info in infos)

    fresh = await admin.plan_gc(origin, now=written)
    assert fresh.garbage == [] and fresh.young == [orphan]
    later = await admin.plan_gc(origin, now=written + 3600 + 60)
    assert later.garbage == [orphan] and later.young == []
    assert (await admin.plan_gc(origin, grace=60, now=written + 120)).garbage == [orphan]
    # Dated in the future (the store's clock ahead of ours): kept, whatever the grace.
    assert (await admin.plan_gc(origin, grace=0, now=written - 120)).young == [orphan]
    assert await admin.run_gc(origin, later) == 1
    assert (await admin.plan_gc(origin, grace=0)).garbage == []


def test_parse_duration() -> None:
    assert admin.parse_duration("0") == 0
    assert admin.parse_duration("90") == admin.parse_duration("90s") == 90
    assert admin.parse_duration("30m") == 1800 and admin.parse_duration("1h") == admin.DEFAULT_GRACE
    assert admin.parse_duration("1.5d") == 1.5 * 86400
    for bad in ("", "-1", "1w", "h", "1 h 2"):
        with pytest.raises(InvalidInput, match="invalid duration"):
            admin.parse_duration(bad)
