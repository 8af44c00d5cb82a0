"""The one interface every source of blob bytes implements: origins, LAN peers, upstream
registries (and, later, IPFS gateways). The fetch engine asks sources through it and nothing else.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable

import trio

from p2pimg.content.model import BlobMap
from p2pimg.errors import OriginError
from p2pimg.sources.origins import Origin, blob_key
from p2pimg.sources.readahead import AheadReport, ReadAhead


class SourceBusy(OriginError):
    """A source declined a request for now (a peer's 429): not a failure, come back later."""

    oci_code = "TOOMANYREQUESTS"
    http_status = 429
    retry_after = 0.5  # seconds the source is left alone


class ChunkSource(abc.ABC):
    """Anything that can send byte ranges of a blob: an origin, a peer, an upstream registry."""

    name: str
    kind: str  # "origin" | "peer" | "upstream": the metrics label and the policy's first key
    limit: int = 8  # concurrent requests, over all blobs
    max_span: int = 16 << 20
    ranges: bool = True  # False: it can only send whole blobs, so ask for all that is left at once
    segment_size: int = 64 << 20
    stall_timeout: float | None = None  # None: the engine's default

    def inventory(self, blob_map: BlobMap) -> bytes | None:
        """What this source holds of a blob, as last heard: one byte per chunk (1 held, 2 being
        fetched by the source itself, 0 missing), b"" for all of it, None for nothing. An origin
        or upstream registry holds everything it publishes; a peer says (see `track`)."""
        return b""

    node_id: str | None = None  # a peer's node identity, shared by every node's view of it

    async def prime(self, blob_map: BlobMap) -> None:  # noqa: B027 - most sources know already
        """Learn what this source holds of a blob before its fetch starts (peers ask)."""

    async def track(self, blob_map: BlobMap, changed: Callable[[], None]) -> None:  # noqa: B027
        """Keep `inventory` fresh while the blob's fetch runs; call `changed()` when it changes."""

    def read_ahead(self, nursery: trio.Nursery, digest: str, report: Callable[[AheadReport], None]) -> bool:
        """A client asked for a blob whose map is still being looked up: a source that can find
        the blob by its digest alone may start on its first bytes (`readahead`), and `report`
        how that went when it is over. Whether it started one (most sources cannot)."""
        return False

    def drop_read_ahead(self, digest: str) -> None:  # noqa: B027 - origins only
        """The blob turned out not to be wanted (unknown to the name, or another registry's)."""

    @abc.abstractmethod
    def read_span(self, blob_map: BlobMap, start: int, length: int) -> AsyncIterator[bytes]:
        """Bytes [start, start+length) of the blob, in pieces of any size."""


class OriginSource(ChunkSource):
    kind = "origin"

    def __init__(self, origin: Origin, *, limit: int = 8) -> None:
        self.origin = origin
        self.name = f"origin {origin.url}"
        self.limit = limit
        self.segment_size = origin.segment_size
        self.max_span = origin.preferred_span
        # Blobs known to be someone else's (in IPFS: an image nerdctl pushed), never asked of it.
        self.elsewhere: Callable[[str], bool] = lambda _digest: False
        self.ahead = ReadAhead(origin, length=self.max_span)

    def inventory(self, blob_map: BlobMap) -> bytes | None:
        # A blob without chunk CIDs is a mirrored one: an upstream's, not published here.
        return b"" if blob_map.checked and not self.elsewhere(blob_map.digest) else None

    def read_ahead(self, nursery: trio.Nursery, digest: str, report: Callable[[AheadReport], None]) -> bool:
        return not self.elsewhere(digest) and self.ahead.start(nursery, digest, report)

    def drop_read_ahead(self, digest: str) -> None:
        self.ahead.drop(digest)

    def read_span(self, blob_map: BlobMap, start: int, length: int) -> AsyncIterator[bytes]:
        taken = self.ahead.take(blob_map.digest, start, length)
        return (
            taken if taken is not None else self.origin.read_range(blob_key(blob_map.digest), start, length)
        )
