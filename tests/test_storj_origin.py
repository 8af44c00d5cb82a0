"""StorjOrigin against storj-uplink's real Python classes, over a fake libuplink.

The adapter's calls go through the installed wrapper's own Project / Download / Upload code, so
its quirks happen for real; only the native library underneath is emulated, at the C ABI the
wrapper uses (the ctypes result structures of storj_uplink.module_def, filled from a dict of
objects), multipart uploads included (with the structures the adapter declares for them). Every
call into the fake is checked against the argtypes/restype declared for it, as ctypes would.
Contract tests check that everything the adapter and the fake use exists in the installed wrapper
and in its bundled libuplink.so, that the adapter's declarations match uplink-c's C definitions,
and call the real library's multipart functions (on invalid handles: no network). The live tests
need a real Storj project.
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import inspect
import io
import itertools
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pimg.errors import InvalidInput, OriginError, OriginNotFound
from p2pimg.sources.origins import open_origin, storj_native
from p2pimg.sources.origins import storj as storj_module
from p2pimg.sources.origins.base import ObjectInfo
from p2pimg.sources.origins.storj import StorjOrigin, parse_storj_url

BUCKET = "bkt"
# time.Time{}.Unix(): the `created` uplink-c gives an object listed without system metadata
GO_ZERO_TIME = -62135596800
LIVE_SKIP = (
    "live Storj test: set STORJ_ACCESS and P2PIMG_STORJ_BUCKET (an access grant and an "
    "existing bucket) to run it"
)


def _wrapper() -> Any:
    pytest.importorskip("storj_uplink", reason="storj-uplink is not installed (x86_64 only)")
    return storj_native.load_wrapper()


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
    """A native function: callable, and takes the argtypes/restype the wrapper assigns.

    Once declared, each call is checked as ctypes would check it (each argument must convert to
    its declared type) and the fake's result must be of the declared result type, so the fake
    and the declarations cannot drift apart silently.
    """

    def __init__(self, lib: FakeLibuplink, name: str, impl: Callable[..., Any]) -> None:
        self.lib, self.name, self.impl = lib, name, impl
        self.argtypes: Any = None
        self.restype: Any = None

    def __call__(self, *args: Any) -> Any:
        self.lib.calls.append(self.name)
        argtypes, restype = self.argtypes, self.restype
        if argtypes is not None:
            if len(args) != len(argtypes):
                self.lib.problem(f"{self.name}: called with {len(args)} arguments, declared {len(argtypes)}")
            for i, (argtype, arg) in enumerate(zip(argtypes, args, strict=False), 1):
                try:
                    argtype.from_param(arg)
                except TypeError as exc:
                    self.lib.problem(f"{self.name}: argument {i} ({arg!r}) is no {argtype.__name__}: {exc}")
        result = self.impl(*args)
        if argtypes is not None:
            fits = (
                result is None
                if restype is None
                else isinstance(result, bool)
                if restype is ctypes.c_bool
                else isinstance(result, restype)
            )
            if not fits:
                self.lib.problem(f"{self.name}: the fake returned {result!r}, declared {restype!r}")
        return result


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
        self.listed_system: list[bool] = []  # whether each listing asked for system metadata
        self.created: dict[str, int] = {}  # key -> creation time (Unix seconds; default: `clock`)
        self.fail: dict[str, tuple[int, str | None]] = {}  # function -> (code, message) to return
        self.eof_with_last_bytes = False  # return the last bytes of a download together with EOF
        self.write_limit: int | None = None  # accept at most this many bytes per write call
        self.list_fails_after: int | None = None  # the iterator stops with an error after n items
        self.delete_missing = "null"  # "null": no object, no error (uplink v1.13); "error": 0x21
        self.downloads: dict[int, dict[str, Any]] = {}
        self.uploads: dict[int, dict[str, Any]] = {}
        self.iterators: dict[int, dict[str, Any]] = {}
        # Multipart: upload ID -> {"key", "created", "state", "parts": {number: {"data", "etag"}}}
        self.mp = storj_native.multipart_types(md)
        self.pending: dict[str, dict[str, Any]] = {}
        self.part_uploads: dict[int, dict[str, Any]] = {}
        self.part_writes: list[tuple[int, int]] = []  # (part number, bytes) per part write call
        self.upload_listings: list[str] = []  # prefix per uplink_list_uploads
        self.commit_extra = b""  # bytes a multipart commit adds (to fake a wrong result)
        self.clock = 1_700_000_000  # creation times of uploads, one second apart
        self.problems: list[str] = []  # misuse of the C API, reported by the fixture
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

    def _object(self, key: str, system: bool = True) -> Any:
        md = self.md
        created = self.created.get(key, self.clock) if system else GO_ZERO_TIME
        return self._keep_ptr(
            md._ObjectStruct(
                key.encode(),
                False,
                md._SystemMetadataStruct(created, 0, len(self.objects[key])),
                md._CustomMetadataStruct(),
            )
        )

    def _lookup(self, bucket: Any, key: Any) -> tuple[str, Any]:
        if _text(bucket) != BUCKET:
            return "", self._error(0x13, f"uplink: bucket not found ({_text(bucket)})\n\tstack")
        k = _text(key)
        if k not in self.objects:
            return k, self._error(0x21, f'uplink: object not found ("{k}")\n\tstorj.io/uplink.x:1')
        return k, None

    def _null_error(self) -> Any:
        return ctypes.POINTER(self.md._Error)()

    def problem(self, message: str) -> None:
        """Record a misuse (the adapter may turn the exception into an OriginError), then raise."""
        self.problems.append(message)
        raise AssertionError(message)

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
            ctypes.memmove(buf, self.objects[d["key"]][d["pos"] : d["pos"] + n], n)
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
        self.created[u["key"]] = self.clock
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
        self.listed_system.append(bool(opts.system) if opts is not None else False)
        assert not prefix or prefix.endswith("/"), "libuplink wants a listing prefix ending with /"
        state: dict[str, Any] = {
            "keys": sorted(k for k in self.objects if k.startswith(prefix)),
            "i": -1,
            "error": None,
            "system": self.listed_system[-1],
        }
        if not recursive:  # collapse to the first level below the prefix
            state["keys"] = sorted({k for k in state["keys"] if "/" not in k[len(prefix) :]})
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
        return self._object(s["keys"][s["i"]], s["system"])

    def _uplink_object_iterator_err(self, iterator: Any) -> Any:
        s = self.iterators[iterator.contents._handle]
        return self._error(*s["error"]) if s["error"] is not None else self._null_error()

    def _uplink_free_object_iterator(self, iterator: Any) -> None:
        self._free_iterator(iterator)

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
        return (
            all(d["closed"] and d.get("freed") for d in self.downloads.values())
            and all(u.get("freed") for u in self.uploads.values())
            and all(p.get("freed") for p in self.part_uploads.values())
            and all(i.get("freed") for i in self.iterators.values())
        )

    def _free_iterator(self, iterator: Any) -> None:
        s = self.iterators[iterator.contents._handle]
        if s.get("freed"):
            self.problem("iterator freed twice")
        s["freed"] = True
        self.freed["iterator"] += 1

    # multipart uploads (multipart.go)

    def add_pending(self, key: str, parts: dict[int, bytes], etag: Callable[[bytes], bytes | None]) -> str:
        """A pending upload as an earlier attempt (or another tool) would have left it."""
        upload_id = f"Upl{next(self._ids)}"
        self.pending[upload_id] = {
            "key": key,
            "created": self.clock,
            "state": "pending",
            "parts": {n: {"data": d, "etag": etag(d)} for n, d in parts.items()},
        }
        self.clock += 1
        return upload_id

    def _upload_info(self, upload_id: str, system: bool = True) -> Any:
        u = self.pending[upload_id]
        created = u["created"] if system else 0
        return self._keep_ptr(
            self.mp.upload_info(
                upload_id.encode(),
                u["key"].encode(),
                False,
                self.md._SystemMetadataStruct(created, 0, 0),
                self.md._CustomMetadataStruct(),
            )
        )

    def _pending(self, upload_id: Any, key: Any) -> tuple[dict[str, Any] | None, Any]:
        u = self.pending.get(_text(upload_id))
        if u is None or u["state"] != "pending" or u["key"] != _text(key):
            return None, self._error(0x21, f'uplink: object not found ("{_text(key)}")\n\tstack')
        return u, None

    def _uplink_begin_upload(self, project: Any, bucket: Any, key: Any, options: Any) -> Any:
        error = self._failure("uplink_begin_upload")
        if error is None and _text(bucket) != BUCKET:
            error = self._error(0x13, "uplink: bucket not found")
        if error is not None:  # uplink-c v1.13 returns an empty info along with the error
            return self.mp.upload_info_result(info=self._keep_ptr(self.mp.upload_info()), error=error)
        upload_id = self.add_pending(_text(key), {}, lambda _data: None)
        return self.mp.upload_info_result(info=self._upload_info(upload_id))

    def _uplink_free_upload_info_result(self, result: Any) -> None:
        self.freed["upload_info_result"] += 1

    def _uplink_free_upload_info(self, info: Any) -> None:
        self.freed["upload_info"] += 1

    def _uplink_list_uploads(self, project: Any, bucket: Any, options: Any) -> Any:
        opts = _struct(options)
        prefix = opts.prefix.decode() if opts is not None and opts.prefix else ""
        self.upload_listings.append(prefix)

        # Like uplink v1.13: a prefix without a trailing slash lists exactly that key; an upload
        # shows once it has a committed part.
        def listed(u: dict[str, Any]) -> bool:
            exact = prefix and not prefix.endswith("/")
            return (u["key"] == prefix if exact else u["key"].startswith(prefix)) and bool(u["parts"])

        state: dict[str, Any] = {
            "kind": "upload",
            "i": -1,
            "error": None,
            "system": bool(opts is not None and opts.system),
            "keys": [i for i, u in self.pending.items() if u["state"] == "pending" and listed(u)],
        }
        if _text(bucket) != BUCKET:
            state["error"] = (0x13, "uplink: bucket not found")
        elif "uplink_list_uploads" in self.fail:
            state["error"] = self.fail["uplink_list_uploads"]
        handle = next(self._ids)
        self.iterators[handle] = state
        return self._keep_ptr(self.mp.upload_iterator(handle))

    def _next(self, iterator: Any) -> bool:
        s = self.iterators[iterator.contents._handle]
        if s["error"] is not None:
            return False
        s["i"] += 1
        return bool(s["i"] < len(s["keys"]))

    def _uplink_upload_iterator_next(self, iterator: Any) -> bool:
        return self._next(iterator)

    def _uplink_upload_iterator_item(self, iterator: Any) -> Any:
        s = self.iterators[iterator.contents._handle]
        return self._upload_info(s["keys"][s["i"]], s["system"])

    def _uplink_upload_iterator_err(self, iterator: Any) -> Any:
        s = self.iterators[iterator.contents._handle]
        return self._error(*s["error"]) if s["error"] is not None else self._null_error()

    def _uplink_free_upload_iterator(self, iterator: Any) -> None:
        self._free_iterator(iterator)

    def _uplink_list_upload_parts(
        self, project: Any, bucket: Any, key: Any, upload_id: Any, options: Any
    ) -> Any:
        u, _ = self._pending(upload_id, key)
        state: dict[str, Any] = {
            "kind": "part",
            "i": -1,
            "error": None,
            "keys": sorted(u["parts"]) if u is not None else [],
            "upload": u,
        }
        if "uplink_list_upload_parts" in self.fail:
            state["error"] = self.fail["uplink_list_upload_parts"]
        elif u is None:
            state["error"] = (0x21, f'uplink: object not found ("{_text(key)}")')
        handle = next(self._ids)
        self.iterators[handle] = state
        return self._keep_ptr(self.mp.part_iterator(handle))

    def _uplink_part_iterator_next(self, iterator: Any) -> bool:
        return self._next(iterator)

    def _uplink_part_iterator_item(self, iterator: Any) -> Any:
        s = self.iterators[iterator.contents._handle]
        number = s["keys"][s["i"]]
        part = s["upload"]["parts"][number]
        etag = part["etag"]
        etag_p = ctypes.POINTER(ctypes.c_char)()
        if etag is not None:
            buf = ctypes.create_string_buffer(etag)
            self._keep.append(buf)
            etag_p = ctypes.cast(buf, ctypes.POINTER(ctypes.c_char))
        return self._keep_ptr(
            self.mp.part(number, len(part["data"]), self.clock, etag_p, len(etag) if etag is not None else 0)
        )

    def _uplink_part_iterator_err(self, iterator: Any) -> Any:
        s = self.iterators[iterator.contents._handle]
        return self._error(*s["error"]) if s["error"] is not None else self._null_error()

    def _uplink_free_part_iterator(self, iterator: Any) -> None:
        self._free_iterator(iterator)

    def _uplink_free_part(self, part: Any) -> None:
        self.freed["part"] += 1

    def _uplink_upload_part(self, project: Any, bucket: Any, key: Any, upload_id: Any, number: Any) -> Any:
        error = self._failure("uplink_upload_part")
        handle = next(self._ids)
        # uplink-c v1.13 hands out a handle even on failure, with no part upload behind it.
        self.part_uploads[handle] = {
            "upload": _text(upload_id),
            "key": _text(key),
            "number": _int(number),
            "data": bytearray(),
            "etag": None,
            "state": "open",
            "broken": error is not None,
        }
        return self.mp.part_upload_result(
            part_upload=self._keep_ptr(self.mp.part_upload(handle)), error=error
        )

    def _part_upload(self, part_upload: Any) -> dict[str, Any]:
        p = self.part_uploads[part_upload.contents._handle]
        if p["broken"] or p.get("freed"):
            self.problem(
                "part upload used after a failed uplink_upload_part or after its free: "
                "libuplink v1.13 would crash"
            )
        return p

    def _uplink_part_upload_write(self, part_upload: Any, buf: Any, size: Any) -> Any:
        p = self._part_upload(part_upload)
        if not isinstance(buf, ctypes._Pointer):
            self.problem(f"part write got {buf!r}, not a pointer to the data")
        n = _int(size)
        error = self._failure("uplink_part_upload_write")
        if error is None and p["state"] != "open":
            error = self._error(0x22, "uplink: upload done")
        if error is not None:
            return self.md._WriteResult(0, error)
        if self.write_limit is not None:
            n = min(n, self.write_limit)
        p["data"] += ctypes.string_at(buf, n)
        self.part_writes.append((p["number"], n))
        return self.md._WriteResult(n)

    def _uplink_part_upload_set_etag(self, part_upload: Any, etag: Any) -> Any:
        p = self._part_upload(part_upload)
        if p["etag"] is not None:
            return self._error(0x02, "uplink: etag already set")
        if p["state"] != "open":
            return self._error(0x22, "uplink: upload done")
        p["etag"] = etag.value if isinstance(etag, ctypes.c_char_p) else bytes(etag)
        return self._null_error()

    def _uplink_part_upload_commit(self, part_upload: Any) -> Any:
        p = self._part_upload(part_upload)
        if p["state"] != "open":
            return self._error(0x22, "uplink: upload done: already " + p["state"])
        p["state"] = "committed"  # libuplink: a failed commit still ends the part upload
        error = self._failure("uplink_part_upload_commit")
        if error is not None:
            return error
        u = self.pending.get(p["upload"])
        if u is None or u["state"] != "pending":
            return self._error(0x02, "uplink: metaclient: pending object missing")
        u["parts"][p["number"]] = {"data": bytes(p["data"]), "etag": p["etag"]}
        return self._null_error()

    def _uplink_part_upload_abort(self, part_upload: Any) -> Any:
        p = self._part_upload(part_upload)
        if p["state"] != "open":
            return self._error(0x22, "uplink: upload done: already " + p["state"])
        p["state"] = "aborted"
        return self._null_error()

    def _uplink_free_part_upload_result(self, result: Any) -> None:
        if result.part_upload:
            p = self.part_uploads[result.part_upload.contents._handle]
            if p.get("freed"):
                self.problem("part upload freed twice")
            p["freed"] = True
        self.freed["part_upload_result"] += 1

    def _uplink_commit_upload(self, project: Any, bucket: Any, key: Any, upload_id: Any, options: Any) -> Any:
        error = self._failure("uplink_commit_upload")
        u, missing = self._pending(upload_id, key)
        if error is None:
            error = missing
        if error is not None or u is None:
            return self.mp.commit_upload_result(error=error)
        # Storj commits every segment of the upload, in (part, index) order.
        k = _text(key)
        self.objects[k] = b"".join(u["parts"][n]["data"] for n in sorted(u["parts"])) + self.commit_extra
        self.created[k] = u["created"]  # Storj dates a multipart object by when its upload began
        u["state"] = "committed"
        return self.mp.commit_upload_result(object=self._object(k))

    def _uplink_free_commit_upload_result(self, result: Any) -> None:
        self.freed["commit_upload_result"] += 1

    def _uplink_abort_upload(self, project: Any, bucket: Any, key: Any, upload_id: Any) -> Any:
        u, error = self._pending(upload_id, key)
        if u is None:
            return error
        u["state"] = "aborted"
        return self._null_error()

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
def fake() -> Iterator[FakeLibuplink]:
    lib = FakeLibuplink(_wrapper().defs)
    yield lib
    assert not lib.problems


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

    for cls, name in (
        (Download, "read_file"),
        (Download, "read"),
        (Upload, "write"),
        (Upload, "write_file"),
        (Project, "list_objects"),
    ):
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
        "prefix",
        "cursor",
        "recursive",
        "system",
        "custom",
    ]
    assert [f[0] for f in md._ReadResult._fields_] == ["bytes_read", "error"]
    assert [f[0] for f in md._WriteResult._fields_] == ["bytes_written", "error"]
    assert [f[0] for f in md._Error._fields_] == ["code", "message"]
    assert md._Error._fields_[0][1] is ctypes.c_int32  # so EOF (-1) reads as -1
    assert [f[0] for f in md._ObjectStruct._fields_][:2] == ["key", "is_prefix"]
    assert "content_length" in [f[0] for f in md._SystemMetadataStruct._fields_]
    for name in ("_ProjectStruct", "_DownloadStruct", "_UploadStruct", "_ObjectIterator"):
        assert [f[0] for f in getattr(md, name)._fields_] == ["_handle"]

    # The error codes the adapter maps are the wrapper's.
    assert storj_native.ERROR_OBJECT_NOT_FOUND == w.errors.ERROR_OBJECT_NOT_FOUND
    assert storj_native.ERROR_BUCKET_NOT_FOUND == w.errors.ERROR_BUCKET_NOT_FOUND
    assert isinstance(w.errors._storj_exception(0x21, "x"), w.errors.ObjectNotFoundError)


def test_native_functions_used_exist_in_the_bundled_libuplink(fake: FakeLibuplink) -> None:
    lib = _real_lib()
    # Everything the fake emulates (a superset of what the adapter's native paths call) is real.
    missing = [name for name in fake.functions if not hasattr(lib, name)]
    assert not missing
    assert {
        "uplink_upload_write",
        "uplink_download_read",
        "uplink_list_objects",
        "uplink_object_iterator_err",
        "uplink_free_object_iterator",
    } <= set(fake.functions)


def test_wrapper_has_no_multipart_binding() -> None:
    """Multipart (resumable) upload exists in libuplink but storj-uplink does not bind it."""
    lib = _real_lib()
    from storj_uplink.project import Project

    assert hasattr(lib, "uplink_begin_upload") and hasattr(lib, "uplink_upload_part")
    bound = {name for name in dir(Project) if not name.startswith("_")}
    assert not bound & {
        "begin_upload",
        "upload_part",
        "commit_upload",
        "list_uploads",
        "list_upload_parts",
        "abort_upload",
    }


# uplink-c's exported prototypes (multipart.go, upload.go, download.go, objects.go, error.go) as the
# C header cgo generates for them spells them, for the uplink-c built with storj.io/uplink v1.13.1.
# `void *` data pointers are declared as `uint8_t *` (any data pointer converts to void *).
C_PROTOTYPES = """
UplinkReadResult uplink_download_read(UplinkDownload *, uint8_t *, size_t)
UplinkWriteResult uplink_upload_write(UplinkUpload *, uint8_t *, size_t)
void uplink_free_read_result(UplinkReadResult)
void uplink_free_write_result(UplinkWriteResult)
void uplink_free_download_result(UplinkDownloadResult)
void uplink_free_upload_result(UplinkUploadResult)
UplinkObjectIterator * uplink_list_objects(UplinkProject *, char *, UplinkListObjectsOptions *)
bool uplink_object_iterator_next(UplinkObjectIterator *)
UplinkObject * uplink_object_iterator_item(UplinkObjectIterator *)
UplinkError * uplink_object_iterator_err(UplinkObjectIterator *)
void uplink_free_object_iterator(UplinkObjectIterator *)
void uplink_free_object(UplinkObject *)
void uplink_free_error(UplinkError *)
UplinkUploadInfoResult uplink_begin_upload(UplinkProject *, char *, char *, UplinkUploadOptions *)
void uplink_free_upload_info_result(UplinkUploadInfoResult)
UplinkCommitUploadResult uplink_commit_upload(UplinkProject *, char *, char *, char *,
                                              UplinkCommitUploadOptions *)
void uplink_free_commit_upload_result(UplinkCommitUploadResult)
UplinkError * uplink_abort_upload(UplinkProject *, char *, char *, char *)
UplinkPartUploadResult uplink_upload_part(UplinkProject *, char *, char *, char *, uint32_t)
UplinkWriteResult uplink_part_upload_write(UplinkPartUpload *, uint8_t *, size_t)
UplinkError * uplink_part_upload_set_etag(UplinkPartUpload *, char *)
UplinkError * uplink_part_upload_commit(UplinkPartUpload *)
UplinkError * uplink_part_upload_abort(UplinkPartUpload *)
void uplink_free_part_upload_result(UplinkPartUploadResult)
UplinkUploadIterator * uplink_list_uploads(UplinkProject *, char *, UplinkListUploadsOptions *)
bool uplink_upload_iterator_next(UplinkUploadIterator *)
UplinkUploadInfo * uplink_upload_iterator_item(UplinkUploadIterator *)
UplinkError * uplink_upload_iterator_err(UplinkUploadIterator *)
void uplink_free_upload_iterator(UplinkUploadIterator *)
void uplink_free_upload_info(UplinkUploadInfo *)
UplinkPartIterator * uplink_list_upload_parts(UplinkProject *, char *, char *, char *,
                                              UplinkListUploadPartsOptions *)
bool uplink_part_iterator_next(UplinkPartIterator *)
UplinkPart * uplink_part_iterator_item(UplinkPartIterator *)
UplinkError * uplink_part_iterator_err(UplinkPartIterator *)
void uplink_free_part_iterator(UplinkPartIterator *)
void uplink_free_part(UplinkPart *)
"""

# The wrapper's names for uplink-c's structures.
_WRAPPER_STRUCTS = {
    "_ProjectStruct": "UplinkProject",
    "_DownloadStruct": "UplinkDownload",
    "_UploadStruct": "UplinkUpload",
    "_Error": "UplinkError",
    "_ReadResult": "UplinkReadResult",
    "_WriteResult": "UplinkWriteResult",
    "_DownloadResult": "UplinkDownloadResult",
    "_UploadResult": "UplinkUploadResult",
    "_ObjectStruct": "UplinkObject",
    "_ObjectIterator": "UplinkObjectIterator",
    "_ListObjectsOptionsStruct": "UplinkListObjectsOptions",
    "_UploadOptionsStruct": "UplinkUploadOptions",
    "_SystemMetadataStruct": "UplinkSystemMetadata",
    "_CustomMetadataStruct": "UplinkCustomMetadata",
}


def _c_name(t: Any) -> str:
    if t is None:
        return "void"
    scalars = {
        ctypes.c_char_p: "char *",
        ctypes.c_size_t: "size_t",
        ctypes.c_uint32: "uint32_t",
        ctypes.c_uint8: "uint8_t",
        ctypes.c_bool: "bool",
        ctypes.c_int64: "int64_t",
        ctypes.c_int32: "int32_t",
        ctypes.c_char: "char",
    }
    if t in scalars:
        return scalars[t]
    if issubclass(t, ctypes._Pointer):
        return f"{_c_name(t._type_)} *"
    return _WRAPPER_STRUCTS.get(t.__name__, t.__name__)


def _c_layout(struct: Any) -> list[tuple[str, str, int]]:
    return [(name, _c_name(t), getattr(struct, name).offset) for name, t in struct._fields_]


def test_native_declarations_match_the_uplink_c_prototypes() -> None:
    signatures = storj_native.signatures(_wrapper().defs)
    declared = {
        f"{_c_name(restype)}{name}({','.join(_c_name(t) for t in argtypes)})".replace(" ", "")
        for name, (argtypes, restype) in signatures.items()
    }
    expected = {f"{prototype})" for prototype in re.sub(r"\s+", "", C_PROTOTYPES).split(")") if prototype}
    assert len(expected) == len(C_PROTOTYPES.split("uplink_")) - 1
    assert sorted(declared) == sorted(expected)


def test_multipart_structures_have_the_uplink_c_layout() -> None:
    """Field order, C types and x86_64 offsets of uplink_definitions.h (uplink-c for uplink v1.13.1)."""
    defs = _wrapper().defs
    t = storj_native.multipart_types(defs)
    assert _c_layout(t.part) == [
        ("part_number", "uint32_t", 0),
        ("size", "size_t", 8),
        ("modified", "int64_t", 16),
        ("etag", "char *", 24),
        ("etag_length", "size_t", 32),
    ]
    assert ctypes.sizeof(t.part) == 40
    assert _c_layout(t.upload_info) == [
        ("upload_id", "char *", 0),
        ("key", "char *", 8),
        ("is_prefix", "bool", 16),
        ("system", "UplinkSystemMetadata", 24),
        ("custom", "UplinkCustomMetadata", 48),
    ]
    assert ctypes.sizeof(t.upload_info) == 64
    assert _c_layout(t.list_uploads_options) == [
        ("prefix", "char *", 0),
        ("cursor", "char *", 8),
        ("recursive", "bool", 16),
        ("system", "bool", 17),
        ("custom", "bool", 18),
    ]
    assert ctypes.sizeof(t.list_uploads_options) == 24
    assert _c_layout(t.list_upload_parts_options) == [("cursor", "uint32_t", 0)]
    assert _c_layout(t.commit_upload_options) == [("custom_metadata", "UplinkCustomMetadata", 0)]
    assert ctypes.sizeof(t.commit_upload_options) == 16
    for handle in (t.part_upload, t.upload_iterator, t.part_iterator):
        assert _c_layout(handle) == [("_handle", "size_t", 0)]
    assert _c_layout(t.upload_info_result) == [
        ("info", "UplinkUploadInfo *", 0),
        ("error", "UplinkError *", 8),
    ]
    assert _c_layout(t.part_upload_result) == [
        ("part_upload", "UplinkPartUpload *", 0),
        ("error", "UplinkError *", 8),
    ]
    assert _c_layout(t.commit_upload_result) == [
        ("object", "UplinkObject *", 0),
        ("error", "UplinkError *", 8),
    ]
    # What they nest from the wrapper has the C sizes too.
    assert _c_layout(defs._SystemMetadataStruct) == [
        ("created", "int64_t", 0),
        ("expires", "int64_t", 8),
        ("content_length", "int64_t", 16),
    ]
    assert ctypes.sizeof(defs._CustomMetadataStruct) == 16 and ctypes.sizeof(defs._ObjectStruct) == 56


def test_every_native_function_the_adapter_calls_is_in_the_bundled_libuplink(fake: FakeLibuplink) -> None:
    lib = _real_lib()
    signatures = storj_native.signatures(_wrapper().defs)
    # Every name the adapter's source spells (as a string or an attribute), and every declared one.
    source = "".join(Path(inspect.getfile(m)).read_text() for m in (storj_module, storj_native))
    spelled = {name for name in re.findall(r"[\"'.](uplink_[a-z0-9_]+)", source) if not name.endswith("_")}
    assert {"uplink_begin_upload", "uplink_part_upload_set_etag", "uplink_commit_upload"} <= spelled
    for name in sorted(spelled | set(signatures)):
        getattr(lib, name)  # ctypes raises AttributeError for a symbol the library does not export
    # The fake emulates every function the adapter declares.
    assert set(signatures) <= set(fake.functions)


def test_multipart_functions_run_in_the_real_libuplink() -> None:
    """Each multipart call, as declared, on the real library: invalid handles fail fast, offline."""
    lib = _real_lib()
    defs = _wrapper().defs
    t = storj_native.multipart_types(defs)
    signatures = storj_native.signatures(defs)

    def fn(name: str) -> Any:
        return storj_native.declare(getattr(lib, name), *signatures[name])

    def invalid_handle(error: Any, what: bytes) -> None:
        assert error, "libuplink reported no error"
        try:
            assert error.contents.code == 0x04  # UPLINK_ERROR_INVALID_HANDLE
            assert error.contents.message.startswith(b"invalid handle") and what in error.contents.message
        finally:
            fn("uplink_free_error")(error)

    project = ctypes.pointer(defs._ProjectStruct(1 << 40))  # no such handle in libuplink's table
    info = fn("uplink_begin_upload")(project, b"bkt", b"k", None)
    assert not info.info and info.error.contents.code == 0x04
    fn("uplink_free_upload_info_result")(info)
    part = fn("uplink_upload_part")(project, b"bkt", b"k", b"upload", 1)
    assert not part.part_upload and part.error.contents.code == 0x04
    fn("uplink_free_part_upload_result")(part)
    commit = fn("uplink_commit_upload")(project, b"bkt", b"k", b"upload", None)
    assert not commit.object and commit.error.contents.code == 0x04
    fn("uplink_free_commit_upload_result")(commit)
    invalid_handle(fn("uplink_abort_upload")(project, b"bkt", b"k", b"upload"), b"project")

    uploads_options = t.list_uploads_options(b"k", b"", True, True, False)
    parts_options = t.list_upload_parts_options(0)
    for kind, iterator in (
        ("upload", fn("uplink_list_uploads")(project, b"bkt", ctypes.byref(uploads_options))),
        (
            "part",
            fn("uplink_list_upload_parts")(project, b"bkt", b"k", b"upload", ctypes.byref(parts_options)),
        ),
    ):
        assert iterator
        try:
            assert fn(f"uplink_{kind}_iterator_next")(iterator) is False
            # (No _item call: on an iterator that failed to start, uplink-c v1.13 dereferences nil.)
            invalid_handle(fn(f"uplink_{kind}_iterator_err")(iterator), b"project")
        finally:
            fn(f"uplink_free_{kind}_iterator")(iterator)

    part_upload = ctypes.pointer(t.part_upload(1 << 40))
    data = ctypes.create_string_buffer(b"abc")
    buf = ctypes.cast(data, ctypes.POINTER(ctypes.c_uint8))
    written = fn("uplink_part_upload_write")(part_upload, buf, 3)
    assert written.bytes_written == 0 and written.error.contents.code == 0x04
    fn("uplink_free_write_result")(written)
    invalid_handle(fn("uplink_part_upload_set_etag")(part_upload, b"0" * 64), b"part upload")
    invalid_handle(fn("uplink_part_upload_commit")(part_upload), b"part upload")
    invalid_handle(fn("uplink_part_upload_abort")(part_upload), b"part upload")
    fn("uplink_free_part")(None)  # NULL is fine for the item frees
    fn("uplink_free_upload_info")(None)


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
    cases = [
        (0, len(data)),
        (1, 100),
        ((1 << 20) - 3, (2 << 20) + 7),
        (len(data) - 1, 1),
        (64 << 10, 1 << 20),
    ]
    for offset, length in cases:
        fake.ranges.clear()
        fake.read_sizes.clear()
        pieces = await _read(origin, key, offset, length)
        assert b"".join(pieces) == data[offset : offset + length]
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


async def test_read_head_ends_with_a_shorter_object(origin: StorjOrigin, fake: FakeLibuplink) -> None:
    data = _blob(1000)
    fake.objects["pre/k"] = data
    assert b"".join([p async for p in origin.read_head("k", 400)]) == data[:400]
    assert b"".join([p async for p in origin.read_head("k", 1 << 20)]) == data
    assert fake.ranges[-1] == ("pre/k", 0, 1 << 20)  # libuplink ends the range at the object's end
    assert fake.all_released()


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


async def test_missing_bucket_says_how_to_create_it(
    fake: FakeLibuplink, opened: Opened, strict_wrapper: None
) -> None:
    origin = StorjOrigin("nobucket", project_factory=opened)
    for attempt in (origin.exists("k"), origin.list("p2pimg/"), origin.put_bytes("k", b"x")):
        with pytest.raises(OriginError, match=r"uplink mb sj://nobucket") as info:
            await attempt
        assert not isinstance(info.value, OriginNotFound)


async def test_codes_the_wrapper_does_not_know_become_origin_errors(
    origin: StorjOrigin, fake: FakeLibuplink
) -> None:
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


# -- multipart uploads ---------------------------------------------------------------------------


class Source(io.FileIO):
    """A blob's file that counts what is read from it and can fail or cancel at an offset."""

    def __init__(
        self,
        path: Path,
        log: list[int],
        fail_at: int | None = None,
        on_reaching: tuple[int, Callable[[], Any]] | None = None,
    ) -> None:
        super().__init__(path)
        self.log, self.fail_at, self.on_reaching = log, fail_at, on_reaching

    def read(self, size: int | None = -1) -> bytes:
        if self.fail_at is not None and self.tell() >= self.fail_at:
            raise OSError(5, "Input/output error")
        if self.on_reaching is not None and self.tell() >= self.on_reaching[0]:
            self.on_reaching[1]()
        data = super().read(size)
        self.log.append(len(data))
        return data


def _sha(data: bytes) -> bytes:
    return hashlib.sha256(data).hexdigest().encode()


def _blob_file(tmp_path: Path, size: int, seed: int = 3) -> tuple[Path, bytes, str]:
    data = _blob(size, seed)
    path = tmp_path / "blob"
    path.write_bytes(data)
    return path, data, f"p2pimg/blobs/sha256/{hashlib.sha256(data).hexdigest()}"


def _written(fake: FakeLibuplink) -> dict[int, int]:
    """Bytes written per part number."""
    out: dict[int, int] = collections.Counter()
    for number, n in fake.part_writes:
        out[number] += n
    return dict(out)


async def test_large_blob_resumes_without_sending_its_parts_again(
    origin: StorjOrigin, fake: FakeLibuplink, tmp_path: Path
) -> None:
    assert origin.part_size == origin.segment_size == 64 << 20  # production parts: one segment each
    part = 64 << 20
    size = (150 << 20) + 12345
    path, data, key = _blob_file(tmp_path, size)
    reads: list[int] = []

    # The source fails as the second part is read: the first, already on its way, is let through.
    with pytest.raises(
        OriginError, match=f"cannot write {key} to storj://bkt/pre: reading its source: .*Input/output error"
    ):
        await origin.put_blob(key, lambda: Source(path, reads, fail_at=part), size)
    [(upload_id, upload)] = fake.pending.items()
    assert upload["key"] == f"pre/{key}" and upload["state"] == "pending"
    assert list(upload["parts"]) == [1]
    assert upload["parts"][1] == {"data": data[:part], "etag": _sha(data[:part])}
    assert _written(fake) == {1: part} and max(n for _, n in fake.part_writes) <= 1 << 20
    assert f"pre/{key}" not in fake.objects and not await origin.exists(key)  # readers see nothing
    assert "uplink_abort_upload" not in fake.calls and "uplink_upload_object" not in fake.calls
    assert fake.all_released()

    fake.part_writes.clear()
    reads.clear()
    await origin.put_blob(key, lambda: Source(path, reads), size)
    assert fake.objects[f"pre/{key}"] == data
    assert upload["state"] == "committed" and fake.calls.count("uplink_begin_upload") == 1
    assert fake.upload_listings == [f"pre/{key}"] * 2  # exactly this key, no trailing slash
    # Part 1 was read from the file to check it against its ETag, and not sent again.
    assert _written(fake) == {2: part, 3: size - 2 * part}
    assert sum(reads) == size and not fake.ranges
    assert (origin.stats.parts_reused, origin.stats.parts_uploaded) == (1, 3)
    assert origin.stats.bytes_uploaded == size
    assert "uplink_abort_upload" not in fake.calls and "uplink_part_upload_abort" not in fake.calls
    assert fake.all_released()
    assert fake.freed["part"] == 1 and fake.freed["commit_upload_result"] == 1

    # Already there: nothing is read or sent.
    fake.calls.clear()
    await origin.put_blob(key, lambda: Source(path, reads), size)
    assert "uplink_list_uploads" not in fake.calls and "uplink_upload_part" not in fake.calls


@pytest.mark.parametrize("damage", ["etag", "no etag", "size"])
async def test_parts_that_do_not_match_are_sent_again(
    origin: StorjOrigin, fake: FakeLibuplink, tmp_path: Path, damage: str
) -> None:
    origin.part_size = part = 1 << 20
    size = (3 << 20) + 500_000
    path, data, key = _blob_file(tmp_path, size)
    with pytest.raises(OriginError, match="Input/output error"):
        await origin.put_blob(key, lambda: Source(path, [], fail_at=2 * part), size)
    [upload] = fake.pending.values()
    assert sorted(upload["parts"]) == [1, 2]
    first = upload["parts"][1]
    if damage == "etag":  # another writer's bytes, or a digest of another kind
        first["etag"] = hashlib.md5(first["data"]).hexdigest().encode()
    elif damage == "no etag":
        first["etag"] = None
    else:
        first["data"] = first["data"][:-1]
    fake.part_writes.clear()
    await origin.put_blob(key, lambda: Source(path, []), size)
    assert fake.objects[f"pre/{key}"] == data
    assert _written(fake) == {1: part, 3: part, 4: size - 3 * part}
    assert origin.stats.parts_reused == 1
    assert fake.all_released()


async def test_cancelled_multipart_upload_stays_pending(
    origin: StorjOrigin, fake: FakeLibuplink, tmp_path: Path
) -> None:
    origin.part_size = part = 1 << 20
    size = 6 * part
    path, data, key = _blob_file(tmp_path, size)
    with trio.CancelScope() as scope:
        cancel = (3 * part, lambda: trio.from_thread.run_sync(scope.cancel))
        await origin.put_blob(key, lambda: Source(path, [], on_reaching=cancel), size)
    assert scope.cancelled_caught
    [upload] = fake.pending.values()
    assert upload["state"] == "pending"  # left for the next attempt, not aborted
    assert "uplink_abort_upload" not in fake.calls and f"pre/{key}" not in fake.objects
    # Parts interrupted on their way were aborted; the others are in the upload. Reading part 4
    # took a slot twice after the first two: two parts at least were done by then.
    assert {p["state"] for p in fake.part_uploads.values()} <= {"committed", "aborted"}
    kept = set(upload["parts"])
    assert len(kept) >= 2 and kept <= {1, 2, 3}
    assert fake.all_released()

    fake.part_writes.clear()
    await origin.put_blob(key, lambda: Source(path, []), size)
    assert fake.objects[f"pre/{key}"] == data and upload["state"] == "committed"
    assert set(_written(fake)) == set(range(1, 7)) - kept
    assert origin.stats.parts_reused == len(kept)
    assert fake.all_released()


async def test_small_blobs_keep_the_single_upload(origin: StorjOrigin, fake: FakeLibuplink) -> None:
    origin.part_size = 1 << 20
    data = _blob(1 << 20)
    await origin.put_blob("p2pimg/blobs/sha256/aa", lambda: io.BytesIO(data), len(data))
    assert fake.objects["pre/p2pimg/blobs/sha256/aa"] == data
    assert "uplink_upload_object" in fake.calls
    assert not {"uplink_list_uploads", "uplink_begin_upload", "uplink_upload_part"} & set(fake.calls)
    # One byte more: two parts.
    fake.calls.clear()
    data += b"!"
    await origin.put_blob("p2pimg/blobs/sha256/bb", lambda: io.BytesIO(data), len(data))
    assert fake.objects["pre/p2pimg/blobs/sha256/bb"] == data
    assert _written(fake) == {1: 1 << 20, 2: 1}
    # Its only single upload is its completion stamp, written right before the commit.
    assert fake.calls.count("uplink_upload_object") == 1
    assert fake.calls.index("uplink_upload_object") < fake.calls.index("uplink_commit_upload")
    assert fake.objects["pre/p2pimg/completed/blobs/sha256/bb"] == b""
    # More parts than an upload may have: a single upload too.
    origin.part_size = 1
    fake.calls.clear()
    await origin.put_blob("p2pimg/blobs/sha256/cc", lambda: io.BytesIO(data[:10_001]), 10_001)
    assert fake.objects["pre/p2pimg/blobs/sha256/cc"] == data[:10_001]
    assert "uplink_upload_object" in fake.calls and "uplink_begin_upload" not in fake.calls
    assert fake.all_released()


async def test_newest_pending_upload_is_resumed(origin: StorjOrigin, fake: FakeLibuplink) -> None:
    origin.part_size = part = 1 << 20
    data = _blob(3 * part)
    pieces = {n: data[(n - 1) * part : n * part] for n in (1, 2, 3)}
    fake.add_pending("pre/k", {1: pieces[1]}, _sha)
    newest = fake.add_pending("pre/k", {1: pieces[1], 2: pieces[2]}, _sha)
    fake.add_pending("pre/k2", {1: pieces[1], 2: pieces[2], 3: pieces[3]}, _sha)  # another key
    await origin.put_blob("k", lambda: io.BytesIO(data), len(data))
    assert fake.objects["pre/k"] == data
    assert fake.pending[newest]["state"] == "committed" and _written(fake) == {3: part}
    assert "uplink_begin_upload" not in fake.calls


async def test_pending_upload_that_does_not_fit_is_aborted(origin: StorjOrigin, fake: FakeLibuplink) -> None:
    origin.part_size = part = 1 << 20
    data = _blob(2 * part + 10)
    # A plain upload's segments are part 0; a part past the end, or larger than a part, would
    # survive into the object, since Storj commits all of an upload's segments.
    for parts in ({0: data[:part]}, {1: data[:part], 4: b"x"}, {1: data[: part + 1]}):
        fake.pending.clear()
        stale = fake.add_pending("pre/k", parts, _sha)
        fake.objects.pop("pre/k", None)
        fake.part_writes.clear()
        await origin.put_blob("k", lambda: io.BytesIO(data), len(data))
        assert fake.objects["pre/k"] == data
        assert fake.pending[stale]["state"] == "aborted"
        assert _written(fake) == {1: part, 2: part, 3: 10}
    assert fake.all_released()


async def test_upload_gone_meanwhile_starts_over(origin: StorjOrigin, fake: FakeLibuplink) -> None:
    origin.part_size = part = 1 << 20
    data = _blob(2 * part)
    fake.add_pending("pre/k", {1: data[:part]}, _sha)
    fake.fail["uplink_list_upload_parts"] = (0x21, 'uplink: object not found ("pre/k")')
    await origin.put_blob("k", lambda: io.BytesIO(data), len(data))
    assert fake.objects["pre/k"] == data and _written(fake) == {1: part, 2: part}
    assert "uplink_abort_upload" not in fake.calls
    fake.objects.clear()
    fake.fail["uplink_list_upload_parts"] = (0x09, "uplink: permission denied\n\tstack")
    fake.add_pending("pre/k", {1: data[:part]}, _sha)
    with pytest.raises(
        OriginError,
        match="^cannot look for an upload to resume of k on storj://bkt/pre: uplink: permission denied$",
    ):
        await origin.put_blob("k", lambda: io.BytesIO(data), len(data))
    assert fake.all_released()


async def test_multipart_failures_leave_the_upload_to_resume(
    origin: StorjOrigin, fake: FakeLibuplink
) -> None:
    origin.part_size = part = 1 << 20
    data = _blob(3 * part)
    # A part that cannot start: its handle (uplink-c v1.13 makes one anyway) is only freed.
    fake.fail["uplink_upload_part"] = (0x05, "uplink: too many requests\n\tstack")
    with pytest.raises(
        OriginError, match="^cannot write part [12] of k on storj://bkt/pre: uplink: too many"
    ):
        await origin.put_blob("k", lambda: io.BytesIO(data), len(data))
    assert fake.all_released() and "uplink_part_upload_abort" not in fake.calls
    del fake.fail["uplink_upload_part"]
    # A write fails: that part is aborted, the upload stays.
    fake.fail["uplink_part_upload_write"] = (0x07, "uplink: storage limit exceeded\n\tstack")
    with pytest.raises(
        OriginError, match="^cannot write part [12] of k on storj://bkt/pre: uplink: storage limit exceeded$"
    ):
        await origin.put_blob("k", lambda: io.BytesIO(data), len(data))
    assert fake.calls.count("uplink_part_upload_abort") >= 1
    del fake.fail["uplink_part_upload_write"]
    # The commit fails: every part is in, the upload stays pending.
    fake.fail["uplink_commit_upload"] = (0x02, "uplink: metaclient: commit failed\n\tstack")
    with pytest.raises(
        OriginError, match="^cannot commit the upload of k on storj://bkt/pre: .*commit failed$"
    ):
        await origin.put_blob("k", lambda: io.BytesIO(data), len(data))
    assert "pre/k" not in fake.objects
    del fake.fail["uplink_commit_upload"]
    pending = [u for u in fake.pending.values() if u["state"] == "pending" and len(u["parts"]) == 3]
    assert len(pending) == 1
    # The next attempt only commits.
    fake.part_writes.clear()
    reused = origin.stats.parts_reused
    await origin.put_blob("k", lambda: io.BytesIO(data), len(data))
    assert fake.objects["pre/k"] == data and fake.part_writes == []
    assert origin.stats.parts_reused - reused == 3
    assert "uplink_abort_upload" not in fake.calls
    assert fake.all_released()


async def test_multipart_result_of_the_wrong_size_is_an_error(
    origin: StorjOrigin, fake: FakeLibuplink
) -> None:
    origin.part_size = 1 << 20
    data = _blob(3 << 20)
    fake.commit_extra = b"x"
    with pytest.raises(
        OriginError,
        match=f"k on storj://bkt/pre has {len(data) + 1} bytes after upload, expected {len(data)}",
    ):
        await origin.put_blob("k", lambda: io.BytesIO(data), len(data))


async def test_multipart_source_errors(origin: StorjOrigin, fake: FakeLibuplink) -> None:
    origin.part_size = 1 << 20
    data = _blob(3 << 20)
    with pytest.raises(OriginError, match="source for k ended early"):
        await origin.put_blob("k", lambda: io.BytesIO(data[:-1]), len(data))

    def missing() -> io.BytesIO:
        raise FileNotFoundError(2, "No such file or directory")

    with pytest.raises(
        OriginError, match="cannot write k to storj://bkt/pre: cannot open its source: .*No such"
    ):
        await origin.put_blob("k", missing, len(data))
    assert "pre/k" not in fake.objects and fake.all_released()


# -- list, delete, lifecycle ---------------------------------------------------------------------


async def test_list_with_prefix(origin: StorjOrigin, fake: FakeLibuplink) -> None:
    for k in (
        "pre/p2pimg/tags/a/2",
        "pre/p2pimg/tags/a/1",
        "pre/p2pimg/tags/a/sub/x",
        "pre/p2pimg/tags/ab/1",
        "pre/p2pimg/blobs/sha256/ff",
        "other/p2pimg/tags/a/3",
    ):
        fake.objects[k] = b""
    assert await origin.list("p2pimg/tags/a/") == [
        "p2pimg/tags/a/1",
        "p2pimg/tags/a/2",
        "p2pimg/tags/a/sub/x",
    ]
    assert fake.listings == [("pre/p2pimg/tags/a/", True)]
    assert await origin.list("p2pimg/nothing/") == []
    assert fake.freed["iterator"] == 2 and fake.freed["object"] == 3
    with pytest.raises(InvalidInput):
        await origin.list("p2pimg/tags/a")


async def test_failed_listing_is_an_error_not_an_empty_list(origin: StorjOrigin, fake: FakeLibuplink) -> None:
    fake.objects.update({"pre/p/a": b"", "pre/p/b": b"", "pre/p/c": b""})
    for after in (0, 2):
        fake.list_fails_after = after
        with pytest.raises(OriginError, match="cannot list p/ on storj://bkt/pre: .*connection reset"):
            await origin.list("p/")
    assert fake.freed["error"] == 2 and fake.freed["iterator"] == 2


async def test_list_info_dates_objects_by_their_creation_time(
    origin: StorjOrigin, fake: FakeLibuplink
) -> None:
    fake.objects.update({"pre/p2pimg/blocks/b": b"", "pre/p2pimg/blocks/a": b"", "pre/p2pimg/tags/x/1": b""})
    fake.created.update({"pre/p2pimg/blocks/a": 1_700_000_100, "pre/p2pimg/blocks/b": 1_700_000_200})
    assert await origin.list_info("p2pimg/blocks/") == [
        ObjectInfo("p2pimg/blocks/a", 1_700_000_100.0),
        ObjectInfo("p2pimg/blocks/b", 1_700_000_200.0),
    ]
    assert await origin.list("p2pimg/blocks/") == ["p2pimg/blocks/a", "p2pimg/blocks/b"]
    # Creation times come only with system metadata, which a plain listing does not ask for.
    assert fake.listings == [("pre/p2pimg/blocks/", True)] * 2 and fake.listed_system == [True, False]
    assert fake.freed["iterator"] == 2 and fake.freed["object"] == 4 and fake.all_released()
    # An object listed without a creation time must not look old: the listing is an error.
    fake.created["pre/p2pimg/blocks/a"] = 0
    with pytest.raises(OriginError, match="no creation time for 'p2pimg/blocks/a'"):
        await origin.list_info("p2pimg/blocks/")
    fake.list_fails_after = 1
    with pytest.raises(OriginError, match="cannot list p2pimg/blocks/ on storj://bkt/pre: .*reset"):
        await origin.list_info("p2pimg/blocks/")


async def test_uploads_are_dated_as_storj_dates_them(origin: StorjOrigin, fake: FakeLibuplink) -> None:
    await origin.put_bytes("p2pimg/blocks/small", b"x")  # a single upload: when it was committed
    origin.part_size = 1 << 20
    fake.clock = 1_700_000_500
    data = _blob(3 << 20)
    await origin.put_blob("p2pimg/blobs/sha256/big", lambda: io.BytesIO(data), len(data))
    began = fake.created["pre/p2pimg/blobs/sha256/big"]  # multipart: when the upload began
    stamped = fake.created["pre/p2pimg/completed/blobs/sha256/big"]  # its completion stamp
    assert began == 1_700_000_500 and fake.clock >= stamped > began
    assert {i.key: i.modified for i in await origin.list_info("p2pimg/")} == {
        "p2pimg/blobs/sha256/big": began,
        "p2pimg/completed/blobs/sha256/big": stamped,
        "p2pimg/blocks/small": 1_700_000_000,
    }


async def test_gc_dates_a_multipart_object_by_its_completion_stamp(
    origin: StorjOrigin, fake: FakeLibuplink
) -> None:
    """Storj dates the object by when its upload began: an upload that took longer than the grace
    is young all the same by its stamp, which goes with it."""
    from p2pimg.ops import admin

    origin.part_size = 1 << 20
    data = _blob(3 << 20)
    key, stamp = "p2pimg/blobs/sha256/big", "p2pimg/completed/blobs/sha256/big"
    await origin.put_blob(key, lambda: io.BytesIO(data), len(data))
    stamped = fake.created[f"pre/{stamp}"]
    fake.created[f"pre/{key}"] = stamped - 7200  # its upload began two hours before it completed
    young = await admin.plan_gc(origin, now=stamped + 60)
    assert young.garbage == [] and young.young == [key, stamp]
    old = await admin.plan_gc(origin, now=stamped + admin.DEFAULT_GRACE + 60)
    assert old.garbage == [key, stamp]
    assert await admin.run_gc(origin, old, now=stamped + 60) == 2
    assert f"pre/{key}" not in fake.objects and f"pre/{stamp}" not in fake.objects


async def test_gc_spares_young_objects(origin: StorjOrigin, fake: FakeLibuplink) -> None:
    """gc over Storj: an unreachable object goes only once its creation time is past the grace."""
    from p2pimg.ops import admin

    now = 1_800_000_000
    young, old = "p2pimg/blobs/sha256/" + "ab" * 32, "p2pimg/blobs/sha256/" + "cd" * 32
    fake.objects.update({f"pre/{young}": b"y", f"pre/{old}": b"o", "pre/p2pimg/blocks/x": b""})
    fake.created.update(
        {f"pre/{young}": now - 60, f"pre/{old}": now - 3600, "pre/p2pimg/blocks/x": now - 3599}
    )
    plan = await admin.plan_gc(origin, now=now)
    assert not plan.problems and plan.garbage == [old]
    assert sorted(plan.young) == [young, "p2pimg/blocks/x"]
    assert await admin.run_gc(origin, plan) == 1
    assert f"pre/{old}" not in fake.objects and f"pre/{young}" in fake.objects


def test_native_listing_runs_in_the_real_libuplink() -> None:
    """The listing, as `NativeBucket.list_objects` makes it (system metadata asked for), on the real
    library: an invalid project handle fails fast, offline, with the iterator's error."""
    lib = _real_lib()
    native = storj_native.NativeBucket(_wrapper(), BUCKET)
    project = collections.namedtuple("project", "project uplink")(
        ctypes.pointer(_wrapper().defs._ProjectStruct(1 << 40)),
        collections.namedtuple("uplink", "m_libuplink")(lib),
    )
    for system in (True, False):
        with pytest.raises(storj_native.NativeError, match="invalid handle") as caught:
            native.list_objects(project, "p2pimg/", system=system)
        assert caught.value.code == 0x04


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


async def test_project_opened_lazily_once_and_closed(
    origin: StorjOrigin, fake: FakeLibuplink, opened: Opened
) -> None:
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
    with pytest.raises(
        OriginError,
        match="cannot open the Storj project for storj://bkt: uplink: dial tcp: connection refused$",
    ):
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
    with pytest.raises(
        InvalidInput,
        match="STORJ_ACCESS does not hold a usable access grant "
        r"\(uplink: invalid access grant format\)",
    ):
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
    real = storj_native.importlib.import_module

    def no_storj(name: str, package: str | None = None) -> Any:
        if name.startswith("storj_uplink"):
            raise ModuleNotFoundError("No module named 'storj_uplink'", name="storj_uplink")
        return real(name, package)

    monkeypatch.setattr(storj_native.importlib, "import_module", no_storj)
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
        raise OSError(
            ".../storj_uplink/libuplink.so: cannot open shared object file: wrong ELF class: ELFCLASS64"
        )

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

    code = (
        "import sys, p2pimg.cli.main, p2pimg.sources.origins, p2pimg.sources.origins.storj; "
        "assert not [m for m in sys.modules if m.startswith('storj_uplink')]"
    )
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
        for offset, length in ((0, len(data)), (1, 10), ((1 << 20) - 1, (1 << 20) + 2), (len(data) - 5, 5)):
            assert b"".join(await _read(origin, blob, offset, length)) == data[offset : offset + length]
        assert await origin.get(tag, max_size=100) == b"record"
        with pytest.raises(OriginError):
            await origin.get(blob, max_size=1000)
        assert await origin.list("p2pimg/") == sorted([blob, tag])
        infos = await origin.list_info("p2pimg/")
        assert [info.key for info in infos] == sorted([blob, tag])
        assert all(abs(info.modified - time.time()) < 3600 for info in infos)  # the satellite's clock
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


async def test_live_multipart_round_trip(live_origin: StorjOrigin, tmp_path: Path) -> None:
    """~130 MiB in three parts: interrupted after the first part, resumed, read back."""
    origin = live_origin
    part = origin.part_size
    assert part == 64 << 20
    size = (130 << 20) + 4321
    path, data, blob = _blob_file(tmp_path, size, seed=11)
    try:
        with pytest.raises(OriginError, match="Input/output error"):
            await origin.put_blob(blob, lambda: Source(path, [], fail_at=part), size)
        assert not await origin.exists(blob)  # a pending upload is invisible
        assert origin.stats.parts_uploaded == 1
        await origin.put_blob(blob, lambda: Source(path, []), size)
        assert (origin.stats.parts_reused, origin.stats.parts_uploaded) == (1, 3)
        assert await origin.exists(blob)
        whole = b"".join(await _read(origin, blob, 0, size))
        assert hashlib.sha256(whole).digest() == hashlib.sha256(data).digest()
        for offset, length in ((part - 10, 20), (2 * part - 1, 2), (size - 5, 5)):
            assert b"".join(await _read(origin, blob, offset, length)) == data[offset : offset + length]
        assert await origin.list("p2pimg/") == [blob]
    finally:
        with trio.CancelScope(shield=True):
            await origin.delete(blob)
            # Whatever an interrupted run left pending.
            project = await origin._project_handle()
            path_in_bucket = origin._path(blob)
            for _created, upload_id in await trio.to_thread.run_sync(
                origin._native.list_uploads, project, path_in_bucket
            ):
                await trio.to_thread.run_sync(origin._native.abort_upload, project, path_in_bucket, upload_id)
            assert await origin.list("p2pimg/") == []
            await origin.aclose()
