"""A tiny IPFS trustless gateway for tests, written from the spec
(https://specs.ipfs.tech/http-gateways/trustless-gateway/): `GET /ipfs/<cid>` answers a raw block
(`?format=raw` or `Accept: application/vnd.ipld.raw`) or a CAR v1 (`?format=car` or `Accept:
application/vnd.ipld.car`) of the DAG under it in depth-first order, with `dag-scope=all|entity|
block`, `entity-bytes=from:to` over a UnixFS file and `dups=y|n`. It serves the blocks of a CAR
(a nerdctl fixture) from memory, on loopback, in a thread of the test process.

It can misbehave on purpose: `car=False` (a gateway that only knows blocks: 406 to CAR requests),
`lie=True` (every block it sends has a byte flipped), `once=True` (a block that occurs twice in
a DAG is sent once, whatever was asked: `dups=n`), `stall=True` (it takes requests and never
answers), `missing` (CIDs it does not hold: 404, or a CAR that stops before them), `scramble`
(CARs in `order=unk`: the blocks reversed, each twice, between blocks nobody asked for: an
unrelated one, one whose bytes do not match its CID, an identity block and a sha2-512 one, which
a client must ignore), `gzip` (every answer gzip-compressed, with `Content-Encoding: gzip`, though
the client asked for identity). Every request is logged (`requests`), so a test can tell whether
a node asked it anything.
"""

from __future__ import annotations

import gzip as gzip_codec
import hashlib
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from p2pimg.content.car import IDENTITY_EMPTY, CarReader, car_header, car_section, encode_varint
from p2pimg.content.cid import DAG_PB, IPFS_CODECS, RAW, Cid
from p2pimg.content.unixfs import DataType, FileNode, decode_pb_node, decode_unixfs, expand_file
from p2pimg.errors import P2pimgError

RAW_TYPE = "application/vnd.ipld.raw"
CAR_TYPE = "application/vnd.ipld.car"


def read_car(path: Path) -> tuple[Cid, dict[Cid, bytes]]:
    reader = CarReader()
    blocks = dict(reader.feed(path.read_bytes()))
    reader.close()
    (root,) = reader.roots
    return root, blocks


@dataclass
class Request:
    format: str  # "raw", "car", or what was asked that is neither
    cid: str
    query: dict[str, str]


@dataclass
class IpfsGateway:
    blocks: dict[Cid, bytes]
    car: bool = True
    lie: bool = False
    stall: bool = False
    once: bool = False  # sends every block once (dups=n), whatever was asked
    scramble: bool = False  # CARs in any order, with duplicates and blocks nobody asked for
    gzip: bool = False  # answers compressed, whatever was asked
    missing: set[Cid] = field(default_factory=set)
    requests: list[Request] = field(default_factory=list)
    url: str = ""
    _server: ThreadingHTTPServer | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def holds(self, cid: Cid) -> bool:
        return cid in self.blocks and cid not in self.missing

    def sent(self, cid: Cid) -> bytes:
        block = self.blocks[cid]
        if not self.lie:
            return block
        return block[:-1] + bytes([block[-1] ^ 0xFF]) if block else b"\x00"

    def log(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def start(self) -> IpfsGateway:
        gateway = self

        class Handler(_Handler):
            pass

        Handler.gateway = gateway
        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.handle_error = lambda *_args: None  # type: ignore[method-assign] # a client left: fine
        self._server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # -- CARs -----------------------------------------------------------------------------------

    def dag(self, root: Cid, scope: str, span: tuple[int, int] | None, dups: bool) -> Iterator[Cid]:
        """The DAG's CIDs in depth-first order, as far as this gateway holds them (a missing block
        ends the walk: the CAR is then incomplete, which the client must notice)."""
        seen: set[Cid] = set()

        def visit(cid: Cid, offset: int, size: int | None) -> Iterator[Cid]:
            if not self.holds(cid):
                raise _Missing
            if dups or cid not in seen:
                seen.add(cid)
                yield cid
            if scope == "block" or cid.codec != DAG_PB:
                return
            block = self.blocks[cid]
            node = decode_pb_node(block)
            try:
                fs = decode_unixfs(node.data or b"")
            except P2pimgError:
                fs = None
            if fs is None or fs.type not in (DataType.FILE, DataType.RAW):
                if scope == "all":  # not a file: every link, in order
                    for link in node.links:
                        yield from visit(link.cid, 0, None)
                return
            for child in expand_file(FileNode(cid, offset, size), block):
                if child.cid == cid:  # data inline in this very node
                    continue
                if span is not None and not (
                    child.offset <= span[1] and child.offset + (child.size or 0) > span[0]
                ):
                    continue
                yield from visit(child.cid, child.offset, child.size)

        try:
            yield from visit(root, 0, None)
        except _Missing:
            return


class _Missing(Exception):
    pass


def _entity_bytes(text: str, size: int) -> tuple[int, int] | None:
    m = re.fullmatch(r"(-?\d+):(-?\d+|\*)", text)
    if m is None:
        return None
    first = int(m.group(1))
    last = size - 1 if m.group(2) == "*" else int(m.group(2))
    first = first + size if first < 0 else first
    last = last + size if last < 0 else last
    return first, last


def _file_size(block: bytes, cid: Cid) -> int:
    if cid.codec == RAW:
        return len(block)
    try:
        fs = decode_unixfs(decode_pb_node(block).data or b"")
    except P2pimgError:
        return 0
    return fs.filesize or 0


class _Handler(BaseHTTPRequestHandler):
    gateway: IpfsGateway

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._answer(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(head=False)

    def _simple(self, status: int, text: str = "", head: bool = False) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("content-type", "text/plain; charset=utf-8")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _answer(self, *, head: bool) -> None:
        gw = self.gateway
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        accept = self.headers.get("accept", "")
        fmt = query.get("format") or ("car" if CAR_TYPE in accept else "raw" if RAW_TYPE in accept else "")
        text = parts.path.removeprefix("/ipfs/")
        gw.log(Request(fmt, text, query))
        if gw.stall:
            gw._stop.wait()
            return
        if not parts.path.startswith("/ipfs/") or "/" in text:
            return self._simple(404, "no such path", head)
        if fmt not in ("raw", "car"):
            return self._simple(400 if not fmt else 406, "ask for format=raw or format=car", head)
        if fmt == "car" and not gw.car:
            return self._simple(406, "this gateway sends blocks only", head)
        try:
            cid = Cid.parse(text, codecs=IPFS_CODECS)
        except P2pimgError as exc:
            return self._simple(400, exc.message, head)
        if not gw.holds(cid):
            return self._simple(404, f"{cid} not found", head)
        common = [
            ("cache-control", "public, max-age=29030400, immutable"),
            ("x-content-type-options", "nosniff"),
            ("x-ipfs-path", f"/ipfs/{cid}"),
            ("vary", "Accept"),
        ]
        if gw.gzip:
            common.append(("content-encoding", "gzip"))
        if fmt == "raw":
            body = gzip_codec.compress(gw.sent(cid)) if gw.gzip else gw.sent(cid)
            self.send_response(200)
            for key, value in [*common, ("content-type", RAW_TYPE), ("content-length", str(len(body)))]:
                self.send_header(key, value)
            self.send_header("content-disposition", f'attachment; filename="{cid}.bin"')
            self.end_headers()
            if not head:
                self.wfile.write(body)
            return
        scope = query.get("dag-scope", "entity" if "entity-bytes" in query else "all")
        dups = (query.get("car-dups") or ("y" if "dups=y" in accept.replace(" ", "") else "n")) == "y"
        dups = dups and not gw.once
        span = None
        if "entity-bytes" in query:
            span = _entity_bytes(query["entity-bytes"], _file_size(gw.blocks[cid], cid))
            if span is None:
                return self._simple(400, "malformed entity-bytes", head)
        self.send_response(200)
        for key, value in common:
            self.send_header(key, value)
        order = "unk" if gw.scramble else "dfs"
        self.send_header("content-type", f"{CAR_TYPE}; version=1; order={order}; dups={'y' if dups else 'n'}")
        self.send_header("content-disposition", f'attachment; filename="{cid}.car"')
        self.send_header("connection", "close")
        self.end_headers()
        if head:
            return
        walked = gw.dag(cid, scope, span, dups)
        sections: Iterator[bytes] = (car_section(each, gw.sent(each)) for each in walked)
        if gw.scramble:
            cids = reversed(list(gw.dag(cid, scope, span, dups)))
            sections = (part for each in cids for part in (car_section(each, gw.sent(each)), *_UNASKED) * 2)
        if gw.gzip:
            sections = iter([gzip_codec.compress(b"".join([car_header([cid]), *sections]))])
        else:
            self.wfile.write(car_header([cid]))
        for section in sections:
            self.wfile.write(section)


def _unverifiable(cid: bytes, block: bytes) -> bytes:
    return encode_varint(len(cid) + len(block)) + cid + block


# Blocks a client did not ask for: one it could verify but does not need, one whose bytes do not
# match its CID, and ones under CIDs it cannot verify (identity, sha2-512).
_UNASKED = [
    car_section(Cid.of_raw(b"unrelated"), b"unrelated"),
    car_section(Cid.of_raw(b"claimed"), b"something else"),
    _unverifiable(IDENTITY_EMPTY, b""),
    _unverifiable(b"\x01\x55\x13\x40" + hashlib.sha512(b"x").digest(), b"x"),
]
