"""The upstream registry client: async (trio) reads of manifests and blobs from one registry.

It serves pull-through mirror mode and `p2pimg publish docker://...` alike. Authentication is
`auth.AuthState`'s decision, performed here; credentials come from `dockerconfig`.

Everything read is bounded: manifests by `MAX_MANIFEST_SIZE`, tokens and error bodies by small
caps, every small request by a deadline, redirects by count. Bytes are trusted only after
checking: manifests against the digest they were asked by (and `Docker-Content-Digest`), whole
blobs against their digest before their last piece is handed out. Secrets are never logged or put
in an error message.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import trio

from p2pimg.content.cid import digest_of, parse_digest
from p2pimg.content.graph import manifest_media_type
from p2pimg.content.model import MANIFEST_MEDIA_TYPES, MAX_MANIFEST_SIZE
from p2pimg.errors import InvalidInput, P2pimgError, SourceInvalid, VerificationError
from p2pimg.sources.httpbody import read_capped
from p2pimg.sources.upstream.auth import USER_AGENT, AuthState, Reply, pull_scope
from p2pimg.sources.upstream.dockerconfig import load_credentials
from p2pimg.sources.upstream.errors import (
    MAX_REDIRECTS,
    ManifestUnsupported,
    RequestContext,
    UpstreamError,
    error_for,
    mapped,
    too_large,
)
from p2pimg.sources.upstream.refs import is_digest_reference, normalize_repo, registry_base

__all__ = ["ACCEPT_MANIFESTS", "UpstreamClient", "UpstreamManifest"]

# Preference order: an index first, so a multi-arch tag is served as the whole image.
ACCEPT_MANIFESTS = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
_SCHEMA1_TYPES = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    }
)

_MAX_ERROR_BODY = 64 << 10
# Small requests (manifests, HEADs, tokens) get this many `timeout`s in total, covering the
# token round trip and the one retry; httpx's own timeouts are per socket operation.
_DEADLINE_FACTOR = 3


@dataclass(frozen=True)
class UpstreamManifest:
    """A manifest or index as the registry holds it: its digest, media type and exact bytes."""

    digest: str
    media_type: str
    data: bytes


# -- checking replies --------------------------------------------------------------------------


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length", "")
    return int(value) if value.isdigit() and len(value) < 20 else None


def _media_type(response: httpx.Response) -> str:
    return str(response.headers.get("content-type", "")).split(";", 1)[0].strip().lower()


def _manifest_what(repo: str, reference: str) -> str:
    return f"manifest {repo}{'@' if ':' in reference else ':'}{reference}"


def _check_manifest(
    response: httpx.Response, data: bytes, reference: str, ctx: RequestContext
) -> UpstreamManifest:
    digest = digest_of(data)
    if is_digest_reference(reference) and digest != reference:
        raise VerificationError(f"registry {ctx.host} sent a manifest with digest {digest} for {ctx.what}")
    claimed = response.headers.get("docker-content-digest", "").strip()
    if claimed.startswith("sha256:") and claimed != digest:
        raise VerificationError(
            f"registry {ctx.host} sent {ctx.what} as {claimed}, but its bytes hash to {digest}"
        )
    declared = _media_type(response)
    try:
        schema = json.loads(data).get("schemaVersion")
    except (ValueError, UnicodeDecodeError, AttributeError, RecursionError):
        schema = None
    if declared in _SCHEMA1_TYPES or schema == 1:
        raise ManifestUnsupported(
            f"{ctx.what} on registry {ctx.host} is a Docker schema 1 manifest, which p2pimg does not "
            "support: push the image again with a current client (e.g. skopeo copy --format v2s2)"
        )
    try:
        media = manifest_media_type(data, declared if declared in MANIFEST_MEDIA_TYPES else "", ctx.what)
    except SourceInvalid as exc:
        raise ManifestUnsupported(f"registry {ctx.host}: {exc.message}") from None
    return UpstreamManifest(digest, media, data)


def _range_header(offset: int, length: int | None) -> dict[str, str]:
    if offset < 0 or (length is not None and length < 0):
        raise InvalidInput(f"invalid blob range: offset {offset}, length {length}")
    if offset == 0 and length is None:
        return {}
    end = "" if length is None else str(offset + length - 1)
    return {"Range": f"bytes={offset}-{end}"}


def _range_skip(response: httpx.Response, offset: int, ctx: RequestContext) -> int:
    """Bytes to drop from the body: a 206 must start at `offset`; a 200 ignored the Range."""
    if response.status_code != 206:
        return offset
    m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", response.headers.get("content-range", "").strip())
    if m is None or int(m.group(1)) != offset:
        raise UpstreamError(
            f"registry {ctx.host} answered a range request for {ctx.what} with a mismatching Content-Range"
        )
    return 0


class _BodyCheck:
    """Cuts a blob body to the requested range and verifies a whole blob's digest."""

    def __init__(self, ctx: RequestContext, digest: str, skip: int, length: int | None, whole: bool) -> None:
        self.ctx, self.digest, self.skip, self.left = ctx, digest, skip, length
        self.hasher = hashlib.sha256() if whole else None

    def feed(self, piece: bytes) -> bytes:
        if self.skip:
            cut = min(self.skip, len(piece))
            piece, self.skip = piece[cut:], self.skip - cut
        if self.left is not None:
            piece = piece[: self.left]
            self.left -= len(piece)
        if self.hasher is not None:
            self.hasher.update(piece)
        return piece

    @property
    def done(self) -> bool:
        return self.left == 0

    def finish(self) -> None:
        if self.skip or self.left:
            raise UpstreamError(f"registry {self.ctx.host} ended {self.ctx.what} early")
        if self.hasher is not None and "sha256:" + self.hasher.hexdigest() != self.digest:
            raise VerificationError(
                f"registry {self.ctx.host} sent bytes for {self.ctx.what} that do not match its digest"
            )


def _client_options(timeout: float) -> dict[str, Any]:
    return {
        "timeout": httpx.Timeout(timeout),
        "follow_redirects": True,  # blob GETs are redirected to storage; httpx drops our
        "max_redirects": MAX_REDIRECTS,  # Authorization when a redirect leaves the origin
        # identity: the bytes we hash must be the stored bytes, never a decoded transfer form.
        "headers": {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
        "limits": httpx.Limits(max_connections=64, max_keepalive_connections=16),
    }


async def _aread(
    response: httpx.Response, limit: int, ctx: RequestContext, *, truncate: bool = False
) -> bytes:
    """At most `limit` bytes of a body: cut there (`truncate`) or refuse a larger one."""
    data = await read_capped(response, limit, truncate=truncate)
    if data is None:
        raise too_large(ctx, limit)
    return data


# -- the client --------------------------------------------------------------------------------


class UpstreamClient:
    """Reads from one upstream registry on trio. Safe for concurrent use by many tasks."""

    def __init__(self, url: str, *, docker_config: Path | None = None, timeout: float = 30.0) -> None:
        self.url, self.host = registry_base(url)
        self.timeout = timeout
        creds = load_credentials(self.host, docker_config)
        self._auth = AuthState(self.host, creds, secure=self.url.startswith("https:"))
        self._client = httpx.AsyncClient(**_client_options(timeout))
        # Whether it answers a Range with 206 (None: not asked yet; False: it sent the whole blob).
        self.ranged: bool | None = None

    @property
    def credentialed(self) -> bool:
        """Whether requests carry the user's credentials (what they bring may be private)."""
        return self._auth.creds is not None

    async def __aenter__(self) -> UpstreamClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    def _ctx(self, repo: str, what: str, kind: str) -> RequestContext:
        return RequestContext(self.host, repo, what, kind, self._auth.creds)

    async def _send(self, method: str, path: str, repo: str, headers: dict[str, str]) -> Reply:
        """Drive the authentication flow for one request: send each step, answer with its reply."""
        flow = self._auth.flow(
            self._client.build_request(method, self.url + path, headers=headers), pull_scope(repo)
        )
        auth_ctx = self._ctx(repo, f"the token for {repo}", "token")
        step = next(flow)
        while True:
            response = await self._client.send(step.request, stream=True)
            body = None
            if step.body is not None or response.status_code == 401:
                try:
                    body = await _aread(
                        response, step.body or _MAX_ERROR_BODY, auth_ctx, truncate=step.body is None
                    )
                finally:
                    await response.aclose()
            try:
                step = flow.send((response, body))
            except StopIteration as stop:
                reply: Reply = stop.value
                return reply

    @contextlib.contextmanager
    def _bounded(self, ctx: RequestContext) -> Iterator[None]:
        try:
            with mapped(ctx), trio.fail_after(self.timeout * _DEADLINE_FACTOR):
                yield
        except trio.TooSlowError:
            raise UpstreamError(
                f"registry {self.host} did not deliver {ctx.what} within "
                f"{self.timeout * _DEADLINE_FACTOR:.0f}s"
            ) from None

    async def _fail(self, reply: Reply, ctx: RequestContext) -> P2pimgError:
        response, body = reply
        if body is None:
            body = await _aread(response, _MAX_ERROR_BODY, ctx, truncate=True)
        return error_for(response, body, ctx)

    async def _manifest_reply(
        self, method: str, repo: str, reference: str
    ) -> tuple[httpx.Response, bytes, RequestContext]:
        """GET or HEAD a manifest: the (closed) 200 response, its body (b"" for HEAD) and the
        request's context; the mapped error for any other status."""
        ctx = self._ctx(repo, _manifest_what(repo, reference), "manifest")
        with self._bounded(ctx):
            reply = await self._send(
                method, f"/v2/{repo}/manifests/{reference}", repo, {"Accept": ACCEPT_MANIFESTS}
            )
            response = reply[0]
            try:
                if response.status_code != 200:
                    raise await self._fail(reply, ctx)
                data = await _aread(response, MAX_MANIFEST_SIZE, ctx) if method == "GET" else b""
            finally:
                await response.aclose()
        return response, data, ctx

    async def get_manifest(self, repo: str, reference: str) -> UpstreamManifest:
        """A manifest or index by tag or digest, byte for byte, its digest checked."""
        repo = normalize_repo(self.host, repo)
        is_digest_reference(reference)
        response, data, ctx = await self._manifest_reply("GET", repo, reference)
        return _check_manifest(response, data, reference, ctx)

    async def head_manifest(self, repo: str, reference: str) -> tuple[str, str, int]:
        """(digest, media type, size) of a manifest, by HEAD when the registry says enough.

        Falls back to a GET when the HEAD lacks the digest, a known media type or the size.
        """
        repo = normalize_repo(self.host, repo)
        is_digest = is_digest_reference(reference)
        response, _, ctx = await self._manifest_reply("HEAD", repo, reference)
        digest = response.headers.get("docker-content-digest", "").strip()
        media, size = _media_type(response), _content_length(response)
        if media in _SCHEMA1_TYPES:
            raise ManifestUnsupported(
                f"{ctx.what} on registry {self.host} is a Docker schema 1 manifest, "
                "which p2pimg does not support"
            )
        if (
            not digest.startswith("sha256:")
            or media not in MANIFEST_MEDIA_TYPES
            or size is None
            or size > MAX_MANIFEST_SIZE
        ):
            manifest = await self.get_manifest(repo, reference)
            return manifest.digest, manifest.media_type, len(manifest.data)
        parse_digest(digest)
        if is_digest and digest != reference:
            raise VerificationError(f"registry {self.host} answered {ctx.what} with digest {digest}")
        return digest, media, size

    async def read_blob(
        self, repo: str, digest: str, offset: int = 0, length: int | None = None, *, size: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        """Stream a blob, or `length` bytes of it from `offset` (all the rest with None).

        A whole-blob read is verified against `digest`: its last piece is only yielded once the
        hash matched, so a consumer never sees a complete, wrong blob. With the blob's `size`
        known (a descriptor's), a whole read ends there: the hash is checked when the last byte
        arrives, and a body that runs longer is never read past it.
        """
        repo = normalize_repo(self.host, repo)
        parse_digest(digest)
        headers = _range_header(offset, length)
        if length == 0:
            return
        ctx = self._ctx(repo, f"blob {repo}@{digest}", "blob")
        with self._bounded(ctx):
            reply = await self._send("GET", f"/v2/{repo}/blobs/{digest}", repo, headers)
        response = reply[0]
        try:
            if response.status_code not in (200, 206):
                with self._bounded(ctx):
                    raise await self._fail(reply, ctx)
            whole = not headers and response.status_code == 200
            if headers:
                self.ranged = response.status_code == 206
            check = _BodyCheck(
                ctx,
                digest,
                _range_skip(response, offset, ctx),
                size if whole and size is not None else length,
                whole=whole,
            )
            # Closed explicitly below: a range read stops before the body ends.
            pieces = cast(AsyncGenerator[bytes, None], response.aiter_raw())
            held = b""
            while not check.done:
                with mapped(ctx):
                    piece = await anext(pieces, None)
                if piece is None:
                    break
                piece = check.feed(piece)
                if check.hasher is None:
                    if piece:
                        yield piece
                elif piece:
                    if held:
                        yield held
                    held = piece
            await pieces.aclose()
            check.finish()
            if held:
                yield held
        finally:
            await response.aclose()

    async def blob_size(self, repo: str, digest: str) -> int:
        """A blob's size from a HEAD (or, if that lacks it, a one-byte ranged GET)."""
        repo = normalize_repo(self.host, repo)
        parse_digest(digest)
        ctx = self._ctx(repo, f"blob {repo}@{digest}", "blob")
        with self._bounded(ctx):
            reply = await self._send("HEAD", f"/v2/{repo}/blobs/{digest}", repo, {})
            response = reply[0]
            try:
                if response.status_code != 200:
                    raise await self._fail(reply, ctx)
            finally:
                await response.aclose()
            size = _content_length(response)
            if size is not None:
                return size
            reply = await self._send("GET", f"/v2/{repo}/blobs/{digest}", repo, {"Range": "bytes=0-0"})
            response = reply[0]
            try:
                if response.status_code not in (200, 206):
                    raise await self._fail(reply, ctx)
            finally:
                await response.aclose()
        total = response.headers.get("content-range", "").rpartition("/")[2]
        size = int(total) if response.status_code == 206 and total.isdigit() else _content_length(response)
        if size is None:
            raise UpstreamError(f"registry {self.host} does not tell the size of {ctx.what}")
        return size

    async def get_referrers(self, repo: str, digest: str) -> list[tuple[str, int, str]]:
        """What the registry lists as referrers of the manifest `digest`: (digest, size, media type)
        of each manifest in the OCI index its referrers API answers (distribution spec 1.1), or,
        when it answers that API with 404 (a registry without it), in the index kept under the
        referrers tag schema's tag `sha256-<hex>`, as oras and cosign push it there; none when
        neither exists. A listing is only a hint: fetch each by digest and check its subject."""
        from p2pimg.content.graph import OCI_INDEX, descriptor, parse_json
        from p2pimg.errors import NotFound

        repo = normalize_repo(self.host, repo)
        hex_digest = parse_digest(digest)
        ctx = self._ctx(repo, f"the referrers of {repo}@{digest}", "manifest")
        data: bytes | None = None
        with self._bounded(ctx):
            reply = await self._send("GET", f"/v2/{repo}/referrers/{digest}", repo, {"Accept": OCI_INDEX})
            response = reply[0]
            try:
                if response.status_code == 200:
                    data = await _aread(response, MAX_MANIFEST_SIZE, ctx)
                elif response.status_code != 404:
                    raise await self._fail(reply, ctx)
            finally:
                await response.aclose()
        if data is None:
            try:
                data = (await self.get_manifest(repo, f"sha256-{hex_digest}")).data
            except NotFound:
                return []
        entries = parse_json(data, ctx.what).get("manifests")
        if not isinstance(entries, list):
            raise UpstreamError(f"registry {self.host} listed {ctx.what} without a manifests array")
        return [descriptor(entry, ctx.what) for entry in entries]
