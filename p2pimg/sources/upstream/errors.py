"""What an upstream registry's failures mean: the errors, and the mapping of a failed reply (or a
failed transport) to the precise one, with a message that says what to do and holds no secret.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

from p2pimg.errors import (
    BlobUnknown,
    ManifestUnknown,
    NameUnknown,
    OriginError,
    P2pimgError,
    RangeNotSatisfiable,
)
from p2pimg.sources.upstream.dockerconfig import Credentials

__all__ = [
    "ManifestUnsupported",
    "RequestContext",
    "UpstreamAuthError",
    "UpstreamError",
    "UpstreamRateLimited",
    "error_for",
    "mapped",
    "too_large",
]

MAX_REDIRECTS = 5


class UpstreamError(OriginError):
    """The upstream registry failed, refused, sent something unusable, or could not be reached."""


class UpstreamAuthError(UpstreamError):
    """The upstream registry (or its token service) refused access after authentication."""

    oci_code = "DENIED"


class UpstreamRateLimited(UpstreamError):
    """The upstream registry answered 429 (Docker Hub's pull limit); passed on so clients back off."""

    oci_code = "TOOMANYREQUESTS"
    http_status = 429


class ManifestUnsupported(UpstreamError):
    """An upstream manifest p2pimg cannot serve (Docker schema 1, an unknown media type)."""

    oci_code = "MANIFEST_INVALID"


@dataclass(frozen=True)
class RequestContext:
    """What a request was for, to turn a failure into a precise error."""

    host: str
    repo: str
    what: str  # "manifest REPO:TAG", "blob REPO@DIGEST"
    kind: str  # "manifest", "blob" or "token"
    creds: Credentials | None


def _oci_error(body: bytes | None) -> tuple[str, str]:
    """(code, message) of the first entry of a distribution-spec error body, if it is one."""
    try:
        doc = json.loads(body or b"")
        first = doc["errors"][0]
        return str(first.get("code", ""))[:64], str(first.get("message", ""))[:200]
    except (ValueError, UnicodeDecodeError, KeyError, IndexError, TypeError, AttributeError, RecursionError):
        return "", ""


def error_for(response: httpx.Response, body: bytes | None, ctx: RequestContext) -> P2pimgError:
    """The error an unexpected reply stands for, given (at most the start of) its body."""
    status = response.status_code
    code, message = _oci_error(body)
    detail = f" ({code}: {message})" if code else ""
    if status == 404 or code in ("MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN"):
        if code == "NAME_UNKNOWN":
            return NameUnknown(f"registry {ctx.host} has no repository {ctx.repo}")
        if code == "BLOB_UNKNOWN" or ctx.kind == "blob":
            return BlobUnknown(f"registry {ctx.host} has no {ctx.what}")
        return ManifestUnknown(f"registry {ctx.host} has no {ctx.what}")
    if status in (401, 403):
        if response.history and response.url.host != response.history[0].url.host:
            # A redirect target (blob storage, a CDN) refused: not about our credentials.
            return UpstreamError(
                f"storage {response.url.host} behind registry {ctx.host} refused "
                f"{ctx.what} (HTTP {status}){detail}"
            )
        if ctx.creds is not None:
            hint = (
                f"check the credentials of user {ctx.creds.username!r} from {ctx.creds.source} "
                "and that they may pull this repository"
            )
        else:
            hint = (
                f"the repository may not exist, or needs credentials: run `docker login {ctx.host}` "
                "or add an auths entry to docker's config.json"
            )
        return UpstreamAuthError(
            f"registry {ctx.host} denied access to {ctx.what} (HTTP {status}){detail}: {hint}"
        )
    if status == 429:
        return UpstreamRateLimited(
            f"registry {ctx.host} is rate limiting pulls of {ctx.what} (HTTP 429){detail}",
            detail=response.headers.get("retry-after"),
        )
    if status == 416:
        total = response.headers.get("content-range", "").rpartition("/")[2]
        return RangeNotSatisfiable(
            f"registry {ctx.host}: range not satisfiable for {ctx.what}",
            size=int(total) if total.isdigit() else 0,
        )
    return UpstreamError(f"registry {ctx.host} answered HTTP {status} for {ctx.what}{detail}")


@contextlib.contextmanager
def mapped(ctx: RequestContext) -> Iterator[None]:
    """Turn httpx's failures (network, protocol, redirects, timeouts) into UpstreamError."""
    try:
        yield
    except httpx.TooManyRedirects:
        raise UpstreamError(
            f"registry {ctx.host}: more than {MAX_REDIRECTS} redirects for {ctx.what}"
        ) from None
    except httpx.TimeoutException as exc:
        raise UpstreamError(f"registry {ctx.host} timed out on {ctx.what} ({type(exc).__name__})") from None
    except httpx.HTTPError as exc:
        # httpx messages name the failure and at most a URL; they never carry headers.
        raise UpstreamError(
            f"cannot fetch {ctx.what} from registry {ctx.host}: {type(exc).__name__}: {str(exc)[:200]}"
        ) from None


def too_large(ctx: RequestContext, limit: int) -> UpstreamError:
    return UpstreamError(f"registry {ctx.host} sent more than {limit} bytes for {ctx.what}; refused")
