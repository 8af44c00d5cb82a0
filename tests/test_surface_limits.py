"""The attack surface as a whole, in process: every input has a bound, checked before it is spent.

A real node (file origin, cache, resolver, fetcher, peer service, warm jobs) behind its two real
listeners on 127.0.0.1: the registry (with the local control endpoints) and the peer listener.
Requests are sent as raw bytes, so nothing is normalised or framed by a client library.

Limits proven elsewhere are not repeated here: DAG-CBOR depth, declared lengths and size before
decoding (tests/unit/test_dagcbor.py), the manifest size in an image root and the tag record size
in `TagRecord.decode` (tests/unit/test_model.py), oversize upstream manifests (the "huge" cases in
tests/integration/test_upstream.py), S3 and Storj `get(max_size)` (tests/test_s3_origin.py,
tests/test_storj_origin.py), the Range header (tests/unit/test_ranges.py), registry writes (405,
tests/test_registry_api.py::test_writes_refused) and name/digest/tag grammar
(tests/unit/test_model.py, tests/unit/test_cid.py, tests/test_registry_api.py::test_malformed_input).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import socket
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pytest
import trio
from _support import published_home

from p2pimg.cli import commands
from p2pimg.cli import main as cli
from p2pimg.content import dagcbor
from p2pimg.content.cid import Cid
from p2pimg.content.model import MAX_MANIFEST_SIZE, BlobMap, ImageRoot, ManifestEntry, TagRecord
from p2pimg.errors import CacheError, InvalidInput, OriginError
from p2pimg.node import warm
from p2pimg.node.config import Config, load_config, parse_listen
from p2pimg.node.node import Node, open_node
from p2pimg.ops.sample import SampleImage
from p2pimg.sources.origins import FileOrigin, block_key, tag_key
from p2pimg.sources.peer import PeerSource
from p2pimg.store.chunks import ChunkStore
from p2pimg.web import server as http
from p2pimg.web.peerapi import PeerService
from p2pimg.web.registry import Registry
from p2pimg.web.serve import local_control
from p2pimg.web.server import (
    MAX_HEADER_BYTES,
    MAX_REQUEST_BODY,
    BodyPart,
    Request,
    Response,
    serve_connection,
    serve_http,
)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_STATUS = re.compile(rb"HTTP/1\.1 ([0-9]{3}) ")


# -- a node behind its two listeners ---------------------------------------------------------------


@dataclass
class Served:
    home: Path
    node: Node
    origin: FileOrigin
    registry_port: int
    peer_port: int
    peers: PeerService  # the peer API behind the peer listener (and the local control endpoints)

    def port(self, listener: str) -> int:
        return self.registry_port if listener == "registry" else self.peer_port


@contextlib.asynccontextmanager
async def serving(config: Config) -> AsyncIterator[Served]:
    async with open_node(config) as node:
        registry = Registry(node.store, node.resolver, node.fetcher, node.metrics, node.mirror)
        peers = PeerService.for_node(node)
        listeners = await node.nursery.start(serve_http, local_control(node, registry, peers), "127.0.0.1", 0)
        peer_listeners = await node.nursery.start(serve_http, peers.handle, "127.0.0.1", 0)
        assert isinstance(node.origin, FileOrigin)
        yield Served(
            config.home,
            node,
            node.origin,
            listeners[0].socket.getsockname()[1],
            peer_listeners[0].socket.getsockname()[1],
            peers,
        )


def _config(home: Path, **changes: object) -> Config:
    config = load_config(home=str(home), mdns=False)
    return replace(config, **changes)  # type: ignore[arg-type]


@pytest.fixture
async def served(tmp_path: Path, sample: SampleImage) -> AsyncIterator[Served]:
    home = tmp_path / "home"
    await published_home(home, sample)  # the default origin: file://$HOME/origin
    async with serving(_config(home)) as s:
        yield s


# -- raw HTTP ---------------------------------------------------------------------------------------


@dataclass
class Exchange:
    status: int | None  # None: closed (or reset) without a status line
    response: bytes
    closed: bool  # the server ended the connection within the wait


async def exchange(port: int, parts: list[bytes], *, pause: float = 0.0, wait: float = 5.0) -> Exchange:
    """Send `parts` (pausing between them), then read until the server closes or `wait` passes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    response = b""
    closed = False
    try:
        for i, part in enumerate(parts):
            if i and pause:
                await trio.sleep(pause)
            try:
                await stream.send_all(part)
            except trio.BrokenResourceError:  # the server has answered and closed already
                break
        with trio.move_on_after(wait):
            while True:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:  # reset: the server closed with our bytes unread
                    data = b""
                if not data:
                    closed = True
                    break
                response += data
    finally:
        await stream.aclose()
    m = _STATUS.match(response)
    return Exchange(int(m.group(1)) if m else None, response, closed)


async def get_ok(port: int, path: bytes = b"/v2/") -> bytes:
    """A well-formed request answered 200: the server is still up after the abuse before it."""
    done = await exchange(port, [b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"])
    assert done.status == 200, done.response[:300]
    return done.response.partition(b"\r\n\r\n")[2]


def _body_json(done: Exchange) -> dict[str, object]:
    doc = json.loads(done.response.partition(b"\r\n\r\n")[2])
    assert isinstance(doc, dict)
    return doc


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# -- the request line and the header block --------------------------------------------------------


@pytest.mark.parametrize("listener", ["registry", "peer"])
@pytest.mark.parametrize("where", ["request line", "header block"])
async def test_head_over_the_limit_is_refused_before_it_ends(
    served: Served, listener: str, where: str
) -> None:
    """16 KiB of an unfinished request head is enough to refuse it (431) and close: the server
    never waits for (or buffers) the rest, and serves the next connection."""
    port = served.port(listener)
    if where == "request line":
        head = [b"GET /v2/" + b"a" * (MAX_HEADER_BYTES // 2), b"a" * (MAX_HEADER_BYTES // 2 + 1024)]
    else:
        line = b"X-Filler: " + b"f" * 1000 + b"\r\n"
        head = [b"GET /v2/ HTTP/1.1\r\nHost: x\r\n"] + [line * 4] * (MAX_HEADER_BYTES // len(line * 4) + 2)
    assert sum(map(len, head)) > MAX_HEADER_BYTES
    # Never ends (no CRLF CRLF): only the limit can end this request.
    done = await exchange(port, head, pause=0.05)
    assert done.status == 431, done.response[:200]
    assert done.closed
    await get_ok(served.registry_port)
    if listener == "peer":
        await get_ok(port, b"/p2pimg/v1/info")


async def test_head_over_the_limit_is_refused_even_when_it_arrives_whole(served: Served) -> None:
    head = (
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"f" * (40 << 10) + b"\r\nConnection: close\r\n\r\n"
    )
    assert MAX_HEADER_BYTES < len(head) < 64 << 10
    done = await exchange(served.registry_port, [head])
    assert done.status == 431, done.response[:200]


async def test_a_head_trickled_byte_by_byte_is_cut_at_the_timeout(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The head timeout covers the whole head, not each read: one byte every 0.2 s cannot hold a
    connection past it. The idle timeout (before a request begins) is separate and longer."""
    monkeypatch.setattr(http, "IDLE_TIMEOUT", 30.0)
    monkeypatch.setattr(http, "HEADER_TIMEOUT", 1.0)
    head = b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 40 + b"\r\n\r\n"
    started = trio.current_time()
    done = await exchange(
        served.registry_port, [head[i : i + 1] for i in range(len(head))], pause=0.2, wait=3
    )
    assert done.closed and done.status is None, done.response[:200]
    assert trio.current_time() - started < 0.2 * len(head), "the trickling client held on"
    # A client quiet for longer than the head timeout before it starts a request is still served.
    patient = await trio.open_tcp_stream("127.0.0.1", served.registry_port)
    async with patient:
        await trio.sleep(1.5)
        await patient.send_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = b""
        with trio.fail_after(5):
            while chunk := await patient.receive_some(65536):
                reply += chunk
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]


async def test_refusals_to_head_requests_carry_no_body(served: Served) -> None:
    head = b"HEAD /v2/ HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"f" * (40 << 10) + b"\r\n\r\n"
    done = await exchange(served.registry_port, [head])
    assert done.status == 431 and done.closed
    assert done.response.endswith(b"\r\n\r\n"), "a body followed the headers of a HEAD answer"


async def test_keyed_peer_listener_refuses_on_the_head_before_the_body(
    tmp_path: Path, sample: SampleImage, monkeypatch: pytest.MonkeyPatch, nursery: trio.Nursery
) -> None:
    """With a swarm key, a stranger's request is refused as soon as its head is in: a body it
    declares but trickles (or never sends) holds nothing; and one address cannot take every slot."""
    home = tmp_path / "home"
    await published_home(home, sample)
    monkeypatch.setenv("P2PIMG_SWARM_KEY", "k" * 32)
    async with open_node(_config(home)) as node:
        peers = PeerService.for_node(node)
        serve = serve_connection(peers.handle, gate=peers.gate, per_client=2)
        listeners = await nursery.start(
            trio.serve_listeners, serve, await trio.open_tcp_listeners(0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        head = b"POST /p2pimg/v1/warm HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\n"
        started = trio.current_time()
        done = await exchange(port, [head], wait=5)
        assert done.status == 401 and done.closed, done.response[:200]
        assert trio.current_time() - started < 2, "the refusal waited for a body"
        held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
        third = await exchange(port, [b"GET /p2pimg/v1/info HTTP/1.1\r\nHost: x\r\n\r\n"], wait=3)
        assert third.closed and third.status is None, "a third connection from one address was served"
        for stream in held:
            await stream.aclose()
        node.nursery.cancel_scope.cancel()


async def test_connections_beyond_the_cap_are_closed_at_once(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http, "MAX_CONNECTIONS", 3)

    async def hello(_request: Request) -> Response:
        return Response(200, [("content-length", "2")], b"ok")

    # The server's connection tasks, counted: one holds its slot until it returns.
    serve = serve_connection(hello)
    running = 0
    changed = trio.Event()

    async def counted(stream: trio.SocketStream) -> None:
        nonlocal running, changed
        running += 1
        try:
            await serve(stream)
        finally:
            running -= 1
            changed.set()
            changed = trio.Event()

    async def until_running(n: int) -> None:
        with trio.fail_after(5):
            while running != n:
                await changed.wait()

    listeners = await nursery.start(
        trio.serve_listeners, counted, await trio.open_tcp_listeners(0, host="127.0.0.1")
    )
    port = listeners[0].socket.getsockname()[1]
    held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(3)]
    refused = await exchange(port, [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"], wait=3)
    assert refused.closed and refused.status is None
    await held.pop().aclose()
    await until_running(2)  # the server saw the close and gave the slot back
    answered = await exchange(port, [b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"])
    assert answered.status == 200
    for stream in held:
        await stream.aclose()


# -- request bodies ---------------------------------------------------------------------------------


async def test_write_with_a_huge_content_length_is_refused_without_reading_it(
    served: Served, sample: SampleImage
) -> None:
    """A PUT declaring 1 TiB, of which only 128 KiB (twice the body limit) ever come: the server
    stops reading at the limit and answers (or closes) without waiting for the rest."""
    head = (
        b"PUT /v2/demo/app/manifests/1 HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: "
        + OCI_MANIFEST.encode()
        + b"\r\nContent-Length: "
        + str(1 << 40).encode()
        + b"\r\n\r\n"
    )
    body = [b"{" * (16 << 10)] * (2 * MAX_REQUEST_BODY // (16 << 10))
    done = await exchange(served.registry_port, [head, *body], wait=10)
    assert done.closed, "the server waited for the rest of a 1 TiB body"
    assert done.status in (None, 405, 413), done.response[:200]
    # Read-only: the tag still names the published manifest.
    r = await exchange(
        served.registry_port,
        [b"HEAD /v2/demo/app/manifests/1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"],
    )
    assert r.status == 200 and f"docker-content-digest: {sample.top_digest}".encode() in r.response


async def test_a_declared_oversize_body_is_refused_before_any_of_it_comes(served: Served) -> None:
    head = (
        b"PUT /v2/demo/app/manifests/1 HTTP/1.1\r\nHost: x\r\nContent-Length: "
        + str(1 << 40).encode()
        + b"\r\n\r\n"
    )
    done = await exchange(served.registry_port, [head], wait=3)
    assert done.status == 413 and done.closed, done.response[:200]


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


@pytest.mark.parametrize("listener", ["registry", "peer"])
async def test_chunked_warm_body_over_the_limit_is_refused(served: Served, listener: str) -> None:
    """POST /p2pimg/v1/warm (peer listener; local control on the registry listener) with a chunked
    body that never ends: refused once past the body limit, and no warm job is started."""
    port = served.port(listener)
    head = (
        # (Host written out: the registry listener's control endpoints refuse a name, see serve.py)
        b"POST /p2pimg/v1/warm HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    opening = _chunk(b'{"ref": "demo/app:1", "pad": "')
    filler = _chunk(b"x" * (16 << 10))
    parts = [head, opening] + [filler] * (2 * MAX_REQUEST_BODY // (16 << 10))  # no last chunk
    done = await exchange(port, parts, wait=10)
    assert done.closed, "the server waited for the end of an over-limit chunked body"
    assert done.status in (None, 400, 413), done.response[:300]
    assert served.node.warm.jobs == {}
    # The endpoint itself works: the same request, small and finished, starts a job.
    small = await exchange(port, [head, opening, _chunk(b'"}'), b"0\r\n\r\n"])
    assert small.status == 202, small.response[:300]
    assert list(served.node.warm.jobs) == [_body_json(small)["id"]]


async def test_running_warm_jobs_are_capped(tmp_path: Path, sample: SampleImage) -> None:
    """Each POST /p2pimg/v1/warm allocates a job and a task. While the node's table is full of
    running jobs, another is refused with 429 (not queued without bound); once they end, it is not."""
    home = tmp_path / "home"
    await published_home(home, sample)
    # A peer that accepts connections and never answers keeps each warm of an unknown root
    # asking it for the root block (3 s) after the origin said it has none.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1024)
    with silent:
        peer_url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        async with serving(_config(home, peers=(peer_url,))) as s:
            cap = warm._MAX_JOBS
            for i in range(cap):
                s.node.warm.start(f"ipfs/{Cid.of_dag_cbor(b'missing %d' % i)}")
            assert all(p.state == "running" for p in s.node.warm.jobs.values())
            post = b"POST /p2pimg/v1/warm HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: "
            body = json.dumps({"ref": "demo/app:1"}).encode()
            request = post + str(len(body)).encode() + b"\r\n\r\n" + body
            refused = await exchange(s.peer_port, [request])
            assert refused.status == 429, refused.response[:300]
            assert b"retry-after: 1" in refused.response.lower()
            assert len(s.node.warm.jobs) == cap
            with trio.fail_after(30):
                while any(p.state == "running" for p in s.node.warm.jobs.values()):
                    await trio.sleep(0.1)
            accepted = await exchange(s.peer_port, [request])
            assert accepted.status == 202, accepted.response[:300]
            assert len(s.node.warm.jobs) <= cap


# -- objects from the origin ---------------------------------------------------------------------


@contextlib.contextmanager
def traced_peak() -> Iterator[list[int]]:
    """The peak of Python allocations (every thread) inside the block, in `result[0]`."""
    result = [0]
    tracemalloc.start()
    try:
        yield result
        result[0] = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _sparse(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)


async def test_file_origin_refuses_an_oversize_object_before_reading_it(tmp_path: Path) -> None:
    origin = FileOrigin(tmp_path / "origin")
    cid = Cid.of_dag_cbor(b"a block of 1 GiB")
    _sparse(tmp_path / "origin" / block_key(cid), 1 << 30)
    with traced_peak() as peak, pytest.raises(OriginError, match=f"exceeds {dagcbor.MAX_BLOCK_SIZE} bytes"):
        await origin.get(block_key(cid), max_size=dagcbor.MAX_BLOCK_SIZE)
    # Refused on the file's size: not even max_size bytes were read (that alone would be 8 MiB).
    assert peak[0] < 1 << 20, peak[0]
    # At the limit it is read, and exactly.
    small = block_key(Cid.of_dag_cbor(b"small"))
    await origin.put_bytes(small, b"s" * 1000)
    assert await origin.get(small, max_size=1000) == b"s" * 1000
    with pytest.raises(OriginError, match="exceeds 999 bytes"):
        await origin.get(small, max_size=999)


async def _hostile_image(origin: FileOrigin, case: str) -> tuple[bytes, str]:
    """Put one hostile object in the origin: the request path that makes the node read it, and
    where the cache would keep that object."""
    if case == "oversize root block":
        cid = Cid.of_dag_cbor(b"a root of 1 GiB")
        _sparse(origin.root / block_key(cid), 1 << 30)
        return f"/v2/ipfs/{cid}/manifests/latest".encode(), f"blocks/{cid}"
    if case == "oversize manifest":
        manifest = b'{"schemaVersion": 2, "pad": "' + b" " * MAX_MANIFEST_SIZE + b'"}'
        mcid = Cid.of_raw(manifest)
        await origin.put_bytes(block_key(mcid), manifest)
        # The root claims a size within the limit; the block behind it is not.
        root = ImageRoot(mcid.to_digest(), {mcid.to_digest(): ManifestEntry(OCI_MANIFEST, 100, mcid)})
        data = root.encode()
        rcid = Cid.of_dag_cbor(data)
        await origin.put_bytes(block_key(rcid), data)
        await origin.put_bytes(tag_key("evil/app", "1"), TagRecord("evil/app", "1", rcid, 1).encode())
        return b"/v2/evil/app/manifests/1", f"blocks/{mcid}"
    if case == "root block nested too deep":
        # It matches its CID, so only parsing it shows it is no node: it must not be cached (and
        # so served to peers by CID) all the same.
        deep = b"\x81" * (dagcbor.MAX_DEPTH + 1) + b"\x01"
        cid = Cid.of_dag_cbor(deep)
        await origin.put_bytes(block_key(cid), deep)
        return f"/v2/ipfs/{cid}/manifests/latest".encode(), f"blocks/{cid}"
    if case == "oversize tag record":
        _sparse(origin.root / tag_key("evil/app", "big"), 1 << 20)
        return b"/v2/evil/app/manifests/big", "tags/evil/app/big"
    assert case == "tag record nested too deep"
    # Canonical DAG-CBOR lists nested one level deeper than the limit.
    await origin.put_bytes(tag_key("evil/app", "deep"), b"\x81" * (dagcbor.MAX_DEPTH + 1) + b"\x01")
    return b"/v2/evil/app/manifests/deep", "tags/evil/app/deep"


@pytest.mark.parametrize(
    "case",
    [
        "oversize root block",
        "root block nested too deep",
        "oversize manifest",
        "oversize tag record",
        "tag record nested too deep",
    ],
)
async def test_hostile_origin_objects_are_refused_end_to_end(served: Served, case: str) -> None:
    """What the origin holds is input too: an over-size block, manifest or tag record, or an
    over-deep tag record, is refused (502) through the registry, is not cached, and the node keeps
    serving."""
    path, kept_at = await _hostile_image(served.origin, case)
    with traced_peak() as peak:
        request = b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        done = await exchange(served.registry_port, [request], wait=15)
    assert done.status == 502, done.response[:400]
    message = str(_body_json(done)["errors"][0]["message"])  # type: ignore[index]
    expected = {
        "oversize root block": f"exceeds {dagcbor.MAX_BLOCK_SIZE} bytes",
        "oversize manifest": f"exceeds {MAX_MANIFEST_SIZE} bytes",
        "oversize tag record": "exceeds",
    }.get(case, "nested too deep")
    assert expected in message, message
    if case == "oversize root block":
        assert peak[0] < 4 << 20, peak[0]  # never read: the 1 GiB file, nor 8 MiB of it
    assert not (served.node.store.root / kept_at).exists()
    await get_ok(served.registry_port)


# -- JSON from LAN peers -------------------------------------------------------------------------


async def test_block_from_a_peer_is_read_only_up_to_its_limit(
    tmp_path: Path, sample: SampleImage, nursery: trio.Nursery
) -> None:
    """A block the origin cannot give is asked of LAN peers (resolver.peer_block): a peer that
    answers /p2pimg/v1/blocks/<cid> with 32 MiB is cut at the block limit asked for, and its bytes
    refused."""
    piece = b"\0" * (1 << 20)

    async def flood(request: Request) -> Response:
        if not request.path.startswith("/p2pimg/v1/blocks/"):
            return Response(404, [("content-length", "0")])

        async def body() -> AsyncIterator[BodyPart]:
            for _ in range(32):
                yield piece

        return Response(200, [("content-type", "application/vnd.ipld.raw")], body())

    listeners = await nursery.start(serve_http, flood, "127.0.0.1", 0)
    peer_url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    home = tmp_path / "home"
    await published_home(home, sample)
    async with serving(_config(home, peers=(peer_url,))) as s:
        with traced_peak() as peak:
            got = await s.node.swarm.block(Cid.of_dag_cbor(b"wanted"), 1 << 20)
    assert got is None
    assert peak[0] < 8 << 20, f"{peak[0] >> 20} MiB read for a block of at most 1 MiB"


async def test_a_block_is_asked_of_peers_at_once(
    tmp_path: Path, sample: SampleImage, nursery: trio.Nursery
) -> None:
    """Peers that never answer do not hold up a block another peer has: they are asked at the
    same time (one after another, three silent peers cost 3 s each before the good one)."""
    wanted = b"a block only one peer has"
    cid = Cid.of_dag_cbor(wanted)

    async def silent(request: Request) -> Response:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def good(request: Request) -> Response:
        if request.path != f"/p2pimg/v1/blocks/{cid}":
            return Response(404, [("content-length", "0")])
        return Response(
            200, [("content-type", "application/vnd.ipld.raw"), ("content-length", str(len(wanted)))], wanted
        )

    urls = []
    for handler in (silent, silent, silent, good):
        listeners = await nursery.start(serve_http, handler, "127.0.0.1", 0)
        urls.append(f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}")
    home = tmp_path / "home"
    await published_home(home, sample)
    async with serving(_config(home, peers=tuple(urls))) as s:
        assert list(s.node.swarm.peers) == urls  # the silent ones come first
        began = trio.current_time()
        got = await s.node.swarm.block(cid, 1 << 20)
        took = trio.current_time() - began
    assert got == wanted
    assert took < 2.5, f"{took:.1f} s: the silent peers were waited for one by one"


async def test_have_answer_from_a_peer_is_bounded(nursery: trio.Nursery) -> None:
    piece = b" " * (1 << 20)

    async def endless(_: Request) -> Response:
        async def body() -> AsyncIterator[BodyPart]:
            yield b'{"node": "n", "pad": "'
            for _ in range(32):
                yield piece
            yield b'"}'

        return Response(200, [("content-type", "application/json")], body())

    listeners = await nursery.start(serve_http, endless, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    bmap = BlobMap("sha256:" + "ab" * 32, 4 << 10, 4 << 10, (Cid.of_raw(b"c"),))
    async with httpx.AsyncClient() as client:
        source = PeerSource(url, client)
        with traced_peak() as peak:
            await source.prime(bmap)
    assert peak[0] < 8 << 20, f"{peak[0] >> 20} MiB buffered for a one-chunk have-map"


TWO_CHUNKS = BlobMap("sha256:" + "ab" * 32, 8 << 10, 4 << 10, (Cid.of_raw(b"c"), Cid.of_raw(b"d")))


async def inventory_peer(nursery: trio.Nursery, answer: object, late: trio.Event | None = None) -> str:
    """A peer answering every /have with `answer` (after 3 s once `late` is set); its URL."""
    body = json.dumps(answer).encode()

    async def inventory(_: Request) -> Response:
        if late is not None and late.is_set():
            await trio.sleep(3)
        return Response(200, [("content-type", "application/json"), ("content-length", str(len(body)))], body)

    listeners = await nursery.start(serve_http, inventory, "127.0.0.1", 0)
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"


@pytest.mark.parametrize(
    "answer",
    [
        {"complete": False, "chunks": None},
        {"complete": False, "chunks": ""},
        {"complete": "yes"},
        {"chunks": "AQ"},
        {"chunks": "not base64!"},
        [1],
    ],
)
async def test_have_answers_that_say_nothing_claim_nothing(nursery: trio.Nursery, answer: object) -> None:
    """An inventory without a usable chunk list (empty, null, malformed, the wrong length, a
    "complete" that is not true) must not read as "has everything"."""
    bmap = TWO_CHUNKS
    async with httpx.AsyncClient() as client:
        source = PeerSource(await inventory_peer(nursery, answer), client)
        await source.prime(bmap)
    assert source.inventory(bmap) is None


async def test_one_late_inventory_is_a_miss_not_a_loss(nursery: trio.Nursery) -> None:
    """A busy peer answering one poll late (past the 2 s bound) keeps what it said it has: it
    takes three misses in a row before its inventory is forgotten."""
    bmap, late = TWO_CHUNKS, trio.Event()
    async with httpx.AsyncClient() as client:
        source = PeerSource(await inventory_peer(nursery, {"complete": True, "node": "n"}, late), client)
        await source.prime(bmap)
        assert source.inventory(bmap) == b""
        late.set()
        for misses in (1, 2):
            await source.prime(bmap)
            assert source.inventory(bmap) == b"", f"forgotten after {misses} late answer(s)"
        await source.prime(bmap)
        assert source.inventory(bmap) is None, "a peer that stopped answering is still counted on"


# -- paths built from input ----------------------------------------------------------------------


def _attacks(marker: str, outside: Path, cid: Cid) -> dict[str, list[bytes]]:
    """Raw requests per listener that try to make the node touch a path of the attacker's choice."""
    hexd = "ab" * 32
    abs_target = f"{outside}/{marker}".lstrip("/")
    registry = [
        f"/v2/../../{marker}/manifests/1",
        f"/v2/demo/%2e%2e/%2e%2e/{marker}/manifests/1",
        f"/v2/demo/app/manifests/..%2f..%2f{marker}",
        "/v2/demo/app/manifests/%2e%2e",
        f"/v2//{abs_target}/manifests/1",
        f"/v2/%2F{abs_target.replace('/', '%2F')}/manifests/1",
        f"/v2/demo/app/manifests/1%00{marker}",
        f"/v2/demo/app/manifests/..%5c..%5c{marker}",
        f"/v2/demo%5c..%5c..%5c{marker}/tags/list",
        f"/v2/demo/app/blobs/sha256:..%2f..%2f{marker}",
        f"/v2/demo/app/blobs/sha256:{hexd}%00",
        f"/v2/demo/app/blobs/sha256:{hexd[:-2]}%2f..",
        f"/v2/ipfs/..%2f..%2f{marker}/manifests/latest",
        f"/v2/ipfs/{cid}%2f..%2f..%2f{marker}/manifests/1",
        f"/v2/ipfs/{cid}/..%2f..%2f{marker}/blobs/sha256:{hexd}",
        f"/v2/demo/app/tags/list/..%2f{marker}",
    ]
    peer = [
        f"/ipfs/..%2f..%2f{marker}",
        f"/ipfs/{cid}%2f..%2f{marker}",
        f"/ipfs//{abs_target}",
        f"/ipfs/{marker}%00",
        f"/p2pimg/v1/have/sha256:..%2f{marker}",
        f"/p2pimg/v1/have/..%5c{marker}",
        f"/p2pimg/v1/blobs/..%2f..%2f{marker}",
        f"/p2pimg/v1/blobs/%2F{abs_target.replace('/', '%2F')}",
        f"/p2pimg/v1/blobs/sha256:{hexd}%00",
        f"/p2pimg/v1/warm/..%2f..%2f{marker}",
        f"/p2pimg/v1/tags/..%2f..%2f{marker}/1",
        f"/p2pimg/v1/tags/demo/app/..%2f{marker}",
        f"/../../{marker}",
        f"/{abs_target}",
    ]
    requests: dict[str, list[bytes]] = {"registry": [], "peer": []}
    for listener, paths in (("registry", registry), ("peer", peer)):
        for path in paths:
            for method in ("GET", "HEAD", "PUT", "DELETE"):
                requests[listener].append(
                    f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                    f"Content-Length: 0\r\n\r\n".encode()
                )
    for ref in (
        f"../../{marker}:1",
        f"/{abs_target}:1",
        f"demo/../../{marker}:1",
        f"demo\\..\\{marker}:1",
        f"demo/app:..%2f{marker}",
        f"demo/app:1\x00{marker}",
        f"ipfs/../../{marker}",
        f"ipfs/{cid}/../../{marker}",
        f"demo/app:{'a' * 5000}",
    ):
        body = json.dumps({"ref": ref}).encode()
        request = (
            b"POST /p2pimg/v1/warm HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        requests["peer"].append(request)
        requests["registry"].append(request)  # local control
    return requests


async def test_paths_from_input_never_leave_the_home(served: Served, tmp_path: Path) -> None:
    """`..`, `%2e%2e`, `%2f`, absolute paths, NUL and backslashes in names, tags, digests, CIDs,
    job ids and warm references, on both listeners: every one is refused (4xx), and no file
    appears anywhere, in the home or around it."""
    marker = f"p2pimg-escape-{uuid.uuid4().hex}"
    outside = tmp_path / "outside"
    outside.mkdir()
    around = tmp_path  # holds the home and `outside`
    before = _files(around)
    cid = Cid.of_dag_cbor(b"x")
    statuses: list[tuple[int | None, bytes]] = []
    for listener, requests in _attacks(marker, outside, cid).items():
        for request in requests:
            done = await exchange(served.port(listener), [request])
            statuses.append((done.status, request[:120]))
    bad = [(s, r) for s, r in statuses if s is None or not 400 <= s < 500]
    assert bad == []
    assert served.node.warm.jobs == {}
    after = _files(around)
    assert after == before, sorted(after ^ before)
    for place in {tmp_path.parent, Path("/tmp"), Path.cwd(), Path("/")}:
        assert not any(marker in p.name for p in place.iterdir()), place
    await get_ok(served.registry_port, b"/v2/demo/app/manifests/1")


async def test_file_origin_keys_cannot_leave_its_directory(tmp_path: Path) -> None:
    origin = FileOrigin(tmp_path / "origin")
    (tmp_path / "origin").mkdir()
    before = _files(tmp_path)
    for key in (
        "../escaped",
        "p2pimg/../../escaped",
        "p2pimg/tags/a/../../../../escaped",
        "/tmp/escaped",
        "p2pimg\\..\\..\\escaped",
        "p2pimg/tags/a/1\x00",
        "p2pimg//escaped",
        "",
        ".",
        "..",
        "p2pimg/./x",
        f"{tmp_path}/escaped",
    ):
        with pytest.raises(InvalidInput):
            await origin.put_bytes(key, b"x")
        with pytest.raises(InvalidInput):
            await origin.get(key, max_size=10)
    assert _files(tmp_path) == before


def test_cache_small_writes_cannot_leave_the_cache(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "cache")
    for dest in (store.root / "upstream" / ".." / ".." / "escaped", tmp_path / "escaped", store.root):
        with pytest.raises(CacheError, match="outside the cache"):
            store.write_small(dest, b"x")
    assert not (tmp_path / "escaped").exists()
    store.write_small(store.root / "upstream" / "ok", b"x")  # inside is fine
    assert (store.root / "upstream" / "ok").read_bytes() == b"x"


# -- where it listens ----------------------------------------------------------------------------


def _cli_config(args: list[str], home: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    for var in ("P2PIMG_ORIGIN", "P2PIMG_CHUNK_SIZE", "P2PIMG_SWARM_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("P2PIMG_HOME", str(home))
    return commands._config(cli.build_parser().parse_args(args))


def test_serve_defaults_to_loopback_and_no_peer_listener(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _cli_config(["serve"], tmp_path, monkeypatch)
    host, port = parse_listen(config.listen)
    assert ipaddress.ip_address(host).is_loopback and port == 5050
    assert config.peer_listen is None


async def test_serve_with_defaults_opens_only_the_loopback_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nursery: trio.Nursery
) -> None:
    from p2pimg.web.serve import serve

    config = _cli_config(["serve"], tmp_path, monkeypatch)
    config = replace(config, listen="127.0.0.1:0", mdns=False)  # the port only: 5050 may be taken
    address = await nursery.start(serve, config)
    assert ipaddress.ip_address(parse_listen(address)[0]).is_loopback
    info = json.loads((tmp_path / "serve.json").read_text())
    assert info["registry"] == address and info["peer"] is None  # no peer listener was opened
    await get_ok(parse_listen(address)[1])
