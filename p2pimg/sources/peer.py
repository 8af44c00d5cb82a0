"""A LAN peer as a source of chunks: what it holds (polled), and its verified bytes.

The peer's side of this exchange is `p2pimg.web.peerapi`; the paths are listed there.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
import trio

from p2pimg.content.model import BlobMap
from p2pimg.errors import (
    OriginError,
)
from p2pimg.sources.base import ChunkSource, SourceBusy
from p2pimg.sources.httpbody import read_capped

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


PROTOCOL_VERSION = 1
RAW_BLOCK = "application/vnd.ipld.raw"
TAG_RECORD = "application/vnd.p2pimg.tag-record.v1+cbor"
_PIECE = 256 << 10
_POLL = 0.3


class PeerBusy(SourceBusy):
    """A peer answered 429: try elsewhere, come back later."""


@dataclass(frozen=True)
class Answer:
    status: int
    doc: object  # the body's JSON, or None when it is not JSON
    text: str  # the start of the body, for messages


async def request_json(
    client: httpx.AsyncClient, method: str, url: str, *, limit: int, timeout: float, body: object = None
) -> Answer:
    """A small JSON exchange with another node, reading at most `limit` bytes and taking at most
    `timeout` s in all. OriginError when it breaks either bound; httpx errors as they come."""
    what = f"{method} {url[:200]}"
    with trio.move_on_after(timeout):
        async with client.stream(
            method, url, json=body, timeout=httpx.Timeout(timeout, connect=min(timeout, 1.0))
        ) as r:
            data = await read_capped(r, limit)
        if data is None:
            raise OriginError(f"{what}: an answer longer than the {limit} bytes expected")
        text = data[:200].decode("utf-8", "replace")
        try:
            return Answer(r.status_code, json.loads(data), text)
        except (ValueError, RecursionError):
            return Answer(r.status_code, None, text)
    raise OriginError(f"{what}: no whole answer within {timeout:g} s")


async def get_json(client: httpx.AsyncClient, url: str, *, limit: int, timeout: float) -> object:
    """The JSON a node answers 200 to a GET with, within `request_json`'s bounds; else None."""
    try:
        answer = await request_json(client, "GET", url, limit=limit, timeout=timeout)
    except OriginError:
        return None
    return answer.doc if answer.status == 200 else None


class PeerSource(ChunkSource):
    """Another node's peer server, as a source of chunks."""

    kind = "peer"
    limit = 4
    max_span = 4 << 20
    stall_timeout = 5.0  # a LAN peer that goes quiet this long is dead to this request

    def __init__(self, url: str, client: httpx.AsyncClient, *, node_id: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.name = f"peer {self.url}"
        self.client = client
        self.node_id = node_id
        self._have: dict[str, bytes | None] = {}  # digest -> states (b"" = complete, None = nothing)
        self._misses: dict[str, int] = {}  # digest -> failed polls in a row
        # When it last answered an inventory poll, and when one last failed (trio's clock), for
        # people to see whether it is there at all.
        self.answered_at = float("-inf")
        self.failed_at = float("-inf")

    def inventory(self, blob_map: BlobMap) -> bytes | None:
        return self._have.get(blob_map.digest)

    async def _poll(self, blob_map: BlobMap) -> bool:
        """Refresh what this peer holds of a blob; True when it changed."""
        # base64 of one byte per chunk, plus the other fields.
        limit = 4 * blob_map.count // 3 + 4096
        try:
            answer = await request_json(
                self.client, "GET", f"{self.url}/p2pimg/v1/have/{blob_map.digest}", limit=limit, timeout=2.0
            )
        except (httpx.HTTPError, OriginError):
            self.failed_at = trio.current_time()
            # A busy machine answers late now and then; three misses in a row mean it is gone,
            # and whatever it claimed to be bringing is not coming.
            self._misses[blob_map.digest] = misses = self._misses.get(blob_map.digest, 0) + 1
            if misses < 3:
                return False
            changed = self._have.get(blob_map.digest) is not None
            self._have[blob_map.digest] = None
            return changed
        self._misses.pop(blob_map.digest, None)
        self.answered_at = trio.current_time()
        states: bytes | None = None
        doc = answer.doc if answer.status == 200 else None
        if isinstance(doc, dict):
            if isinstance(doc.get("node"), str) and len(doc["node"]) <= 64:
                self.node_id = doc["node"]
            if doc.get("complete") is True:
                states = b""
            elif isinstance(doc.get("chunks"), str):
                try:
                    states = base64.b64decode(doc["chunks"], validate=True)
                except ValueError:
                    states = None
                if states is not None and len(states) != blob_map.count:
                    states = None  # empty, or another chunking of the blob: useless to us
        changed = self._have.get(blob_map.digest) != states
        self._have[blob_map.digest] = states
        return changed

    async def prime(self, blob_map: BlobMap) -> None:
        await self._poll(blob_map)

    async def track(self, blob_map: BlobMap, changed: Callable[[], None]) -> None:
        """Poll until cancelled (the fetch's end), forgetting what was learnt only then."""
        try:
            while True:
                if self._have.get(blob_map.digest) == b"":
                    await trio.sleep_forever()  # complete there: nothing more to learn
                await trio.sleep(_POLL)
                if await self._poll(blob_map):
                    changed()
        finally:
            self._have.pop(blob_map.digest, None)
            self._misses.pop(blob_map.digest, None)

    async def read_span(self, blob_map: BlobMap, start: int, length: int) -> AsyncIterator[bytes]:
        headers = {"range": f"bytes={start}-{start + length - 1}"}
        url = f"{self.url}/p2pimg/v1/blobs/{blob_map.digest}"
        try:
            async with self.client.stream("GET", url, headers=headers) as r:
                if r.status_code == 429:
                    raise PeerBusy(f"{self.name} is busy")
                if r.status_code != 206:
                    raise OriginError(f"{self.name} answered {r.status_code} for a span of {blob_map.digest}")
                async for piece in r.aiter_raw():
                    yield piece
        except httpx.HTTPError as exc:
            raise OriginError(f"{self.name}: {exc or type(exc).__name__}") from None
