"""Every error class answers with one of the distribution spec's error codes (or, where the spec
has none, with no code at all), and keeps its CLI exit code."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import p2pimg
from p2pimg import errors
from p2pimg.errors import SPEC_CODES, P2pimgError


def all_error_classes() -> list[type[P2pimgError]]:
    for info in pkgutil.walk_packages(p2pimg.__path__, "p2pimg."):
        if info.name.endswith(".__main__"):  # runs the CLI when imported
            continue
        try:
            importlib.import_module(info.name)
        except ImportError:  # an optional backend's library (storj) may be missing
            continue
    found: list[type[P2pimgError]] = []
    pending: list[type[P2pimgError]] = [P2pimgError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending += cls.__subclasses__()
    return sorted(set(found), key=lambda c: f"{c.__module__}.{c.__qualname__}")


def test_the_spec_list() -> None:
    assert len(SPEC_CODES) == 14
    assert {"NOT_FOUND", "RANGE_INVALID", "TAG_INVALID", "UNKNOWN"}.isdisjoint(SPEC_CODES)


@pytest.mark.parametrize("cls", all_error_classes(), ids=lambda c: f"{c.__module__}.{c.__qualname__}")
def test_client_errors_use_the_specs_codes(cls: type[P2pimgError]) -> None:
    """A 4xx JSON error body's code MUST be one of the spec's; a 5xx may say UNKNOWN (as the Go
    registry's do); None means a plain-text body (byte ranges: the spec has no code for them)."""
    if cls.http_status < 500:
        assert cls.oci_code is None or cls.oci_code in SPEC_CODES, (cls, cls.oci_code)
    else:
        assert cls.oci_code is None or cls.oci_code in SPEC_CODES | {"UNKNOWN"}, (cls, cls.oci_code)


@pytest.mark.parametrize(
    "cls,status,code,exit_code",
    [
        (errors.NotFound, 404, "BLOB_UNKNOWN", 3),
        (errors.OriginNotFound, 404, "BLOB_UNKNOWN", 3),
        (errors.EndpointUnknown, 404, "UNSUPPORTED", 3),
        (errors.NameUnknown, 404, "NAME_UNKNOWN", 3),
        (errors.ManifestUnknown, 404, "MANIFEST_UNKNOWN", 3),
        (errors.BlobUnknown, 404, "BLOB_UNKNOWN", 3),
        (errors.TagInvalid, 404, "MANIFEST_UNKNOWN", 2),  # bad input for the CLI all the same
        (errors.NameInvalid, 400, "NAME_INVALID", 2),
        (errors.DigestInvalid, 400, "DIGEST_INVALID", 2),
        (errors.RangeInvalid, 400, None, 2),
        (errors.RangeNotSatisfiable, 416, None, 2),
        (errors.InvalidInput, 400, "UNSUPPORTED", 2),
        (errors.UnsupportedMethod, 405, "UNSUPPORTED", 2),
    ],
)
def test_the_decisions(cls: type[P2pimgError], status: int, code: str | None, exit_code: int) -> None:
    assert (cls.http_status, cls.oci_code, cls.exit_code) == (status, code, exit_code)
