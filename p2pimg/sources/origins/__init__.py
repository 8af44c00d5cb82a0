"""Origins: where published images live, under one key layout on every backend.

    p2pimg/blobs/sha256/<hex>    whole blob bytes
    p2pimg/blocks/<cid>          DAG-CBOR blocks (image roots, blob maps) and raw manifest blocks
    p2pimg/tags/<name>/<tag>     tag records
    p2pimg/leases/<kind>-<id>    a running publish's lease, a running gc's hold (`ops.lease`)
    p2pimg/completed/<key>       completion stamp of an object written by a multipart upload
                                 (`multipart.completion_key`): its date is the object's for gc

An origin only moves bytes under keys. It never interprets them: everything read from it is
verified above it, against the CID or digest the key was asked under.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from p2pimg.content.cid import Cid, parse_digest
from p2pimg.content.model import check_name, check_tag
from p2pimg.errors import InvalidInput
from p2pimg.sources.origins.base import BlobReader, Origin
from p2pimg.sources.origins.file import FileOrigin

__all__ = [
    "HEADS",
    "BlobReader",
    "FileOrigin",
    "Origin",
    "blob_key",
    "block_key",
    "head_key",
    "list_tags",
    "open_origin",
    "tag_key",
]

PREFIX = "p2pimg"


def blob_key(digest: str) -> str:
    return f"{PREFIX}/blobs/sha256/{parse_digest(digest)}"


def block_key(cid: Cid) -> str:
    return f"{PREFIX}/blocks/{cid}"


def tag_key(name: str, tag: str = "") -> str:
    """Key of a tag record, or with no tag the prefix under which a name's tags live."""
    base = f"{PREFIX}/tags/{check_name(name)}/"
    return base + check_tag(tag) if tag else base


HEADS = f"{PREFIX}/heads/"


def head_key(name: str, tag: str) -> str:
    """Key of a tag's head (`content.model.encode_tag_head`): beside, not under, its tags, so
    that listing a name's tags does not see it."""
    return f"{HEADS}{check_name(name)}/{check_tag(tag)}"


async def list_tags(origin: Origin) -> dict[str, list[str]]:
    """Published names and their tags."""
    names: dict[str, list[str]] = {}
    base = f"{PREFIX}/tags/"
    for key in await origin.list(base):
        name, _, tag = key[len(base) :].rpartition("/")
        if name and tag:
            names.setdefault(name, []).append(tag)
    return {n: sorted(t) for n, t in sorted(names.items())}


def default_origin_url(home: Path) -> str:
    return (home / "origin").as_uri()


def open_origin(url: str | None, home: Path) -> Origin:
    """The origin named by `url` (`--origin`, else `$P2PIMG_ORIGIN`, else the embedded one)."""
    url = url or os.environ.get("P2PIMG_ORIGIN") or default_origin_url(home)
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise InvalidInput(f"file origin must be a local path, got {url!r}")
        if not parts.path:
            raise InvalidInput(f"file origin needs a directory: {url!r}")
        return FileOrigin(Path(parts.path))
    if parts.scheme == "s3":
        from p2pimg.sources.origins.s3 import (
            S3Origin,  # imported here: botocore costs startup time file:// never needs
        )

        return S3Origin(url)
    if parts.scheme == "storj":
        from p2pimg.sources.origins.storj import (
            StorjOrigin,  # storj-uplink is optional: import it only when asked for
        )

        return StorjOrigin.from_url(url)
    raise InvalidInput(
        f"unsupported origin URL {url!r}: expected file://DIR, s3://BUCKET[/PREFIX]?endpoint=URL "
        "or storj://BUCKET[/PREFIX]"
    )
