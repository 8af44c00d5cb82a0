"""One exception hierarchy for p2pimg.

Every error maps to an OCI distribution error code and HTTP status (for the registry edge) and to
a process exit code (for the CLI) here, in exactly one place: the class attributes.

A 4xx answer carries one of the distribution spec's error codes (`SPEC_CODES`; the spec requires it
of a JSON error body), or none: an error the spec names no code for (a byte range) gets a plain-text
body, as the Go registry answers it. 5xx answers use `UNKNOWN`, as the Go registry does (the spec's
list is about 4xx). `tests/unit/test_error_codes.py` holds every class to this.
"""

from __future__ import annotations

# The distribution spec's error codes ("Error Codes": a JSON error body's code MUST be one of these).
SPEC_CODES = frozenset(
    {
        "BLOB_UNKNOWN",
        "BLOB_UPLOAD_INVALID",
        "BLOB_UPLOAD_UNKNOWN",
        "DIGEST_INVALID",
        "MANIFEST_BLOB_UNKNOWN",
        "MANIFEST_INVALID",
        "MANIFEST_UNKNOWN",
        "NAME_INVALID",
        "NAME_UNKNOWN",
        "SIZE_INVALID",
        "UNAUTHORIZED",
        "DENIED",
        "UNSUPPORTED",
        "TOOMANYREQUESTS",
    }
)


class P2pimgError(Exception):
    """Root of all p2pimg errors."""

    # The error code of a JSON error body; None: no code, the body is the message as plain text.
    oci_code: str | None = "UNKNOWN"
    http_status = 500
    exit_code = 1

    def __init__(self, message: str, *, detail: object = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class InvalidInput(P2pimgError):
    """Input from a user or a client is malformed."""

    oci_code: str | None = "UNSUPPORTED"
    http_status = 400
    exit_code = 2


class NameInvalid(InvalidInput):
    oci_code = "NAME_INVALID"


class TagInvalid(InvalidInput):
    """A malformed tag. `TAG_INVALID` is a legacy Docker code, not the spec's, and the spec has none
    for a malformed tag in a request: NAME_INVALID is about the repository name, MANIFEST_INVALID
    about an uploaded manifest's content (a client would take it for a corrupt stored manifest).
    A string that cannot be a tag names no manifest: 404 MANIFEST_UNKNOWN, the answer the endpoint
    table gives for a manifest GET/HEAD (end-3 fails with 404 only) and the Go registry's status
    (its routes only match valid tags). The message says the tag is malformed. The CLI's exit code
    stays that of bad input (2)."""

    oci_code = "MANIFEST_UNKNOWN"
    http_status = 404


class DigestInvalid(InvalidInput):
    oci_code = "DIGEST_INVALID"


class RangeInvalid(InvalidInput):
    """A Range header that cannot be parsed (a satisfiable-check failure is `RangeNotSatisfiable`).

    No error code: the spec has none for ranges (`RANGE_INVALID` is not one of its codes), and the
    nearest ones would mislead (BLOB_UNKNOWN: the blob is there; SIZE_INVALID: about uploads). The
    Go registry answers range errors with net/http's plain-text body; so do we (400 here, 416 below).
    """

    oci_code = None


class RangeNotSatisfiable(P2pimgError):
    """A well-formed range that selects nothing of the blob: 416 with `Content-Range: bytes */SIZE`
    and a plain-text body (see RangeInvalid)."""

    oci_code = None
    http_status = 416
    exit_code = 2

    def __init__(self, message: str, *, size: int) -> None:
        super().__init__(message)
        self.size = size


class SourceInvalid(InvalidInput):
    """A publish source that is missing or malformed."""


class BlockInvalid(P2pimgError):
    """A DAG block or tag record that is not strict DAG-CBOR of the expected shape."""

    oci_code = "MANIFEST_INVALID"
    http_status = 502


class UnixfsInvalid(BlockInvalid):
    """A dag-pb block or UnixFS node that is malformed, or a DAG that is not the file it was taken
    for (a directory, a wrong codec, sizes that do not add up, too deep, too wide, too big)."""


class NotFound(P2pimgError):
    """Something is not there. The spec has no generic "not found" code (`NOT_FOUND` is not one):
    p2pimg's content is addressed blobs and blocks, and what is missing without a more specific
    class is one of them (an origin object a root names, a chunk a peer lacks): BLOB_UNKNOWN."""

    oci_code = "BLOB_UNKNOWN"
    http_status = 404
    exit_code = 3


class EndpointUnknown(NotFound):
    """A path that is no endpoint of the API, or one this node does not serve for a name: 404 (the
    status clients fall back on, e.g. to the referrers tag schema) with UNSUPPORTED, the spec's code
    for an operation a registry does not support (the Go registry's router answers a bare 404)."""

    oci_code = "UNSUPPORTED"


class NameUnknown(NotFound):
    oci_code = "NAME_UNKNOWN"


class ManifestUnknown(NotFound):
    oci_code = "MANIFEST_UNKNOWN"


class BlobUnknown(NotFound):
    oci_code = "BLOB_UNKNOWN"


class VerificationError(P2pimgError):
    """Bytes did not match the CID or digest they were fetched under."""

    http_status = 502
    exit_code = 4


class OriginError(P2pimgError):
    """The origin failed or holds something it should not."""

    http_status = 502
    exit_code = 5


class OriginNotFound(OriginError, NotFound):
    """The origin has no object under the key (at the registry edge: content an image root names is
    missing from the origin, BLOB_UNKNOWN; tags and roots that are not there are NAME_UNKNOWN or
    MANIFEST_UNKNOWN, raised by the resolver)."""

    oci_code = "BLOB_UNKNOWN"
    http_status = 404
    exit_code = 3


class UnsupportedMethod(P2pimgError):
    oci_code = "UNSUPPORTED"
    http_status = 405
    exit_code = 2


class ListenError(P2pimgError):
    """A listen address that cannot be bound."""

    exit_code = 2

    def __init__(self, message: str, *, errno: int | None) -> None:
        super().__init__(message)
        self.errno = errno


class CacheError(P2pimgError):
    """The local cache cannot take a write (disk full, permissions)."""

    http_status = 507
    exit_code = 6


def first_error(group: BaseExceptionGroup[P2pimgError]) -> P2pimgError:
    """The first of a group of concurrent failures: the one a user needs to see."""
    while True:
        inner = group.exceptions[0]
        if not isinstance(inner, BaseExceptionGroup):
            return inner
        group = inner
