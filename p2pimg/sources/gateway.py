"""IPFS trustless gateways (https://specs.ipfs.tech/http-gateways/trustless-gateway/) as a source
of blocks and of blob bytes.

A gateway is asked for one block at a time (`GET /ipfs/<cid>?format=raw`) or, for a span of a
UnixFS file, for the blocks of that span as a CAR (`?format=car&dag-scope=entity&entity-bytes=
from:to`, depth-first asked for): one request instead of one per leaf. A conforming gateway sends
only the nodes on the way to the span and its leaves, so a blob costs about its size. Whatever
order the blocks come in, the span's leaves are kept until their turn (at most the span's own
blocks are held); blocks the span does not need (the nodes on the way, duplicates, unrelated or
unverifiable ones) are dropped unhashed, as the spec tells clients to. Every block that is kept is
checked against its CID first. A gateway that answers a CAR request with something else (an
older or minimal gateway) is asked block by block for `car_retry` seconds, then for CARs again.

Bodies are read as sent: `accept-encoding: identity` is asked, an answer with any other
Content-Encoding is refused unread (never decompressed: a small gzip body can expand a
thousandfold), and the size bounds count the bytes on the wire.

A gateway holds what IPFS holds, but only what the node was told is a UnixFS file is asked of it:
`IpfsFiles` maps a blob's digest to its file's layout (its root and its leaves at their offsets,
learnt by walking the file's dag-pb nodes, `fetch/nerdctl.py`). Gateways are not the authority for
what they send: a wrong block is charged to the gateway like a lying peer's (`policy.RELAYS`).
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import httpx
import trio

from p2pimg.content.car import CarReader
from p2pimg.content.cid import DAG_PB, Cid
from p2pimg.content.model import BlobMap
from p2pimg.content.unixfs import MAX_BLOCK_SIZE, DataType, decode_pb_node, decode_unixfs
from p2pimg.errors import OriginError, OriginNotFound, P2pimgError, UnixfsInvalid, VerificationError
from p2pimg.sources.base import ChunkSource, SourceBusy
from p2pimg.tasks import first_failure_nursery

log = logging.getLogger(__name__)

RAW_BLOCK = "application/vnd.ipld.raw"
CAR = "application/vnd.ipld.car"
_CAR_ACCEPT = "application/vnd.ipld.car; version=1; order=dfs; dups=y"
_BATCH = 4  # leaves of a span asked for at once when a gateway is asked block by block
_KEPT_LAYOUTS = 4096
_BLOCK_HEDGE = 1.0  # seconds without a block before the next gateway is asked for it too
_BLOCK_TIMEOUT = 20.0  # seconds one gateway has to send one block
_CAR_RETRY = 600.0  # seconds a gateway that refused a CAR request is asked block by block


class Stats(Protocol):
    """What the fetch engine observed of a source (`fetch.policy.SourceStats`): block requests
    made outside the engine report to the same record, so a gateway's bans hold everywhere."""

    banned: bool
    unavailable_until: float
    errors: int
    throughput: float
    latency: float
    delivered: int
    in_flight: int

    def started(self) -> None: ...
    def finished(self, nbytes: int, seconds: float, first_byte: float | None) -> None: ...
    def failed(self, now: float, nbytes: int = 0) -> None: ...
    def sent_bad_chunk(self, now: float, nbytes: int = 0) -> None: ...


class GatewayMissing(OriginNotFound):
    """A gateway answered that it does not have a block (404)."""


class GatewayBusy(SourceBusy):
    """A gateway answered 429: leave it alone for a while."""


class CarRefused(OriginError):
    """A gateway did not answer a CAR request with a usable CAR (it may not offer CARs at all)."""


@dataclass(frozen=True, slots=True)
class Piece:
    """`size` bytes of a file at `offset`: a raw leaf block, or (`inline`) the data a dag-pb node
    carries itself, which is read by fetching that node again."""

    cid: Cid
    offset: int
    size: int
    inline: bool = False


class FileLayout:
    """A blob as a UnixFS file: its root, and its pieces in file order."""

    def __init__(self, root: Cid, size: int, pieces: Sequence[Piece]) -> None:
        self.root = root
        self.size = size
        self.pieces = tuple(pieces)
        self._offsets = [p.offset for p in self.pieces]

    def pieces_in(self, start: int, end: int) -> list[Piece]:
        """The pieces holding any of the bytes [start, end), in order."""
        first = max(0, bisect.bisect_right(self._offsets, start) - 1)
        found = []
        for piece in self.pieces[first:]:
            if piece.offset >= end:
                break
            if piece.offset + piece.size > start:
                found.append(piece)
        return found


class IpfsFiles:
    """Digest -> the UnixFS layout of that blob, for the blobs the node was told are in IPFS (the
    most recently told `_KEPT_LAYOUTS`, and no more than `kept_pieces` pieces in all: a piece
    costs a few hundred bytes, and a hostile image can make layouts of many). Shared by every
    gateway source of a node."""

    kept_pieces = 1 << 19

    def __init__(self) -> None:
        self._layouts: OrderedDict[str, FileLayout] = OrderedDict()
        self._pieces = 0

    def put(self, digest: str, layout: FileLayout) -> None:
        if (old := self._layouts.pop(digest, None)) is not None:
            self._pieces -= len(old.pieces)
        self._layouts[digest] = layout
        self._pieces += len(layout.pieces)
        while len(self._layouts) > 1 and (
            len(self._layouts) > _KEPT_LAYOUTS or self._pieces > self.kept_pieces
        ):
            _, dropped = self._layouts.popitem(last=False)
            self._pieces -= len(dropped.pieces)

    def get(self, digest: str) -> FileLayout | None:
        return self._layouts.get(digest)


def inline_data(piece: Piece, block: bytes) -> bytes:
    """The file bytes a dag-pb node carries itself (`piece` says how many); the block was checked
    against its CID."""
    fs = decode_unixfs(decode_pb_node(block).data or b"")
    data = fs.data or b""
    if fs.type not in (DataType.FILE, DataType.RAW) or len(data) != piece.size:
        raise UnixfsInvalid(f"node {piece.cid} does not carry the {piece.size} bytes its parent says")
    return data


def piece_bytes(piece: Piece, block: bytes) -> bytes:
    """The file bytes of `piece`, from its verified block."""
    if piece.inline:
        return inline_data(piece, block)
    if len(block) != piece.size:
        raise UnixfsInvalid(f"leaf {piece.cid} holds {len(block)} bytes, its parent says {piece.size}")
    return block


def _media(content_type: str) -> tuple[str, dict[str, str]]:
    kind, *params = (p.strip() for p in content_type.split(";"))
    values = {}
    for param in params:
        key, _, value = param.partition("=")
        values[key.strip().lower()] = value.strip().strip('"').lower()
    return kind.lower(), values


class Gateway:
    """One trustless gateway's HTTP side."""

    def __init__(self, url: str, client: httpx.AsyncClient) -> None:
        self.url = url.rstrip("/")
        self.name = f"gateway {self.url}"
        self.client = client
        # False once it answered a CAR request with something else; asked for CARs again
        # `car_retry` seconds later (it may have been restarted, upgraded, or briefly overloaded).
        self.offers_car: bool | None = None
        self.car_retry = _CAR_RETRY
        self._car_refused_at = 0.0

    def asks_car(self) -> bool:
        """Whether a span is asked for as a CAR now."""
        return self.offers_car is not False or trio.current_time() >= self._car_refused_at + self.car_retry

    def car_refused(self) -> None:
        self.offers_car = False
        self._car_refused_at = trio.current_time()

    def _plain(self, r: httpx.Response, what: str) -> None:
        encoding = r.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise OriginError(
                f"{self.name} sent {what} with Content-Encoding {encoding[:40]} (identity was asked)"
            )

    def _failed(self, status: int, what: str) -> P2pimgError:
        if status in (404, 410):
            return GatewayMissing(f"{self.name} does not have {what}")
        if status == 429:
            return GatewayBusy(f"{self.name} is busy")
        return OriginError(f"{self.name} answered {status} for {what}")

    async def block(self, cid: Cid, max_size: int = MAX_BLOCK_SIZE) -> bytes:
        """Block `cid`, checked against it; VerificationError when the gateway sent another."""
        url = f"{self.url}/ipfs/{cid}?format=raw"
        headers = {"accept": RAW_BLOCK, "accept-encoding": "identity"}
        try:
            async with self.client.stream("GET", url, headers=headers) as r:
                if r.status_code != 200:
                    raise self._failed(r.status_code, f"block {cid}")
                self._plain(r, f"block {cid}")
                declared = r.headers.get("content-length", "")
                data = bytearray()
                if declared.isdigit() and int(declared) > max_size:
                    raise OriginError(
                        f"{self.name} announced {declared} bytes for block {cid}, over {max_size}"
                    )
                async for piece in r.aiter_raw():
                    data += piece
                    if len(data) > max_size:
                        raise OriginError(f"{self.name} sent more than {max_size} bytes for block {cid}")
        except httpx.HTTPError as exc:
            raise OriginError(f"{self.name}: {exc or type(exc).__name__}") from None
        if not cid.matches(data):
            raise VerificationError(f"{self.name} sent a block that does not match {cid}")
        return bytes(data)

    async def car(
        self, root: Cid, first: int, last: int, wanted: Callable[[Cid], bool]
    ) -> AsyncGenerator[tuple[Cid, bytes]]:
        """The blocks `wanted` accepts of a CAR of bytes [first, last] of the file `root`, in the
        order the gateway sends them, each checked against its CID; the others are dropped
        unhashed. CarRefused before any block when the answer is not a CAR."""
        url = (
            f"{self.url}/ipfs/{root}?format=car&dag-scope=entity&entity-bytes={first}:{last}"
            "&car-version=1&car-order=dfs&car-dups=y"
        )
        headers = {"accept": _CAR_ACCEPT, "accept-encoding": "identity"}
        try:
            async with self.client.stream("GET", url, headers=headers) as r:
                kind, params = _media(r.headers.get("content-type", ""))
                if r.status_code in (400, 406, 415, 501) or (r.status_code == 200 and kind != CAR):
                    raise CarRefused(f"{self.name} answered {r.status_code} {kind or '-'} to a CAR request")
                if r.status_code != 200:
                    raise self._failed(r.status_code, f"a CAR of {root}")
                if params.get("version", "1") != "1":
                    raise CarRefused(
                        f"{self.name} answered a CAR request with CAR version {params['version']}"
                    )
                self._plain(r, f"a CAR of {root}")
                reader = CarReader()
                async for data in r.aiter_raw():
                    for cid, block in reader.feed(data):
                        if not wanted(cid):
                            continue
                        if not cid.matches(block):
                            raise VerificationError(f"{self.name} sent a block that does not match {cid}")
                        yield cid, block
                reader.close()
        except httpx.HTTPError as exc:
            raise OriginError(f"{self.name}: {exc or type(exc).__name__}") from None


class GatewaySource(ChunkSource):
    """A gateway as a source of the blobs `files` knows: the pieces of a span, checked against
    their CIDs, as one CAR or block by block."""

    kind = "gateway"
    limit = 6
    max_span = 4 << 20
    segment_size = 1 << 62  # no segments: any span is one request
    stall_timeout = 15.0

    def __init__(self, gateway: Gateway, files: IpfsFiles) -> None:
        self.gateway = gateway
        self.name = gateway.name
        self.files = files

    def inventory(self, blob_map: BlobMap) -> bytes | None:
        return b"" if self.files.get(blob_map.digest) is not None else None

    async def read_span(self, blob_map: BlobMap, start: int, length: int) -> AsyncIterator[bytes]:
        layout = self.files.get(blob_map.digest)
        if layout is None:
            raise OriginError(f"{self.name} was not told where {blob_map.digest} is in IPFS")
        end = start + length
        pieces = layout.pieces_in(start, end)
        if layout.root.codec == DAG_PB and len(pieces) > 1 and self.gateway.asks_car():
            sent = False
            try:
                async with contextlib.aclosing(self._by_car(layout, pieces, start, end)) as parts:
                    async for part in parts:
                        sent = True
                        yield part
                return
            except CarRefused as exc:
                if sent:
                    raise
                if self.gateway.offers_car is not False:
                    log.info("%s; asking it block by block for %g s", exc.message, self.gateway.car_retry)
                self.gateway.car_refused()
        async with contextlib.aclosing(self._by_blocks(pieces, start, end)) as parts:
            async for part in parts:
                yield part

    @staticmethod
    def _cut(piece: Piece, data: bytes, start: int, end: int) -> bytes:
        lo = max(start, piece.offset) - piece.offset
        hi = min(end, piece.offset + piece.size) - piece.offset
        return data[lo:hi]

    async def _by_blocks(self, pieces: list[Piece], start: int, end: int) -> AsyncGenerator[bytes]:
        # A few pieces at a time, all fetched before any is passed on: a response is never waited
        # on while the tasks fetching the next pieces are running (no yield inside a nursery).
        for at in range(0, len(pieces), _BATCH):
            batch = pieces[at : at + _BATCH]
            blocks: list[bytes] = [b""] * len(batch)
            async with first_failure_nursery() as nursery:
                for i, piece in enumerate(batch):
                    nursery.start_soon(self._piece, piece, blocks, i)
            for piece, data in zip(batch, blocks, strict=True):
                yield self._cut(piece, data, start, end)

    async def _piece(self, piece: Piece, into: list[bytes], i: int) -> None:
        into[i] = piece_bytes(piece, await self.gateway.block(piece.cid))

    async def _by_car(
        self, layout: FileLayout, pieces: list[Piece], start: int, end: int
    ) -> AsyncGenerator[bytes]:
        # A conforming CAR brings the nodes on the way to the span, then its leaves in file
        # order, but any order is taken: a leaf that comes before its turn is kept until then,
        # and one that occurs several times in the span (zero-filled chunks) may come once only
        # (dups=n), so it is kept until its last use. Only the span's own leaves are ever kept:
        # memory stays bounded by the span. Anything else (the nodes on the way, a leaf that came
        # again, blocks the span does not use) is dropped unhashed.
        uses = collections.Counter(p.cid for p in pieces)
        kept: dict[Cid, bytes] = {}
        i = 0

        def wanted(cid: Cid) -> bool:
            return uses[cid] > 0 and cid not in kept

        cars = self.gateway.car(layout.root, start, end - 1, wanted)
        async with contextlib.aclosing(cars) as blocks:
            async for cid, block in blocks:
                self.gateway.offers_car = True
                kept[cid] = block
                while i < len(pieces) and pieces[i].cid in kept:
                    piece = pieces[i]
                    data = kept[piece.cid]
                    uses[piece.cid] -= 1
                    if not uses[piece.cid]:
                        del kept[piece.cid]
                    yield self._cut(piece, piece_bytes(piece, data), start, end)
                    i += 1
                if i == len(pieces):
                    return
        # A gateway stops a CAR at a block it does not have (the spec's streaming rule).
        raise GatewayMissing(
            f"{self.name} does not have block {pieces[i].cid} (bytes from {pieces[i].offset} of "
            f"the file {layout.root}): its CAR stopped before it"
        )


class Gateways:
    """The node's gateways: its sources, and blocks by CID from whichever answers first."""

    def __init__(
        self,
        urls: Sequence[str],
        client: httpx.AsyncClient,
        *,
        stats: Callable[[str], Stats | None] = lambda _name: None,
    ) -> None:
        self.files = IpfsFiles()
        self.sources = [GatewaySource(Gateway(url, client), self.files) for url in urls]
        self.stats = stats  # what the fetch engine has observed of each source, by name

    def __bool__(self) -> bool:
        return bool(self.sources)

    def _ranked(self, now: float) -> list[GatewaySource]:
        def rank(source: GatewaySource) -> tuple[bool, int, bool, float]:
            # Healthy first, then those that have answered before (one that takes requests and
            # never answers has not), the quickest to answer first.
            st = self.stats(source.name)
            if st is None:
                return False, 0, True, 0.0
            return now < st.unavailable_until, st.errors, not st.delivered, st.latency

        return sorted((s for s in self.sources if not getattr(self.stats(s.name), "banned", False)), key=rank)

    async def block(self, cid: Cid, max_size: int = MAX_BLOCK_SIZE) -> bytes:
        """Block `cid` from the gateways: the best first, the next one as well whenever the ones
        asked have failed or have not answered for `_BLOCK_HEDGE` s; the first verified answer
        wins. A gateway that sends a wrong block is charged for it like a lying peer."""
        found: list[bytes] = []
        failures: list[P2pimgError] = []
        ranked = self._ranked(trio.current_time())
        if not ranked:
            raise OriginError("no usable IPFS gateway (none configured, or all sent wrong blocks)")

        async def ask(source: GatewaySource, failed: trio.Event, done: trio.CancelScope) -> None:
            st = self.stats(source.name)
            if st is not None:
                st.started()
            began = trio.current_time()
            data: bytes | None = None
            error: P2pimgError | None = None
            try:
                with trio.fail_after(_BLOCK_TIMEOUT):
                    data = await source.gateway.block(cid, max_size)
                found.append(data)
                done.cancel()
            except VerificationError as exc:
                error = exc
                log.warning("%s", exc.message)
            except P2pimgError as exc:
                error = exc
            except trio.TooSlowError:
                error = OriginError(f"{source.name} sent no block {cid} within {_BLOCK_TIMEOUT:g} s")
            finally:
                if error is not None:
                    failures.append(error)
                if st is not None:
                    now = trio.current_time()
                    if data is not None:
                        st.finished(len(data), now - began, now - began)
                    elif isinstance(error, VerificationError):
                        st.sent_bad_chunk(now)
                    elif error is not None and not isinstance(error, GatewayMissing | GatewayBusy):
                        st.failed(now)  # (a gateway that lacks a block, or is busy, is not failing)
                    else:
                        st.in_flight -= 1
                failed.set()

        async with trio.open_nursery() as nursery:
            for source in ranked:
                failed = trio.Event()
                nursery.start_soon(ask, source, failed, nursery.cancel_scope)
                with trio.move_on_after(_BLOCK_HEDGE):
                    await failed.wait()
        if found:
            return found[0]
        missing = all(isinstance(f, GatewayMissing) for f in failures)
        error = GatewayMissing if missing else OriginError
        reasons = "; ".join(f.message for f in failures)
        raise error(f"no IPFS gateway sent block {cid}: {reasons}")
