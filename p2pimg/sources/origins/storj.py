"""`storj://BUCKET[/PREFIX]`: an origin on Storj, through the native uplink library.

The binding is the `storj-uplink` package (module `storj_uplink`): uplink-python's ctypes classes
over a bundled libuplink.so (uplink-c, x86_64 only). It is imported lazily so that p2pimg works
without it. Every call into it blocks on the network, so each one runs in a worker thread.

storj-uplink 0.2.0 has bugs that this adapter works around:

- `Upload.write` never passes the data: it hands ctypes the POINTER *type* instead of a buffer
  (upload.py:71), so every write raises `ctypes.ArgumentError`, and it drops the native error
  instead of raising it (upload.py:80-82). Writes here call libuplink's `uplink_upload_write`
  themselves, with the wrapper's own ctypes declarations.
- `Project.list_objects` reads the iterator's error *before* iterating (project.py:328) and never
  after, so a listing that fails (no network, no permission, no bucket) comes back as an empty or
  truncated list. Listing here drives the native iterator and checks its error at the end.
- Error codes the wrapper does not know (EOF, limits, edge errors...) make `_storj_exception`
  raise `TypeError` instead of a `StorjException` (errors.py:202 calls `StorjException(details=)`,
  whose `__init__` also wants `message` and `code`); the code and message survive only in that
  frame, where they are read back. Anything not recognised maps to `OriginError`.
- `Download.read` raises whenever libuplink returns an error, even when the same call returned
  bytes (download.py:88-90), and Go readers may return the last bytes together with io.EOF; the
  EOF itself comes without a message and makes it raise `AttributeError`. Reads here call
  `uplink_download_read` themselves and keep the bytes that come with an EOF.
- `Download.read_file` ignores the download's range (it loops over the whole object's size,
  download.py:122); it is never used.
- `Project.delete_object` raises `ValueError` (NULL pointer access) when libuplink reports no
  deleted object, which it does for a missing object or an access grant that cannot read.
- Nothing is ever freed: `Download.close` only closes, so each download (and each upload) stays
  in libuplink's handle table with its context never cancelled. Finished downloads and uploads
  are released here with `uplink_free_download_result` / `uplink_free_upload_result`. (The small
  C results of stat/info/delete still leak: the wrapper keeps no pointer to free them with.)
- It binds none of libuplink's multipart upload functions. Blobs larger than one segment are sent
  here as resumable multipart uploads through them directly (`_put_multipart`): one part per
  64 MiB segment, each tagged with the SHA-256 of its bytes as its ETag, so that a later attempt
  finds the pending upload, keeps the parts that match its source and sends only the rest.

Every native function called directly is declared once, in `_signatures`, with the C signatures
of uplink-c's exported functions and the layouts of `uplink_definitions.h` (uplink-c built with
storj.io/uplink v1.13.1, as bundled); structures the wrapper defines are the wrapper's own.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib
import logging
import os
import platform
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar
from urllib.parse import urlsplit

import trio

from p2pimg.errors import InvalidInput, OriginError, OriginNotFound
from p2pimg.sources.origins.base import BlobReader, Origin
from p2pimg.tasks import first_failure_nursery

log = logging.getLogger(__name__)
_T = TypeVar("_T")

ProjectFactory = Callable[[], Any]
"""Opens an uplink `Project` (blocking: it is called in a worker thread)."""

_PIECE = 1 << 20  # bytes per native read or write: bounds memory per call, keeps cancellation prompt

# uplink-c error codes, as `storj_uplink.errors` spells them (the contract tests check they agree).
_ERROR_BUCKET_NOT_FOUND = 0x13
_ERROR_OBJECT_NOT_FOUND = 0x21
_EOF = -1  # uplink-c reports io.EOF as C's EOF, with no message

# S3's limit on parts per upload (Storj satellites have a configured limit too); a blob needing more
# goes up as a single upload.
_MAX_PARTS = 10_000
_PARALLEL_PARTS = 2  # parts uploaded at once: memory stays at this many parts

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_COMPONENT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")

_ACCESS_HELP = (
    "storj:// origins need an access grant in the STORJ_ACCESS environment variable: create one in "
    "the Storj console (Access Keys -> New Access Key -> Access Grant) or with `uplink access create`, then "
    "`export STORJ_ACCESS=<grant>`. The bucket must exist: create it in the console or with "
    "`uplink mb sj://BUCKET`."
)
_S3_HINT = (
    "s3:// through Storj's S3-compatible gateway (gateway.storjshare.io, with S3 credentials "
    "from the console or `uplink share --register`) works on every platform"
)


@dataclass(frozen=True)
class _Wrapper:
    """The parts of storj_uplink this adapter uses, typed as Any at the boundary."""

    classes: Any  # storj_uplink.module_classes: DownloadOptions, ...
    defs: Any  # storj_uplink.module_def: the ctypes structures libuplink takes and returns
    errors: Any  # storj_uplink.errors
    uplink: Any  # storj_uplink.uplink: Uplink (loads libuplink.so)


def load_wrapper() -> _Wrapper:
    """Import storj_uplink, or say exactly what is missing."""
    try:
        return _Wrapper(*(importlib.import_module(f"storj_uplink.{name}")
                          for name in ("module_classes", "module_def", "errors", "uplink")))
    except ImportError as exc:
        raise InvalidInput(
            f"storj:// needs the storj-uplink package, which is not installed ({exc}). Install it "
            "with `pip install 'p2pimg[storj]'` (it bundles libuplink for x86_64 Linux only); "
            f"elsewhere, {_S3_HINT}."
        ) from None


def _native_project_factory(wrapper: _Wrapper, grant: str | None) -> ProjectFactory:
    """Load libuplink and parse the grant now (local, fast: errors show at startup); open later."""
    if not grant:
        raise InvalidInput(_ACCESS_HELP)
    try:
        uplink = wrapper.uplink.Uplink()
    except Exception as exc:  # OSError from ctypes (wrong ELF class, ...), LibUplinkSoError
        raise InvalidInput(
            "storj:// needs the native uplink library bundled with storj-uplink (libuplink.so), "
            f"which cannot be loaded on this machine ({platform.system()} {platform.machine()}): "
            f"{_first_line(getattr(exc, 'details', None) or exc)}. storj-uplink ships it for "
            f"x86_64 Linux only; elsewhere, {_S3_HINT}."
        ) from None
    try:
        access = uplink.parse_access(grant)
    except Exception as exc:
        raise InvalidInput(
            f"STORJ_ACCESS does not hold a usable access grant ({_native_error(exc)[1]}). "
            + _ACCESS_HELP
        ) from None
    return lambda: access.open_project()


def _first_line(text: object) -> str:
    # libuplink messages are Go's "%+v": the message, then a stack trace, one frame a line.
    return str(text).strip().split("\n", 1)[0]


def _native_error(exc: BaseException) -> tuple[int | None, str]:
    """(code, message) of a failed uplink call, however the wrapper delivered it."""
    if isinstance(exc, _NativeError):
        return exc.code, exc.details
    code = getattr(exc, "code", None)
    if isinstance(code, int) and hasattr(exc, "details"):  # a StorjException
        return code, _first_line(exc.details)
    # A code the wrapper does not know makes _storj_exception raise TypeError while building its
    # exception; the code and libuplink's message are still in that frame.
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "_storj_exception" and "code" in frame.f_locals:
            found = frame.f_locals["code"]
            return (found if isinstance(found, int) else None), _first_line(frame.f_locals.get("details"))
        tb = tb.tb_next
    return None, f"storj-uplink failed: {type(exc).__name__}: {exc}"


def _declare(fn: Any, argtypes: list[Any], restype: Any) -> Any:
    """Declare a libuplink function's C signature before calling it.

    The wrapper assigns the same declarations before each of its own calls (on the shared CDLL
    function objects), so doing it here per call is consistent with it from any thread.
    """
    fn.argtypes = argtypes
    fn.restype = restype
    return fn


def _structure(name: str, fields: list[tuple[str, Any]]) -> Any:
    return type(name, (ctypes.Structure,), {"_fields_": fields})


@dataclass(frozen=True)
class _MultipartTypes:
    """uplink-c's multipart structures, which storj-uplink does not define.

    Laid out as `uplink_definitions.h` has them; where one nests a structure the wrapper defines
    (error, metadata, object), it is the wrapper's, so that functions shared with the wrapper and
    with the other paths here (`uplink_free_error`) keep a single declaration.
    """

    part_upload: Any  # UplinkPartUpload
    upload_iterator: Any  # UplinkUploadIterator
    part_iterator: Any  # UplinkPartIterator
    upload_info: Any  # UplinkUploadInfo
    part: Any  # UplinkPart
    list_uploads_options: Any  # UplinkListUploadsOptions
    list_upload_parts_options: Any  # UplinkListUploadPartsOptions
    commit_upload_options: Any  # UplinkCommitUploadOptions
    upload_info_result: Any  # UplinkUploadInfoResult
    part_upload_result: Any  # UplinkPartUploadResult
    commit_upload_result: Any  # UplinkCommitUploadResult


@functools.cache
def _multipart_types(defs: Any) -> _MultipartTypes:
    ptr, handle = ctypes.POINTER, [("_handle", ctypes.c_size_t)]
    error_p = ptr(defs._Error)
    upload_info = _structure("UplinkUploadInfo", [
        ("upload_id", ctypes.c_char_p), ("key", ctypes.c_char_p), ("is_prefix", ctypes.c_bool),
        ("system", defs._SystemMetadataStruct), ("custom", defs._CustomMetadataStruct)])
    part = _structure("UplinkPart", [
        ("part_number", ctypes.c_uint32), ("size", ctypes.c_size_t), ("modified", ctypes.c_int64),
        # char * with a length: read as a pointer (c_char_p would stop at a NUL byte).
        ("etag", ptr(ctypes.c_char)), ("etag_length", ctypes.c_size_t)])
    part_upload = _structure("UplinkPartUpload", handle)
    return _MultipartTypes(
        part_upload=part_upload,
        upload_iterator=_structure("UplinkUploadIterator", handle),
        part_iterator=_structure("UplinkPartIterator", handle),
        upload_info=upload_info,
        part=part,
        list_uploads_options=_structure("UplinkListUploadsOptions", [
            ("prefix", ctypes.c_char_p), ("cursor", ctypes.c_char_p), ("recursive", ctypes.c_bool),
            ("system", ctypes.c_bool), ("custom", ctypes.c_bool)]),
        list_upload_parts_options=_structure("UplinkListUploadPartsOptions", [("cursor", ctypes.c_uint32)]),
        commit_upload_options=_structure("UplinkCommitUploadOptions",
                                         [("custom_metadata", defs._CustomMetadataStruct)]),
        upload_info_result=_structure("UplinkUploadInfoResult",
                                      [("info", ptr(upload_info)), ("error", error_p)]),
        part_upload_result=_structure("UplinkPartUploadResult",
                                      [("part_upload", ptr(part_upload)), ("error", error_p)]),
        commit_upload_result=_structure("UplinkCommitUploadResult",
                                        [("object", ptr(defs._ObjectStruct)), ("error", error_p)]),
    )


@functools.cache
def _signatures(defs: Any) -> dict[str, tuple[list[Any], Any]]:
    """(argtypes, restype) of every libuplink function this module calls itself, by name."""
    t = _multipart_types(defs)
    ptr, char_p, size_t = ctypes.POINTER, ctypes.c_char_p, ctypes.c_size_t
    project, error, data = ptr(defs._ProjectStruct), ptr(defs._Error), ptr(ctypes.c_uint8)
    part_upload, uploads, parts = ptr(t.part_upload), ptr(t.upload_iterator), ptr(t.part_iterator)
    objects = ptr(defs._ObjectIterator)
    return {
        # download.go, upload.go
        "uplink_download_read": ([ptr(defs._DownloadStruct), data, size_t], defs._ReadResult),
        "uplink_upload_write": ([ptr(defs._UploadStruct), data, size_t], defs._WriteResult),
        "uplink_free_read_result": ([defs._ReadResult], None),
        "uplink_free_write_result": ([defs._WriteResult], None),
        "uplink_free_download_result": ([defs._DownloadResult], None),
        "uplink_free_upload_result": ([defs._UploadResult], None),
        # objects.go, object.go, error.go
        "uplink_list_objects": ([project, char_p, ptr(defs._ListObjectsOptionsStruct)], objects),
        "uplink_object_iterator_next": ([objects], ctypes.c_bool),
        "uplink_object_iterator_item": ([objects], ptr(defs._ObjectStruct)),
        "uplink_object_iterator_err": ([objects], error),
        "uplink_free_object_iterator": ([objects], None),
        "uplink_free_object": ([ptr(defs._ObjectStruct)], None),
        "uplink_free_error": ([error], None),
        # multipart.go: (project, bucket, key[, upload_id], ...)
        "uplink_begin_upload": ([project, char_p, char_p, ptr(defs._UploadOptionsStruct)],
                                t.upload_info_result),
        "uplink_free_upload_info_result": ([t.upload_info_result], None),
        "uplink_commit_upload": ([project, char_p, char_p, char_p, ptr(t.commit_upload_options)],
                                 t.commit_upload_result),
        "uplink_free_commit_upload_result": ([t.commit_upload_result], None),
        "uplink_abort_upload": ([project, char_p, char_p, char_p], error),
        "uplink_upload_part": ([project, char_p, char_p, char_p, ctypes.c_uint32], t.part_upload_result),
        "uplink_part_upload_write": ([part_upload, data, size_t], defs._WriteResult),
        "uplink_part_upload_set_etag": ([part_upload, char_p], error),
        "uplink_part_upload_commit": ([part_upload], error),
        "uplink_part_upload_abort": ([part_upload], error),
        "uplink_free_part_upload_result": ([t.part_upload_result], None),
        "uplink_list_uploads": ([project, char_p, ptr(t.list_uploads_options)], uploads),
        "uplink_upload_iterator_next": ([uploads], ctypes.c_bool),
        "uplink_upload_iterator_item": ([uploads], ptr(t.upload_info)),
        "uplink_upload_iterator_err": ([uploads], error),
        "uplink_free_upload_iterator": ([uploads], None),
        "uplink_free_upload_info": ([ptr(t.upload_info)], None),
        "uplink_list_upload_parts": ([project, char_p, char_p, char_p, ptr(t.list_upload_parts_options)],
                                     parts),
        "uplink_part_iterator_next": ([parts], ctypes.c_bool),
        "uplink_part_iterator_item": ([parts], ptr(t.part)),
        "uplink_part_iterator_err": ([parts], error),
        "uplink_free_part_iterator": ([parts], None),
        "uplink_free_part": ([ptr(t.part)], None),
    }


# The functions that walk each kind of libuplink iterator: next, item, err, free it, free an item.
_ITERATORS = {
    "object": ("uplink_object_iterator_next", "uplink_object_iterator_item", "uplink_object_iterator_err",
               "uplink_free_object_iterator", "uplink_free_object"),
    "upload": ("uplink_upload_iterator_next", "uplink_upload_iterator_item", "uplink_upload_iterator_err",
               "uplink_free_upload_iterator", "uplink_free_upload_info"),
    "part": ("uplink_part_iterator_next", "uplink_part_iterator_item", "uplink_part_iterator_err",
             "uplink_free_part_iterator", "uplink_free_part"),
}


def _c_error(err: Any) -> _NativeError:
    message = err.message.decode("utf-8", "replace") if err.message else ""
    return _NativeError(int(err.code), _first_line(message))


def _is_null_object(exc: BaseException) -> bool:
    return isinstance(exc, ValueError) and "NULL pointer" in str(exc)


def parse_storj_url(url: str) -> tuple[str, str]:
    """`storj://BUCKET[/PREFIX]` -> (bucket, prefix without slashes at either end)."""
    parts = urlsplit(url)
    if parts.scheme != "storj":
        raise InvalidInput(f"not a storj:// URL: {url!r}")
    if parts.query or parts.fragment or "@" in parts.netloc or ":" in parts.netloc:
        raise InvalidInput(f"storj origin URL takes only a bucket and a prefix: {url!r} "
                           "(the access grant comes from STORJ_ACCESS)")
    return parts.netloc, parts.path.strip("/")


@dataclass
class UploadStats:
    """What this origin's blob uploads did (resumes show up as parts_reused)."""

    parts_uploaded: int = 0
    parts_reused: int = 0
    bytes_uploaded: int = 0


class StorjOrigin(Origin):
    # Storj splits objects into 64 MiB segments, each erasure-coded onto its own set of nodes
    # (libuplink does the splitting); spans aligned to them read from different nodes.
    segment_size = 64 << 20
    # Blobs larger than this go up as multipart uploads, in parts of exactly this size: one
    # segment each. (Tests lower it on an instance to exercise many parts cheaply.)
    part_size = segment_size

    def __init__(self, bucket: str, prefix: str = "", *, access: str | None = None,
                 project_factory: ProjectFactory | None = None) -> None:
        if not _BUCKET_RE.match(bucket) or ".." in bucket:
            raise InvalidInput(f"invalid Storj bucket name {bucket!r}: 3-63 lowercase letters, "
                               "digits, dots and hyphens")
        if prefix:
            self._check_components(prefix, what="prefix")
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"storj://{bucket}/{prefix}" if prefix else f"storj://{bucket}"
        self._wrapper = load_wrapper()
        if project_factory is None:
            project_factory = _native_project_factory(
                self._wrapper, access if access is not None else os.environ.get("STORJ_ACCESS"))
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

    def _error(self, exc: BaseException, what: str, key: str | None, *,
               reading: bool = True) -> OriginError:
        code, message = _native_error(exc)
        if code == _ERROR_OBJECT_NOT_FOUND and key is not None and reading:
            return OriginNotFound(f"origin has no {key}")
        if code == _ERROR_BUCKET_NOT_FOUND:
            return OriginError(f"Storj bucket {self.bucket!r} does not exist (create it with "
                               f"`uplink mb sj://{self.bucket}` or in the Storj console)")
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

    def _fn(self, lib: Any, name: str) -> Any:
        """A libuplink function, declared as `_signatures` has it."""
        argtypes, restype = _signatures(self._wrapper.defs)[name]
        return _declare(getattr(lib, name), argtypes, restype)

    def _check(self, lib: Any, error: Any) -> None:
        """Raise (and free) the `UplinkError *` a libuplink function returned, if any."""
        if error:
            try:
                raise _c_error(error.contents)
            finally:
                self._fn(lib, "uplink_free_error")(error)

    def _drain(self, lib: Any, kind: str, iterator: Any, read: Callable[[Any], _T | None]) -> list[_T]:
        """What `read` makes of each item of a libuplink iterator (blocking), then the iterator's
        error, which only the end of the iteration tells; frees the items and the iterator."""
        next_, item_, err_, free_iterator, free_item = (self._fn(lib, name) for name in _ITERATORS[kind])
        if not iterator:
            raise _NativeError(None, f"libuplink returned no {kind} iterator")
        try:
            values = []
            while next_(iterator):
                item = item_(iterator)
                if not item:
                    raise _NativeError(None, f"libuplink returned no {kind} from its iterator")
                try:
                    value = read(item.contents)
                finally:
                    free_item(item)
                if value is not None:
                    values.append(value)
            self._check(lib, err_(iterator))
            return values
        finally:
            free_iterator(iterator)

    def _release(self, kind: str, handle: Any) -> None:
        """Close a download or drop an upload, then free it in libuplink (blocking).

        The wrapper never frees these; without it each one stays in libuplink's handle table.
        """
        try:
            if kind == "download":
                handle.close()
        finally:
            defs, lib = self._wrapper.defs, handle.uplink.m_libuplink
            if kind == "download":
                self._fn(lib, "uplink_free_download_result")(defs._DownloadResult(download=handle.download))
            else:
                self._fn(lib, "uplink_free_upload_result")(defs._UploadResult(upload=handle.upload))

    async def _quietly(self, fn: Callable[..., Any], *args: Any) -> None:
        """Release a native handle whatever happens around us (cancellation included)."""
        # Errors are dropped: this runs after success or after the error worth reporting.
        with trio.CancelScope(shield=True), contextlib.suppress(Exception):
            await trio.to_thread.run_sync(fn, *args)

    # -- reads -----------------------------------------------------------------------------------

    def _read_native(self, download: Any, buf: Any, size: int) -> tuple[bytes, bool]:
        """Up to `size` bytes and whether the stream ended (blocking), bypassing `Download.read`."""
        lib = download.uplink.m_libuplink
        read, free = self._fn(lib, "uplink_download_read"), self._fn(lib, "uplink_free_read_result")
        result = read(download.download, ctypes.cast(buf, ctypes.POINTER(ctypes.c_uint8)), size)
        try:
            n = int(result.bytes_read)
            data = ctypes.string_at(buf, n) if n else b""
            if result.error:
                # io.EOF is the one error libuplink sends without a message.
                if result.error.contents.code == _EOF or not result.error.contents.message:
                    return data, True
                raise _c_error(result.error.contents)
            return data, False
        finally:
            free(result)

    async def _pieces(self, project: Any, key: str, offset: int, length: int,
                      download: Any = None) -> AsyncGenerator[bytes, None]:
        """Bytes [offset, offset+length) of `key`, from `download` if given (open at `offset`)."""
        pos, end = offset, offset + length
        try:
            if download is None:
                options = self._wrapper.classes.DownloadOptions(offset, length)
                download = await self._call("read", key, project.download_object,
                                            self.bucket, self._path(key), options)
            buf = ctypes.create_string_buffer(min(_PIECE, length))
            stalls = 0
            while pos < end:
                data, eof = await self._call("read", key, self._read_native, download, buf,
                                             min(_PIECE, end - pos))
                pos += len(data)
                if data:
                    stalls = 0
                    yield data
                elif not eof:
                    stalls += 1  # io.Reader allows (0, nil); a reader that only says that is stuck
                if pos < end and (eof or stalls > 3):
                    raise OriginError(f"{key} on {self.url} is shorter than expected "
                                      f"(ends at byte {pos}, before {end})")
        finally:
            if download is not None:
                await self._quietly(self._release, "download", download)

    async def read_range(self, key: str, offset: int, length: int) -> AsyncIterator[bytes]:
        project = await self._project_handle()
        if length <= 0:
            if not await self.exists(key):
                raise OriginNotFound(f"origin has no {key}")
            return
        # aclosing: a consumer that stops early closes this generator, which must close the
        # inner one (and with it the native download) now, not whenever it is collected.
        async with contextlib.aclosing(self._pieces(project, key, offset, length)) as pieces:
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
            await self._quietly(self._release, "download", download)
            raise
        if size > max_size:
            await self._quietly(self._release, "download", download)
            raise OriginError(f"{key} on {self.url} exceeds {max_size} bytes")
        if size == 0:
            await self._quietly(self._release, "download", download)
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

    def _write_native(self, upload: Any, data: bytes) -> None:
        """Write all of `data` to an upload (blocking), bypassing the broken `Upload.write`."""
        self._write_all(upload.uplink.m_libuplink, "uplink_upload_write", upload.upload, data)

    def _write_all(self, lib: Any, function: str, handle: Any, data: bytes) -> None:
        """Write all of `data` with uplink_upload_write or uplink_part_upload_write (blocking)."""
        write, free = self._fn(lib, function), self._fn(lib, "uplink_free_write_result")
        view, done = memoryview(data), 0
        while done < len(data):
            rest = bytes(view[done:]) if done else data
            buf = ctypes.cast(ctypes.c_char_p(rest), ctypes.POINTER(ctypes.c_uint8))
            result = write(handle, buf, len(rest))
            try:
                written = int(result.bytes_written)
                if result.error:
                    raise _c_error(result.error.contents)
            finally:
                free(result)
            if written <= 0:
                raise _NativeError(None, "libuplink accepted no bytes")
            done += written

    async def _upload(self, key: str, fill: bytes | BlobReader, size: int) -> None:
        project = await self._project_handle()
        # Nothing is visible under the key until commit(); abort() drops the pending object.
        upload = await self._call("write", key, project.upload_object, self.bucket, self._path(key))
        committed = False
        try:
            if isinstance(fill, bytes):
                for start in range(0, len(fill), _PIECE):
                    await self._call("write", key, self._write_native, upload,
                                     fill[start:start + _PIECE])
            else:
                await self._pump(key, upload, fill, size)
            await self._call("write", key, upload.commit)
            committed = True
        finally:
            if not committed:
                await self._quietly(upload.abort)
            await self._quietly(self._release, "upload", upload)

    async def _pump(self, key: str, upload: Any, open_reader: BlobReader, size: int) -> None:
        try:
            src = await trio.to_thread.run_sync(open_reader)
        except OSError as exc:
            raise OriginError(f"cannot write {key} to {self.url}: cannot open its source: {exc}") from None
        try:
            remaining = size
            while remaining:
                try:
                    piece = await trio.to_thread.run_sync(src.read, min(_PIECE, remaining))
                except OSError as exc:
                    raise OriginError(f"cannot write {key} to {self.url}: reading its source: "
                                      f"{exc}") from None
                if not piece:
                    raise OriginError(f"source for {key} ended early")
                await self._call("write", key, self._write_native, upload, piece)
                remaining -= len(piece)
        finally:
            src.close()  # not in a thread: a cancelled task could not start one, and this is quick

    async def put_bytes(self, key: str, data: bytes) -> None:
        await self._upload(key, data, len(data))

    async def put_blob(self, key: str, open_reader: BlobReader, size: int) -> None:
        # A blob already there is not sent again.
        if await self._stat_size(key) == size:
            return
        part_size = self.part_size
        if size <= part_size or -(-size // part_size) > _MAX_PARTS:
            await self._upload(key, open_reader, size)
            self.stats.parts_uploaded += 1
            self.stats.bytes_uploaded += size
        else:
            await self._put_multipart(key, open_reader, size, part_size)

    # -- multipart uploads -----------------------------------------------------------------------
    #
    # A multipart upload stays pending, invisible to readers, until committed; its parts stay
    # with it. Nothing here aborts it on failure or cancellation: the next attempt looks for it,
    # keeps each part whose size and ETag (the SHA-256 of its bytes, set when it was sent) match
    # its source, sends the others and commits. Storj commits every part of the upload, in part
    # number order: there is no list of parts to commit as in S3.

    async def _put_multipart(self, key: str, open_reader: BlobReader, size: int, part_size: int) -> None:
        path = self._path(key)
        count = -(-size // part_size)
        project = await self._project_handle()
        found = await self._find_upload(project, key, path, size, part_size)
        have: dict[int, tuple[int, str]] = {}
        if found is None:
            upload_id = await self._call_write("start an upload of", key, self._begin_upload_native,
                                               project, path)
        else:
            upload_id, have = found
            log.info("resuming upload of %s: %d parts already in %s", key, len(have), self.url)
        slots = trio.Semaphore(_PARALLEL_PARTS)
        source_error: OriginError | None = None

        async def send(number: int, data: bytes, digest: str) -> None:
            try:
                await self._send_part(project, key, path, upload_id, number, data, digest)
            finally:
                slots.release()

        src = await self._open_source(key, open_reader)
        try:
            async with first_failure_nursery() as nursery:
                for number in range(1, count + 1):
                    length = min(part_size, size - (number - 1) * part_size)
                    # A slot is taken before reading, so at most `_PARALLEL_PARTS` parts are in memory.
                    await slots.acquire()
                    try:
                        data, digest = await trio.to_thread.run_sync(self._read_part, key, src, length)
                    except OriginError as exc:
                        # Parts already on their way are let through: the next attempt keeps them.
                        slots.release()
                        source_error = exc
                        break
                    if have.get(number) == (length, digest):
                        self.stats.parts_reused += 1
                        slots.release()
                        continue
                    nursery.start_soon(send, number, data, digest)
                    del data  # the part's memory now belongs to its upload task alone
        finally:
            src.close()  # not in a thread: a cancelled task could not start one, and this is quick
        if source_error is not None:
            raise source_error
        stored = await self._call_write("commit the upload of", key, self._commit_upload_native,
                                        project, path, upload_id)
        if stored != size:
            raise OriginError(f"{key} on {self.url} has {stored} bytes after upload, expected {size}")

    async def _find_upload(self, project: Any, key: str, path: str, size: int,
                           part_size: int) -> tuple[str, dict[int, tuple[int, str]]] | None:
        """The newest pending upload of exactly this key and its parts, if it can be resumed."""
        what = "look for an upload to resume of"
        uploads = await self._call_write(what, key, self._list_uploads_native, project, path)
        if not uploads:
            return None
        # The newest; of uploads started in the same second, the one listed last (max keeps the first).
        upload_id = max(reversed(uploads), key=lambda upload: upload[0])[1]
        parts = await self._call_write(what, key, self._list_parts_native, project, path, upload_id)
        if parts is None:
            return None  # committed or aborted meanwhile
        count = -(-size // part_size)
        if any(not 1 <= number <= count or have > min(part_size, size - (number - 1) * part_size)
               for number, (have, _etag) in parts.items()):
            # Parts of another size, or a plain upload (part 0). Sending a part again replaces its
            # segments one by one, so one too large (more segments) or out of range would be kept.
            log.info("aborting an upload of %s in %s that does not fit: parts %s", key, self.url,
                     sorted(parts))
            with contextlib.suppress(OriginError):
                await self._call_write("abort an upload of", key, self._abort_upload_native,
                                       project, path, upload_id)
            return None
        return upload_id, parts

    async def _open_source(self, key: str, open_reader: BlobReader) -> BinaryIO:
        try:
            return await trio.to_thread.run_sync(open_reader)
        except OSError as exc:
            raise OriginError(f"cannot write {key} to {self.url}: cannot open its source: {exc}") from None

    def _read_part(self, key: str, src: BinaryIO, length: int) -> tuple[bytes, str]:
        """Exactly `length` bytes of a source and the hex SHA-256 of them (blocking)."""
        pieces, have = [], 0
        while have < length:
            try:
                piece = src.read(length - have)
            except OSError as exc:
                raise OriginError(f"cannot write {key} to {self.url}: reading its source: {exc}") from None
            if not piece:
                raise OriginError(f"source for {key} ended early")
            pieces.append(piece)
            have += len(piece)
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        return data, hashlib.sha256(data).hexdigest()

    async def _send_part(self, project: Any, key: str, path: str, upload_id: str, number: int,
                         data: bytes, digest: str) -> None:
        what = f"write part {number} of"
        lib = project.uplink.m_libuplink
        result = await self._call_write(what, key, self._begin_part_native, project, path, upload_id, number)
        committed = False
        try:
            for start in range(0, len(data), _PIECE):
                await self._call_write(what, key, self._write_all, lib, "uplink_part_upload_write",
                                       result.part_upload, data[start:start + _PIECE])
            await self._call_write(what, key, self._commit_part_native, lib, result.part_upload, digest)
            committed = True
        finally:
            if not committed:
                # Its one segment is committed with the part, so nothing of it stays in the upload;
                # the next attempt sends it again.
                await self._quietly(self._abort_part_native, lib, result.part_upload)
            await self._quietly(self._free_part_native, lib, result)
        self.stats.parts_uploaded += 1
        self.stats.bytes_uploaded += len(data)

    # Blocking calls into libuplink for the multipart path (run them in a worker thread).

    def _begin_upload_native(self, project: Any, path: str) -> str:
        lib = project.uplink.m_libuplink
        result = self._fn(lib, "uplink_begin_upload")(project.project, self.bucket.encode(), path.encode(),
                                                      None)
        try:
            if result.error:
                raise _c_error(result.error.contents)
            if not result.info or not result.info.contents.upload_id:
                raise _NativeError(None, "libuplink began an upload without an upload ID")
            return str(result.info.contents.upload_id.decode("ascii"))
        finally:
            self._fn(lib, "uplink_free_upload_info_result")(result)

    def _list_uploads_native(self, project: Any, path: str) -> list[tuple[int, str]]:
        """(creation time, upload ID) of the pending uploads of exactly `path`."""
        lib = project.uplink.m_libuplink
        # A prefix without a trailing slash lists the pending uploads of exactly that key.
        options = _multipart_types(self._wrapper.defs).list_uploads_options(path.encode(), b"", True, True,
                                                                              False)
        iterator = self._fn(lib, "uplink_list_uploads")(project.project, self.bucket.encode(),
                                                       ctypes.byref(options))

        def upload(info: Any) -> tuple[int, str] | None:
            if info.is_prefix or not info.upload_id or info.key != path.encode():
                return None
            return int(info.system.created), str(info.upload_id.decode("ascii"))

        return self._drain(lib, "upload", iterator, upload)

    def _list_parts_native(self, project: Any, path: str,
                           upload_id: str) -> dict[int, tuple[int, str]] | None:
        """Part number -> (size, ETag) of the parts an upload holds; None if it is gone."""
        lib = project.uplink.m_libuplink
        options = _multipart_types(self._wrapper.defs).list_upload_parts_options(0)
        iterator = self._fn(lib, "uplink_list_upload_parts")(
            project.project, self.bucket.encode(), path.encode(), upload_id.encode(), ctypes.byref(options))

        def part(info: Any) -> tuple[int, int, str]:
            etag = ctypes.string_at(info.etag, info.etag_length) if info.etag else b""
            return int(info.part_number), int(info.size), etag.decode("ascii", "replace")

        try:
            parts = self._drain(lib, "part", iterator, part)
        except _NativeError as exc:
            if exc.code == _ERROR_OBJECT_NOT_FOUND:
                return None
            raise
        return {number: (size, etag) for number, size, etag in parts}

    def _begin_part_native(self, project: Any, path: str, upload_id: str, number: int) -> Any:
        """The `UplinkPartUploadResult` of a new part upload (free it when done with it)."""
        lib = project.uplink.m_libuplink
        result = self._fn(lib, "uplink_upload_part")(project.project, self.bucket.encode(), path.encode(),
                                                     upload_id.encode(), number)
        if result.error or not result.part_upload:
            # On failure uplink-c v1.13 still hands out a handle, with no part upload behind it:
            # any call on it but the free would crash the process.
            error = (_c_error(result.error.contents) if result.error
                     else _NativeError(None, "libuplink returned no part upload"))
            self._free_part_native(lib, result)
            raise error
        return result

    def _commit_part_native(self, lib: Any, part_upload: Any, digest: str) -> None:
        # The ETag goes before the commit: libuplink stores it with the part's last segment.
        self._check(lib, self._fn(lib, "uplink_part_upload_set_etag")(part_upload, digest.encode()))
        self._check(lib, self._fn(lib, "uplink_part_upload_commit")(part_upload))

    def _abort_part_native(self, lib: Any, part_upload: Any) -> None:
        self._check(lib, self._fn(lib, "uplink_part_upload_abort")(part_upload))

    def _free_part_native(self, lib: Any, result: Any) -> None:
        self._fn(lib, "uplink_free_part_upload_result")(result)

    def _commit_upload_native(self, project: Any, path: str, upload_id: str) -> int:
        """Commit an upload; the size of the object it made."""
        lib = project.uplink.m_libuplink
        result = self._fn(lib, "uplink_commit_upload")(project.project, self.bucket.encode(), path.encode(),
                                                       upload_id.encode(), None)
        try:
            if result.error:
                raise _c_error(result.error.contents)
            if not result.object:
                raise _NativeError(None, "libuplink committed the upload but returned no object")
            return int(result.object.contents.system.content_length)
        finally:
            self._fn(lib, "uplink_free_commit_upload_result")(result)

    def _abort_upload_native(self, project: Any, path: str, upload_id: str) -> None:
        lib = project.uplink.m_libuplink
        self._check(lib, self._fn(lib, "uplink_abort_upload")(project.project, self.bucket.encode(),
                                                              path.encode(), upload_id.encode()))

    async def delete(self, key: str) -> None:
        path = self._path(key)
        project = await self._project_handle()
        try:
            await trio.to_thread.run_sync(project.delete_object, self.bucket, path)
        except Exception as exc:
            if _is_null_object(exc):
                return  # deleted, or never there: libuplink returns no object in both cases
            error = self._error(exc, "delete", key)
            if not isinstance(error, OriginNotFound):
                raise error from None

    # -- listing ---------------------------------------------------------------------------------

    def _list_native(self, project: Any, prefix: str) -> list[str]:
        """Keys under `prefix` (blocking), with the iterator's error checked after the last item."""
        defs = self._wrapper.defs
        lib = project.uplink.m_libuplink
        options = defs._ListObjectsOptionsStruct(prefix.encode(), b"", True, False, False)
        iterator = self._fn(lib, "uplink_list_objects")(project.project, self.bucket.encode(),
                                                       ctypes.byref(options))

        def key(obj: Any) -> str | None:
            return None if obj.is_prefix else str(obj.key.decode("utf-8"))

        return self._drain(lib, "object", iterator, key)

    async def list(self, prefix: str) -> list[str]:
        if not prefix.endswith("/"):
            raise InvalidInput(f"origin list prefix must end with '/': {prefix[:100]!r}")
        full = self._path(prefix.rstrip("/")) + "/"
        project = await self._project_handle()
        keys = await self._call("list", prefix, self._list_native, project, full)
        # libuplink returns whole keys (the listing prefix included); anything else would mean
        # its contract changed, and guessing would risk answering with the wrong keys.
        if stray := [k for k in keys if not k.startswith(full)]:
            raise OriginError(f"listing {full} on storj://{self.bucket} returned {stray[0]!r}, "
                              "which is outside the prefix")
        strip = len(self.prefix) + 1 if self.prefix else 0
        return sorted(k[strip:] for k in keys)

    async def aclose(self) -> None:
        async with self._project_lock:
            project, self._project = self._project, None
        if project is not None:
            await self._quietly(project.close)


class _NativeError(Exception):
    """An error read straight from libuplink (on the paths that bypass the wrapper)."""

    def __init__(self, code: int | None, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
