"""Where an S3 origin is: `s3://BUCKET[/PREFIX]?endpoint=URL[&region=R]` checked and parsed,
and its credentials from the environment."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from botocore.credentials import Credentials

from p2pimg.errors import InvalidInput

_DEFAULT_REGION = "us-east-1"
_COMPONENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_REGION_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


@dataclass(frozen=True)
class S3Location:
    """A parsed `s3://` origin URL."""

    bucket: str
    prefix: str  # "" or components joined by "/", no leading or trailing "/"
    endpoint: str  # scheme://host[:port], no path
    region: str = _DEFAULT_REGION

    @property
    def url(self) -> str:
        path = f"/{self.prefix}" if self.prefix else ""
        region = f"&region={self.region}" if self.region != _DEFAULT_REGION else ""
        return f"s3://{self.bucket}{path}?endpoint={self.endpoint}{region}"


def _check_bucket(bucket: str) -> str:
    if not bucket:
        raise InvalidInput("s3 origin URL needs a bucket: s3://BUCKET[/PREFIX]?endpoint=URL")
    if not _BUCKET_RE.match(bucket):
        raise InvalidInput(
            f"invalid bucket name {bucket[:70]!r}: 3 to 63 characters of a-z, 0-9, '.' "
            "and '-', starting and ending with a letter or digit"
        )
    if ".." in bucket or ".-" in bucket or "-." in bucket:
        raise InvalidInput(f"invalid bucket name {bucket!r}: no '..', '.-' or '-.'")
    with contextlib.suppress(ValueError):
        ipaddress.IPv4Address(bucket)
        raise InvalidInput(f"invalid bucket name {bucket!r}: must not look like an IP address")
    if bucket.startswith("xn--") or bucket.endswith("-s3alias"):
        raise InvalidInput(f"invalid bucket name {bucket!r}: reserved prefix or suffix")
    return bucket


def _check_endpoint(endpoint: str | None) -> str:
    if not endpoint:
        raise InvalidInput("s3 origin URL needs an endpoint: s3://BUCKET[/PREFIX]?endpoint=https://HOST")
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https"):
        raise InvalidInput(f"s3 endpoint must be an http:// or https:// URL, got {endpoint[:100]!r}")
    try:
        port = parts.port
    except ValueError:
        raise InvalidInput(f"s3 endpoint has an invalid port: {endpoint[:100]!r}") from None
    if not parts.hostname:
        raise InvalidInput(f"s3 endpoint has no host: {endpoint[:100]!r}")
    if parts.username is not None or parts.password is not None:
        raise InvalidInput(
            "s3 endpoint must not carry credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY instead"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise InvalidInput(f"s3 endpoint must be scheme://host[:port] with no path: {endpoint[:100]!r}")
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


def _check_prefix(path: str) -> str:
    prefix = path.strip("/")
    if not prefix:
        return ""
    for component in prefix.split("/"):
        if not _COMPONENT_RE.match(component):
            raise InvalidInput(
                f"invalid s3 key prefix {prefix[:100]!r}: components of A-Z a-z 0-9 . _ -, "
                "each starting with a letter or digit"
            )
    return prefix


def parse_s3_url(url: str) -> S3Location:
    """Parse and validate `s3://BUCKET[/PREFIX]?endpoint=URL[&region=R]`."""
    parts = urlsplit(url)
    if parts.scheme != "s3":
        raise InvalidInput(f"not an s3:// URL: {url[:100]!r}")
    if "@" in parts.netloc:
        raise InvalidInput(
            "s3 origin URL must not carry credentials: "
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY instead"
        )
    if parts.fragment:
        raise InvalidInput(f"s3 origin URL must not have a fragment: {url[:100]!r}")
    bucket = _check_bucket(parts.netloc)
    prefix = _check_prefix(parts.path)
    params: dict[str, str] = {}
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise InvalidInput(f"s3 origin URL has a malformed query: {parts.query[:100]!r}") from None
    for name, value in pairs:
        if name not in ("endpoint", "region"):
            raise InvalidInput(f"unknown s3 origin URL parameter {name[:40]!r}: expected endpoint, region")
        if name in params:
            raise InvalidInput(f"s3 origin URL parameter {name!r} given twice")
        params[name] = value
    endpoint = _check_endpoint(params.get("endpoint"))
    region = params.get("region", _DEFAULT_REGION)
    if not _REGION_RE.match(region):
        raise InvalidInput(f"invalid s3 region {region[:70]!r}")
    return S3Location(bucket=bucket, prefix=prefix, endpoint=endpoint, region=region)


def credentials_from_env(env: Mapping[str, str] | None = None) -> Credentials:
    """AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and optionally AWS_SESSION_TOKEN."""
    env = os.environ if env is None else env
    access = env.get("AWS_ACCESS_KEY_ID", "")
    secret = env.get("AWS_SECRET_ACCESS_KEY", "")
    missing = [
        name
        for name, value in (("AWS_ACCESS_KEY_ID", access), ("AWS_SECRET_ACCESS_KEY", secret))
        if not value
    ]
    if missing:
        raise InvalidInput(
            f"s3 origin needs credentials: set {' and '.join(missing)} "
            "(and AWS_SESSION_TOKEN for temporary credentials)"
        )
    return Credentials(access, secret, env.get("AWS_SESSION_TOKEN") or None)
