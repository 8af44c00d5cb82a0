"""The peer listener's `/ipfs/<cid>`: an IPFS trustless gateway over what this node holds verified.

    GET|HEAD /ipfs/<cid>                    a block (application/vnd.ipld.raw, `?format=raw`) or
                                            a CAR v1 (application/vnd.ipld.car, `?format=car`)

It follows https://specs.ipfs.tech/http-gateways/trustless-gateway/ as a non-recursive gateway:
it serves only what this node holds, verified, and never fetches anything for the asker.

- Format: `?format=` wins over `Accept` (with its q-values and the CAR parameters `version`,
  `order`, `dups`; the `car-version`, `car-order`, `car-dups` query parameters win over those).
  No `Accept` at all (or `*/*`): a raw block, what p2pimg's own peers and older clients expect.
  What it cannot give is 406: dag-json, dag-cbor, json, cbor and tar (trustless responses only),
  ipns-record, CAR version 2, an unknown order. `order=unk` is answered in `dfs` order and
  `dups=y` with `dups=n`, both declared in the Content-Type, as the spec lets a gateway do.
- Status: 400 only for a malformed CID (or request); 404 for any well-formed CID it does not
  hold (CIDv0, dag-pb, other hash functions and codecs included: it cannot hold those), and for
  private content when no swarm key guards the listener (the same answer as for absent content,
  see `PeerService._guard`); 403 for a block over 2 MiB (a whole blob by its raw CID: IPFS
  peers refuse such blocks; the bytes are on /p2pimg/v1/blobs/<digest>); 412 with
  `Cache-Control: only-if-cached` when the block is not here; 304 for a matching If-None-Match.
  `bafkqaaa` (and any identity CID) is answered from the CID itself: the probe gets 200, empty.
- Headers: Content-Type with its parameters, `Cache-Control: public, max-age=29030400,
  immutable`, `Content-Disposition: attachment; filename="<cid>.bin|.car"`, `Etag`,
  `X-Content-Type-Options: nosniff`, `X-Ipfs-Path`, `X-Ipfs-Roots`, `Vary: Accept`, and
  `Content-Location` when `Accept` chose the format.

CAR responses walk the DAG depth-first, each block once (`order=dfs; dups=n`), with `dag-scope`
= block, entity or all, and `entity-bytes` narrowing a blob map or a UnixFS file to the blocks of
a byte range: which blocks, in which order, is `web/carwalk.py`.

The body streams, one block at a time: chunks go from the cached blob file (or the verified part
of one being fetched) to the socket with sendfile. The root block must be here before anything
is sent (404 otherwise); a block further down that is missing (or over 2 MiB) ends the stream
there, cut short, as the spec says a gateway that already answered 200 must (the client sees an
incomplete chunked body, never a short CAR that looks whole).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from urllib.parse import urlencode

import trio
from multiformats import multibase

from p2pimg.content.car import IDENTITY, MAX_BLOCK, CidParts, car_header, read_cid, section_head
from p2pimg.content.cid import RAW, Cid
from p2pimg.content.model import BlobMap
from p2pimg.errors import DigestInvalid, P2pimgError
from p2pimg.fetch.engine import BlobFetch, Fetcher
from p2pimg.store.chunks import ChunkStore
from p2pimg.store.index import ChunkIndex, Place
from p2pimg.web.carwalk import SCOPES, car_body
from p2pimg.web.server import AbortResponse, BodyPart, FileRegion, Request, Response

log = logging.getLogger(__name__)

RAW_BLOCK = "application/vnd.ipld.raw"
CAR = "application/vnd.ipld.car"
CAR_TYPE = f"{CAR}; version=1; order=dfs; dups=n"
IMMUTABLE = "public, max-age=29030400, immutable"
# `format=` values of the path gateway that a trustless gateway does not give (406, not 400).
_OTHER_FORMATS = frozenset({"dag-json", "dag-cbor", "json", "cbor", "tar", "ipns-record"})
_MAX_CID_TEXT = 512


class _Refusal(Exception):
    """An answer other than the content: its status and plain-text message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# -- what was asked for ------------------------------------------------------------------------


def parse_cid_text(text: str) -> tuple[CidParts, bytes]:
    """Any well-formed CID (v0 or v1, any codec and hash function): its fields and binary form;
    400 when malformed."""
    if not text or len(text) > _MAX_CID_TEXT or not text.isascii():
        raise _Refusal(400, f"invalid CID {text[:80]!r}")
    try:
        if len(text) == 46 and text.startswith("Qm"):  # CIDv0: base58btc without a multibase prefix
            binary = bytes(multibase.get("base58btc").raw_decoder(text))
        else:
            binary = bytes(multibase.decode(text))
            if binary[:1] == b"\x12":
                raise ValueError("a CIDv0 cannot be multibase-encoded")
        parts, end = read_cid(binary, 0, len(binary))
        if end != len(binary):
            raise ValueError("bytes after the CID")
    except Exception as exc:  # multibase's decoders raise errors that share no useful base class
        message = exc.message if isinstance(exc, P2pimgError) else str(exc)
        raise _Refusal(400, f"invalid CID {text[:100]!r}: {message[:200]}") from None
    return parts, binary


@dataclass(frozen=True)
class Wanted:
    """What the request asks for: a raw block, or a CAR of `scope` (with an optional byte range
    of the entity, `entity-bytes`: first and last offset, negative from the end, None for `*`)."""

    car: bool
    scope: str = "all"
    entity_bytes: tuple[int, int | None] | None = None
    by_accept: bool = False  # chosen by the Accept header, the URL naming no format


def _media_ranges(accept: str) -> list[tuple[str, dict[str, str], float]]:
    """An Accept header's media ranges: (type, parameters, q), in their order."""
    ranges = []
    for item in accept.split(","):
        fields = [f.strip() for f in item.split(";")]
        kind = fields[0].lower()
        if not kind:
            continue
        params: dict[str, str] = {}
        for field in fields[1:]:
            name, _, value = field.partition("=")
            params[name.strip().lower()] = value.strip().strip('"')
        try:
            q = float(params.pop("q", "1"))
        except ValueError:
            q = 0.0
        if not 0 <= q <= 1:  # nan too: not a preference
            q = 0.0
        ranges.append((kind, params, q))
    return ranges


def _car_params_ok(params: dict[str, str]) -> bool:
    return (
        params.get("version", "1") == "1"
        and params.get("order", "dfs") in ("dfs", "unk", "")
        and params.get("dups", "n") in ("y", "n")
    )


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None


def negotiate(request: Request) -> Wanted:
    """The response format and CAR shape a request asks for (406 or 400 when it cannot be given)."""
    query = request.query
    accept = request.headers.get("accept", "").strip()
    ranges = sorted(_media_ranges(accept), key=lambda r: -r[2])  # a stable sort keeps ties in order
    car_params: dict[str, str] = next((p for k, p, q in ranges if k == CAR and q > 0), {})
    fmt = _one(query, "format")
    if fmt is not None:
        if fmt in _OTHER_FORMATS:
            raise _Refusal(406, f"format={fmt} is not served here: this is a trustless gateway (raw, car)")
        if fmt not in ("raw", "car"):
            raise _Refusal(400, f"unknown format {fmt[:40]!r}")
        car, by_accept = fmt == "car", False
    elif not accept:
        car, by_accept = False, False
    else:
        chosen = None
        for kind, params, q in ranges:
            if q <= 0:
                continue
            if kind == RAW_BLOCK or kind in ("*/*", "application/*"):
                chosen = False
            elif kind == CAR and _car_params_ok(params):
                chosen, car_params = True, params
            if chosen is not None:
                break
        if chosen is None:
            raise _Refusal(406, f"none of {accept[:200]!r} is served here (raw blocks and CAR v1 are)")
        car, by_accept = chosen, kind != "*/*" and kind != "application/*"
    if not car:
        return Wanted(False, by_accept=by_accept)
    for name in ("version", "order", "dups"):
        if (value := _one(query, f"car-{name}")) is not None:
            car_params = {**car_params, name: value}
    if not _car_params_ok(car_params):
        raise _Refusal(
            406, "only CAR version=1 with order=dfs and dups=n (or y, answered as n) is served here"
        )
    entity_bytes = _one(query, "entity-bytes")
    scope = _one(query, "dag-scope") or ("entity" if entity_bytes is not None else "all")
    if scope not in SCOPES:
        raise _Refusal(400, f"dag-scope must be block, entity or all, not {scope[:40]!r}")
    return Wanted(True, scope, _parse_entity_bytes(entity_bytes), by_accept)


def _parse_entity_bytes(text: str | None) -> tuple[int, int | None] | None:
    if text is None:
        return None
    first, sep, last = text.partition(":")
    try:
        start = int(first)
        end = None if last == "*" else int(last)
    except ValueError:
        raise _Refusal(
            400, f"entity-bytes must be FROM:TO (integers, TO may be *), not {text[:40]!r}"
        ) from None
    if not sep or (end is not None and 0 <= end < start):
        raise _Refusal(400, f"entity-bytes {text[:40]!r} is not a range")
    return start, end


# -- what this node holds ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Held:
    """A verified block this node holds: its bytes, or where they are in a blob's file."""

    size: int
    data: bytes | None = None
    blob: str | None = None  # bytes [lo, lo + size) of this blob's complete file...
    fetch: BlobFetch | None = None  # ...or of the partial file of this fetch
    lo: int = 0


class _OpenFile:
    """The one blob file a CAR body reads from at a time, owned by its exchange (`Request.hold`
    takes `close`): a region is sent before the body resumes, so the next blob can replace it."""

    def __init__(self, store: ChunkStore) -> None:
        self.store = store
        self.key: object = None
        self.fd: int | None = None

    def of(self, held: _Held) -> int:
        key = ("blob", held.blob) if held.fetch is None else ("partial", held.fetch.map.digest)
        if self.fd is None or key != self.key:
            self.close()
            if held.fetch is not None:
                self.fd = os.dup(held.fetch.partial.fd)
            else:
                assert held.blob is not None
                self.fd = os.open(self.store.blob_path(held.blob), os.O_RDONLY)
            self.key = key
        return self.fd

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Gateway:
    """`/ipfs/<cid>` over a node's cache; `hidden(sha256 hex)` says what must look absent."""

    def __init__(
        self, store: ChunkStore, fetcher: Fetcher, index: ChunkIndex, hidden: Callable[[str], bool]
    ) -> None:
        self.store = store
        self.fetcher = fetcher
        self.index = index
        self.hidden = hidden

    async def serve(self, rest: str, request: Request) -> Response:
        head = request.method == "HEAD"
        try:
            return await self._serve(rest, request)
        except _Refusal as refusal:
            return _text(refusal.status, refusal.message, head)

    async def _serve(self, rest: str, request: Request) -> Response:
        text, _, path = rest.partition("/")
        parts, binary = parse_cid_text(text)
        want = negotiate(request)
        if path:
            if want.car:
                raise _Refusal(501, "paths under a CID are not served here: ask for the CID they lead to")
            raise _Refusal(400, "a block is asked for as /ipfs/<cid>, without a path")
        if parts.hash_code == IDENTITY:  # the data is the CID itself: nothing to hold
            return self._identity(text, binary, parts.digest, want, request)
        try:
            cid = parts.to_cid()
        except DigestInvalid:
            cid = None  # well-formed, but nothing this node can hold
        held = await self._locate(cid, None) if cid is not None else None
        if held is None or cid is None:
            if "only-if-cached" in request.headers.get("cache-control", ""):
                raise _Refusal(412, f"{text} is not held here")
            raise _Refusal(404, f"this peer does not have {text}")
        if held.size > MAX_BLOCK:
            raise _Refusal(403, self._too_large(cid, held))
        if not want.car:
            return self._raw(text, held, want, request)
        headers = _ok_headers(text, want, request)
        if _matches(request.headers.get("if-none-match"), dict(headers)["etag"]):
            return Response(304, [h for h in headers if h[0] != "content-type"])
        if request.method == "HEAD":
            return Response(200, headers)
        files = _OpenFile(self.store)
        request.hold(files.close)  # the exchange owns the file the body reads, however it ends
        return Response(200, headers, self._car(cid, held, want, files))

    def _raw(self, text: str, held: _Held, want: Wanted, request: Request) -> Response:
        headers = _ok_headers(text, want, request)
        if _matches(request.headers.get("if-none-match"), dict(headers)["etag"]):
            return Response(304, [h for h in headers if h[0] != "content-type"])
        headers.append(("content-length", str(held.size)))
        if request.method == "HEAD":
            return Response(200, headers)
        if held.data is not None:
            return Response(200, headers, held.data)
        files = _OpenFile(self.store)
        request.hold(files.close)
        try:
            fd = files.of(held)
        except FileNotFoundError:  # evicted since it was found
            raise _Refusal(404, f"this peer does not have {text}") from None
        return Response(200, headers, _region(fd, held.lo, held.size))

    async def serve_block(self, text: str, request: Request, max_size: int) -> Response:
        """`/p2pimg/v1/blocks/<cid>` of the peer API: a block this node holds, raw, found and
        hidden as `/ipfs/` finds and hides it, but up to `max_size` bytes instead of IPFS's 2 MiB:
        p2pimg's own blocks (image roots and blob maps up to 8 MiB, manifests up to 4 MiB), which
        its peers ask for when their origin cannot give them."""
        try:
            parts, _binary = parse_cid_text(text)
            try:
                cid: Cid | None = parts.to_cid()
            except DigestInvalid:
                cid = None  # well-formed, but nothing this node can hold
            held = await self._locate(cid, None) if cid is not None else None
            if held is None:
                raise _Refusal(404, f"this peer does not have {text}")
            if held.size > max_size:
                raise _Refusal(403, f"{text} is {held.size} bytes, over {max_size}: ask for blobs by digest")
            return self._raw(text, held, Wanted(False), request)
        except _Refusal as refusal:
            return _text(refusal.status, refusal.message, request.method == "HEAD")

    @staticmethod
    def _identity(text: str, binary: bytes, data: bytes, want: Wanted, request: Request) -> Response:
        """An identity CID holds its data: the probe `bafkqaaa` is 200 and empty. Its CAR names it
        as the root and holds no block (identity blocks are never sent)."""
        headers = _ok_headers(text, want, request)
        body = car_header([binary]) if want.car else data
        headers.append(("content-length", str(len(body))))
        return Response(200, headers, b"" if request.method == "HEAD" else body)

    @staticmethod
    def _too_large(cid: Cid, held: _Held) -> str:
        if held.blob is not None and held.lo == 0 and cid.codec == RAW and cid.to_digest() == held.blob:
            return (
                f"{cid} is the whole blob {held.blob} ({held.size} bytes): IPFS blocks stop at "
                f"{MAX_BLOCK} bytes. Its bytes are served at /p2pimg/v1/blobs/{held.blob}, and its "
                "chunks by their own CIDs (see its blob map)"
            )
        return f"{cid} is a block of {held.size} bytes: IPFS blocks stop at {MAX_BLOCK} bytes"

    # -- finding blocks ------------------------------------------------------------------------

    async def _locate(self, cid: Cid, chunk: tuple[BlobMap, int] | None) -> _Held | None:
        """The verified block `cid` names, if this node holds it (and may show it); `chunk` says
        where a blob map claims it is."""
        if self.hidden(cid.digest.hex()):
            return None
        if chunk is not None:
            bmap, i = chunk
            lo, hi = bmap.bounds(i)
            return await self._at(cid, self.index.claim(cid, bmap.digest, lo, hi - lo))
        data = await trio.to_thread.run_sync(self.store.get_block, cid)  # re-verified on read
        if data is not None:
            return _Held(len(data), data=data)
        if cid.codec != RAW:
            return None
        digest = cid.to_digest()
        try:  # a whole blob, named by the CID of all its bytes
            return _Held(os.stat(self.store.blob_path(digest)).st_size, blob=digest)
        except FileNotFoundError:
            pass
        for place in self.index.find(cid):
            if (held := await self._at(cid, place)) is not None:
                return held
        return None

    async def _at(self, cid: Cid, place: Place) -> _Held | None:
        """The block `cid` at a claimed place: in a complete blob once its bytes were found to
        match `cid` (`ChunkIndex.check`), or in the partial blob of a fetch whose own map has
        that very chunk there, verified as it arrived. A blob map or a UnixFS file only claims
        what its chunks are: the bytes decide."""
        if self.hidden(place.digest[7:]):
            return None
        if self.store.has_blob(place.digest):
            if await self.index.check(self.store, cid, place):
                return _Held(place.size, blob=place.digest, lo=place.offset)
            return None
        fetch = self.fetcher.fetch_of(place.digest)
        if fetch is None or not fetch.map.checked:
            return None
        bmap, i = fetch.map, place.offset // fetch.map.chunk_size
        there = i < bmap.count and bmap.bounds(i) == (place.offset, place.offset + place.size)
        if there and bmap.chunks[i] == cid and fetch.partial.have[i]:  # have: it matched chunks[i]
            return _Held(place.size, fetch=fetch, lo=place.offset)
        return None

    # -- CAR responses -------------------------------------------------------------------------

    async def export(self, root: Cid, also: Sequence[Cid] = ()) -> AsyncIterator[BodyPart]:
        """The CAR of everything `root` reaches (`dag-scope=all`), as `p2pimg export` writes it:
        the same stream as the gateway's; then the DAGs of `also`, each block still once (a
        nerdctl image: its root is a raw block that names its files by URL, not by links).
        AbortResponse when a block is missing or too large."""
        held = await self._locate(root, None)
        if held is None or held.size > MAX_BLOCK:
            why = "not in the cache" if held is None else f"{held.size} bytes, over the block limit"
            raise AbortResponse(f"block {root}: {why}")
        files = _OpenFile(self.store)
        try:
            async for part in self._car(root, held, Wanted(True), files, also):
                yield part
        finally:
            files.close()

    def _car(
        self, root: Cid, held: _Held, want: Wanted, files: _OpenFile, also: Sequence[Cid] = ()
    ) -> AsyncIterator[BodyPart]:
        """The CAR body (`carwalk.car_body`): blocks found as `/ipfs/` finds them, chunks read
        from `files`; a block that is missing (or too large) cuts the stream there."""
        return car_body(
            root,
            held,
            want.scope,
            want.entity_bytes,
            self._locate,
            lambda cid, block: self._section(cid, block, files),
            also,
        )

    def _section(self, cid: Cid, held: _Held, files: _OpenFile) -> Iterator[BodyPart]:
        if held.data is not None:
            yield section_head(cid, held.size) + held.data
        else:
            try:
                fd = files.of(held)
            except FileNotFoundError:  # evicted since it was found: as if missing
                raise AbortResponse(f"block {cid}: its blob left the cache") from None
            yield section_head(cid, held.size)
            yield FileRegion(fd, held.lo, held.size)


async def _region(fd: int, lo: int, size: int) -> AsyncIterator[BodyPart]:
    if size:
        yield FileRegion(fd, lo, size)


def _ok_headers(text: str, want: Wanted, request: Request) -> list[tuple[str, str]]:
    if want.car:
        extra = "" if want.entity_bytes is None else f".{want.entity_bytes[0]}-{want.entity_bytes[1] or '*'}"
        kind, etag, ext = CAR_TYPE, f'W/"{text}.car.{want.scope}{extra}.dfs.n"', "car"
    else:
        kind, etag, ext = RAW_BLOCK, f'"{text}.raw"', "bin"
    headers = [
        ("content-type", kind),
        ("cache-control", IMMUTABLE),
        ("content-disposition", f'attachment; filename="{text}.{ext}"'),
        ("x-content-type-options", "nosniff"),
        ("etag", etag),
        ("x-ipfs-path", f"/ipfs/{text}"),
        ("x-ipfs-roots", text),
        ("vary", "Accept"),
    ]
    if want.car:
        headers.append(("accept-ranges", "none"))
    if want.by_accept:  # so that HTTP caches keep the raw block and the CAR apart
        query = [(k, v) for k, values in request.query.items() for v in values]
        query.append(("format", "car" if want.car else "raw"))
        headers.append(("content-location", f"/ipfs/{text}?{urlencode(query)}"))
    return headers


def _matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    bare = etag.removeprefix("W/")
    return any(
        tag.strip() in ("*", etag, bare) or tag.strip().removeprefix("W/") == bare
        for tag in if_none_match.split(",")
    )


def _text(status: int, message: str, head: bool) -> Response:
    body = (message + "\n").encode()
    headers = [
        ("content-type", "text/plain; charset=utf-8"),
        ("content-length", str(len(body))),
        ("x-content-type-options", "nosniff"),
        ("vary", "Accept"),
    ]
    return Response(status, headers, b"" if head else body)
