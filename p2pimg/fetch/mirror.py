"""Pull-through mirror mode: names not published to p2pimg come from upstream registries.

Upstream bytes can only be checked against the whole blob's digest, so they follow a rule of
their own: they may stream to the requesting client as they arrive (clients check the digest
too), except the last byte, which is held until the digest matched; on a mismatch the response is
cut. They become visible in the cache (and so to peers) only once the digest matched, and then
as a chunk-mapped blob like any other: chunk CIDs are computed while the bytes stream in, and the
blob map is stored beside the blob.

What an upstream gives only with the user's credentials (from the Docker config) may be private:
its manifests, blobs and blob maps are marked so before they become visible, and the peer listener
serves marked content only when a swarm key guards it (web/peerapi.py).

Mutable upstream tags are re-checked after `tag_ttl` seconds; manifests by digest never change.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from p2pimg.content.cid import Cid, parse_digest
from p2pimg.content.model import DEFAULT_CHUNK_SIZE, MAX_MANIFEST_SIZE, BlobMap, check_name, check_tag
from p2pimg.errors import CacheError, NameUnknown, OriginError, P2pimgError, VerificationError
from p2pimg.fetch.resolver import Manifest
from p2pimg.metrics import Metrics
from p2pimg.sources.upstream.client import UpstreamClient
from p2pimg.sources.upstream.refs import normalize_repo
from p2pimg.store.chunks import ChunkStore
from p2pimg.tasks import guarded

log = logging.getLogger(__name__)

# An upstream registry, as the edge names one (from `Mirror.upstream_for`) without talking to it.
Upstream = UpstreamClient

_TAG_FILE_MAX = 512


@dataclass(eq=False)
class UpstreamFetch:
    """One in-flight download of an upstream blob, shared by its readers."""

    digest: str
    size: int
    path: Path
    fd: int
    private: bool = False  # fetched with the user's credentials: peers need the swarm key
    written: int = 0
    verified: bool = False
    error: P2pimgError | None = None
    readers: int = 0
    done: trio.Event = field(default_factory=trio.Event)
    progress: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    def _advance(self) -> None:
        self.progress.set()
        self.progress = trio.Event()

    def readable(self) -> int:
        """Bytes a reader may take now: everything once verified, else all but the last byte."""
        return self.size if self.verified else min(self.written, max(self.size - 1, 0))


class Mirror:
    def __init__(
        self,
        store: ChunkStore,
        upstreams: list[UpstreamClient],
        nursery: trio.Nursery,
        metrics: Metrics,
        *,
        tag_ttl: float = 300.0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        self.store = store
        self.upstreams = upstreams
        self.nursery = nursery
        self.metrics = metrics
        self.tag_ttl = tag_ttl
        self.chunk_size = chunk_size
        self._root = store.root / "upstream"
        self._fetches: dict[str, UpstreamFetch] = {}
        self.on_blob_map: Callable[[BlobMap], None] = lambda _bmap: None  # the chunk index

    def upstream_for(self, ns: str | None) -> UpstreamClient | None:
        """The upstream a request means: containerd names it with `?ns=`, others get the first."""
        if not self.upstreams:
            return None
        if ns is None:
            return self.upstreams[0]
        wanted = "docker.io" if ns in ("docker.io", "index.docker.io", "registry-1.docker.io") else ns
        return next((u for u in self.upstreams if u.host == wanted), None)

    # -- manifests -------------------------------------------------------------------------

    def _dir(self, upstream: UpstreamClient, repo: str) -> Path:
        # host is ours (from --upstream); repo is a validated name, so the path stays inside.
        return self._root / upstream.host.replace(":", "_") / check_name(repo)

    def _remember(self, upstream: UpstreamClient, repo: str, manifest: Manifest, tag: str | None) -> None:
        cid = Cid.from_digest(manifest.digest)
        if upstream.credentialed:  # marked before it is visible, so no peer ever sees it unmarked
            self.store.mark_private(manifest.digest[7:])
        self.store.put_block(cid, manifest.data)
        base = self._dir(upstream, repo)
        self.store.write_small(base / "manifests" / manifest.digest[7:], manifest.media_type.encode())
        if tag is not None:
            self.store.write_small(base / "tags" / tag, f"{manifest.digest} {time.time()}".encode())

    def _cached(self, upstream: UpstreamClient, repo: str, digest: str) -> Manifest | None:
        data = self.store.get_block(Cid.from_digest(digest))
        if data is None:
            return None
        try:
            media = (self._dir(upstream, repo) / "manifests" / digest[7:]).read_text()
        except OSError:
            return None
        return Manifest(digest=digest, media_type=media, data=data)

    def _cached_tag(self, upstream: UpstreamClient, repo: str, tag: str) -> tuple[str, float] | None:
        try:
            raw = (self._dir(upstream, repo) / "tags" / tag).read_bytes()[:_TAG_FILE_MAX].decode()
            digest, checked = raw.split()
            parse_digest(digest)
            return digest, float(checked)
        except (OSError, ValueError, P2pimgError):
            return None

    async def manifest(self, upstream: UpstreamClient, name: str, reference: str) -> Manifest:
        repo = normalize_repo(upstream.host, name)
        if ":" in reference:
            parse_digest(reference)
            cached = await trio.to_thread.run_sync(self._cached, upstream, repo, reference)
            if cached is not None:
                return cached
            got = await upstream.get_manifest(repo, reference)
            manifest = Manifest(got.digest, got.media_type, got.data)
            await trio.to_thread.run_sync(self._remember, upstream, repo, manifest, None)
            return manifest
        check_tag(reference)
        known = await trio.to_thread.run_sync(self._cached_tag, upstream, repo, reference)
        if known is not None and time.time() - known[1] < self.tag_ttl:
            cached = await trio.to_thread.run_sync(self._cached, upstream, repo, known[0])
            if cached is not None:
                return cached
        try:
            got = await upstream.get_manifest(repo, reference)
        except OriginError as exc:
            if isinstance(exc, NameUnknown) or known is None:
                raise
            cached = await trio.to_thread.run_sync(self._cached, upstream, repo, known[0])
            if cached is None:
                raise
            log.warning(
                "upstream %s unreachable (%s); serving %s:%s as last seen",
                upstream.host,
                exc.message,
                repo,
                reference,
            )
            return cached
        if len(got.data) > MAX_MANIFEST_SIZE:
            raise OriginError(f"upstream manifest {repo}:{reference} is too large")
        manifest = Manifest(got.digest, got.media_type, got.data)
        await trio.to_thread.run_sync(self._remember, upstream, repo, manifest, reference)
        return manifest

    # -- blobs -------------------------------------------------------------------------------

    async def blob_size(self, upstream: UpstreamClient, name: str, digest: str) -> int:
        if (fetch := self._fetches.get(digest)) is not None:
            return fetch.size
        return await upstream.blob_size(normalize_repo(upstream.host, name), digest)

    def open(self, upstream: UpstreamClient, name: str, digest: str, size: int) -> tuple[UpstreamFetch, int]:
        """Join (or start) the download of a blob: the fetch and a descriptor of its file for this
        reader, who must `release()` the fetch and close the fd when done (a request makes both
        its own with `Request.hold` before any await)."""
        fetch = self._fetches.get(digest)
        if fetch is None:
            fd, tmp = tempfile.mkstemp(dir=self.store.root / "tmp", prefix="upstream-")
            fetch = UpstreamFetch(digest, size, Path(tmp), fd, private=upstream.credentialed)
            self._fetches[digest] = fetch
            self.nursery.start_soon(
                guarded,
                f"upstream download of {digest}",
                self._download,
                upstream,
                normalize_repo(upstream.host, name),
                fetch,
            )
        fetch.readers += 1
        return fetch, os.dup(fetch.fd)

    def release(self, fetch: UpstreamFetch) -> None:
        fetch.readers -= 1
        if fetch.readers == 0 and not fetch.done.is_set():
            if self._fetches.get(fetch.digest) is fetch:
                del self._fetches[fetch.digest]
            fetch.scope.cancel()

    async def _download(self, upstream: UpstreamClient, repo: str, fetch: UpstreamFetch) -> None:
        whole = hashlib.sha256()
        chunks: list[Cid] = []
        buf = bytearray()
        self.metrics.source_requests.labels("upstream").inc()

        def write(data: bytes, offset: int) -> None:
            os.pwrite(fetch.fd, data, offset)
            whole.update(data)
            for i in range(0, len(data), self.chunk_size):
                chunks.append(Cid.of_raw(data[i : i + self.chunk_size]))

        try:
            with fetch.scope:
                async with contextlib.aclosing(upstream.read_blob(repo, fetch.digest)) as pieces:
                    async for piece in pieces:
                        buf += piece
                        if fetch.written + len(buf) > fetch.size:
                            raise VerificationError(
                                f"upstream sent more than {fetch.size} bytes of {fetch.digest}"
                            )
                        if len(buf) >= self.chunk_size:
                            cut = len(buf) - len(buf) % self.chunk_size
                            data = bytes(buf[:cut])
                            del buf[:cut]
                            await trio.to_thread.run_sync(write, data, fetch.written)
                            fetch.written += len(data)
                            fetch._advance()
                if buf:
                    await trio.to_thread.run_sync(write, bytes(buf), fetch.written)
                    fetch.written += len(buf)
                if fetch.written != fetch.size or "sha256:" + whole.hexdigest() != fetch.digest:
                    raise VerificationError(f"upstream bytes of {fetch.digest} do not match that digest")
                bmap = BlobMap(fetch.digest, fetch.size, self.chunk_size, tuple(chunks))
                await trio.to_thread.run_sync(self._keep, fetch, bmap)
                self.on_blob_map(bmap)
                fetch.verified = True
                self.metrics.source_bytes.labels("upstream").inc(fetch.size)
        except VerificationError as exc:
            self.metrics.verify_failures.labels("upstream").inc()
            fetch.error = exc
        except P2pimgError as exc:
            fetch.error = exc
        except OSError as exc:
            fetch.error = CacheError(f"cannot cache upstream blob {fetch.digest}: {exc}")
        except Exception as exc:  # a bug: this download fails, its readers are cut, the node serves on
            log.exception("upstream download of %s crashed", fetch.digest)
            fetch.error = OriginError(f"upstream download of {fetch.digest} failed: {exc!r}")
        finally:
            if self._fetches.get(fetch.digest) is fetch:
                del self._fetches[fetch.digest]
            if not fetch.verified:
                with contextlib.suppress(OSError):
                    fetch.path.unlink()
                if fetch.error is None:
                    fetch.error = OriginError(f"download of {fetch.digest} was cancelled")
                log.warning("upstream blob %s: %s", fetch.digest, fetch.error)
            fetch.done.set()
            fetch._advance()
            os.close(fetch.fd)

    def _keep(self, fetch: UpstreamFetch, bmap: BlobMap) -> None:
        """Make a verified upstream blob visible, with its blob map, as any other cached blob."""
        data = bmap.encode()
        map_cid = Cid.of_dag_cbor(data)
        if fetch.private:
            self.store.mark_private(map_cid.digest.hex())
            self.store.mark_private(fetch.digest[7:])
        self.store.put_block(map_cid, data)
        os.fsync(fetch.fd)
        os.replace(fetch.path, self.store.blob_path(fetch.digest))
        self.store.write_small(self._root / "maps" / fetch.digest[7:], str(map_cid).encode())

    async def wait_readable(self, fetch: UpstreamFetch, start: int, end: int) -> None:
        """Wait until the first of bytes [start, end) can be read, so that a reader answers a
        download that fails at once with an error, not a cut body; the download's error (a
        P2pimgError) when it failed before that."""
        while fetch.readable() <= start < end and fetch.error is None:
            await fetch.progress.wait()
        if fetch.error is not None and fetch.readable() <= start:
            raise fetch.error

    async def regions(
        self, fetch: UpstreamFetch, start: int, end: int
    ) -> AsyncGenerator[tuple[int, int], None]:
        """Bytes [start, end) of the blob's file as they become readable, in order, as (offset,
        length) regions. Raises the download's error (a P2pimgError) when the blob turns out wrong
        or cannot be had: what was read of it already must then not be taken for the blob. The
        reader owns the descriptor of the file and the count `open()` took (see there)."""
        offset = start
        while offset < end:
            available = min(fetch.readable(), end)
            if available > offset:
                yield offset, available - offset
                offset = available
                continue
            if fetch.error is not None:
                raise fetch.error
            await fetch.progress.wait()
