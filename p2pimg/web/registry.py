"""The read-only OCI distribution endpoint: routing, errors, and streaming blob bodies.

Routes (distribution-spec "pull" and "content discovery" categories only):

    GET/HEAD /v2/                                 API version check
    GET/HEAD /v2/<name>/manifests/<tag|digest>    manifest bytes, exactly as published
    GET/HEAD /v2/<name>/blobs/<digest>            blob bytes, single byte ranges
    GET      /v2/<name>/tags/list                 tag names (`n` and `last` paginate)
    GET/HEAD /v2/<name>/referrers/<digest>        an image index of the manifests whose subject is
                                                  <digest> (`artifactType` filters)

`<name>` is a published repository name, or `ipfs/<root CID>`, whose one tag is `latest` (the
image's top manifest).
Everything else that would write answers 405 UNSUPPORTED.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import AsyncIterator
from functools import partial
from typing import NoReturn

from p2pimg.content.cid import parse_digest
from p2pimg.content.graph import OCI_INDEX
from p2pimg.content.model import BlobEntry, BlobMap, check_name, check_tag
from p2pimg.content.referrers import ARTIFACT_TYPE_FILTER, referrer_descriptor, referrers_index
from p2pimg.errors import (
    DigestInvalid,
    EndpointUnknown,
    NameInvalid,
    NameUnknown,
    P2pimgError,
    RangeNotSatisfiable,
    VerificationError,
)
from p2pimg.fetch.engine import BlobFetch, Fetcher
from p2pimg.fetch.mirror import Mirror, Upstream
from p2pimg.fetch.nerdctl import FileBlob, FileMap
from p2pimg.fetch.resolver import IPFS_PREFIX, IPFS_TAG, Resolver, ipfs_cid
from p2pimg.metrics import CONTENT_TYPE_LATEST, Metrics, Timeline
from p2pimg.store.chunks import ChunkStore
from p2pimg.web.ranges import content_range, parse_range
from p2pimg.web.server import AbortResponse, BodyPart, FileRegion, Request, Response

log = logging.getLogger(__name__)

# Bytes of a mirrored blob already sent turned out wrong (its digest did not match, and the
# upstream's own bytes, fetched again, differ): the response is cut.
_SENT_WRONG = VerificationError("bytes already sent did not match the blob's digest")

API_HEADER = ("docker-distribution-api-version", "registry/2.0")
_READ_METHODS = ("GET", "HEAD")
_MAX_TAGS_PAGE = 10000


def error_response(exc: P2pimgError, *, head: bool = False) -> Response:
    """The distribution-spec JSON error body for `exc`; for an error the spec has no code for (a
    byte range), its message as plain text (a 4xx body "MAY be in any format")."""
    if exc.oci_code is None:
        body, content_type = exc.message.encode() + b"\n", "text/plain; charset=utf-8"
    else:
        body = json.dumps(
            {"errors": [{"code": exc.oci_code, "message": exc.message, "detail": exc.detail}]}
        ).encode()
        content_type = "application/json"
    headers = [API_HEADER, ("content-type", content_type), ("content-length", str(len(body)))]
    if isinstance(exc, RangeNotSatisfiable):
        headers.append(("content-range", f"bytes */{exc.size}"))
    return Response(exc.http_status, headers, b"" if head else body)


def _unsupported(method: str) -> Response:
    err = P2pimgError(f"{method} is not supported: this registry is read-only")
    err.oci_code, err.http_status = "UNSUPPORTED", 405
    resp = error_response(err)
    resp.headers.append(("allow", "GET, HEAD"))
    return resp


def check_repository(name: str) -> str:
    """A registry name: a published NAME, or `ipfs/<CID>` with a valid CID (a p2pimg image root,
    or a nerdctl image's descriptor file: raw, or dag-pb when another adder made it several
    blocks)."""
    check_name(name)
    if name.startswith(IPFS_PREFIX):
        try:
            ipfs_cid(name)
        except DigestInvalid as exc:
            raise NameInvalid(f"invalid image CID in {name!r}: {exc.message}") from None
    return name


class Registry:
    def __init__(
        self,
        store: ChunkStore,
        resolver: Resolver,
        fetcher: Fetcher,
        metrics: Metrics,
        mirror: Mirror | None = None,
    ) -> None:
        self.store = store
        self.resolver = resolver
        self.fetcher = fetcher
        self.metrics = metrics
        self.mirror = mirror

    async def handle(self, request: Request) -> Response:
        head = request.method == "HEAD"
        began = Timeline.now()
        try:
            response = await self._route(request)
            if request.path.startswith("/v2/"):  # when a client asked, and got its answer's head
                self.metrics.timeline.add(
                    "client", began, Timeline.now(), request=f"{request.method} {request.path[:160]}"
                )
            return response
        except P2pimgError as exc:
            if exc.http_status >= 500:
                log.warning("%s %s: %s", request.method, request.path[:300], exc)
            return error_response(exc, head=head)
        except Exception:
            log.exception("%s %s failed", request.method, request.path[:300])
            return error_response(P2pimgError("internal error"), head=head)

    async def _route(self, request: Request) -> Response:
        path = request.path
        if path in ("/v2", "/v2/"):
            if request.method not in _READ_METHODS:
                return _unsupported(request.method)
            return Response(
                200,
                [API_HEADER, ("content-type", "application/json"), ("content-length", "2")],
                b"" if request.method == "HEAD" else b"{}",
            )
        if path == "/metrics" and request.method in _READ_METHODS:
            body = self.metrics.render()
            return Response(
                200,
                [("content-type", CONTENT_TYPE_LATEST), ("content-length", str(len(body)))],
                b"" if request.method == "HEAD" else body,
            )
        if not path.startswith("/v2/"):
            raise EndpointUnknown(f"no such endpoint {path[:100]}")
        rest = path[len("/v2/") :]
        if "/blobs/uploads" in rest or request.method not in _READ_METHODS:
            return _unsupported(request.method)
        if rest.endswith("/tags/list"):
            return await self._tags(check_repository(rest[: -len("/tags/list")]), request)
        for marker, handler in (
            ("/manifests/", self._manifest),
            ("/blobs/", self._blob),
            ("/referrers/", self._referrers),
        ):
            name, sep, ref = rest.rpartition(marker)
            if sep:
                return await handler(check_repository(name), ref, request)
        raise EndpointUnknown(f"no such endpoint {path[:100]}")

    async def _manifest(self, name: str, reference: str, request: Request) -> Response:
        if ":" in reference:
            parse_digest(reference)
        else:
            check_tag(reference)
        upstream = await self._upstream_for(name, request)
        if upstream is not None:
            assert self.mirror is not None
            manifest = await self.mirror.manifest(upstream, name, reference)
        else:
            manifest = await self.resolver.manifest_for(name, reference)
        headers = [
            API_HEADER,
            ("content-type", manifest.media_type),
            ("docker-content-digest", manifest.digest),
            ("etag", f'"{manifest.digest}"'),
            ("content-length", str(len(manifest.data))),
        ]
        if request.method == "HEAD":
            return Response(200, headers)
        self.metrics.served_bytes.inc(len(manifest.data))
        return Response(200, headers, manifest.data)

    async def _tags(self, name: str, request: Request) -> Response:
        if name.startswith(IPFS_PREFIX):
            await self.resolver.manifest_for(name, IPFS_TAG)  # 404 if the root does not exist
            tags = [IPFS_TAG]
        else:
            tags = await self.resolver.tags(name)
        last = (request.query.get("last") or [""])[0]
        if last:
            tags = [t for t in tags if t > last]
        n_arg = (request.query.get("n") or [""])[0]
        headers = [API_HEADER, ("content-type", "application/json")]
        if re.fullmatch(r"[0-9]{1,9}", n_arg):
            n = min(int(n_arg), _MAX_TAGS_PAGE)
            # n=0 asks for no tags and gets no Link: a client following one would loop.
            if n == 0:
                tags = []
            elif len(tags) > n:
                tags = tags[:n]
                after = tags[-1] if tags else ""
                headers.append(("link", f'</v2/{name}/tags/list?n={n}&last={after}>; rel="next"'))
        body = json.dumps({"name": name, "tags": tags}).encode()
        headers.append(("content-length", str(len(body))))
        return Response(200, headers, body)

    async def _referrers(self, name: str, digest: str, request: Request) -> Response:
        """The referrers API: an OCI image index of the manifests whose subject is `digest`, an
        empty one when there are none (never a 404 for a published name, as the spec requires),
        filtered by `artifactType` when asked (saying so in `OCI-Filters-Applied`)."""
        parse_digest(digest)
        if await self._upstream_for(name, request) is not None:
            # A 404 makes clients fall back to the referrers tag schema, a tag the mirror serves.
            raise EndpointUnknown(
                f"{name} is mirrored from an upstream registry: its referrers are not "
                "listed here (the referrers tag schema's tag is)"
            )
        wanted = (request.query.get(ARTIFACT_TYPE_FILTER) or [""])[0]
        descriptors = []
        for referrer, entry in await self.resolver.referrers(name, digest):
            manifest = await self.resolver.manifest(entry, referrer)
            desc = referrer_descriptor(manifest.data, referrer, entry.media_type, digest)
            if not wanted or desc.get("artifactType") == wanted:
                descriptors.append(desc)
        body = referrers_index(descriptors)
        headers = [API_HEADER, ("content-type", OCI_INDEX), ("content-length", str(len(body)))]
        if wanted:
            headers.append(("oci-filters-applied", ARTIFACT_TYPE_FILTER))
        if request.method == "HEAD":
            return Response(200, headers)
        return Response(200, headers, body)

    async def _upstream_for(self, name: str, request: Request) -> Upstream | None:
        """The upstream registry a request goes to, or None for p2pimg's own images.

        containerd names the registry it means with `?ns=`: such a request is about that
        registry's image, never one published here under the same name. Without `ns`, names
        published here win and the rest go to the first upstream.
        """
        if self.mirror is None or name.startswith(IPFS_PREFIX):
            return None
        ns_values = request.query.get("ns")
        if ns_values:
            ns = ns_values[0]
            upstream = self.mirror.upstream_for(ns)
            if upstream is None:
                raise NameUnknown(f"this mirror does not serve registry {ns[:100]}")
            return upstream
        if await self.resolver.is_published(name):
            return None
        return self.mirror.upstream_for(None)

    async def _blob(self, name: str, digest: str, request: Request) -> Response:
        parse_digest(digest)
        ahead = (
            request.method == "GET"
            and not (  # another registry's
                self.mirror is not None and (request.query.get("ns") or self.resolver.seen_unpublished(name))
            )
            and not self.resolver.knows_blob(name, digest)
            and not self.store.has_blob(digest)
            and not self.store.has_partial(digest)  # a resumed fetch starts where it stopped
        )
        # Its first bytes come while the lookups below find its map (this request's read ahead:
        # one another request started is that one's to drop).
        ahead = ahead and self.fetcher.read_ahead(digest)
        try:
            upstream = await self._upstream_for(name, request)
            if upstream is not None:
                if ahead:
                    self.fetcher.drop_read_ahead(digest)
                return await self._upstream_blob(upstream, name, digest, request)
            entry = await self.resolver.blob_for(name, digest)
            status, start, end, headers = self._blob_headers(digest, entry.size, request)
            if request.method == "HEAD":
                return Response(status, headers)
            body = await self._blob_body(name, entry, digest, start, end, request)
        except P2pimgError:
            if ahead:  # not the name's, a bad range, no map: the read ahead is not wanted
                self.fetcher.drop_read_ahead(digest)
            raise
        return Response(status, headers, body)

    @staticmethod
    def _blob_headers(
        digest: str, size: int, request: Request
    ) -> tuple[int, int, int, list[tuple[str, str]]]:
        rng = parse_range(request.headers.get("range"), size)
        start, end = rng if rng is not None else (0, size)
        headers = [
            API_HEADER,
            ("content-type", "application/octet-stream"),
            ("docker-content-digest", digest),
            ("etag", f'"{digest}"'),
            ("accept-ranges", "bytes"),
            ("content-length", str(end - start)),
        ]
        if rng is None:
            return 200, start, end, headers
        headers.append(("content-range", content_range(start, end, size)))
        return 206, start, end, headers

    async def _upstream_blob(self, upstream: Upstream, name: str, digest: str, request: Request) -> Response:
        assert self.mirror is not None
        fd = self._open_cached(digest, request)
        if fd is not None:
            status, start, end, headers = self._blob_headers(digest, os.fstat(fd).st_size, request)
            if request.method == "HEAD":
                return Response(status, headers)
            return Response(status, headers, self._file_body(fd, start, end))
        bmap = await self.mirror.blob_map(upstream, name, digest)
        status, start, end, headers = self._blob_headers(digest, bmap.size, request)
        if request.method == "HEAD":
            return Response(status, headers)
        return Response(status, headers, await self._fetched_body(name, bmap, start, end, request))

    def _open_cached(self, digest: str, request: Request) -> int | None:
        """A descriptor of the complete cached blob, owned by `request` (a cache hit), or None (a
        miss)."""
        try:
            fd = request.open_file(self.store.blob_path(digest))
        except FileNotFoundError:
            self.metrics.cache_requests.labels("miss").inc()
            return None
        self.metrics.cache_requests.labels("hit").inc()
        self.store.touch(digest)  # last use, for the cache's LRU eviction
        return fd

    async def _blob_body(
        self, name: str, entry: BlobEntry | FileBlob, digest: str, start: int, end: int, request: Request
    ) -> AsyncIterator[BodyPart]:
        fd = self._open_cached(digest, request)
        if fd is not None:
            return self._file_body(fd, start, end)
        bmap = await self.resolver.blob_map(entry, digest)
        return await self._fetched_body(name, bmap, start, end, request)

    async def _fetched_body(
        self, name: str, bmap: BlobMap, start: int, end: int, request: Request
    ) -> AsyncIterator[BodyPart]:
        """Bytes [start, end) of a blob through the fetch engine (or the cache, if it completed
        meanwhile); the fetch's reader and descriptor belong to `request`."""
        fetch = await self.fetcher.open(bmap, repository=name)
        if fetch is None:  # completed while we looked
            return self._file_body(request.open_file(self.store.blob_path(bmap.digest)), start, end)
        request.hold(partial(self.fetcher.release, fetch))
        fd = request.dup(fetch.partial.fd)
        if start < end:
            # Wait for the first chunk before answering: a blob that cannot be fetched at all
            # gets an error status, not a truncated 200.
            await fetch.wait_chunk(start // bmap.chunk_size)
        return self._chunked_body(fetch, fd, start, end)

    async def _file_body(self, fd: int, start: int, end: int) -> AsyncIterator[BodyPart]:
        """A cached blob's bytes; `fd` belongs to the request (see `Request.hold`)."""
        yield FileRegion(fd, start, end - start)
        self.metrics.served_bytes.inc(end - start)

    async def _chunked_body(self, fetch: BlobFetch, fd: int, start: int, end: int) -> AsyncIterator[BodyPart]:
        """Blob bytes in order, each chunk sent as soon as it is on disk (the fetch's reader and
        `fd` belong to the request). Chunks of a blob with CIDs are verified first. Of a blob only
        its digest checks (mirrored), chunks this node fetched from the upstream itself go at once,
        while a peer's chunks and the last one wait for the digest check: a lying peer then costs
        the client time, not a failed pull. The chunks of a nerdctl image's blob are checked by
        their CIDs, but nothing binds those to its digest (another blob's leaves can claim it):
        its last chunk waits too, so that a client never gets a whole blob that is not the digest
        it asked for."""
        bmap = fetch.map
        unbound = isinstance(bmap, FileMap) and bmap.checked
        offset = start
        index = start // bmap.chunk_size if bmap.count else 0
        sent_in = fetch.round  # the round whose bytes this response sends
        while offset < end:
            try:
                await fetch.wait_chunk(index)
            except P2pimgError as exc:
                self._abort(bmap, offset, exc)
            _, hi = bmap.bounds(index)
            stop = min(hi, end)
            if (unbound and hi == bmap.size) or (
                not bmap.checked and (fetch.round != sent_in or not fetch.firsthand[index] or hi == bmap.size)
            ):
                await fetch.done.wait()
                if fetch.error is not None:
                    self._abort(bmap, offset, fetch.error)
                first = start // bmap.chunk_size
                if offset > start and any(first <= i < index for i in fetch.changed):
                    self._abort(bmap, offset, _SENT_WRONG)
                stop = end  # all of it matched the digest: the rest goes at once
            yield FileRegion(fd, offset, stop - offset)
            self.metrics.served_bytes.inc(stop - offset)
            offset = stop
            index += 1

    @staticmethod
    def _abort(bmap: BlobMap, offset: int, exc: P2pimgError) -> NoReturn:
        log.warning("aborting blob %s at byte %d: %s", bmap.digest, offset, exc)
        raise AbortResponse(str(exc)) from None
