"""`storj://BUCKET[/PREFIX]`: an origin on Storj, through the native uplink library.

The binding is the `storj-uplink` package, imported lazily so that p2pimg works without it; what
p2pimg calls in libuplink itself, and why (the wrapper's bugs), is in `storj_native`. Every call
into it blocks on the network, so each one runs in a worker thread.

Blobs larger than one segment go up as resumable multipart uploads (`multipart.upload_multipart`,
through libuplink's multipart functions): one part per 64 MiB segment, each tagged with the SHA-256
of its bytes as its ETag, so that a later attempt finds the pending upload, keeps the parts that
match its source and sends only the rest.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlsplit

import trio

from p2pimg.errors import InvalidInput, OriginError, OriginNotFound
from p2pimg.sources.origins.base import BlobReader, ObjectInfo, Origin, open_source, read_source
from p2pimg.sources.origins.multipart import (
    MultipartBackend,
    Part,
    StoredPart,
    UploadStats,
    completion_key,
    part_count,
    upload_multipart,
)
from p2pimg.sources.origins.storj_native import (
    ERROR_BUCKET_NOT_FOUND,
    ERROR_OBJECT_NOT_FOUND,
    NativeBucket,
    ProjectFactory,
    is_null_object,
    load_wrapper,
    native_error,
    native_project_factory,
)

__all__ = ["StorjOrigin", "parse_storj_url"]

_T = TypeVar("_T")

_PIECE = 1 << 20  # bytes per native read or write: bounds memory per call, keeps cancellation prompt

# S3's limit on parts per upload (Storj satellites have a configured limit too); a blob needing more
# goes up as a single upload.
_MAX_PARTS = 10_000
_PARALLEL_PARTS = 2  # parts uploaded at once: memory stays at this many parts

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_COMPONENT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


def parse_storj_url(url: str) -> tuple[str, str]:
    """`storj://BUCKET[/PREFIX]` -> (bucket, prefix without slashes at either end)."""
    parts = urlsplit(url)
    if parts.scheme != "storj":
        raise InvalidInput(f"not a storj:// URL: {url!r}")
    if parts.query or parts.fragment or "@" in parts.netloc or ":" in parts.netloc:
        raise InvalidInput(
            f"storj origin URL takes only a bucket and a prefix: {url!r} "
            "(the access grant comes from STORJ_ACCESS)"
        )
    return parts.netloc, parts.path.strip("/")


class StorjOrigin(Origin):
    # Storj splits objects into 64 MiB segments, each erasure-coded onto its own set of nodes
    # (libuplink does the splitting); spans aligned to them read from different nodes.
    segment_size = 64 << 20
    # Blobs larger than this go up as multipart uploads, in parts of exactly this size: one
    # segment each. (Tests lower it on an instance to exercise many parts cheaply.)
    part_size = segment_size

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        access: str | None = None,
        project_factory: ProjectFactory | None = None,
    ) -> None:
        if not _BUCKET_RE.match(bucket) or ".." in bucket:
            raise InvalidInput(
                f"invalid Storj bucket name {bucket!r}: 3-63 lowercase letters, digits, dots and hyphens"
            )
        if prefix:
            self._check_components(prefix, what="prefix")
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"storj://{bucket}/{prefix}" if prefix else f"storj://{bucket}"
        self._wrapper = load_wrapper()
        self._native = NativeBucket(self._wrapper, bucket)
        if project_factory is None:
            project_factory = native_project_factory(
                self._wrapper, access if access is not None else os.environ.get("STORJ_ACCESS")
            )
        self._open_project = project_factory
        self._project: Any = None
        self._project_lock = trio.Lock()
        self.stats = UploadStats()

    @classmethod
    def from_url(cls, url: str) -> StorjOrigin:
        bucket, prefix = parse_storj_url(url)
        return cls(bucket, prefix)

    # -- keys ------------------------------------------------------------------------------------

    @staticmethod
    def _check_components(path: str, *, what: str) -> None:
        if not all(_COMPONENT_RE.match(c) for c in path.split("/")):
            raise InvalidInput(f"invalid origin {what} {path[:100]!r}")

    def _path(self, key: str) -> str:
        # Keys come from validated names, tags, digests and CIDs; this is the last line.
        self._check_components(key, what="key")
        return f"{self.prefix}/{key}" if self.prefix else key

    # -- calling the wrapper ---------------------------------------------------------------------

    async def _project_handle(self) -> Any:
        async with self._project_lock:
            if self._project is None:
                try:
                    self._project = await trio.to_thread.run_sync(self._open_project)
                except Exception as exc:
                    raise self._error(exc, "open the Storj project for", None) from None
            return self._project

    def _error(self, exc: BaseException, what: str, key: str | None, *, reading: bool = True) -> OriginError:
        code, message = native_error(exc)
        if code == ERROR_OBJECT_NOT_FOUND and key is not None and reading:
            return OriginNotFound(f"origin has no {key}")
        if code == ERROR_BUCKET_NOT_FOUND:
            return OriginError(
                f"Storj bucket {self.bucket!r} does not exist (create it with "
                f"`uplink mb sj://{self.bucket}` or in the Storj console)"
            )
        target = f"{key} on {self.url}" if key is not None else self.url
        return OriginError(f"cannot {what} {target}: {message}")

    async def _call(self, what: str, key: str | None, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await trio.to_thread.run_sync(fn, *args)
        except Exception as exc:
            raise self._error(exc, what, key) from None

    async def _call_write(self, what: str, key: str, fn: Callable[..., _T], *args: Any) -> _T:
        """`_call` for the multipart path: 'object not found' there is a failure, not a missing key."""
        try:
            return await trio.to_thread.run_sync(fn, *args)
        except OriginError:
            raise
        except Exception as exc:
            raise self._error(exc, what, key, reading=False) from None

    async def _quietly(self, fn: Callable[..., Any], *args: Any) -> None:
        """Release a native handle whatever happens around us (cancellation included)."""
        # Errors are dropped: this runs after success or after the error worth reporting.
        with trio.CancelScope(shield=True), contextlib.suppress(Exception):
            await trio.to_thread.run_sync(fn, *args)

    # -- reads -----------------------------------------------------------------------------------

    async def _pieces(
        self, project: Any, key: str, offset: int, length: int, download: Any = None, *, shorter: bool = False
    ) -> AsyncGenerator[bytes, None]:
        """Bytes [offset, offset+length) of `key`, from `download` if given (open at `offset`);
        fewer if `shorter` and the object ends before (libuplink ends a longer range there)."""
        pos, end = offset, offset + length
        try:
            if download is None:
                options = self._wrapper.classes.DownloadOptions(offset, length)
                download = await self._call(
                    "read", key, project.download_object, self.bucket, self._path(key), options
                )
            buf = ctypes.create_string_buffer(min(_PIECE, length))
            stalls = 0
            while pos < end:
                data, eof = await self._call(
                    "read", key, self._native.read, download, buf, min(_PIECE, end - pos)
                )
                pos += len(data)
                if data:
                    stalls = 0
                    yield data
                elif not eof:
                    stalls += 1  # io.Reader allows (0, nil); a reader that only says that is stuck
                if pos < end and eof and shorter:
                    return
                if pos < end and (eof or stalls > 3):
                    raise OriginError(
                        f"{key} on {self.url} is shorter than expected (ends at byte {pos}, before {end})"
                    )
        finally:
            if download is not None:
                await self._quietly(self._native.release, "download", download)

    def read_range(self, key: str, offset: int, length: int) -> AsyncIterator[bytes]:
        return self._read(key, offset, length, shorter=False)

    def read_head(self, key: str, length: int) -> AsyncIterator[bytes]:
        return self._read(key, 0, length, shorter=True)

    async def _read(self, key: str, offset: int, length: int, *, shorter: bool) -> AsyncIterator[bytes]:
        project = await self._project_handle()
        if length <= 0:
            if not await self.exists(key):
                raise OriginNotFound(f"origin has no {key}")
            return
        # aclosing: a consumer that stops early closes this generator, which must close the
        # inner one (and with it the native download) now, not whenever it is collected.
        pieces = self._pieces(project, key, offset, length, shorter=shorter)
        async with contextlib.aclosing(pieces):
            async for piece in pieces:
                yield piece

    async def get(self, key: str, *, max_size: int) -> bytes:
        project = await self._project_handle()
        # One round trip: open the whole object, learn its size from the download itself.
        download = await self._call("read", key, project.download_object, self.bucket, self._path(key))
        try:
            info = await self._call("read", key, download.info)
            size = int(info.system.content_length)
        except BaseException:
            await self._quietly(self._native.release, "download", download)
            raise
        if size > max_size:
            await self._quietly(self._native.release, "download", download)
            raise OriginError(f"{key} on {self.url} exceeds {max_size} bytes")
        if size == 0:
            await self._quietly(self._native.release, "download", download)
            return b""
        async with contextlib.aclosing(self._pieces(project, key, 0, size, download)) as pieces:
            return b"".join([piece async for piece in pieces])

    async def _stat_size(self, key: str) -> int | None:
        path = self._path(key)
        project = await self._project_handle()
        try:
            obj = await trio.to_thread.run_sync(project.stat_object, self.bucket, path)
        except Exception as exc:
            error = self._error(exc, "look up", key)
            if isinstance(error, OriginNotFound):
                return None
            raise error from None
        return int(obj.system.content_length)

    async def exists(self, key: str) -> bool:
        return await self._stat_size(key) is not None

    # -- writes ----------------------------------------------------------------------------------

    async def _upload(self, key: str, fill: bytes | BlobReader, size: int) -> None:
        project = await self._project_handle()
        # Nothing is visible under the key until commit(); abort() drops the pending object.
        upload = await self._call("write", key, project.upload_object, self.bucket, self._path(key))
        committed = False
        try:
            if isinstance(fill, bytes):
                for start in range(0, len(fill), _PIECE):
                    await self._call("write", key, self._native.write, upload, fill[start : start + _PIECE])
            else:
                await self._pump(key, upload, fill, size)
            await self._call("write", key, upload.commit)
            committed = True
        finally:
            if not committed:
                await self._quietly(upload.abort)
            await self._quietly(self._native.release, "upload", upload)

    async def _pump(self, key: str, upload: Any, open_reader: BlobReader, size: int) -> None:
        src = await trio.to_thread.run_sync(open_source, open_reader, key, self.url)
        try:
            remaining = size
            while remaining:
                piece = await trio.to_thread.run_sync(read_source, src, min(_PIECE, remaining), key, self.url)
                await self._call("write", key, self._native.write, upload, piece)
                remaining -= len(piece)
        finally:
            with trio.CancelScope(shield=True):  # a cancelled task could not start the thread
                await trio.to_thread.run_sync(src.close)

    async def put_bytes(self, key: str, data: bytes) -> None:
        await self._upload(key, data, len(data))

    async def put_blob(self, key: str, open_reader: BlobReader, size: int) -> None:
        # A blob already there is not sent again.
        if await self._stat_size(key) == size:
            return
        part_size = self.part_size
        if size <= part_size or part_count(size, part_size) > _MAX_PARTS:
            await self._upload(key, open_reader, size)
            self.stats.parts_uploaded += 1
            self.stats.bytes_uploaded += size
        else:
            project = await self._project_handle()
            await upload_multipart(
                _StorjUpload(self, project, key, size),
                open_reader,
                size,
                part_size,
                key=key,
                url=self.url,
                parallel=_PARALLEL_PARTS,
                stats=self.stats,
            )

    async def delete(self, key: str) -> None:
        path = self._path(key)
        project = await self._project_handle()
        try:
            await trio.to_thread.run_sync(project.delete_object, self.bucket, path)
        except Exception as exc:
            if is_null_object(exc):
                return  # deleted, or never there: libuplink returns no object in both cases
            error = self._error(exc, "delete", key)
            if not isinstance(error, OriginNotFound):
                raise error from None

    # -- listing ---------------------------------------------------------------------------------

    async def list_info(self, prefix: str) -> list[ObjectInfo]:
        listed = await self._listing(prefix, system=True)
        # A listing with system metadata gives every object its creation time; none (0, or Go's
        # zero time) would mean the contract changed, and an unknown age must not look old.
        if undated := [key for key, created in listed if created <= 0]:
            raise OriginError(f"listing {prefix} on {self.url} gave no creation time for {undated[0]!r}")
        return [ObjectInfo(key, float(created)) for key, created in listed]

    async def _listing(self, prefix: str, *, system: bool) -> list[tuple[str, int]]:
        if not prefix.endswith("/"):
            raise InvalidInput(f"origin list prefix must end with '/': {prefix[:100]!r}")
        full = self._path(prefix.rstrip("/")) + "/"
        project = await self._project_handle()
        listed = await self._call(
            "list", prefix, partial(self._native.list_objects, system=system), project, full
        )
        # libuplink returns whole keys (the listing prefix included); anything else would mean
        # its contract changed, and guessing would risk answering with the wrong keys.
        if stray := [k for k, _created in listed if not k.startswith(full)]:
            raise OriginError(
                f"listing {full} on storj://{self.bucket} returned {stray[0]!r}, which is outside the prefix"
            )
        strip = len(self.prefix) + 1 if self.prefix else 0
        return sorted((k[strip:], created) for k, created in listed)

    async def list(self, prefix: str) -> list[str]:
        return [key for key, _created in await self._listing(prefix, system=False)]

    async def aclose(self) -> None:
        async with self._project_lock:
            project, self._project = self._project, None
        if project is not None:
            await self._quietly(project.close)


class _StorjUpload(MultipartBackend):
    """One key's multipart upload through libuplink, for `upload_multipart`.

    Each part is tagged with the SHA-256 of its bytes as its ETag. A part that fails on its way
    is aborted, so that none of its segments stay in the upload; the next attempt sends it again.
    Storj commits every part an upload holds, in part number order: there is no list of parts to
    commit as in S3.
    """

    commits_every_part = True

    def __init__(self, origin: StorjOrigin, project: Any, key: str, size: int) -> None:
        self.origin, self.project, self.key, self.size = origin, project, key, size
        self.path = origin._path(key)
        self.native = origin._native

    async def _call(self, what: str, fn: Callable[..., _T], *args: Any) -> _T:
        return await self.origin._call_write(what, self.key, fn, *args)

    async def find(self) -> tuple[str, dict[int, StoredPart]] | None:
        what = "look for an upload to resume of"
        uploads = await self._call(what, self.native.list_uploads, self.project, self.path)
        if not uploads:
            return None
        # The newest; of uploads started in the same second, the one listed last (max keeps the first).
        upload_id = max(reversed(uploads), key=lambda upload: upload[0])[1]
        parts = await self._call(what, self.native.list_parts, self.project, self.path, upload_id)
        if parts is None:
            return None  # committed or aborted meanwhile
        return upload_id, {number: StoredPart(size, etag) for number, (size, etag) in parts.items()}

    async def begin(self) -> str:
        return await self._call("start an upload of", self.native.begin_upload, self.project, self.path)

    def etag_of(self, data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    async def send(self, upload_id: str, part: Part, data: bytes, etag: str) -> str:
        what = f"write part {part.number} of"
        lib = self.project.uplink.m_libuplink
        result = await self._call(
            what, self.native.begin_part, self.project, self.path, upload_id, part.number
        )
        committed = False
        try:
            for start in range(0, len(data), _PIECE):
                await self._call(
                    what,
                    self.native.write_all,
                    lib,
                    "uplink_part_upload_write",
                    result.part_upload,
                    data[start : start + _PIECE],
                )
            await self._call(what, self.native.commit_part, lib, result.part_upload, etag)
            committed = True
        finally:
            if not committed:
                # Its one segment is committed with the part, so nothing of it stays in the upload;
                # the next attempt sends it again.
                await self.origin._quietly(self.native.abort_part, lib, result.part_upload)
            await self.origin._quietly(self.native.free_part, lib, result)
        return etag

    async def stamp_completion(self) -> None:
        await self.origin.put_bytes(completion_key(self.key), b"")

    async def complete(self, upload_id: str, etags: dict[int, str]) -> None:
        stored = await self._call(
            "commit the upload of", self.native.commit_upload, self.project, self.path, upload_id
        )
        if stored != self.size:
            raise OriginError(
                f"{self.key} on {self.origin.url} has {stored} bytes after upload, expected {self.size}"
            )

    async def abort(self, upload_id: str) -> None:
        await self._call("abort an upload of", self.native.abort_upload, self.project, self.path, upload_id)
