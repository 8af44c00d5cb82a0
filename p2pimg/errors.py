"""One exception hierarchy for p2pimg.

Every error maps to an OCI distribution error code and HTTP status (for the registry edge) and to
a process exit code (for the CLI) here, in exactly one place: the class attributes.
"""

from __future__ import annotations


class P2pimgError(Exception):
    """Root of all p2pimg errors."""

    oci_code = "UNKNOWN"
    http_status = 500
    exit_code = 1

    def __init__(self, message: str, *, detail: object = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class InvalidInput(P2pimgError):
    """Input from a user or a client is malformed."""

    oci_code = "UNSUPPORTED"
    http_status = 400
    exit_code = 2


class NameInvalid(InvalidInput):
    oci_code = "NAME_INVALID"


class TagInvalid(InvalidInput):
    oci_code = "TAG_INVALID"


class DigestInvalid(InvalidInput):
    oci_code = "DIGEST_INVALID"


class RangeInvalid(InvalidInput):
    """A Range header that cannot be parsed (a satisfiable-check failure is `RangeNotSatisfiable`)."""

    oci_code = "RANGE_INVALID"


class RangeNotSatisfiable(P2pimgError):
    oci_code = "RANGE_INVALID"
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


class NotFound(P2pimgError):
    oci_code = "NOT_FOUND"
    http_status = 404
    exit_code = 3


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
    """The origin has no object under the key."""

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
