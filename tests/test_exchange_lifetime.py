"""What a request takes, it gives back, however it ends; a body that stops moving is cut.

In process, over real sockets on 127.0.0.1: the HTTP server with handlers that take resources
through `Request.hold`, and a real node whose background tasks get injected bugs.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest
import trio
from _support import published_home, wait_cached
from test_surface_limits import _config, get_ok, serving

from p2pimg.ops.sample import SampleImage
from p2pimg.web import server as http
from p2pimg.web.server import AbortResponse, BodyPart, FileRegion, Request, Response, serve_http

BODY = 8 << 20


@pytest.fixture
def blob_file(tmp_path: Path) -> Path:
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(BODY))
    return path


class Ledger:
    """Counts what handlers took and what came back."""

    def __init__(self) -> None:
        self.taken = 0
        self.released = 0
        self.finished = trio.Event()

    def take(self, request: Request) -> None:
        self.taken += 1

        def give_back() -> None:
            self.released += 1
            if self.released == self.taken:
                self.finished.set()

        request.hold(give_back)

    async def settled(self, timeout: float = 10) -> None:
        """Wait until something was taken and all of it given back."""
        with trio.fail_after(timeout):
            while not self.taken or self.released < self.taken:
                await trio.sleep(0.01)


async def start(nursery: trio.Nursery, handler: Callable[[Request], Awaitable[Response]]) -> int:
    listeners = await nursery.start(serve_http, handler, "127.0.0.1", 0)
    return int(listeners[0].socket.getsockname()[1])


def file_response(request: Request, path: Path) -> Response:
    fd = request.open_file(path)
    return Response(200, [("content-length", str(BODY))], _region(fd))


async def _region(fd: int) -> AsyncIterator[BodyPart]:
    yield FileRegion(fd, 0, BODY)


async def reset_after(port: int, data: bytes, *, read: int = 0, wait: trio.Event | None = None) -> None:
    """Send `data`, then read `read` bytes or wait for `wait`, then reset the connection."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    await sock.send(data)
    if read:
        await sock.recv(read)
    if wait is not None:
        await wait.wait()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


GET = b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(
    "ending",
    [
        "before the head",
        "mid-body",
        "after the body",
        "HEAD",
        "handler error",
        "handler fails after taking",
        "body aborts",
        "server shuts down",
    ],
)
async def test_every_ending_releases_what_the_exchange_took(
    nursery: trio.Nursery, blob_file: Path, ending: str
) -> None:
    ledger = Ledger()
    handler_started, handler_done = trio.Event(), trio.Event()

    async def handler(request: Request) -> Response:
        ledger.take(request)
        handler_started.set()
        if ending == "before the head":
            await trio.sleep(0.3)  # the client resets meanwhile: the head cannot be sent
        if ending == "handler error":
            handler_done.set()
            raise RuntimeError("a bug in a handler")
        response = file_response(request, blob_file)
        if ending == "handler fails after taking":
            raise AbortResponse("failed after opening the file")
        if ending == "body aborts":

            async def broken() -> AsyncIterator[BodyPart]:
                yield b"x" * 1000
                raise AbortResponse("the source failed")

            response = Response(200, [("content-length", str(BODY))], broken())
        handler_done.set()
        return response

    server = trio.CancelScope()

    async def run_server(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        with server:
            async with trio.open_nursery() as inner:
                task_status.started(await start(inner, handler))

    port = await nursery.start(run_server)
    base = open_fds()
    if ending == "before the head":
        await reset_after(port, GET, wait=handler_started)
    elif ending == "mid-body":
        await reset_after(port, GET, read=4096)
    elif ending == "server shuts down":
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", port))
        await sock.send(GET)
        await sock.recv(4096)  # the body is under way, and the client stops reading
        await handler_done.wait()
        server.cancel()
        await ledger.settled()
        sock.close()
    else:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            method = "HEAD" if ending == "HEAD" else "GET"
            try:
                r = await client.request(method, "/x")
                if ending in ("after the body", "HEAD"):
                    assert r.status_code == 200 and len(r.content) == (0 if method == "HEAD" else BODY)
            except httpx.HTTPError:
                assert ending in ("handler error", "handler fails after taking", "body aborts"), ending
    await ledger.settled()
    assert ledger.taken == ledger.released == 1
    with trio.fail_after(5):
        while open_fds() > base:  # the file's descriptor is closed, and the connection
            await trio.sleep(0.01)


async def test_a_body_that_stops_moving_is_cut_and_a_fast_reader_beside_it_is_served(
    nursery: trio.Nursery, blob_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a 0.5 s window and 1 MiB/s minimum: a client that reads 1 KiB every 0.1 s is cut
    within a few windows (whatever the kernel buffered for it at first), another that stops
    reading altogether too, and one that reads at full speed gets every byte meanwhile."""
    monkeypatch.setattr(http, "SEND_WINDOW", 0.5)
    monkeypatch.setattr(http, "MIN_SEND_RATE", 1 << 20)
    monkeypatch.setattr(http, "_WINDOW_BYTES", 1 << 19)
    began = trio.current_time()
    ended: dict[str, float] = {}

    async def handler(request: Request) -> Response:
        request.hold(lambda: ended.setdefault(request.path, trio.current_time() - began))
        return file_response(request, blob_file)

    port = await start(nursery, handler)

    async def slow(path: str, every: float) -> None:
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", port))
        await sock.send(GET.replace(b"/x", path.encode()))
        got = 0
        with trio.fail_after(30):
            while path not in ended:
                got += len(await sock.recv(1024))
                await trio.sleep(every)
        assert got < BODY
        sock.close()

    async with trio.open_nursery() as clients:
        clients.start_soon(slow, "/trickle", 0.1)  # 10 KiB/s
        clients.start_soon(slow, "/stalled", 3.0)  # one read, then (as far as the window goes) none
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            r = await client.get("/fast")
            assert r.status_code == 200 and r.content == blob_file.read_bytes()
    # SEND_WINDOW is 0.5 s: the first windows may be spent on what the socket buffers took.
    assert ended["/trickle"] < 5 and ended["/stalled"] < 5, ended


async def test_a_reader_at_the_minimum_rate_is_not_cut(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow but steady client (about four times the minimum rate) gets the whole body."""
    monkeypatch.setattr(http, "SEND_WINDOW", 0.5)
    monkeypatch.setattr(http, "MIN_SEND_RATE", 128 << 10)
    monkeypatch.setattr(http, "_WINDOW_BYTES", 64 << 10)
    path = tmp_path / "small"
    data = os.urandom(1 << 20)
    path.write_bytes(data)

    async def handler(request: Request) -> Response:
        fd = request.open_file(path)

        async def body() -> AsyncIterator[BodyPart]:
            yield FileRegion(fd, 0, len(data))

        return Response(200, [("content-length", str(len(data)))], body())

    port = await start(nursery, handler)
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 10)
    await sock.connect(("127.0.0.1", port))
    await sock.send(GET)
    received = b""
    with trio.fail_after(30):
        while len(received.partition(b"\r\n\r\n")[2]) < len(data):
            piece = await sock.recv(32 << 10)
            assert piece, f"cut after {len(received)} bytes"
            received += piece
            await trio.sleep(0.06)  # at most ~530 KiB/s
    sock.close()
    assert received.partition(b"\r\n\r\n")[2] == data


async def test_a_bug_in_a_warm_job_fails_that_job_only(
    tmp_path: Path, sample: SampleImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    await published_home(home, sample)
    async with serving(_config(home)) as s:
        real = s.node.resolver.root

        async def broken_root(cid: object) -> object:
            raise RuntimeError("injected bug")

        monkeypatch.setattr(s.node.resolver, "root", broken_root)
        job = s.node.warm.jobs[s.node.warm.start("demo/app:1")]
        with trio.fail_after(10):
            while job.state == "running":
                await trio.sleep(0.01)
        assert job.state == "failed" and "injected bug" in (job.error or ""), job.to_json()
        await get_ok(s.registry_port)  # the node serves on
        monkeypatch.setattr(s.node.resolver, "root", real)
        again = s.node.warm.jobs[s.node.warm.start("demo/app:1")]
        with trio.fail_after(30):
            while again.state == "running":
                await trio.sleep(0.01)
        assert again.state == "done", again.to_json()


async def test_a_bug_in_a_background_task_ends_that_task_only(
    tmp_path: Path, sample: SampleImage, caplog: pytest.LogCaptureFixture
) -> None:
    from p2pimg.tasks import guarded

    home = tmp_path / "home"
    await published_home(home, sample)
    async with serving(_config(home)) as s:

        async def buggy() -> None:
            await trio.sleep(0)
            raise KeyError("injected bug")

        s.node.nursery.start_soon(guarded, "a test task", buggy)
        with trio.fail_after(5):
            while "a test task failed" not in caplog.text:
                await trio.sleep(0.01)
        assert "KeyError" in caplog.text
        await get_ok(s.registry_port)


async def test_a_body_waiting_on_its_source_is_not_cut(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only time spent waiting for the client counts toward the send rule: a body whose source
    pauses for two windows between parts (a slow origin mid-fetch) reaches a fast client whole."""
    monkeypatch.setattr(http, "SEND_WINDOW", 0.5)
    monkeypatch.setattr(http, "MIN_SEND_RATE", 1 << 20)
    monkeypatch.setattr(http, "_WINDOW_BYTES", 1 << 19)
    part = os.urandom(64 << 10)

    async def handler(request: Request) -> Response:
        async def body() -> AsyncIterator[BodyPart]:
            for _ in range(3):
                yield part
                await trio.sleep(1.0)

        return Response(200, [("content-length", str(3 * len(part)))], body())

    port = await start(nursery, handler)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        r = await client.get("/x")
    assert r.status_code == 200 and r.content == part * 3


async def test_a_peer_busy_uploading_still_says_what_it_holds(tmp_path: Path, sample: SampleImage) -> None:
    """With one upload slot taken by a transfer, another span gets 429, but the inventory and
    /info still answer (they take no slot); once the transfer ends, its slot serves again."""
    home = tmp_path / "home"
    await published_home(home, sample)
    async with (
        serving(_config(home, peer_max_requests=1, peer_rate=64 << 10)) as s,
        httpx.AsyncClient(timeout=10) as client,
    ):
        registry, peer = f"http://127.0.0.1:{s.registry_port}", f"http://127.0.0.1:{s.peer_port}"
        root = await s.node.resolver.root(await s.node.resolver.resolve_tag("demo/app", "1"))
        digest = max(root.blobs, key=lambda d: root.blobs[d].size)
        r = await client.get(f"{registry}/v2/demo/app/blobs/{digest}")
        assert r.status_code == 200
        await wait_cached(s.node.store, digest)  # the last byte goes out before the final check
        span = f"GET /p2pimg/v1/blobs/{digest} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-999999\r\n\r\n"
        holder = trio.socket.socket()
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await holder.connect(("127.0.0.1", s.peer_port))
        await holder.send(span.encode())
        await holder.recv(1024)  # under way, paced at 64 KiB/s: the one slot is taken
        busy = await client.get(f"{peer}/p2pimg/v1/blobs/{digest}", headers={"Range": "bytes=0-99"})
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        have = await client.get(f"{peer}/p2pimg/v1/have/{digest}")
        assert have.status_code == 200 and have.json()["complete"] is True
        assert (await client.get(f"{peer}/p2pimg/v1/info")).status_code == 200
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        holder.close()
        with trio.fail_after(10):
            while s.peers.active:
                await trio.sleep(0.01)
        again = await client.get(f"{peer}/p2pimg/v1/blobs/{digest}", headers={"Range": "bytes=0-99"})
        assert again.status_code == 206 and len(again.content) == 100
