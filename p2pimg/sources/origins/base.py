"""The origin interface: keyed objects with ranged, parallel reads; and how a backend reads the
stream a blob is written from."""

from __future__ import annotations

import abc
import datetime
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import BinaryIO

from p2pimg.errors import OriginError

BlobReader = Callable[[], BinaryIO]
"""Opens a fresh stream of a blob's bytes (publish may read a source twice)."""


@dataclass(frozen=True)
class ObjectInfo:
    """An object of a listing, and when the store says it was written: seconds since the epoch
    by the store's clock (a file's mtime, S3's LastModified, Storj's creation time; for S3 and
    Storj multipart uploads, when the upload began, which is why such an upload also writes a
    completion stamp: see `multipart`)."""

    key: str
    modified: float


def iso_seconds(text: str | None) -> float | None:
    """A store's ISO 8601 timestamp (UTC when it names no zone) in seconds since the epoch."""
    try:
        when = datetime.datetime.fromisoformat((text or "").strip())
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=datetime.UTC)).timestamp()


class Origin(abc.ABC):
    """Where published images live. Reads of disjoint ranges may run concurrently.

    `segment_size` is the backend's natural unit: spans of a read plan never cross it, so that
    parallel ranged reads land on different segments (on Storj, different storage nodes).
    """

    url: str
    segment_size: int = 64 << 20
    preferred_span: int = 16 << 20  # bytes per ranged read: parallel enough, few enough requests

    @abc.abstractmethod
    def read_range(self, key: str, offset: int, length: int) -> AsyncIterator[bytes]:
        """Stream bytes [offset, offset+length) of an object, in pieces of any size.

        Raises OriginNotFound if there is no such object, OriginError on failures.
        """

    @abc.abstractmethod
    def read_head(self, key: str, length: int) -> AsyncIterator[bytes]:
        """Stream the first `length` bytes of an object, or all of it if it is shorter: a read
        ahead of a blob whose size is not known yet (`sources.readahead`). Errors as `read_range`.
        """

    @abc.abstractmethod
    async def get(self, key: str, *, max_size: int) -> bytes:
        """A whole small object (block, tag record), refusing anything above `max_size`."""

    @abc.abstractmethod
    async def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    async def put_bytes(self, key: str, data: bytes) -> None:
        """Write a small object atomically (readers see the old or the new, never a part)."""

    @abc.abstractmethod
    async def put_blob(self, key: str, open_reader: BlobReader, size: int) -> None:
        """Write a large object from a stream, atomically, in segment-sized parts."""

    # Methods annotated with `list[...]` come before `list`: after it, the name means the method.
    @abc.abstractmethod
    async def list_info(self, prefix: str) -> list[ObjectInfo]:
        """`list`, with when each object was written (garbage collection spares young objects)."""

    @abc.abstractmethod
    async def list(self, prefix: str) -> list[str]:
        """Keys below `prefix` (which ends with '/'), sorted."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Remove an object; removing one that is not there is not an error."""

    def prepare(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Make now, in the trio run that will use them, what the first request would otherwise
        make on its critical path (an HTTP client and its TLS context: tens of milliseconds)."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release connections or handles."""


# -- reading a blob's source --------------------------------------------------------------------
#
# Blocking (run them in a worker thread). A source's failures are reported as the upload's, the
# same way on every backend, so that publish shows one clear error rather than a traceback.


def open_source(open_reader: BlobReader, key: str, url: str) -> BinaryIO:
    try:
        return open_reader()
    except OSError as exc:
        raise OriginError(f"cannot write {key} to {url}: cannot open its source: {exc}") from None


def read_source(src: BinaryIO, length: int, key: str, url: str) -> bytes:
    """Up to `length` (> 0) bytes of a source, at least one."""
    try:
        piece = src.read(length)
    except OSError as exc:
        raise OriginError(f"cannot write {key} to {url}: reading its source: {exc}") from None
    if not piece:
        raise OriginError(f"source for {key} ended early")
    return piece


def read_exactly(src: BinaryIO, length: int, key: str, url: str) -> bytes:
    """Exactly `length` (> 0) bytes of a source: a file returns them at once; a short read of a
    pipe-like stream is gathered here."""
    data = read_source(src, length, key, url)
    if len(data) == length:
        return data
    pieces, have = [data], len(data)
    while have < length:
        piece = read_source(src, length - have, key, url)
        pieces.append(piece)
        have += len(piece)
    return b"".join(pieces)
