"""`p2pimg ls`, `untag` and `gc` on the embedded origin, through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pimg.errors import InvalidInput
from p2pimg.ops import admin, lease
from p2pimg.ops import publish as publish_module
from p2pimg.ops.publish import publish
from p2pimg.ops.sample import LayerSpec, write_oci_layout
from p2pimg.sources.origins import FileOrigin
from p2pimg.sources.origins.multipart import completion_key


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
    # untag took the tag's record and its head (`fetch.heads`); the rest is gc's.
    untagged = {"p2pimg/tags/demo/one/1", "p2pimg/heads/demo/one/1"}
    assert {"p2pimg/heads/demo/two/1", "p2pimg/heads/demo/two/latest"} <= before
    assert dry.returncode == 0 and garbage and origin_keys(home) == before - untagged
    # What only demo/one used: its unshared layer, config, manifest, blob maps and root.
    unshared = set(one.blob_digests) - set(two.blob_digests)
    assert {f"p2pimg/blobs/sha256/{d[7:]}" for d in unshared if d != one.top_digest} <= garbage
    shared_blobs = {f"p2pimg/blobs/sha256/{d[7:]}" for d in set(one.blob_digests) & set(two.blob_digests)}
    assert shared_blobs and not shared_blobs & garbage

    done = cli("gc", "--yes", "--grace", "0", home=home)
    assert done.returncode == 0 and f"deleted {len(garbage)} objects" in done.stderr
    assert origin_keys(home) == before - untagged - garbage
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


# -- gc beside a publish that reuses old objects (publish leases, `ops.lease`) ----------------


def _age_all(root: Path, seconds: float) -> None:
    """Date every object of a file origin `seconds` ago (as if written then)."""
    then = time.time() - seconds
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, (then, then))


async def _untagged_old_image(tmp_path: Path) -> tuple[FileOrigin, str]:
    """An image published two hours ago and untagged since: all of it is gc's garbage."""
    origin = FileOrigin(tmp_path / "origin")
    image = write_oci_layout(tmp_path / "img", [LayerSpec(20 << 10), LayerSpec(5 << 10)], tag="1")
    await publish(f"oci:{image.path}:1", "demo/app", "1", origin)
    await admin.untag(origin, "demo/app", "1")
    _age_all(origin.root, 7200)
    return origin, f"oci:{image.path}:1"


async def _whole(origin: FileOrigin) -> None:
    """Every tag's image is complete in the origin, and nothing else is there."""
    check = await admin.plan_gc(origin, grace=0)
    assert check.problems == [] and check.garbage == [] and check.leased == []
    assert await origin.list(lease.LEASES) == []


async def test_gc_spares_old_objects_a_publish_reuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gc planned (no tag reaches the old image), then a publish of the same image finds all of it
    in the origin and uploads nothing; gc deletes between that publish's existence checks and
    its tag write. The publish's lease names what it reuses: gc spares all of it."""
    origin, source = await _untagged_old_image(tmp_path)
    plan = await admin.plan_gc(origin)
    assert plan.problems == [] and plan.young == [] and len(plan.garbage) == len(await origin.list("p2pimg/"))
    real_write = publish_module._write_root_and_tag
    deleted: list[int] = []

    async def gc_then_write(*args: Any, **kwargs: Any) -> Any:
        deleted.append(await admin.run_gc(origin, plan))  # between the checks and the tag
        return await real_write(*args, **kwargs)

    monkeypatch.setattr(publish_module, "_write_root_and_tag", gc_then_write)
    report = await publish(source, "demo/app", "2", origin)
    assert report.blobs_uploaded == 0 and report.blobs_skipped == 3  # config and two layers
    assert deleted == [0]
    await _whole(origin)


async def test_a_publish_that_leases_after_gc_listed_the_leases_waits_for_gc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other ordering: gc lists the leases (none), then a publish writes its lease and looks
    which objects exist, before gc deletes them. gc's hold, written before it listed, makes that
    publish wait until the deletions are over; it then finds the objects gone and uploads them."""
    origin, source = await _untagged_old_image(tmp_path)
    plan = await admin.plan_gc(origin)
    real_read = admin.read_leases
    publish_waits, gc_done = trio.Event(), trio.Event()
    reports: list[Any] = []

    async def pause(_seconds: float) -> None:
        publish_waits.set()
        await gc_done.wait()

    monkeypatch.setattr(lease, "pause", pause)
    async with trio.open_nursery() as nursery:

        async def run_publish() -> None:
            reports.append(await publish(source, "demo/app", "2", origin))
            publish_waits.set()  # (only if it never waited: then the test fails below)

        async def read_then_publish(*args: Any, **kwargs: Any) -> lease.LeaseView:
            view = await real_read(*args, **kwargs)
            if not publish_waits.is_set():  # gc listed the leases: now the publish runs
                nursery.start_soon(run_publish)
                await publish_waits.wait()
            return view

        monkeypatch.setattr(admin, "read_leases", read_then_publish)
        assert await admin.run_gc(origin, plan) == len(plan.garbage)
        gc_done.set()
    assert reports[0].blobs_uploaded == 3 and reports[0].blobs_skipped == 0
    await _whole(origin)


async def test_a_gc_tag_written_after_the_plan_keeps_its_objects(tmp_path: Path) -> None:
    """A publish that ran all its course (lease gone) between gc's plan and its deletions: gc reads
    the tags again before deleting, and spares what the new tag reaches."""
    origin, source = await _untagged_old_image(tmp_path)
    plan = await admin.plan_gc(origin)
    await publish(source, "demo/app", "2", origin)
    assert await admin.run_gc(origin, plan) == 0
    await _whole(origin)


async def test_stale_leases_and_holds_are_ignored_and_collected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    origin, source = await _untagged_old_image(tmp_path)
    keys = await origin.list("p2pimg/")
    await origin.put_bytes(lease.LEASES + "publish-dead", json.dumps({"keys": keys}).encode())
    await origin.put_bytes(lease.LEASES + "gc-dead", b"{}")
    live = await admin.plan_gc(origin)
    assert sorted(live.leased) == keys and live.garbage == []
    _age_all(origin.root / lease.LEASES, lease.TTL + 60)
    paused: list[float] = []

    async def pause(seconds: float) -> None:
        paused.append(seconds)

    monkeypatch.setattr(lease, "pause", pause)
    plan = await admin.plan_gc(origin)
    assert plan.leased == [] and set(plan.garbage) == {*keys, *(await origin.list(lease.LEASES))}
    assert await admin.run_gc(origin, plan) == len(keys) + 2
    # A publish does not wait for a stale hold either.
    await origin.put_bytes(lease.LEASES + "gc-dead", b"{}")
    _age_all(origin.root / lease.LEASES, lease.TTL + 60)
    await publish(source, "demo/app", "3", origin)
    assert paused == []
    await origin.delete(lease.LEASES + "gc-dead")
    await _whole(origin)


# -- completion stamps (multipart uploads, dated by when they began) ------------------------------


async def test_gc_dates_an_object_by_its_completion_stamp(tmp_path: Path) -> None:
    origin = FileOrigin(tmp_path / "origin")
    blob = "p2pimg/blobs/sha256/" + "ab" * 32
    stamp = completion_key(blob)
    assert stamp == "p2pimg/completed/blobs/sha256/" + "ab" * 32
    await origin.put_bytes(blob, b"completed from a multipart upload begun two hours ago")
    _age_all(origin.root, 7200)
    await origin.put_bytes(stamp, b"")  # stamped just now, when it completed
    fresh = await admin.plan_gc(origin)
    assert fresh.garbage == [] and fresh.young == [blob, stamp]
    later = await admin.plan_gc(origin, now=time.time() + admin.DEFAULT_GRACE + 60)
    assert later.garbage == [blob, stamp]  # the stamp goes with its object, after it
    # An orphan stamp (an upload that never completed): garbage once past the grace.
    orphan = completion_key("p2pimg/blobs/sha256/" + "cd" * 32)
    await origin.put_bytes(orphan, b"")
    assert (await admin.plan_gc(origin)).young == [blob, stamp, orphan]
    _age_all(origin.root, 7200)
    plan = await admin.plan_gc(origin)
    assert plan.garbage == [blob, stamp, orphan]
    assert await admin.run_gc(origin, plan) == 3
    assert await origin.list("p2pimg/") == []


async def test_gc_keeps_the_stamp_of_a_reachable_object(tmp_path: Path) -> None:
    origin = FileOrigin(tmp_path / "origin")
    image = write_oci_layout(tmp_path / "img", [LayerSpec(10 << 10)], tag="1")
    await publish(f"oci:{image.path}:1", "demo/app", "1", origin)
    layer = next(k for k in await origin.list("p2pimg/blobs/sha256/"))
    await origin.put_bytes(completion_key(layer), b"")
    _age_all(origin.root, 7200)
    assert (await admin.plan_gc(origin)).garbage == []


async def test_gc_says_what_a_running_publish_leased(tmp_path: Path) -> None:
    origin, _source = await _untagged_old_image(tmp_path)
    keys = await origin.list("p2pimg/")
    await origin.put_bytes(lease.LEASES + "publish-live", json.dumps({"keys": keys}).encode())
    out = cli("gc", "--origin", origin.url, "--yes", home=tmp_path / "home")
    assert out.returncode == 0, out.stderr
    assert f"kept {len(keys)} unreachable objects a running publish has leased" in out.stderr
    assert sorted(await origin.list("p2pimg/blobs/")) == sorted(
        k for k in keys if k.startswith("p2pimg/blobs/")
    )
