"""`file://DIR`: the embedded origin, a plain directory with the origin key layout."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import trio

from p2pimg.errors import InvalidInput, OriginError, OriginNotFound
from p2pimg.sources.origins.base import BlobReader, ObjectInfo, Origin

_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)*/?$")
_PIECE = 256 << 10  # bytes read at a time: a few requests in flight hold little memory


class FileOrigin(Origin):
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        # Keys come from validated names, tags, digests and CIDs; this is the last line.
        if not _KEY_RE.match(key) or ".." in key.split("/"):
            raise InvalidInput(f"invalid origin key {key[:100]!r}")
        return self.root / key

    def read_range(self, key: str, offset: int, length: int) -> AsyncIterator[bytes]:
        return self._read(key, offset, length, shorter=False)

    def read_head(self, key: str, length: int) -> AsyncIterator[bytes]:
        return self._read(key, 0, length, shorter=True)

    async def _read(self, key: str, offset: int, length: int, *, shorter: bool) -> AsyncIterator[bytes]:
        path = self._path(key)
        try:
            fd = await trio.to_thread.run_sync(os.open, path, os.O_RDONLY)
        except FileNotFoundError:
            raise OriginNotFound(f"origin has no {key}") from None
        except OSError as exc:
            raise OriginError(f"cannot read {key} from {self.url}: {exc}") from None
        try:
            end = offset + length
            while offset < end:
                piece = await trio.to_thread.run_sync(os.pread, fd, min(_PIECE, end - offset), offset)
                if not piece:
                    if shorter:
                        return
                    raise OriginError(f"{key} in {self.url} is shorter than expected")
                offset += len(piece)
                yield piece
        finally:
            os.close(fd)

    async def get(self, key: str, *, max_size: int) -> bytes:
        path = self._path(key)

        def read() -> bytes:
            with open(path, "rb") as f:
                # Refuse on the size the file system reports, before reading a byte; the bounded
                # read below still holds for files that grow, or report no size (a FIFO).
                if os.fstat(f.fileno()).st_size > max_size:
                    raise OriginError(f"{key} in {self.url} exceeds {max_size} bytes")
                data = f.read(max_size + 1)
            if len(data) > max_size:
                raise OriginError(f"{key} in {self.url} exceeds {max_size} bytes")
            return data

        try:
            return await trio.to_thread.run_sync(read)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise OriginNotFound(f"origin has no {key}") from None
        except OSError as exc:
            raise OriginError(f"cannot read {key} from {self.url}: {exc}") from None

    async def exists(self, key: str) -> bool:
        return await trio.to_thread.run_sync(self._path(key).is_file)

    def _write(self, key: str, fill: BlobReader | bytes, size: int) -> None:
        dest = self._path(key)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".part-")
        except OSError as exc:
            raise OriginError(f"cannot write {key} to {self.url}: {exc}") from None
        try:
            with os.fdopen(fd, "wb") as out:
                if isinstance(fill, bytes):
                    out.write(fill)
                else:
                    with fill() as src:
                        remaining = size
                        while remaining:
                            piece = src.read(min(_PIECE, remaining))
                            if not piece:
                                raise OriginError(f"source for {key} ended early")
                            out.write(piece)
                            remaining -= len(piece)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            full = " (disk full)" if exc.errno == errno.ENOSPC else ""
            raise OriginError(f"cannot write {key} to {self.url}{full}: {exc}") from None
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    async def put_bytes(self, key: str, data: bytes) -> None:
        await trio.to_thread.run_sync(self._write, key, data, len(data))

    async def put_blob(self, key: str, open_reader: BlobReader, size: int) -> None:
        await trio.to_thread.run_sync(self._write, key, open_reader, size)

    async def delete(self, key: str) -> None:
        path = self._path(key)

        def remove() -> None:
            try:
                path.unlink()
            except FileNotFoundError:
                return
            except OSError as exc:
                raise OriginError(f"cannot delete {key} from {self.url}: {exc}") from None

        await trio.to_thread.run_sync(remove)

    def _walk(self, prefix: str, *, mtimes: bool) -> list[ObjectInfo]:
        infos = []
        for dirpath, _dirs, files in os.walk(self._path(prefix)):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in files:
                if name.startswith(".part-"):  # a write in progress
                    continue
                modified = 0.0
                if mtimes:
                    try:
                        modified = os.stat(os.path.join(dirpath, name)).st_mtime
                    except FileNotFoundError:
                        continue  # deleted since the directory was read
                    except OSError as exc:
                        raise OriginError(f"cannot list {prefix} in {self.url}: {exc}") from None
                infos.append(ObjectInfo(f"{rel}/{name}", modified))
        return sorted(infos, key=lambda info: info.key)

    async def list_info(self, prefix: str) -> list[ObjectInfo]:
        return await trio.to_thread.run_sync(partial(self._walk, prefix, mtimes=True))

    async def list(self, prefix: str) -> list[str]:
        return [info.key for info in await trio.to_thread.run_sync(partial(self._walk, prefix, mtimes=False))]
