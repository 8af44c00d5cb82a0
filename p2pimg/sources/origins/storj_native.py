"""The native side of the Storj origin: storj-uplink (uplink-python's ctypes classes over a bundled
libuplink.so, uplink-c, x86_64 only), loaded lazily, and the calls into libuplink that p2pimg
makes itself. Every call blocks on the network: run each one in a worker thread.

storj-uplink 0.2.0 has bugs that this binding works around:

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
  frame, where they are read back (`native_error`). Anything not recognised maps to `OriginError`.
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
- It binds none of libuplink's multipart upload functions: they are declared and called here,
  for the origin's resumable multipart uploads.

Every native function called directly is declared once, in `signatures`, with the C signatures
of uplink-c's exported functions and the layouts of `uplink_definitions.h` (uplink-c built with
storj.io/uplink v1.13.1, as bundled); structures the wrapper defines are the wrapper's own.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from p2pimg.errors import InvalidInput

_T = TypeVar("_T")

ProjectFactory = Callable[[], Any]
"""Opens an uplink `Project` (blocking: it is called in a worker thread)."""

# uplink-c error codes, as `storj_uplink.errors` spells them (the contract tests check they agree).
ERROR_BUCKET_NOT_FOUND = 0x13
ERROR_OBJECT_NOT_FOUND = 0x21
EOF = -1  # uplink-c reports io.EOF as C's EOF, with no message

ACCESS_HELP = (
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
class Wrapper:
    """The parts of storj_uplink the origin uses, typed as Any at the boundary."""

    classes: Any  # storj_uplink.module_classes: DownloadOptions, ...
    defs: Any  # storj_uplink.module_def: the ctypes structures libuplink takes and returns
    errors: Any  # storj_uplink.errors
    uplink: Any  # storj_uplink.uplink: Uplink (loads libuplink.so)


def load_wrapper() -> Wrapper:
    """Import storj_uplink, or say exactly what is missing."""
    try:
        return Wrapper(
            *(
                importlib.import_module(f"storj_uplink.{name}")
                for name in ("module_classes", "module_def", "errors", "uplink")
            )
        )
    except ImportError as exc:
        raise InvalidInput(
            f"storj:// needs the storj-uplink package, which is not installed ({exc}). Install it "
            "with `pip install 'p2pimg[storj]'` (it bundles libuplink for x86_64 Linux only); "
            f"elsewhere, {_S3_HINT}."
        ) from None


def native_project_factory(wrapper: Wrapper, grant: str | None) -> ProjectFactory:
    """Load libuplink and parse the grant now (local, fast: errors show at startup); open later."""
    if not grant:
        raise InvalidInput(ACCESS_HELP)
    try:
        uplink = wrapper.uplink.Uplink()
    except Exception as exc:  # OSError from ctypes (wrong ELF class, ...), LibUplinkSoError
        raise InvalidInput(
            "storj:// needs the native uplink library bundled with storj-uplink (libuplink.so), "
            f"which cannot be loaded on this machine ({platform.system()} {platform.machine()}): "
            f"{first_line(getattr(exc, 'details', None) or exc)}. storj-uplink ships it for "
            f"x86_64 Linux only; elsewhere, {_S3_HINT}."
        ) from None
    try:
        access = uplink.parse_access(grant)
    except Exception as exc:
        raise InvalidInput(
            f"STORJ_ACCESS does not hold a usable access grant ({native_error(exc)[1]}). " + ACCESS_HELP
        ) from None
    return lambda: access.open_project()


def first_line(text: object) -> str:
    # libuplink messages are Go's "%+v": the message, then a stack trace, one frame a line.
    return str(text).strip().split("\n", 1)[0]


def native_error(exc: BaseException) -> tuple[int | None, str]:
    """(code, message) of a failed uplink call, however the wrapper delivered it."""
    if isinstance(exc, NativeError):
        return exc.code, exc.details
    code = getattr(exc, "code", None)
    if isinstance(code, int) and hasattr(exc, "details"):  # a StorjException
        return code, first_line(exc.details)
    # A code the wrapper does not know makes _storj_exception raise TypeError while building its
    # exception; the code and libuplink's message are still in that frame.
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "_storj_exception" and "code" in frame.f_locals:
            found = frame.f_locals["code"]
            return (found if isinstance(found, int) else None), first_line(frame.f_locals.get("details"))
        tb = tb.tb_next
    return None, f"storj-uplink failed: {type(exc).__name__}: {exc}"


def declare(fn: Any, argtypes: list[Any], restype: Any) -> Any:
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
class MultipartTypes:
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
def multipart_types(defs: Any) -> MultipartTypes:
    ptr, handle = ctypes.POINTER, [("_handle", ctypes.c_size_t)]
    error_p = ptr(defs._Error)
    upload_info = _structure(
        "UplinkUploadInfo",
        [
            ("upload_id", ctypes.c_char_p),
            ("key", ctypes.c_char_p),
            ("is_prefix", ctypes.c_bool),
            ("system", defs._SystemMetadataStruct),
            ("custom", defs._CustomMetadataStruct),
        ],
    )
    part = _structure(
        "UplinkPart",
        [
            ("part_number", ctypes.c_uint32),
            ("size", ctypes.c_size_t),
            ("modified", ctypes.c_int64),
            # char * with a length: read as a pointer (c_char_p would stop at a NUL byte).
            ("etag", ptr(ctypes.c_char)),
            ("etag_length", ctypes.c_size_t),
        ],
    )
    part_upload = _structure("UplinkPartUpload", handle)
    return MultipartTypes(
        part_upload=part_upload,
        upload_iterator=_structure("UplinkUploadIterator", handle),
        part_iterator=_structure("UplinkPartIterator", handle),
        upload_info=upload_info,
        part=part,
        list_uploads_options=_structure(
            "UplinkListUploadsOptions",
            [
                ("prefix", ctypes.c_char_p),
                ("cursor", ctypes.c_char_p),
                ("recursive", ctypes.c_bool),
                ("system", ctypes.c_bool),
                ("custom", ctypes.c_bool),
            ],
        ),
        list_upload_parts_options=_structure("UplinkListUploadPartsOptions", [("cursor", ctypes.c_uint32)]),
        commit_upload_options=_structure(
            "UplinkCommitUploadOptions", [("custom_metadata", defs._CustomMetadataStruct)]
        ),
        upload_info_result=_structure(
            "UplinkUploadInfoResult", [("info", ptr(upload_info)), ("error", error_p)]
        ),
        part_upload_result=_structure(
            "UplinkPartUploadResult", [("part_upload", ptr(part_upload)), ("error", error_p)]
        ),
        commit_upload_result=_structure(
            "UplinkCommitUploadResult", [("object", ptr(defs._ObjectStruct)), ("error", error_p)]
        ),
    )


@functools.cache
def signatures(defs: Any) -> dict[str, tuple[list[Any], Any]]:
    """(argtypes, restype) of every libuplink function this module calls itself, by name."""
    t = multipart_types(defs)
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
        "uplink_begin_upload": (
            [project, char_p, char_p, ptr(defs._UploadOptionsStruct)],
            t.upload_info_result,
        ),
        "uplink_free_upload_info_result": ([t.upload_info_result], None),
        "uplink_commit_upload": (
            [project, char_p, char_p, char_p, ptr(t.commit_upload_options)],
            t.commit_upload_result,
        ),
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
        "uplink_list_upload_parts": (
            [project, char_p, char_p, char_p, ptr(t.list_upload_parts_options)],
            parts,
        ),
        "uplink_part_iterator_next": ([parts], ctypes.c_bool),
        "uplink_part_iterator_item": ([parts], ptr(t.part)),
        "uplink_part_iterator_err": ([parts], error),
        "uplink_free_part_iterator": ([parts], None),
        "uplink_free_part": ([ptr(t.part)], None),
    }


# The functions that walk each kind of libuplink iterator: next, item, err, free it, free an item.
_ITERATORS = {
    "object": (
        "uplink_object_iterator_next",
        "uplink_object_iterator_item",
        "uplink_object_iterator_err",
        "uplink_free_object_iterator",
        "uplink_free_object",
    ),
    "upload": (
        "uplink_upload_iterator_next",
        "uplink_upload_iterator_item",
        "uplink_upload_iterator_err",
        "uplink_free_upload_iterator",
        "uplink_free_upload_info",
    ),
    "part": (
        "uplink_part_iterator_next",
        "uplink_part_iterator_item",
        "uplink_part_iterator_err",
        "uplink_free_part_iterator",
        "uplink_free_part",
    ),
}


def c_error(err: Any) -> NativeError:
    message = err.message.decode("utf-8", "replace") if err.message else ""
    return NativeError(int(err.code), first_line(message))


def is_null_object(exc: BaseException) -> bool:
    return isinstance(exc, ValueError) and "NULL pointer" in str(exc)


class NativeError(Exception):
    """An error read straight from libuplink (on the paths that bypass the wrapper)."""

    def __init__(self, code: int | None, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class NativeBucket:
    """Blocking calls into libuplink for one bucket (run each in a worker thread): those that
    bypass the wrapper's broken methods, the multipart functions it does not bind, and the
    frees it never makes."""

    def __init__(self, wrapper: Wrapper, bucket: str) -> None:
        self.wrapper = wrapper
        self.bucket = bucket

    def fn(self, lib: Any, name: str) -> Any:
        """A libuplink function, declared as `signatures` has it."""
        argtypes, restype = signatures(self.wrapper.defs)[name]
        return declare(getattr(lib, name), argtypes, restype)

    def check(self, lib: Any, error: Any) -> None:
        """Raise (and free) the `UplinkError *` a libuplink function returned, if any."""
        if error:
            try:
                raise c_error(error.contents)
            finally:
                self.fn(lib, "uplink_free_error")(error)

    def drain(self, lib: Any, kind: str, iterator: Any, read: Callable[[Any], _T | None]) -> list[_T]:
        """What `read` makes of each item of a libuplink iterator (blocking), then the iterator's
        error, which only the end of the iteration tells; frees the items and the iterator."""
        next_, item_, err_, free_iterator, free_item = (self.fn(lib, name) for name in _ITERATORS[kind])
        if not iterator:
            raise NativeError(None, f"libuplink returned no {kind} iterator")
        try:
            values = []
            while next_(iterator):
                item = item_(iterator)
                if not item:
                    raise NativeError(None, f"libuplink returned no {kind} from its iterator")
                try:
                    value = read(item.contents)
                finally:
                    free_item(item)
                if value is not None:
                    values.append(value)
            self.check(lib, err_(iterator))
            return values
        finally:
            free_iterator(iterator)

    def release(self, kind: str, handle: Any) -> None:
        """Close a download or drop an upload, then free it in libuplink (blocking).

        The wrapper never frees these; without it each one stays in libuplink's handle table.
        """
        try:
            if kind == "download":
                handle.close()
        finally:
            defs, lib = self.wrapper.defs, handle.uplink.m_libuplink
            if kind == "download":
                self.fn(lib, "uplink_free_download_result")(defs._DownloadResult(download=handle.download))
            else:
                self.fn(lib, "uplink_free_upload_result")(defs._UploadResult(upload=handle.upload))

    # -- reads and writes ----------------------------------------------------------------------

    def read(self, download: Any, buf: Any, size: int) -> tuple[bytes, bool]:
        """Up to `size` bytes and whether the stream ended (blocking), bypassing `Download.read`."""
        lib = download.uplink.m_libuplink
        read, free = self.fn(lib, "uplink_download_read"), self.fn(lib, "uplink_free_read_result")
        result = read(download.download, ctypes.cast(buf, ctypes.POINTER(ctypes.c_uint8)), size)
        try:
            n = int(result.bytes_read)
            data = ctypes.string_at(buf, n) if n else b""
            if result.error:
                # io.EOF is the one error libuplink sends without a message.
                if result.error.contents.code == EOF or not result.error.contents.message:
                    return data, True
                raise c_error(result.error.contents)
            return data, False
        finally:
            free(result)

    def write(self, upload: Any, data: bytes) -> None:
        """Write all of `data` to an upload (blocking), bypassing the broken `Upload.write`."""
        self.write_all(upload.uplink.m_libuplink, "uplink_upload_write", upload.upload, data)

    def write_all(self, lib: Any, function: str, handle: Any, data: bytes) -> None:
        """Write all of `data` with uplink_upload_write or uplink_part_upload_write (blocking)."""
        write, free = self.fn(lib, function), self.fn(lib, "uplink_free_write_result")
        view, done = memoryview(data), 0
        while done < len(data):
            rest = bytes(view[done:]) if done else data
            buf = ctypes.cast(ctypes.c_char_p(rest), ctypes.POINTER(ctypes.c_uint8))
            result = write(handle, buf, len(rest))
            try:
                written = int(result.bytes_written)
                if result.error:
                    raise c_error(result.error.contents)
            finally:
                free(result)
            if written <= 0:
                raise NativeError(None, "libuplink accepted no bytes")
            done += written

    # -- multipart uploads: libuplink's, which the wrapper does not bind ----------------------

    def begin_upload(self, project: Any, path: str) -> str:
        lib = project.uplink.m_libuplink
        result = self.fn(lib, "uplink_begin_upload")(
            project.project, self.bucket.encode(), path.encode(), None
        )
        try:
            if result.error:
                raise c_error(result.error.contents)
            if not result.info or not result.info.contents.upload_id:
                raise NativeError(None, "libuplink began an upload without an upload ID")
            return str(result.info.contents.upload_id.decode("ascii"))
        finally:
            self.fn(lib, "uplink_free_upload_info_result")(result)

    def list_uploads(self, project: Any, path: str) -> list[tuple[int, str]]:
        """(creation time, upload ID) of the pending uploads of exactly `path`."""
        lib = project.uplink.m_libuplink
        # A prefix without a trailing slash lists the pending uploads of exactly that key.
        options = multipart_types(self.wrapper.defs).list_uploads_options(
            path.encode(), b"", True, True, False
        )
        iterator = self.fn(lib, "uplink_list_uploads")(
            project.project, self.bucket.encode(), ctypes.byref(options)
        )

        def upload(info: Any) -> tuple[int, str] | None:
            if info.is_prefix or not info.upload_id or info.key != path.encode():
                return None
            return int(info.system.created), str(info.upload_id.decode("ascii"))

        return self.drain(lib, "upload", iterator, upload)

    def list_parts(self, project: Any, path: str, upload_id: str) -> dict[int, tuple[int, str]] | None:
        """Part number -> (size, ETag) of the parts an upload holds; None if it is gone."""
        lib = project.uplink.m_libuplink
        options = multipart_types(self.wrapper.defs).list_upload_parts_options(0)
        iterator = self.fn(lib, "uplink_list_upload_parts")(
            project.project, self.bucket.encode(), path.encode(), upload_id.encode(), ctypes.byref(options)
        )

        def part(info: Any) -> tuple[int, int, str]:
            etag = ctypes.string_at(info.etag, info.etag_length) if info.etag else b""
            return int(info.part_number), int(info.size), etag.decode("ascii", "replace")

        try:
            parts = self.drain(lib, "part", iterator, part)
        except NativeError as exc:
            if exc.code == ERROR_OBJECT_NOT_FOUND:
                return None
            raise
        return {number: (size, etag) for number, size, etag in parts}

    def begin_part(self, project: Any, path: str, upload_id: str, number: int) -> Any:
        """The `UplinkPartUploadResult` of a new part upload (free it when done with it)."""
        lib = project.uplink.m_libuplink
        result = self.fn(lib, "uplink_upload_part")(
            project.project, self.bucket.encode(), path.encode(), upload_id.encode(), number
        )
        if result.error or not result.part_upload:
            # On failure uplink-c v1.13 still hands out a handle, with no part upload behind it:
            # any call on it but the free would crash the process.
            error = (
                c_error(result.error.contents)
                if result.error
                else NativeError(None, "libuplink returned no part upload")
            )
            self.free_part(lib, result)
            raise error
        return result

    def commit_part(self, lib: Any, part_upload: Any, digest: str) -> None:
        # The ETag goes before the commit: libuplink stores it with the part's last segment.
        self.check(lib, self.fn(lib, "uplink_part_upload_set_etag")(part_upload, digest.encode()))
        self.check(lib, self.fn(lib, "uplink_part_upload_commit")(part_upload))

    def abort_part(self, lib: Any, part_upload: Any) -> None:
        self.check(lib, self.fn(lib, "uplink_part_upload_abort")(part_upload))

    def free_part(self, lib: Any, result: Any) -> None:
        self.fn(lib, "uplink_free_part_upload_result")(result)

    def commit_upload(self, project: Any, path: str, upload_id: str) -> int:
        """Commit an upload; the size of the object it made."""
        lib = project.uplink.m_libuplink
        result = self.fn(lib, "uplink_commit_upload")(
            project.project, self.bucket.encode(), path.encode(), upload_id.encode(), None
        )
        try:
            if result.error:
                raise c_error(result.error.contents)
            if not result.object:
                raise NativeError(None, "libuplink committed the upload but returned no object")
            return int(result.object.contents.system.content_length)
        finally:
            self.fn(lib, "uplink_free_commit_upload_result")(result)

    def abort_upload(self, project: Any, path: str, upload_id: str) -> None:
        lib = project.uplink.m_libuplink
        self.check(
            lib,
            self.fn(lib, "uplink_abort_upload")(
                project.project, self.bucket.encode(), path.encode(), upload_id.encode()
            ),
        )

    # -- listing --------------------------------------------------------------------------------

    def list_objects(self, project: Any, prefix: str, *, system: bool = False) -> list[tuple[str, int]]:
        """(key, creation time) of the objects under `prefix` (blocking), with the iterator's error
        checked after the last item. The creation time (Unix seconds) is listed only with `system`
        (libuplink then includes each object's system metadata); without it, it means nothing."""
        defs = self.wrapper.defs
        lib = project.uplink.m_libuplink
        options = defs._ListObjectsOptionsStruct(prefix.encode(), b"", True, system, False)
        iterator = self.fn(lib, "uplink_list_objects")(
            project.project, self.bucket.encode(), ctypes.byref(options)
        )

        def key(obj: Any) -> tuple[str, int] | None:
            return None if obj.is_prefix else (str(obj.key.decode("utf-8")), int(obj.system.created))

        return self.drain(lib, "object", iterator, key)
