"""StorjOrigin against storj-uplink's real Python classes, over a fake libuplink.

The adapter's calls go through the installed wrapper's own Project / Download / Upload code, so
its quirks happen for real; only the native library underneath is emulated, at the C ABI the
wrapper uses (the ctypes result structures of storj_uplink.module_def, filled from a dict of
objects). Contract tests check that everything the adapter and the fake use exists in the
installed wrapper and in its bundled libuplink.so. The live test needs a real Storj project.
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import inspect
import io
import itertools
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pimg.errors import InvalidInput, OriginError, OriginNotFound
from p2pimg.origins import open_origin
from p2pimg.origins import storj as storj_module
from p2pimg.origins.storj import StorjOrigin, parse_storj_url

BUCKET = "bkt"
LIVE_SKIP = ("live Storj test: set STORJ_ACCESS and P2PIMG_STORJ_BUCKET (an access grant and an "
             "existing bucket) to run it")


def _wrapper() -> Any:
    pytest.importorskip("storj_uplink", reason="storj-uplink is not installed (x86_64 only)")
    return storj_module.load_wrapper()


def _real_lib() -> ctypes.CDLL:
    w = _wrapper()
    try:
        return w.uplink.Uplink().m_libuplink  # type: ignore[no-any-return]
    except Exception as exc:  # noqa: BLE001 - any load failure means: not on this machine
        pytest.skip(f"libuplink.so cannot be loaded here: {exc}")


# -- a fake libuplink -----------------------------------------------------------------------------


def _text(arg: Any) -> str:
    if isinstance(arg, ctypes.c_char_p):
        arg = arg.value
    return arg.decode() if isinstance(arg, bytes) else str(arg)


def _int(arg: Any) -> int:
    return int(arg.value) if hasattr(arg, "value") else int(arg)


def _struct(arg: Any) -> Any:
    """The structure behind `ctypes.byref(s)`; None for a NULL pointer."""
    if not arg:
        return None
    return arg._obj if hasattr(arg, "_obj") else arg.contents


class _Fn:
    """A native function: callable, and takes the argtypes/restype the wrapper assigns."""

    def __init__(self, lib: FakeLibuplink, name: str, impl: Callable[..., Any]) -> None:
        self.lib, self.name, self.impl = lib, name, impl
        self.argtypes: Any = None
        self.restype: Any = None

    def __call__(self, *args: Any) -> Any:
        self.lib.calls.append(self.name)
        return self.impl(*args)


class FakeLibuplink:
    """libuplink's behaviour as uplink-c v1.13 has it, for one bucket held in `objects`."""

    def __init__(self, md: Any) -> None:
        self.md = md
        self.objects: dict[str, bytes] = {}
        self.calls: list[str] = []
        self.ranges: list[tuple[str, int, int]] = []  # (key, offset, length) per download_object
        self.read_sizes: list[int] = []
        self.write_sizes: list[int] = []
        self.listings: list[tuple[str, bool]] = []  # (prefix, recursive)
        self.fail: dict[str, tuple[int, str | None]] = {}  # function -> (code, message) to return
        self.eof_with_last_bytes = False  # return the last bytes of a download together with EOF
        self.write_limit: int | None = None  # accept at most this many bytes per write call
        self.list_fails_after: int | None = None  # the iterator stops with an error after n items
        self.delete_missing = "null"  # "null": no object, no error (uplink v1.13); "error": 0x21
        self.downloads: dict[int, dict[str, Any]] = {}
        self.uploads: dict[int, dict[str, Any]] = {}
        self.iterators: dict[int, dict[str, Any]] = {}
        self.freed: collections.Counter[str] = collections.Counter()
        self.projects_closed = 0
        self._ids = itertools.count(1)
        self._keep: list[Any] = []  # C memory handed out must outlive the wrapper's use of it
        for name in dir(self):
            if name.startswith("_uplink_"):
                setattr(self, name[1:], _Fn(self, name[1:], getattr(self, name)))

    @property
    def functions(self) -> list[str]:
        return [n[1:] for n in dir(type(self)) if n.startswith("_uplink_")]

    # helpers building C results

    def _keep_ptr(self, struct: Any) -> Any:
        self._keep.append(struct)
        return ctypes.pointer(struct)

    def _error(self, code: int, message: str | None) -> Any:
        return self._keep_ptr(self.md._Error(code, message.encode() if message is not None else None))

    def _eof(self) -> Any:
        return self._error(-1, None)  # uplink-c: code C.EOF, no message

    def _failure(self, name: str) -> Any:
        if name in self.fail:
            return self._error(*self.fail[name])
        return None

    def _object(self, key: str) -> Any:
        md = self.md
        return self._keep_ptr(md._ObjectStruct(key.encode(), False,
                                               md._SystemMetadataStruct(0, 0, len(self.objects[key])),
                                               md._CustomMetadataStruct()))

    def _lookup(self, bucket: Any, key: Any) -> tuple[str, Any]:
        if _text(bucket) != BUCKET:
            return "", self._error(0x13, f"uplink: bucket not found ({_text(bucket)})\n\tstack")
        k = _text(key)
        if k not in self.objects:
            return k, self._error(0x21, f"uplink: object not found (\"{k}\")\n\tstorj.io/uplink.x:1")
        return k, None

    def _null_error(self) -> Any:
        return ctypes.POINTER(self.md._Error)()

    # the functions

    def _uplink_stat_object(self, project: Any, bucket: Any, key: Any) -> Any:
        error = self._failure("uplink_stat_object")
        if error is None:
            k, error = self._lookup(bucket, key)
        if error is not None:
            return self.md._ObjectResult(error=error)
        return self.md._ObjectResult(object=self._object(k))

    def _uplink_download_object(self, project: Any, bucket: Any, key: Any, options: Any) -> Any:
        opts = _struct(options)
        offset, length = (opts.offset, opts.length) if opts is not None else (0, -1)
        self.ranges.append((_text(key), offset, length))
        error = self._failure("uplink_download_object")
        if error is None:
            k, error = self._lookup(bucket, key)
        if error is not None:
            return self.md._DownloadResult(error=error)
        size = len(self.objects[k])
        end = size if length < 0 else min(size, offset + length)
        handle = next(self._ids)
        self.downloads[handle] = {"key": k, "pos": offset, "end": end, "closed": False}
        return self.md._DownloadResult(download=self._keep_ptr(self.md._DownloadStruct(handle)))

    def _uplink_download_read(self, download: Any, buf: Any, size: Any) -> Any:
        d = self.downloads[download.contents._handle]
        assert not d["closed"] and not d.get("freed"), "read after close (libuplink would crash)"
        want = _int(size)
        self.read_sizes.append(want)
        error = self._failure("uplink_download_read")
        if error is not None:
            return self.md._ReadResult(0, error)
        n = max(0, min(want, d["end"] - d["pos"]))
        if n:
            ctypes.memmove(buf, self.objects[d["key"]][d["pos"]:d["pos"] + n], n)
        d["pos"] += n
        if n == 0 or (self.eof_with_last_bytes and d["pos"] == d["end"]):
            return self.md._ReadResult(n, self._eof())
        return self.md._ReadResult(n)

    def _uplink_download_info(self, download: Any) -> Any:
        return self.md._ObjectResult(object=self._object(self.downloads[download.contents._handle]["key"]))

    def _uplink_close_download(self, download: Any) -> Any:
        self.downloads[download.contents._handle]["closed"] = True
        return self._null_error()

    def _uplink_upload_object(self, project: Any, bucket: Any, key: Any, options: Any) -> Any:
        error = self._failure("uplink_upload_object")
        if error is None and _text(bucket) != BUCKET:
            error = self._error(0x13, "uplink: bucket not found")
        if error is not None:
            return self.md._UploadResult(error=error)
        handle = next(self._ids)
        self.uploads[handle] = {"key": _text(key), "data": bytearray(), "state": "open"}
        return self.md._UploadResult(upload=self._keep_ptr(self.md._UploadStruct(handle)))

    def _uplink_upload_write(self, upload: Any, buf: Any, size: Any) -> Any:
        u = self.uploads[upload.contents._handle]
        assert isinstance(buf, ctypes._Pointer), f"write got {buf!r}, not a pointer to the data"
        n = _int(size)
        self.write_sizes.append(n)
        error = self._failure("uplink_upload_write")
        if error is not None:
            return self.md._WriteResult(0, error)
        if self.write_limit is not None:
            n = min(n, self.write_limit)
        u["data"] += ctypes.string_at(buf, n)
        return self.md._WriteResult(n)

    def _uplink_upload_commit(self, upload: Any) -> Any:
        u = self.uploads[upload.contents._handle]
        if u["state"] != "open":
            return self._error(0x22, "uplink: upload done: already " + u["state"])
        error = self._failure("uplink_upload_commit")
        if error is not None:
            u["state"] = "committed"  # libuplink: a failed commit still ends the upload
            return error
        self.objects[u["key"]] = bytes(u["data"])
        u["state"] = "committed"
        return self._null_error()

    def _uplink_upload_abort(self, upload: Any) -> Any:
        u = self.uploads[upload.contents._handle]
        if u["state"] == "committed":
            return self._error(0x22, "uplink: upload done: already committed")
        u["state"] = "aborted"
        return self._null_error()

    def _uplink_delete_object(self, project: Any, bucket: Any, key: Any) -> Any:
        error = self._failure("uplink_delete_object")
        if error is not None:
            return self.md._ObjectResult(error=error)
        k, error = self._lookup(bucket, key)
        if error is not None:
            if self.delete_missing == "error" or _text(bucket) != BUCKET:
                return self.md._ObjectResult(error=error)
            return self.md._ObjectResult()  # uplink v1.13: deleting nothing is no error, no object
        deleted = self._object(k)
        del self.objects[k]
        return self.md._ObjectResult(object=deleted)

    def _uplink_list_objects(self, project: Any, bucket: Any, options: Any) -> Any:
        opts = _struct(options)
        prefix = opts.prefix.decode() if opts is not None and opts.prefix else ""
        recursive = bool(opts.recursive) if opts is not None else False
        self.listings.append((prefix, recursive))
        assert not prefix or prefix.endswith("/"), "libuplink wants a listing prefix ending with /"
        state: dict[str, Any] = {"keys": sorted(k for k in self.objects if k.startswith(prefix)),
                                 "i": -1, "error": None}
        if not recursive:  # collapse to the first level below the prefix
            state["keys"] = sorted({k for k in state["keys"] if "/" not in k[len(prefix):]})
        if _text(bucket) != BUCKET:
            state["error"] = (0x13, "uplink: bucket not found")
        elif "uplink_list_objects" in self.fail:
            state["error"] = self.fail["uplink_list_objects"]
        handle = next(self._ids)
        self.iterators[handle] = state
        return self._keep_ptr(self.md._ObjectIterator(handle))

    def _uplink_object_iterator_next(self, iterator: Any) -> bool:
        s = self.iterators[iterator.contents._handle]
        if s["error"] is not None:
            return False
        if self.list_fails_after is not None and s["i"] + 1 >= self.list_fails_after:
            s["error"] = (0x02, "uplink: metaclient: rpc: connection reset\n\tstack")
            return False
        s["i"] += 1
        return bool(s["i"] < len(s["keys"]))

    def _uplink_object_iterator_item(self, iterator: Any) -> Any:
        s = self.iterators[iterator.contents._handle]
        return self._object(s["keys"][s["i"]])

    def _uplink_object_iterator_err(self, iterator: Any) -> Any:
        s = self.iterators[iterator.contents._handle]
        return self._error(*s["error"]) if s["error"] is not None else self._null_error()

    def _uplink_free_object_iterator(self, iterator: Any) -> None:
        self.freed["iterator"] += 1

    def _uplink_free_object(self, obj: Any) -> None:
        self.freed["object"] += 1

    def _uplink_free_error(self, err: Any) -> None:
        self.freed["error"] += 1

    def _uplink_free_read_result(self, result: Any) -> None:
        self.freed["read_result"] += 1

    def _uplink_free_write_result(self, result: Any) -> None:
        self.freed["write_result"] += 1

    def _uplink_free_download_result(self, result: Any) -> None:
        d = self.downloads[result.download.contents._handle]
        assert not d.get("freed"), "download freed twice"
        d["freed"] = True

    def _uplink_free_upload_result(self, result: Any) -> None:
        u = self.uploads[result.upload.contents._handle]
        assert not u.get("freed"), "upload freed twice"
        u["freed"] = True

    def all_released(self) -> bool:
        return (all(d["closed"] and d.get("freed") for d in self.downloads.values())
                and all(u.get("freed") for u in self.uploads.values()))

    def _uplink_close_project(self, project: Any) -> Any:
        self.projects_closed += 1
        return self._null_error()

    # the wrapper's classes over this library

    def uplink(self) -> Any:
        w = _wrapper()
        up = object.__new__(w.uplink.Uplink)  # skips loading the real libuplink.so
        up.m_libuplink = self
        return up

    def project(self) -> Any:
        from storj_uplink.project import Project

        return Project(ctypes.pointer(self.md._ProjectStruct(1)), self.uplink())


@pytest.fixture
def fake() -> FakeLibuplink:
    return FakeLibuplink(_wrapper().defs)


@pytest.fixture
def strict_wrapper(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the adapter uses a wrapper call known to be broken."""
    from storj_uplink.download import Download
    from storj_uplink.project import Project
    from storj_uplink.upload import Upload

    def broken(name: str) -> Callable[..., Any]:
        def call(*_args: Any, **_kwargs: Any) -> Any:
            raise AssertionError(f"the adapter called {name}, which is broken in storj-uplink")
        return call

    for cls, name in ((Download, "read_file"), (Download, "read"), (Upload, "write"),
                      (Upload, "write_file"), (Project, "list_objects")):
        monkeypatch.setattr(cls, name, broken(f"{cls.__name__}.{name}"))


class Opened:
    def __init__(self, fake: FakeLibuplink) -> None:
        self.fake, self.count = fake, 0

    def __call__(self) -> Any:
        self.count += 1
        return self.fake.project()


@pytest.fixture
def opened(fake: FakeLibuplink) -> Opened:
    return Opened(fake)


@pytest.fixture
def origin(fake: FakeLibuplink, opened: Opened, strict_wrapper: None) -> StorjOrigin:
    return StorjOrigin(BUCKET, "pre", project_factory=opened)


def _blob(size: int, seed: int = 1) -> bytes:
    out, block = bytearray(), hashlib.sha256(bytes([seed])).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:size])


async def _read(origin: StorjOrigin, key: str, offset: int, length: int) -> list[bytes]:
    return [piece async for piece in origin.read_range(key, offset, length)]


# -- contract: the wrapper's real API surface ----------------------------------------------------


def test_adapter_calls_exist_on_the_real_wrapper_with_compatible_parameters() -> None:
    w = _wrapper()
    from storj_uplink.access import Access
    from storj_uplink.download import Download
    from storj_uplink.project import Project
    from storj_uplink.upload import Upload

    options = w.classes.DownloadOptions(5, 7)
    calls: list[tuple[type, str, tuple[Any, ...]]] = [
        (w.uplink.Uplink, "parse_access", ("grant",)),
        (Access, "open_project", ()),
        (Project, "download_object", (BUCKET, "k", options)),  # read_range: exact range
        (Project, "download_object", (BUCKET, "k")),  # get: whole object
        (Project, "upload_object", (BUCKET, "k")),
        (Project, "stat_object", (BUCKET, "k")),
        (Project, "delete_object", (BUCKET, "k")),
        (Project, "close", ()),
        (Download, "info", ()),
        (Download, "close", ()),
        (Upload, "commit", ()),
        (Upload, "abort", ()),
    ]
    for cls, name, args in calls:
        inspect.signature(getattr(cls, name)).bind(object(), *args)  # raises if incompatible

    # DownloadOptions(offset, length) carries exactly those into the C structure.
    assert list(inspect.signature(w.classes.DownloadOptions).parameters) == ["offset", "length"]
    assert (options.offset, options.length) == (5, 7)
    struct = options.get_structure()
    assert [f[0] for f in struct._fields_] == ["offset", "length"]
    assert (struct.offset, struct.length) == (5, 7)

    # What the native read/write/list paths take from the wrapper's objects and declarations.
    sentinel = object()
    assert Project(sentinel, sentinel).project is sentinel
    assert Project(sentinel, sentinel).uplink is sentinel
    assert Download(sentinel, sentinel, None, None, None).download is sentinel
    assert Download(sentinel, sentinel, None, None, None).uplink is sentinel
    assert Upload(sentinel, sentinel).upload is sentinel
    assert Upload(sentinel, sentinel).uplink is sentinel
    md = w.defs
    assert [f[0] for f in md._ListObjectsOptionsStruct._fields_] == [
        "prefix", "cursor", "recursive", "system", "custom"]
    assert [f[0] for f in md._ReadResult._fields_] == ["bytes_read", "error"]
    assert [f[0] for f in md._WriteResult._fields_] == ["bytes_written", "error"]
    assert [f[0] for f in md._Error._fields_] == ["code", "message"]
    assert md._Error._fields_[0][1] is ctypes.c_int32  # so EOF (-1) reads as -1
    assert [f[0] for f in md._ObjectStruct._fields_][:2] == ["key", "is_prefix"]
    assert "content_length" in [f[0] for f in md._SystemMetadataStruct._fields_]
    for name in ("_ProjectStruct", "_DownloadStruct", "_UploadStruct", "_ObjectIterator"):
        assert [f[0] for f in getattr(md, name)._fields_] == ["_handle"]

    # The error codes the adapter maps are the wrapper's.
    assert storj_module._ERROR_OBJECT_NOT_FOUND == w.errors.ERROR_OBJECT_NOT_FOUND
    assert storj_module._ERROR_BUCKET_NOT_FOUND == w.errors.ERROR_BUCKET_NOT_FOUND
    assert isinstance(w.errors._storj_exception(0x21, "x"), w.errors.ObjectNotFoundError)


def test_native_functions_used_exist_in_the_bundled_libuplink(fake: FakeLibuplink) -> None:
    lib = _real_lib()
    # Everything the fake emulates (a superset of what the adapter's native paths call) is real.
    missing = [name for name in fake.functions if not hasattr(lib, name)]
    assert not missing
    assert {"uplink_upload_write", "uplink_download_read", "uplink_list_objects",
            "uplink_object_iterator_err", "uplink_free_object_iterator"} <= set(fake.functions)


def test_wrapper_has_no_multipart_binding() -> None:
    """Multipart (resumable) upload exists in libuplink but storj-uplink does not bind it."""
    lib = _real_lib()
    from storj_uplink.project import Project

    assert hasattr(lib, "uplink_begin_upload") and hasattr(lib, "uplink_upload_part")
    bound = {name for name in dir(Project) if not name.startswith("_")}
    assert not bound & {"begin_upload", "upload_part", "commit_upload", "list_uploads",
                        "list_upload_parts", "abort_upload"}


# -- the wrapper's quirks, confirmed on its own code -----------------------------------------------


def test_quirk_upload_write_never_passes_the_data() -> None:
    lib = _real_lib()
    from storj_uplink.module_def import _UploadStruct
    from storj_uplink.upload import Upload

    up = object.__new__(_wrapper().uplink.Uplink)
    up.m_libuplink = lib
    # ctypes rejects the argument before any native code runs: the data pointer is a type.
    with pytest.raises(ctypes.ArgumentError, match="argument 2"):
        Upload(ctypes.POINTER(_UploadStruct)(), up).write(b"abc", 3)


def test_quirk_unknown_error_codes_raise_type_error() -> None:
    errors = _wrapper().errors
    with pytest.raises(TypeError, match="message"):
        errors._storj_exception(0x09, "uplink: permission denied")
    with pytest.raises(TypeError):
        errors._storj_exception(-1, "")  # EOF


def test_quirk_download_read_drops_bytes_that_come_with_eof(fake: FakeLibuplink) -> None:
    fake.objects["k"] = b"0123456789"
    fake.eof_with_last_bytes = True
    opts = _wrapper().classes.DownloadOptions(0, 10)
    download = fake.project().download_object(BUCKET, "k", opts)
    with pytest.raises(AttributeError):  # decoding the EOF's NULL message
        download.read(10)
    assert fake.downloads[1]["pos"] == 10  # libuplink did hand over all ten bytes


def test_quirk_read_file_ignores_the_range(fake: FakeLibuplink) -> None:
    fake.objects["k"] = bytes(100)
    opts = _wrapper().classes.DownloadOptions(10, 5)
    download = fake.project().download_object(BUCKET, "k", opts)
    with pytest.raises(AttributeError):  # reads on past the 5 bytes, towards the whole 100
        download.read_file(io.BytesIO())


def test_quirk_list_objects_hides_a_failed_listing(fake: FakeLibuplink) -> None:
    fake.objects.update({"p/a": b"", "p/b": b""})
    fake.list_fails_after = 0
    options = _wrapper().classes.ListObjectsOptions(prefix="p/", recursive=True)
    assert fake.project().list_objects(BUCKET, options) == []  # the error is never looked at


def test_quirk_delete_of_nothing_raises_value_error(fake: FakeLibuplink) -> None:
    with pytest.raises(ValueError, match="NULL pointer"):
        fake.project().delete_object(BUCKET, "missing")


# -- reads ---------------------------------------------------------------------------------------


async def test_ranged_reads_ask_for_exactly_the_range(origin: StorjOrigin, fake: FakeLibuplink) -> None:
    data = _blob((3 << 20) + 12345)
    fake.objects["pre/p2pimg/blobs/sha256/ab"] = data
    key = "p2pimg/blobs/sha256/ab"
    cases = [(0, len(data)), (1, 100), ((1 << 20) - 3, (2 << 20) + 7), (len(data) - 1, 1),
             (64 << 10, 1 << 20)]
    for offset, length in cases:
        fake.ranges.clear()
        fake.read_sizes.clear()
        pieces = await _read(origin, key, offset, length)
        assert b"".join(pieces) == data[offset:offset + length]
        assert fake.ranges == [("pre/" + key, offset, length)]
        assert all(len(p) <= 1 << 20 for p in pieces)
        assert all(size <= 1 << 20 for size in fake.read_sizes)
        assert sum(fake.read_sizes) == length  # never asks past the range
    assert fake.all_released()
    assert fake.freed["read_result"] == fake.calls.count("uplink_download_read")
    assert "uplink_stat_object" not in fake.calls  # read_file's whole-object stat never happens


async def test_read_keeps_the_bytes_that_come_with_eof(origin: StorjOrigin, fake: FakeLibuplink) -> None:
    data = _blob(2_500_000)
    fake.objects["pre/k"] = data
    fake.eof_with_last_bytes = True
    assert b"".join(await _read(origin, "k", 100, len(data) - 100)) == data[100:]
    assert await origin.get("k", max_size=len(data)) == data


async def test_short_object_is_an_error_not_a_short_read(origin: StorjOrigin, fake: FakeLibuplink) -> None:
    fake.objects["pre/k"] = _blob(1000)
    with pytest.raises(OriginError, match="shorter than expected") as info:
        await _read(origin, "k", 500, 1000)
    assert not isinstance(info.value, OriginNotFound)
    assert fake.all_released()


async def test_not_found(origin: StorjOrigin, fake: FakeLibuplink) -> None:
    with pytest.raises(OriginNotFound, match="origin has no p2pimg/blocks/x"):
        await _read(origin, "p2pimg/blocks/x", 0, 10)
    with pytest.raises(OriginNotFound):
        await origin.get("p2pimg/blocks/x", max_size=10)
    assert await origin.exists("p2pimg/blocks/x") is False
    with pytest.raises(OriginNotFound):
        await _read(origin, "p2pimg/blocks/x", 0, 0)


async def test_missing_bucket_says_how_to_create_it(fake: FakeLibuplink, opened: Opened,
                                                    strict_wrapper: None) -> None:
    origin = StorjOrigin("nobucket", project_factory=opened)
    for attempt in (origin.exists("k"), origin.list("p2pimg/"), origin.put_bytes("k", b"x")):
        with pytest.raises(OriginError, match=r"uplink mb sj://nobucket") as info:
            await attempt
        assert not isinstance(info.value, OriginNotFound)


async def test_codes_the_wrapper_does_not_know_become_origin_errors(origin: StorjOrigin,
                                                                    fake: FakeLibuplink) -> None:
    fake.objects["pre/k"] = b"x"
    fake.fail["uplink_stat_object"] = (0x09, "uplink: permission denied\n\tstorj.io/uplink.x:1")
    with pytest.raises(OriginError, match="cannot look up k on storj://bkt/pre: uplink: permission denied$"):
        await origin.exists("k")
    # An error without a message (the wrapper then fails with AttributeError) is still an OriginError.
    fake.fail["uplink_download_object"] = (0x02, None)
    with pytest.raises(OriginError, match="AttributeError"):
        await _read(origin, "k", 0, 1)


async def test_read_errors_mid_stream(origin: StorjOrigin, fake: FakeLibuplink) -> None:
    fake.objects["pre/k"] = _blob(3 << 20)
    fake.fail["uplink_download_read"] = (0x02, "uplink: ecclient: not enough pieces\n\tstack")
    with pytest.raises(OriginError, match="cannot read k on storj://bkt/pre: uplink: ecclient: not enough"):
        await _read(origin, "k", 0, 3 << 20)
    assert fake.all_released()


async def test_abandoned_read_closes_the_download(origin: StorjOrigin, fake: FakeLibuplink) -> None:
    fake.objects["pre/k"] = _blob(5 << 20)
    stream = origin.read_range("k", 0, 5 << 20)
    assert len(await stream.__anext__()) == 1 << 20
    await stream.aclose()  # type: ignore[attr-defined]
    assert len(fake.downloads) == 1 and fake.all_released()


async def test_get_enforces_max_size_without_reading(origin: StorjOrigin, fake: FakeLibuplink) -> None:
    fake.objects["pre/p2pimg/tags/a/1"] = b"r" * 100
    assert await origin.get("p2pimg/tags/a/1", max_size=100) == b"r" * 100
    assert fake.all_released()
    fake.read_sizes.clear()
    with pytest.raises(OriginError, match="exceeds 99 bytes"):
        await origin.get("p2pimg/tags/a/1", max_size=99)
    assert fake.read_sizes == []  # refused on the size the download reported
    assert fake.all_released()
    fake.objects["pre/empty"] = b""
    assert await origin.get("empty", max_size=0) == b""
    # get opens one download for the whole object: one round trip, no stat.
    assert fake.ranges[-1] == ("pre/empty", 0, -1)
    assert "uplink_stat_object" not in fake.calls


# -- writes --------------------------------------------------------------------------------------


async def test_put_bytes_commits(origin: StorjOrigin, fake: FakeLibuplink) -> None:
    record = _blob((1 << 20) + 5)
    await origin.put_bytes("p2pimg/tags/a/1", record)
    assert fake.objects["pre/p2pimg/tags/a/1"] == record
    assert [u["state"] for u in fake.uploads.values()] == ["committed"]
    assert fake.write_sizes == [1 << 20, 5]
    assert fake.freed["write_result"] == 2
    await origin.put_bytes("p2pimg/tags/a/1", b"new")  # tags are overwritten
    assert fake.objects["pre/p2pimg/tags/a/1"] == b"new"
    assert fake.all_released()


async def test_put_blob_streams_in_pieces_and_commits(origin: StorjOrigin, fake: FakeLibuplink) -> None:
    data = _blob((2 << 20) + 77)
    sources: list[io.BytesIO] = []

    def open_reader() -> io.BytesIO:
        sources.append(io.BytesIO(data))
        return sources[-1]

    await origin.put_blob("p2pimg/blobs/sha256/cd", open_reader, len(data))
    assert fake.objects["pre/p2pimg/blobs/sha256/cd"] == data
    assert max(fake.write_sizes) <= 1 << 20
    assert all(s.closed for s in sources)
    assert fake.calls.index("uplink_upload_commit") > fake.calls.index("uplink_upload_write")
    assert "uplink_upload_abort" not in fake.calls
    # Already there with the right size: not sent again.
    fake.calls.clear()
    await origin.put_blob("p2pimg/blobs/sha256/cd", open_reader, len(data))
    assert "uplink_upload_object" not in fake.calls and len(sources) == 1


async def test_short_writes_are_continued(origin: StorjOrigin, fake: FakeLibuplink) -> None:
    fake.write_limit = 1000
    data = _blob(5000)
    await origin.put_blob("k", lambda: io.BytesIO(data), len(data))
    assert fake.objects["pre/k"] == data


async def test_failed_upload_is_aborted_and_invisible(origin: StorjOrigin, fake: FakeLibuplink) -> None:
    data = _blob(3 << 20)
    # The source ends early.
    with pytest.raises(OriginError, match="source for k ended early"):
        await origin.put_blob("k", lambda: io.BytesIO(data[:100]), len(data))
    # libuplink refuses a write (the wrapper would have ignored this error).
    fake.fail["uplink_upload_write"] = (0x07, "uplink: storage limit exceeded\n\tstack")
    with pytest.raises(OriginError, match="storage limit exceeded"):
        await origin.put_blob("k", lambda: io.BytesIO(data), len(data))
    del fake.fail["uplink_upload_write"]
    # The commit fails (abort afterwards fails too, with 'upload done'; that is not the error shown).
    fake.fail["uplink_upload_commit"] = (0x02, "uplink: metaclient: commit failed\n\tstack")
    with pytest.raises(OriginError, match="commit failed"):
        await origin.put_blob("k", lambda: io.BytesIO(data), len(data))
    assert "pre/k" not in fake.objects
    states = [u["state"] for u in fake.uploads.values()]
    assert states == ["aborted", "aborted", "committed"]
    assert fake.calls.count("uplink_upload_abort") == 3
    assert fake.all_released()


async def test_cancelled_upload_is_aborted(origin: StorjOrigin, fake: FakeLibuplink) -> None:
    data = _blob(4 << 20)
    with trio.CancelScope() as scope:
        class Reader(io.BytesIO):
            def read(self, n: int | None = -1) -> bytes:
                if self.tell() >= 2 << 20:
                    trio.from_thread.run_sync(scope.cancel)
                return super().read(n)

        await origin.put_blob("k", lambda: Reader(data), len(data))
    assert scope.cancelled_caught
    assert [u["state"] for u in fake.uploads.values()] == ["aborted"]
    assert fake.all_released()
    assert "pre/k" not in fake.objects


# -- list, delete, lifecycle ---------------------------------------------------------------------


async def test_list_with_prefix(origin: StorjOrigin, fake: FakeLibuplink) -> None:
    for k in ("pre/p2pimg/tags/a/2", "pre/p2pimg/tags/a/1", "pre/p2pimg/tags/a/sub/x",
              "pre/p2pimg/tags/ab/1", "pre/p2pimg/blobs/sha256/ff", "other/p2pimg/tags/a/3"):
        fake.objects[k] = b""
    assert await origin.list("p2pimg/tags/a/") == ["p2pimg/tags/a/1", "p2pimg/tags/a/2",
                                                   "p2pimg/tags/a/sub/x"]
    assert fake.listings == [("pre/p2pimg/tags/a/", True)]
    assert await origin.list("p2pimg/nothing/") == []
    assert fake.freed["iterator"] == 2 and fake.freed["object"] == 3
    with pytest.raises(InvalidInput):
        await origin.list("p2pimg/tags/a")


async def test_failed_listing_is_an_error_not_an_empty_list(origin: StorjOrigin,
                                                            fake: FakeLibuplink) -> None:
    fake.objects.update({"pre/p/a": b"", "pre/p/b": b"", "pre/p/c": b""})
    for after in (0, 2):
        fake.list_fails_after = after
        with pytest.raises(OriginError, match="cannot list p/ on storj://bkt/pre: .*connection reset"):
            await origin.list("p/")
    assert fake.freed["error"] == 2 and fake.freed["iterator"] == 2


async def test_list_without_prefix(fake: FakeLibuplink, opened: Opened, strict_wrapper: None) -> None:
    origin = StorjOrigin(BUCKET, project_factory=opened)
    fake.objects.update({"p2pimg/tags/a/1": b"", "pre/p2pimg/tags/a/2": b""})
    assert await origin.list("p2pimg/tags/a/") == ["p2pimg/tags/a/1"]
    assert fake.listings == [("p2pimg/tags/a/", True)]
    await origin.put_bytes("p2pimg/x", b"1")
    assert fake.objects["p2pimg/x"] == b"1"


async def test_delete(origin: StorjOrigin, fake: FakeLibuplink) -> None:
    fake.objects["pre/k"] = b"x"
    await origin.delete("k")
    assert "pre/k" not in fake.objects
    await origin.delete("k")  # nothing there (libuplink: no object, no error) -> fine
    fake.delete_missing = "error"
    await origin.delete("k")  # nothing there (older libuplink: object not found) -> fine
    fake.fail["uplink_delete_object"] = (0x02, "uplink: permission denied\n\tstack")
    with pytest.raises(OriginError, match="cannot delete k on storj://bkt/pre: uplink: permission denied"):
        await origin.delete("k")


async def test_project_opened_lazily_once_and_closed(origin: StorjOrigin, fake: FakeLibuplink,
                                                     opened: Opened) -> None:
    assert opened.count == 0
    fake.objects["pre/k"] = b"abc"
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(origin.exists, "k")
    await origin.get("k", max_size=10)
    assert opened.count == 1
    await origin.aclose()
    assert fake.projects_closed == 1
    await origin.aclose()
    assert fake.projects_closed == 1


async def test_project_open_failure_is_an_origin_error(fake: FakeLibuplink) -> None:
    errors = _wrapper().errors

    def factory() -> Any:
        raise errors.InternalError("uplink: dial tcp: connection refused\n\tstack")

    origin = StorjOrigin(BUCKET, project_factory=factory)
    with pytest.raises(OriginError, match="cannot open the Storj project for storj://bkt: "
                                          "uplink: dial tcp: connection refused$"):
        await origin.exists("k")


async def test_keys_are_validated(origin: StorjOrigin) -> None:
    for bad in ("../x", "a//b", "/a", "a/..", "a/./b", ""):
        with pytest.raises(InvalidInput):
            await origin.exists(bad)


# -- URLs, configuration and the library missing ---------------------------------------------------


def test_parse_url() -> None:
    assert parse_storj_url("storj://bucket") == ("bucket", "")
    assert parse_storj_url("storj://bucket/") == ("bucket", "")
    assert parse_storj_url("storj://bucket/some/prefix/") == ("bucket", "some/prefix")
    for bad in ("storj://user@bucket", "storj://bucket:7777", "storj://bucket?x=1"):
        with pytest.raises(InvalidInput):
            parse_storj_url(bad)


def test_bad_bucket_and_prefix(opened: Opened) -> None:
    for bucket in ("B", "ab", "Bucket", "-bucket", "a" * 64, "a..b"):
        with pytest.raises(InvalidInput, match="bucket name"):
            StorjOrigin(bucket, project_factory=opened)
    with pytest.raises(InvalidInput, match="prefix"):
        StorjOrigin("bucket", "a/../b", project_factory=opened)


def test_missing_access_grant_is_explained(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _wrapper()
    monkeypatch.delenv("STORJ_ACCESS", raising=False)
    with pytest.raises(InvalidInput) as info:
        open_origin("storj://bucket/prefix", tmp_path)
    message = str(info.value)
    assert "STORJ_ACCESS" in message
    assert "Storj console" in message and "uplink access create" in message
    assert "uplink mb sj://BUCKET" in message
    assert info.value.exit_code == 2


def test_invalid_access_grant_is_explained(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _real_lib()
    monkeypatch.setenv("STORJ_ACCESS", "not-a-grant")
    with pytest.raises(InvalidInput, match="STORJ_ACCESS does not hold a usable access grant "
                                           r"\(uplink: invalid access grant format\)"):
        open_origin("storj://bucket", tmp_path)


def test_open_origin_builds_a_storj_origin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    w = _wrapper()
    fake = FakeLibuplink(w.defs)

    class Access:
        def open_project(self) -> Any:
            return fake.project()

    class Uplink:
        def parse_access(self, grant: str) -> Access:
            assert grant == "the-grant"
            return Access()

    monkeypatch.setattr(w.uplink, "Uplink", Uplink)
    monkeypatch.setenv("STORJ_ACCESS", "the-grant")
    origin = open_origin("storj://my-bucket/images/", tmp_path)
    assert isinstance(origin, StorjOrigin)
    assert (origin.url, origin.bucket, origin.prefix) == ("storj://my-bucket/images", "my-bucket", "images")
    assert origin.segment_size == 64 << 20


def test_package_not_installed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = storj_module.importlib.import_module

    def no_storj(name: str, package: str | None = None) -> Any:
        if name.startswith("storj_uplink"):
            raise ModuleNotFoundError("No module named 'storj_uplink'", name="storj_uplink")
        return real(name, package)

    monkeypatch.setattr(storj_module.importlib, "import_module", no_storj)
    monkeypatch.setenv("STORJ_ACCESS", "grant")
    with pytest.raises(InvalidInput) as info:
        open_origin("storj://bucket", tmp_path)
    message = str(info.value)
    assert "storj-uplink package, which is not installed" in message
    assert "pip install 'p2pimg[storj]'" in message and "x86_64" in message
    assert "s3://" in message and "works on every platform" in message


def test_native_library_not_loadable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    w = _wrapper()

    def aarch64_load() -> Any:  # what ctypes says for an x86_64 library on another machine
        raise OSError(".../storj_uplink/libuplink.so: cannot open shared object file: "
                      "wrong ELF class: ELFCLASS64")

    monkeypatch.setattr(w.uplink, "Uplink", aarch64_load)
    monkeypatch.setenv("STORJ_ACCESS", "grant")
    with pytest.raises(InvalidInput) as info:
        open_origin("storj://bucket", tmp_path)
    message = str(info.value)
    assert "native uplink library bundled with storj-uplink (libuplink.so)" in message
    assert "wrong ELF class" in message and "x86_64 Linux only" in message
    assert "s3://" in message

    def so_missing() -> Any:
        raise w.errors.LibUplinkSoError()

    monkeypatch.setattr(w.uplink, "Uplink", so_missing)
    with pytest.raises(InvalidInput, match="cannot be loaded on this machine .*uplink-python"):
        open_origin("storj://bucket", tmp_path)


def test_importing_p2pimg_does_not_import_storj_uplink() -> None:
    import subprocess
    import sys

    code = ("import sys, p2pimg.cli, p2pimg.origins, p2pimg.origins.storj; "
            "assert not [m for m in sys.modules if m.startswith('storj_uplink')]")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- live ----------------------------------------------------------------------------------------


@pytest.fixture
def live_origin() -> Iterator[StorjOrigin]:
    if not (os.environ.get("STORJ_ACCESS") and os.environ.get("P2PIMG_STORJ_BUCKET")):
        pytest.skip(LIVE_SKIP)
    yield StorjOrigin(os.environ["P2PIMG_STORJ_BUCKET"], f"p2pimg-test-{secrets.token_hex(8)}")


async def test_live_round_trip(live_origin: StorjOrigin) -> None:
    origin = live_origin
    data = _blob((3 << 20) + 4321, seed=9)
    blob = f"p2pimg/blobs/sha256/{hashlib.sha256(data).hexdigest()}"
    tag = "p2pimg/tags/test/1"
    try:
        await origin.put_blob(blob, lambda: io.BytesIO(data), len(data))
        await origin.put_bytes(tag, b"record")
        assert await origin.exists(blob)
        for offset, length in ((0, len(data)), (1, 10), ((1 << 20) - 1, (1 << 20) + 2),
                               (len(data) - 5, 5)):
            assert b"".join(await _read(origin, blob, offset, length)) == data[offset:offset + length]
        assert await origin.get(tag, max_size=100) == b"record"
        with pytest.raises(OriginError):
            await origin.get(blob, max_size=1000)
        assert await origin.list("p2pimg/") == sorted([blob, tag])
        with pytest.raises(OriginNotFound):
            await _read(origin, "p2pimg/blocks/missing", 0, 1)
        await origin.delete(tag)
        assert not await origin.exists(tag)
    finally:
        with trio.CancelScope(shield=True):
            for key in (blob, tag):
                await origin.delete(key)
            assert await origin.list("p2pimg/") == []
            await origin.aclose()
