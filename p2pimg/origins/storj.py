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
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import os
import platform
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import trio

from ..errors import InvalidInput, OriginError, OriginNotFound
from .base import BlobReader, Origin

ProjectFactory = Callable[[], Any]
"""Opens an uplink `Project` (blocking: it is called in a worker thread)."""

_PIECE = 1 << 20  # bytes per native read or write: bounds memory per call, keeps cancellation prompt

# uplink-c error codes, as `storj_uplink.errors` spells them (the contract tests check they agree).
_ERROR_BUCKET_NOT_FOUND = 0x13
_ERROR_OBJECT_NOT_FOUND = 0x21
_EOF = -1  # uplink-c reports io.EOF as C's EOF, with no message

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


class StorjOrigin(Origin):
    # Storj splits objects into 64 MiB segments, each erasure-coded onto its own set of nodes
    # (libuplink does the splitting); spans aligned to them read from different nodes.
    segment_size = 64 << 20

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

    def _error(self, exc: BaseException, what: str, key: str | None) -> OriginError:
        code, message = _native_error(exc)
        if code == _ERROR_OBJECT_NOT_FOUND and key is not None:
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

    def _release(self, kind: str, handle: Any) -> None:
        """Close a download or drop an upload, then free it in libuplink (blocking).

        The wrapper never frees these; without it each one stays in libuplink's handle table.
        """
        try:
            if kind == "download":
                handle.close()
        finally:
            defs = self._wrapper.defs
            result_t = defs._DownloadResult if kind == "download" else defs._UploadResult
            free = _declare(getattr(handle.uplink.m_libuplink, f"uplink_free_{kind}_result"),
                            [result_t], None)
            free(result_t(**{kind: getattr(handle, kind)}))

    async def _quietly(self, fn: Callable[..., Any], *args: Any) -> None:
        """Release a native handle whatever happens around us (cancellation included)."""
        # Errors are dropped: this runs after success or after the error worth reporting.
        with trio.CancelScope(shield=True), contextlib.suppress(Exception):
            await trio.to_thread.run_sync(fn, *args)

    # -- reads -----------------------------------------------------------------------------------

    def _read_native(self, download: Any, buf: Any, size: int) -> tuple[bytes, bool]:
        """Up to `size` bytes and whether the stream ended (blocking), bypassing `Download.read`."""
        defs = self._wrapper.defs
        lib = download.uplink.m_libuplink
        read = _declare(lib.uplink_download_read, [ctypes.POINTER(defs._DownloadStruct),
                                                   ctypes.POINTER(ctypes.c_uint8), ctypes.c_size_t],
                        defs._ReadResult)
        free = _declare(lib.uplink_free_read_result, [defs._ReadResult], None)
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
        defs = self._wrapper.defs
        lib = upload.uplink.m_libuplink
        write = _declare(lib.uplink_upload_write, [ctypes.POINTER(defs._UploadStruct),
                                                   ctypes.POINTER(ctypes.c_uint8), ctypes.c_size_t],
                         defs._WriteResult)
        free = _declare(lib.uplink_free_write_result, [defs._WriteResult], None)
        view, done = memoryview(data), 0
        while done < len(data):
            rest = bytes(view[done:]) if done else data
            buf = ctypes.cast(ctypes.c_char_p(rest), ctypes.POINTER(ctypes.c_uint8))
            result = write(upload.upload, buf, len(rest))
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
        # storj-uplink exposes no multipart upload (libuplink has it, the wrapper does not bind
        # it), so an interrupted upload starts over; a blob already there is not sent again.
        if await self._stat_size(key) == size:
            return
        await self._upload(key, open_reader, size)

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
        ptr = ctypes.POINTER
        iterator_t, object_t, error_t = (ptr(defs._ObjectIterator), ptr(defs._ObjectStruct),
                                         ptr(defs._Error))
        list_objects = _declare(lib.uplink_list_objects, [ptr(defs._ProjectStruct), ctypes.c_char_p,
                                                          ptr(defs._ListObjectsOptionsStruct)], iterator_t)
        next_ = _declare(lib.uplink_object_iterator_next, [iterator_t], ctypes.c_bool)
        item_ = _declare(lib.uplink_object_iterator_item, [iterator_t], object_t)
        err_ = _declare(lib.uplink_object_iterator_err, [iterator_t], error_t)
        free_iterator = _declare(lib.uplink_free_object_iterator, [iterator_t], None)
        free_object = _declare(lib.uplink_free_object, [object_t], None)
        free_error = _declare(lib.uplink_free_error, [error_t], None)

        options = defs._ListObjectsOptionsStruct(prefix.encode(), b"", True, False, False)
        iterator = list_objects(project.project, self.bucket.encode(), ctypes.byref(options))
        if not iterator:
            raise _NativeError(None, "libuplink returned no object iterator")
        try:
            keys = []
            while next_(iterator):
                item = item_(iterator)
                if not item:
                    raise _NativeError(None, "libuplink returned no object from its iterator")
                try:
                    if not item.contents.is_prefix:
                        keys.append(item.contents.key.decode("utf-8"))
                finally:
                    free_object(item)
            # Only now does the iterator know whether the listing stopped early.
            error = err_(iterator)
            if error:
                try:
                    raise _c_error(error.contents)
                finally:
                    free_error(error)
            return keys
        finally:
            free_iterator(iterator)

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
