"""The mirror's data-level progress of an upstream blob (what the registry turns into a body):
readable regions in order, the last byte held until the digest matched, and the download's error
when the blob turns out wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from p2pimg.errors import OriginError, P2pimgError, VerificationError
from p2pimg.fetch.mirror import Mirror, UpstreamFetch
from p2pimg.metrics import Metrics
from p2pimg.store.chunks import ChunkStore

DIGEST = "sha256:" + "ab" * 32


@pytest.fixture
def mirror(tmp_path: Path, nursery: trio.Nursery) -> Mirror:
    return Mirror(ChunkStore(tmp_path / "cache"), [], nursery, Metrics())


def _fetch(tmp_path: Path, size: int) -> UpstreamFetch:
    return UpstreamFetch(DIGEST, size, tmp_path / "partial", fd=-1)


def _arrive(
    fetch: UpstreamFetch,
    *,
    written: int | None = None,
    verified: bool = False,
    error: P2pimgError | None = None,
) -> None:
    if written is not None:
        fetch.written = written
    fetch.verified = verified
    if error is not None:
        fetch.error = error
    fetch._advance()


async def _collect(
    mirror: Mirror,
    fetch: UpstreamFetch,
    start: int,
    end: int,
    into: list[tuple[int, int]],
    failed: list[BaseException],
) -> None:
    try:
        async for region in mirror.regions(fetch, start, end):
            into.append(region)
    except VerificationError as exc:
        failed.append(exc)


async def test_regions_follow_the_download_and_hold_the_last_byte_until_verified(
    mirror: Mirror, tmp_path: Path, nursery: trio.Nursery
) -> None:
    fetch = _fetch(tmp_path, 10)
    got: list[tuple[int, int]] = []
    failed: list[BaseException] = []
    done = trio.Event()

    async def reader() -> None:
        await _collect(mirror, fetch, 2, 10, got, failed)
        done.set()

    nursery.start_soon(reader)
    await trio.testing.wait_all_tasks_blocked()
    assert got == []
    _arrive(fetch, written=4)
    await trio.testing.wait_all_tasks_blocked()
    assert got == [(2, 2)]
    _arrive(fetch, written=10)  # all here, not yet checked: all but the last byte
    await trio.testing.wait_all_tasks_blocked()
    assert got == [(2, 2), (4, 5)] and not done.is_set()
    _arrive(fetch, verified=True)
    with trio.fail_after(5):
        await done.wait()
    assert got == [(2, 2), (4, 5), (9, 1)] and failed == []


async def test_a_wrong_blob_ends_the_regions_with_the_download_error(
    mirror: Mirror, tmp_path: Path, nursery: trio.Nursery
) -> None:
    fetch = _fetch(tmp_path, 10)
    got: list[tuple[int, int]] = []
    failed: list[BaseException] = []
    nursery.start_soon(_collect, mirror, fetch, 0, 10, got, failed)
    _arrive(fetch, written=10)
    await trio.testing.wait_all_tasks_blocked()
    wrong = VerificationError(f"upstream bytes of {DIGEST} do not match that digest")
    _arrive(fetch, error=wrong)
    await trio.testing.wait_all_tasks_blocked()
    assert got == [(0, 9)], "the last byte went out before the digest matched"
    assert failed == [wrong]


async def test_wait_readable_raises_a_failure_before_the_first_byte(mirror: Mirror, tmp_path: Path) -> None:
    fetch = _fetch(tmp_path, 10)
    _arrive(fetch, written=4, error=OriginError("upstream went away"))
    await mirror.wait_readable(fetch, 0, 10)  # bytes from 0 are readable: the body starts, then is cut
    with pytest.raises(OriginError):
        await mirror.wait_readable(fetch, 5, 10)
