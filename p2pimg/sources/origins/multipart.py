"""Resumable multipart uploads: one plan and one loop for every backend that has them (S3, Storj).

A blob larger than one part goes up as a multipart upload, which stays pending, invisible to
readers, until it is completed. Nothing here aborts it when an attempt fails or is cancelled: the
parts it holds stay for the next attempt, which finds the upload, keeps each stored part whose
size and ETag match what the source holds now, sends the others and completes.

    PartPlan          pure: the parts a blob is cut into, which stored parts do not fit, and
                      which may be kept, checked against the ETag of the bytes the source has
    MultipartBackend  one object's upload on a backend: find, begin, send a part, complete, abort
    upload_multipart  the loop: reads the source once, front to back, with at most `parallel`
                      parts in memory, and sends what the plan does not keep

Parts go in number order: the source is a stream, read once. A part's ETag is the backend's
digest of its bytes (S3: MD5; Storj: the SHA-256 p2pimg sets as the ETag), so a kept part is
known to hold exactly the bytes that would have been sent.

S3 and Storj date an object completed from a multipart upload by when the upload *began*: an
upload resumed a day after its first attempt, or one that took longer than gc's grace, would come
out looking old the moment it became visible, and `gc` (which spares unreachable objects by age,
since a publish writes its tag last) could delete it before the publish wrote its tag. So right
before completing, the loop writes a small completion stamp, `completion_key(key)`, whose own date
is the completion's (within one request); gc counts such an object's age from the later of the
two dates (`ops.admin`).
"""

from __future__ import annotations

import abc
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import BinaryIO

import trio

from p2pimg.errors import InvalidInput, OriginError, P2pimgError
from p2pimg.sources.origins.base import BlobReader, open_source, read_exactly
from p2pimg.tasks import first_failure_nursery

__all__ = [
    "COMPLETED",
    "MultipartBackend",
    "Part",
    "PartPlan",
    "StoredPart",
    "UploadStats",
    "completion_key",
    "stamped_key",
    "part_count",
    "same_etag",
    "upload_multipart",
]

log = logging.getLogger(__name__)

COMPLETED = "completed"  # `<prefix>/completed/<rest of the key>`: completion stamps


def completion_key(key: str) -> str:
    """Where the completion of a multipart upload of `key` is stamped: the key's first component
    (the origin layout's prefix), then `completed/`, then the rest of it; for
    `p2pimg/blobs/sha256/<hex>`, `p2pimg/completed/blobs/sha256/<hex>` (for a key of one
    component, which the layout never uses, `completed/<key>`)."""
    head, sep, rest = key.partition("/")
    if not sep or not head or not rest:
        return f"{COMPLETED}/{key}"
    return f"{head}/{COMPLETED}/{rest}"


def stamped_key(stamp: str) -> str:
    """The key a completion stamp is about: the inverse of `completion_key`."""
    head, sep, rest = stamp.partition(f"/{COMPLETED}/")
    if not sep or not head or not rest or "/" in head:
        raise InvalidInput(f"not a completion stamp: {stamp[:100]!r}")
    return f"{head}/{rest}"


@dataclass
class UploadStats:
    """What an origin's blob uploads did (resumes show up as parts_reused)."""

    parts_uploaded: int = 0
    parts_reused: int = 0
    bytes_uploaded: int = 0


@dataclass(frozen=True)
class Part:
    """One part of a blob: numbered from 1, as S3 and Storj number them."""

    number: int
    offset: int
    length: int


@dataclass(frozen=True)
class StoredPart:
    """A part as the backend lists it in a pending upload: its size, and its ETag verbatim."""

    size: int
    etag: str


def part_count(size: int, part_size: int) -> int:
    return -(-size // part_size)


def same_etag(stored: str, expected: str) -> bool:
    """Whether a listed ETag is `expected` (hex): S3 lists them quoted, some gateways in capitals."""
    return stored.strip().strip('"').lower() == expected.lower()


class PartPlan:
    """The parts of a `size`-byte blob in `part_size` parts, and the upload's record of them.

    `stored` are the parts a pending upload already holds. The plan says which of them do not fit
    (`strays`), whether a part may be kept rather than sent (`keep`, once its bytes' ETag is
    known), and which ETag completes each part (`completion`).
    """

    def __init__(self, size: int, part_size: int, stored: Mapping[int, StoredPart] | None = None) -> None:
        if size <= 0 or part_size <= 0:
            raise ValueError(f"a multipart upload needs a size and a part size, got {size}, {part_size}")
        self.size = size
        self.part_size = part_size
        self.parts = tuple(
            Part(number, offset, min(part_size, size - offset))
            for number, offset in enumerate(range(0, size, part_size), 1)
        )
        self.stored = dict(stored or {})
        self._etags: dict[int, str] = {}

    @property
    def strays(self) -> list[int]:
        """Stored parts this plan has no place for, by number: past its last part (or part 0, a
        plain upload's segments), or larger than the part planned under their number (another
        part size). A smaller one is not: sending its part again replaces it."""
        return sorted(
            number
            for number, stored in self.stored.items()
            if not 1 <= number <= len(self.parts) or stored.size > self.parts[number - 1].length
        )

    def keep(self, part: Part, etag: str) -> bool:
        """Whether the stored part under `part`'s number holds the bytes whose ETag is `etag`: then it
        is kept for the upload, and the part is not sent."""
        stored = self.stored.get(part.number)
        if stored is None or stored.size != part.length or not same_etag(stored.etag, etag):
            return False
        self._etags[part.number] = stored.etag
        return True

    def sent(self, part: Part, etag: str) -> None:
        """Record the ETag the backend gave `part` when it was sent."""
        self._etags[part.number] = etag

    def completion(self) -> dict[int, str]:
        """Every part's ETag by number, in order, to complete the upload with."""
        missing = [part.number for part in self.parts if part.number not in self._etags]
        if missing:
            raise OriginError(f"cannot complete a multipart upload without parts {missing[:10]}")
        return {part.number: self._etags[part.number] for part in self.parts}


class MultipartBackend(abc.ABC):
    """One object's multipart upload on a backend: the calls `upload_multipart` makes."""

    # Storj: completing an upload commits every part it holds, so one holding parts the plan has
    # no place for cannot be resumed; it is aborted and a new one begun. S3 completes with a list
    # of parts, which leaves the others out.
    commits_every_part = False

    @abc.abstractmethod
    async def find(self) -> tuple[str, dict[int, StoredPart]] | None:
        """The newest pending upload of exactly this object and its parts, if there is one."""

    @abc.abstractmethod
    async def begin(self) -> str:
        """Start an upload; its ID."""

    @abc.abstractmethod
    def etag_of(self, data: bytes) -> str:
        """The ETag (hex) the backend keeps for a part of these bytes (blocking: a worker thread)."""

    @abc.abstractmethod
    async def send(self, upload_id: str, part: Part, data: bytes, etag: str) -> str:
        """Upload one part; the ETag to complete the upload with."""

    @abc.abstractmethod
    async def stamp_completion(self) -> None:
        """Write (or rewrite) the object's completion stamp, `completion_key(key)`: called right
        before `complete`, once every part is stored, so the stamp is dated when the object appears."""

    @abc.abstractmethod
    async def complete(self, upload_id: str, etags: dict[int, str]) -> None:
        """Complete the upload from every part's ETag, in part number order."""

    async def abort(self, upload_id: str) -> None:
        """Drop an upload and its parts (only needed where `commits_every_part`)."""
        raise NotImplementedError


def _read_part(
    src: BinaryIO, part: Part, key: str, url: str, etag_of: Callable[[bytes], str]
) -> tuple[bytes, str]:
    """A part's bytes and their ETag (blocking: hashing is CPU work for the worker thread too)."""
    data = read_exactly(src, part.length, key, url)
    return data, etag_of(data)


async def upload_multipart(
    backend: MultipartBackend,
    open_reader: BlobReader,
    size: int,
    part_size: int,
    *,
    key: str,
    url: str,
    parallel: int,
    stats: UploadStats,
) -> None:
    """Upload `size` bytes from `open_reader` as `key`, resuming a pending upload of it if there is one.

    On failure or cancellation the upload stays pending for the next attempt. A source that fails
    stops the reading, but the parts already on their way are let through: the next attempt keeps
    them. Errors are the first one alone (`first_failure_nursery`).
    """
    found = await backend.find()
    plan = PartPlan(size, part_size, found[1] if found is not None else None)
    if found is not None and plan.strays and backend.commits_every_part:
        log.info("aborting an upload of %s in %s that does not fit: parts %s", key, url, sorted(found[1]))
        with contextlib.suppress(OriginError):
            await backend.abort(found[0])
        found, plan = None, PartPlan(size, part_size)
    if found is None:
        upload_id = await backend.begin()
    else:
        upload_id = found[0]
        log.info("resuming upload of %s: %d parts already in %s", key, len(found[1]), url)

    slots = trio.Semaphore(parallel)
    source_error: P2pimgError | None = None

    async def send(part: Part, data: bytes, etag: str) -> None:
        try:
            plan.sent(part, await backend.send(upload_id, part, data, etag))
            stats.parts_uploaded += 1
            stats.bytes_uploaded += part.length
        finally:
            slots.release()

    src = await trio.to_thread.run_sync(open_source, open_reader, key, url)
    try:
        async with first_failure_nursery() as nursery:
            for part in plan.parts:
                # A slot is taken before reading, so at most `parallel` parts are in memory.
                await slots.acquire()
                try:
                    data, etag = await trio.to_thread.run_sync(
                        _read_part, src, part, key, url, backend.etag_of
                    )
                except P2pimgError as exc:
                    slots.release()
                    source_error = exc
                    break
                if plan.keep(part, etag):
                    stats.parts_reused += 1
                    slots.release()
                    continue
                nursery.start_soon(send, part, data, etag)
                del data  # the part's memory now belongs to its upload task alone
    finally:
        # Shielded: a cancelled task could not start the thread, and the source must be closed.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(src.close)
    if source_error is not None:
        raise source_error
    etags = plan.completion()
    # The stamp first: an object completed without it would be dated by when the upload began.
    await backend.stamp_completion()
    await backend.complete(upload_id, etags)
