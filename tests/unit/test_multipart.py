"""The resumable-multipart planner and the loop S3 and Storj share, against an in-memory backend:
which parts are kept or sent again, in what order, with how much in memory, and what is left for
the next attempt when one fails or is cancelled."""

from __future__ import annotations

import hashlib
import io
import random
from typing import BinaryIO

import pytest
import trio

from p2pimg.errors import OriginError
from p2pimg.sources.origins.multipart import (
    MultipartBackend,
    Part,
    PartPlan,
    StoredPart,
    UploadStats,
    part_count,
    same_etag,
    upload_multipart,
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the plan --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "part_size", "lengths"),
    [
        (10, 4, [4, 4, 2]),
        (8, 4, [4, 4]),
        (1, 4, [1]),
        (5, 1, [1, 1, 1, 1, 1]),
    ],
)
def test_parts_cover_the_blob_in_order(size: int, part_size: int, lengths: list[int]) -> None:
    plan = PartPlan(size, part_size)
    assert [p.length for p in plan.parts] == lengths
    assert [p.number for p in plan.parts] == list(range(1, len(lengths) + 1))
    assert [p.offset for p in plan.parts] == [sum(lengths[:i]) for i in range(len(lengths))]
    assert part_count(size, part_size) == len(lengths)


@pytest.mark.parametrize(("size", "part_size"), [(0, 4), (4, 0), (-1, 4)])
def test_plan_needs_bytes_and_a_part_size(size: int, part_size: int) -> None:
    with pytest.raises(ValueError):
        PartPlan(size, part_size)


@pytest.mark.parametrize(
    ("stored", "strays"),
    [
        ({}, []),
        ({1: 4, 2: 4, 3: 2}, []),
        ({3: 1}, []),  # smaller than planned: sending part 3 again replaces it
        ({0: 4}, [0]),  # a plain upload's segments
        ({1: 4, 4: 1}, [4]),  # past the last part
        ({1: 5}, [1]),  # larger than planned: another part size
        ({3: 3, 0: 1, 9: 4}, [0, 3, 9]),
    ],
)
def test_strays(stored: dict[int, int], strays: list[int]) -> None:
    plan = PartPlan(10, 4, {n: StoredPart(size, "x") for n, size in stored.items()})
    assert plan.strays == strays


def test_keep_checks_size_and_etag() -> None:
    plan = PartPlan(10, 4, {1: StoredPart(4, '"ABCD"'), 2: StoredPart(4, "beef"), 3: StoredPart(1, "cafe")})
    one, two, three = plan.parts
    assert plan.keep(one, "abcd")  # quoted and in capitals, as S3 and some gateways list them
    assert not plan.keep(two, "bee")
    assert not plan.keep(three, "cafe")  # the right ETag, but not the planned length
    assert not plan.keep(Part(4, 12, 4), "abcd")
    assert same_etag('"00ff"', "00FF") and not same_etag("00ff", "00fe")


def test_completion_needs_every_part_and_keeps_stored_etags_verbatim() -> None:
    plan = PartPlan(10, 4, {2: StoredPart(4, '"bb"')})
    one, two, three = plan.parts
    plan.sent(three, "cc")
    assert plan.keep(two, "bb")
    with pytest.raises(OriginError, match=r"without parts \[1\]"):
        plan.completion()
    plan.sent(one, "aa")
    completion = plan.completion()
    assert completion == {1: "aa", 2: '"bb"', 3: "cc"} and list(completion) == [1, 2, 3]


# -- the loop --------------------------------------------------------------------------------------


class Store(MultipartBackend):
    """An in-memory store of pending uploads, with parts keyed by SHA-256 like Storj's."""

    def __init__(self, *, commits_every_part: bool = False, delay: float = 0.0) -> None:
        self.commits_every_part = commits_every_part
        self.delay = delay
        self.uploads: dict[str, dict[int, tuple[bytes, str]]] = {}
        self.completed: dict[str, bytes] = {}
        self.aborted: list[str] = []
        self.sent: list[int] = []
        self.sending = self.peak = 0
        self.fail_part: int | None = None
        self.stamps = 0

    def add(self, parts: dict[int, bytes]) -> str:
        upload_id = f"u{len(self.uploads) + 1}"
        self.uploads[upload_id] = {n: (data, sha(data)) for n, data in parts.items()}
        return upload_id

    async def find(self) -> tuple[str, dict[int, StoredPart]] | None:
        if not self.uploads:
            return None
        upload_id = list(self.uploads)[-1]
        parts = self.uploads[upload_id]
        return upload_id, {n: StoredPart(len(data), etag) for n, (data, etag) in parts.items()}

    async def begin(self) -> str:
        return self.add({})

    def etag_of(self, data: bytes) -> str:
        return sha(data)

    async def send(self, upload_id: str, part: Part, data: bytes, etag: str) -> str:
        self.sending += 1
        self.peak = max(self.peak, self.sending)
        try:
            await trio.sleep(self.delay)
            if part.number == self.fail_part:
                raise OriginError(f"part {part.number} refused")
            self.uploads[upload_id][part.number] = (data, etag)
            self.sent.append(part.number)
            return etag
        finally:
            self.sending -= 1

    async def stamp_completion(self) -> None:
        self.stamps += 1

    async def complete(self, upload_id: str, etags: dict[int, str]) -> None:
        assert self.stamps == len(self.completed) + 1, "the stamp comes right before the completion"
        parts = self.uploads.pop(upload_id)
        assert all(parts[n][1] == etag for n, etag in etags.items())
        self.completed[upload_id] = b"".join(parts[n][0] for n in sorted(etags))

    async def abort(self, upload_id: str) -> None:
        del self.uploads[upload_id]
        self.aborted.append(upload_id)


class Source(io.BytesIO):
    """A blob's source that counts reads in flight, fails at an offset, and knows it was closed."""

    def __init__(self, data: bytes, fail_at: int | None = None) -> None:
        super().__init__(data)
        self.fail_at = fail_at
        self.was_closed = False

    def read(self, n: int | None = -1) -> bytes:
        if self.fail_at is not None and self.tell() + (n or 0) > self.fail_at:
            raise OSError(5, "Input/output error")
        return super().read(n)

    def close(self) -> None:
        self.was_closed = True
        super().close()


BLOB = random.Random(7).randbytes(10_000)
PART = 1000


async def upload(store: Store, source: Source, *, parallel: int = 2, size: int = len(BLOB)) -> UploadStats:
    stats = UploadStats()

    def open_reader() -> BinaryIO:
        return source

    await upload_multipart(
        store, open_reader, size, PART, key="k", url="mem://", parallel=parallel, stats=stats
    )
    return stats


async def test_fresh_upload_sends_every_part() -> None:
    store = Store()
    source = Source(BLOB)
    stats = await upload(store, source)
    assert list(store.completed.values()) == [BLOB] and not store.uploads
    assert sorted(store.sent) == list(range(1, 11))
    assert (stats.parts_uploaded, stats.parts_reused, stats.bytes_uploaded) == (10, 0, len(BLOB))
    assert source.was_closed


async def test_resume_keeps_matching_parts_and_sends_the_rest() -> None:
    store = Store()
    stale = BLOB[2 * PART : 3 * PART][::-1]  # part 3 holds other bytes
    upload_id = store.add({1: BLOB[:PART], 3: stale, 5: BLOB[4 * PART : 5 * PART]})
    stats = await upload(store, Source(BLOB))
    assert store.completed == {upload_id: BLOB} and not store.aborted
    assert sorted(store.sent) == [2, 3, 4, 6, 7, 8, 9, 10]
    assert (stats.parts_uploaded, stats.parts_reused) == (8, 2)
    assert stats.bytes_uploaded == len(BLOB) - 2 * PART


@pytest.mark.parametrize("commits_every_part", [True, False])
async def test_an_upload_that_does_not_fit(commits_every_part: bool) -> None:
    """Storj would commit a stray part into the object: that upload is aborted and begun again.
    S3 completes with the list of parts, which leaves the stray out: it is resumed."""
    store = Store(commits_every_part=commits_every_part)
    stray = store.add({1: BLOB[:PART], 11: b"x"})
    stats = await upload(store, Source(BLOB))
    if commits_every_part:
        assert store.aborted == [stray] and stats.parts_reused == 0 and len(store.sent) == 10
        assert list(store.completed.values()) == [BLOB]
    else:
        assert not store.aborted and stats.parts_reused == 1 and store.completed == {stray: BLOB}


async def test_source_failure_lets_parts_on_their_way_through() -> None:
    store = Store(delay=0.05)
    # Reading part 4 fails while parts 2 and 3 are still being sent.
    with pytest.raises(OriginError, match="^cannot write k to mem://: reading its source: .*Input/output"):
        await upload(store, Source(BLOB, fail_at=3 * PART + 1))
    [(upload_id, parts)] = store.uploads.items()
    assert sorted(parts) == [1, 2, 3] and not store.completed and not store.aborted
    # The next attempt keeps them.
    stats = await upload(store, Source(BLOB))
    assert store.completed == {upload_id: BLOB}
    assert stats.parts_reused == 3 and sorted(store.sent[3:]) == list(range(4, 11))


async def test_short_source() -> None:
    store = Store()
    with pytest.raises(OriginError, match="^source for k ended early$"):
        await upload(store, Source(BLOB[:-1]))
    assert not store.completed


async def test_a_failed_part_fails_the_upload_and_leaves_it_pending() -> None:
    store = Store(delay=0.01)
    store.fail_part = 5
    with pytest.raises(OriginError, match="^part 5 refused$"):
        await upload(store, Source(BLOB))
    [parts] = store.uploads.values()
    assert 5 not in parts and {1, 2, 3, 4} <= set(parts) and not store.completed


@pytest.mark.parametrize("parallel", [1, 2, 3])
async def test_memory_is_bounded_by_parallel_parts(parallel: int) -> None:
    store = Store(delay=0.01)
    reads_ahead = 0
    peak_ahead = 0

    class Counting(Source):
        def read(self, n: int | None = -1) -> bytes:
            nonlocal reads_ahead, peak_ahead
            reads_ahead += 1
            peak_ahead = max(peak_ahead, reads_ahead)
            return super().read(n)

    real_send = store.send

    async def send(upload_id: str, part: Part, data: bytes, etag: str) -> str:
        nonlocal reads_ahead
        try:
            return await real_send(upload_id, part, data, etag)
        finally:
            reads_ahead -= 1

    store.send = send  # type: ignore[method-assign]
    await upload(store, Counting(BLOB), parallel=parallel)
    assert peak_ahead == parallel and store.peak == parallel
    assert list(store.completed.values()) == [BLOB]


async def test_cancelled_upload_stays_pending_and_the_source_is_closed() -> None:
    store = Store(delay=10)
    source = Source(BLOB)
    with trio.move_on_after(0.1) as scope:
        await upload(store, source)
    assert scope.cancelled_caught
    assert len(store.uploads) == 1 and not store.aborted and not store.completed
    assert source.was_closed
