"""A small HTTP/1.1 server: h11 for the protocol, trio for I/O, sendfile for blob bodies.

Blob bytes never enter Python on the way out: a `FileRegion` body part travels through h11 as a
placeholder (`send_with_data_passthrough`), and its bytes go from the page cache to the socket
with `os.sendfile`. A worker thread copies while the socket takes bytes (a page-cache miss then
blocks that thread, not the event loop) and returns once the socket stays full for a few
milliseconds; the longer wait for writability is trio's, so a client that reads slowly holds a
descriptor and never a thread. Over TLS (the optional peer mTLS) the bytes must pass through
the TLS layer, so a region is read and sent in 256 KiB pieces.

Every exchange owns what its handler takes for it (`Request.hold`): descriptors, a reader of an
in-flight fetch, a request slot. The connection releases them when the exchange ends, however it
ends: response sent, client gone before the head or mid-body, a timeout, cancellation, an error.
Body iterators only produce parts; they own nothing, because one that never started (the head
could not be sent) never runs its `finally`.

A response body must keep moving: within every `SEND_WINDOW` seconds spent waiting for it, the
client must take at least `MIN_SEND_RATE` × `SEND_WINDOW` bytes (or the rest of the body), else
the connection is cut. Time the body waits on its own source does not count. A fast client never
meets the rule; a stalled one is cut within two windows whatever it took before, and one that
reads a byte now and then cannot hold its connection for long.
"""

from __future__ import annotations

import contextlib
import errno
import http
import logging
import math
import os
import select
import socket
import ssl
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from urllib.parse import parse_qs, unquote, urlsplit

import h11
import trio

from p2pimg.errors import ListenError

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 << 10
MAX_REQUEST_BODY = 64 << 10
IDLE_TIMEOUT = 60.0
HEADER_TIMEOUT = 20.0
# A response must move at least MIN_SEND_RATE × SEND_WINDOW bytes (or what is left of it) in
# every window: 1 MiB per 32 s. A 256 kbit/s link passes; a client at 1 KiB/s does not.
SEND_WINDOW = 32.0
MIN_SEND_RATE = 32 << 10
_WINDOW_BYTES = int(MIN_SEND_RATE * SEND_WINDOW)
_RECV = 64 << 10
# Threads copying file pages to sockets at once (each only while its socket takes bytes, or
# for _LINGER_MS after it filled up).
_SENDERS = trio.CapacityLimiter(64)
_LINGER_MS = 5
# Open connections per listener: one more is closed as soon as it is accepted.
MAX_CONNECTIONS = 1024
# A larger send buffer means fewer sendfile/epoll round trips per blob (the kernel's autotuned
# default keeps it small until a connection has proven itself).
_SEND_BUFFER = 4 << 20
_TLS_PIECE = 256 << 10

UNIX = "unix"  # the client address of a unix socket's connections


@dataclass(frozen=True)
class FileRegion:
    """`length` bytes of an open file from `offset`, sent with sendfile."""

    fd: int
    offset: int
    length: int

    def __len__(self) -> int:
        return self.length


BodyPart = bytes | FileRegion


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    client: str = ""  # the peer's IP address
    local: str = ""  # the address it connected to
    body: bytes = b""
    admitted: bool = False  # a gate checked its head and let it in (see Gate)
    _releases: list[Callable[[], object]] = field(default_factory=list, repr=False)

    @property
    def from_this_machine(self) -> bool:
        """Loopback, a connection from our own address to itself, or a unix socket's."""
        return (
            self.client == UNIX
            or self.client.startswith("127.")
            or self.client in ("::1", "::ffff:127.0.0.1")
            or (bool(self.client) and self.client == self.local)
        )

    def hold(self, release: Callable[[], object]) -> None:
        """Make this exchange own a resource: `release` runs once when it ends, however it ends
        (see the module docstring). Call it right where the resource is taken, with no await
        between the two."""
        self._releases.append(release)

    def open_file(self, path: str | os.PathLike[str]) -> int:
        """A read-only descriptor of `path`, owned by this exchange."""
        fd = os.open(path, os.O_RDONLY)
        self.hold(partial(os.close, fd))
        return fd

    def dup(self, fd: int) -> int:
        """A copy of descriptor `fd`, owned by this exchange."""
        copy = os.dup(fd)
        self.hold(partial(os.close, copy))
        return copy

    def release(self) -> None:
        """Release what the exchange holds, last taken first; a failing release is logged and
        does not stop the others."""
        while self._releases:
            release = self._releases.pop()
            try:
                release()
            except Exception:
                log.exception("releasing a resource of %s %s failed", self.method, self.path[:100])


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | AsyncIterator[BodyPart] = b""


class AbortResponse(Exception):
    """Raised by a body iterator to cut the connection: the client must not take a short body."""


Handler = Callable[[Request], Awaitable[Response]]
# Looks at a request's head before its body is read: a response refuses it, None lets it in.
Gate = Callable[[Request], "Response | None"]


class _Pace:
    """The send rule of one response body (see the module docstring). Only time spent waiting
    for the client counts: a body that waits on its source (a slow origin, a fetch in progress)
    is not the client's fault. Each MIN_SEND_RATE × SEND_WINDOW bytes sent (or the body's end)
    starts a new window."""

    def __init__(self, remaining: int) -> None:
        self.waited = 0.0  # seconds spent waiting for the client in this window
        self.quota = min(_WINDOW_BYTES, remaining)
        self.remaining = remaining

    def sent(self, n: int) -> None:
        self.remaining -= n
        self.quota -= n
        if self.quota <= 0:
            self.waited = 0.0
            self.quota = min(_WINDOW_BYTES, max(self.remaining, 1))

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Wait for the client within what is left of the window; TooSlowError past it."""
        began = trio.current_time()
        try:
            with trio.fail_after(max(0.0, SEND_WINDOW - self.waited)):
                yield
        finally:
            self.waited += trio.current_time() - began


def _sendfile_some(sockfd: int, fd: int, offset: int, count: int) -> int:
    """Copy file bytes to a non-blocking socket until `count` are sent or it stays full for
    `_LINGER_MS`: the bytes sent (0 when it took none). Runs in a worker thread. A client that
    reads fast frees room within the linger, so its body goes out in one thread hop; one that
    does not costs the thread at most the linger, and trio waits for it instead."""
    poller = select.poll()
    poller.register(sockfd, select.POLLOUT)
    done = 0
    while done < count:
        try:
            sent = os.sendfile(sockfd, fd, offset + done, count - done)
        except BlockingIOError:
            if not poller.poll(_LINGER_MS):
                break
            continue
        if sent == 0:
            raise AbortResponse("file shorter than the response promised")
        done += sent
    return done


async def _sendfile(stream: trio.SocketStream, region: FileRegion, pace: _Pace) -> None:
    sock = stream.socket
    offset, end = region.offset, region.offset + region.length
    while offset < end:
        sent = await trio.to_thread.run_sync(
            _sendfile_some, sock.fileno(), region.fd, offset, end - offset, limiter=_SENDERS
        )
        offset += sent
        pace.sent(sent)
        if offset < end:
            with pace.waiting():
                await trio.lowlevel.wait_writable(sock)


async def _send_region_tls(stream: trio.abc.Stream, region: FileRegion, pace: _Pace) -> None:
    """A file region through TLS: read and encrypted in pieces (one piece in memory at a time)."""
    offset, end = region.offset, region.offset + region.length
    while offset < end:
        piece = await trio.to_thread.run_sync(os.pread, region.fd, min(_TLS_PIECE, end - offset), offset)
        if not piece:
            raise AbortResponse("file shorter than the response promised")
        await _send_paced(stream, piece, pace)
        offset += len(piece)


async def _send_paced(stream: trio.abc.Stream, data: bytes, pace: _Pace) -> None:
    with pace.waiting():
        await stream.send_all(data)
    pace.sent(len(data))


class _Connection:
    def __init__(
        self,
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream],
        handler: Handler,
        gate: Gate | None = None,
    ) -> None:
        self.stream = stream
        self.handler = handler
        self.gate = gate
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        sock = stream.transport_stream.socket if isinstance(stream, trio.SSLStream) else stream.socket
        self.client, self.local = _addresses(sock)

    async def _send(self, event: h11.Event, pace: _Pace | None = None) -> None:
        data = self.conn.send(event)
        if data:
            await _send_paced(self.stream, data, pace or _Pace(len(data)))

    async def _receive(self) -> None:
        data = await self.stream.receive_some(_RECV)
        self.conn.receive_data(data if isinstance(data, bytes) else bytes(data))

    async def _next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        """The next event: callers bound the time it may take (a deadline for a whole head or
        body, not per read, so a client trickling a byte at a time cannot hold a connection)."""
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            await self._receive()

    async def _next_request(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        """Wait up to IDLE_TIMEOUT for a request to begin, then HEADER_TIMEOUT for all its head."""
        buffered, closed = self.conn.trailing_data
        if not buffered and not closed:
            with trio.fail_after(IDLE_TIMEOUT):
                await self._receive()
        with trio.fail_after(HEADER_TIMEOUT):
            return await self._next_event()

    async def _read_body(self) -> tuple[int, bytes]:
        """The request body, all of it within HEADER_TIMEOUT: (200, body), (413, b"") when it is
        over MAX_REQUEST_BODY, (400, b"") when the client ended it early."""
        body = bytearray()
        with trio.fail_after(HEADER_TIMEOUT):
            while True:
                event = await self._next_event()
                if isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > MAX_REQUEST_BODY:
                        return 413, b""
                elif isinstance(event, h11.EndOfMessage):
                    return 200, bytes(body)
                else:
                    return 400, b""

    async def _respond(self, response: Response, *, head: bool = False) -> None:
        """Send a response; for a HEAD request, its headers only (whatever body it carries)."""
        body = b"" if head else response.body
        headers = [(k.encode(), v.encode()) for k, v in response.headers]
        headers.append((b"server", b"p2pimg"))
        try:
            reason = http.HTTPStatus(response.status).phrase.encode()
        except ValueError:
            reason = b""
        await self._send(h11.Response(status_code=response.status, headers=headers, reason=reason))
        pace = _Pace(_declared_length(response.headers))
        if isinstance(body, bytes):
            if body:
                await self._send(h11.Data(data=body), pace)
        else:
            async for part in body:
                if isinstance(part, FileRegion):
                    if not part.length:
                        continue
                    # h11 passes the region through untouched, framing it by its length.
                    pieces = self.conn.send_with_data_passthrough(h11.Data(data=part))  # type: ignore[arg-type]
                    for piece in pieces or ():
                        if isinstance(piece, FileRegion):
                            if isinstance(self.stream, trio.SSLStream):
                                await _send_region_tls(self.stream, piece, pace)
                            else:
                                await _sendfile(self.stream, piece, pace)
                        else:
                            await _send_paced(self.stream, piece, pace)
                elif part:
                    await self._send(h11.Data(data=part), pace)
        await self._send(h11.EndOfMessage(), pace)

    async def _exchange(self, request: Request, head: bool) -> None:
        """Handle one request and send its response; whatever happens, close the body iterator
        and release everything the exchange holds."""
        response: Response | None = None
        try:
            response = await self.handler(request)
            await self._respond(response, head=head)
        finally:
            try:
                if response is not None and not isinstance(response.body, bytes):
                    with trio.move_on_after(1) as scope:
                        scope.shield = True
                        await response.body.aclose()  # type: ignore[attr-defined]
            finally:
                request.release()

    async def run(self) -> None:
        try:
            while True:
                try:
                    event = await self._next_request()
                except h11.RemoteProtocolError as exc:
                    await self._protocol_error(exc)
                    return
                if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    return
                if not isinstance(event, h11.Request):
                    return
                head = event.method == b"HEAD"
                refusal = _refuse_head(event)
                request = _to_request(event) if refusal is None else None
                if request is None:
                    await self._respond(refusal or _plain(400, b"bad request target\n"), head=head)
                    return
                request.client, request.local = self.client, self.local
                refusal = self.gate(request) if self.gate is not None else None
                if refusal is not None:  # refused on its head: its body is never read
                    refusal.headers.append(("connection", "close"))
                    await self._respond(refusal, head=head)
                    return
                status, request.body = await self._read_body()
                if status != 200:
                    await self._respond(
                        _plain(
                            status,
                            b"request body too large\n" if status == 413 else b"incomplete request body\n",
                        ),
                        head=head,
                    )
                    return
                await self._exchange(request, head)
                if self.conn.our_state is h11.MUST_CLOSE:
                    return
                self.conn.start_next_cycle()
        except (
            trio.TooSlowError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            ConnectionError,
            AbortResponse,
            h11.LocalProtocolError,
        ) as exc:
            log.debug("connection ended: %r", exc)
        except Exception:
            # One connection's failure must never take the server (and every other client) down.
            log.exception("connection failed")
        finally:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await self.stream.aclose()

    async def _protocol_error(self, exc: h11.RemoteProtocolError) -> None:
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            status = exc.error_status_hint
            with trio.move_on_after(5):
                await self._respond(_plain(status, f"{exc}\n".encode()))


def _refuse_head(event: h11.Request) -> Response | None:
    """431 for a head over MAX_HEADER_BYTES (h11's own bound only covers heads still arriving:
    one that came whole in a single read can be larger), 413 for a declared body over
    MAX_REQUEST_BODY (refused before any of it is read)."""
    size = len(event.method) + len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
    if size > MAX_HEADER_BYTES:
        return _plain(431, b"request header fields too large\n")
    for name, value in event.headers:
        if name == b"content-length" and int(value) > MAX_REQUEST_BODY:
            return _plain(413, b"request body too large\n")
    return None


def _declared_length(headers: list[tuple[str, str]]) -> int:
    """A response's content-length (what its body must send), or a window's worth when unknown."""
    for name, value in headers:
        if name == "content-length":
            with contextlib.suppress(ValueError):
                return int(value)
    return _WINDOW_BYTES


def _plain(status: int, body: bytes) -> Response:
    return Response(
        status,
        [("content-type", "text/plain"), ("content-length", str(len(body))), ("connection", "close")],
        body,
    )


def _to_request(event: h11.Request) -> Request | None:
    try:
        target = event.target.decode("ascii")
    except UnicodeDecodeError:
        return None
    parts = urlsplit(target)
    if not parts.path.startswith("/"):
        return None
    headers: dict[str, str] = {}
    for k, v in event.headers:
        headers[k.decode("latin-1").lower()] = v.decode("latin-1")
    return Request(
        method=event.method.decode("ascii", "replace"),
        path=unquote(parts.path),
        query=parse_qs(parts.query),
        headers=headers,
    )


def _addresses(sock: trio.socket.SocketType) -> tuple[str, str]:
    """(client, local) addresses of a connection: IPs, or both UNIX for a unix socket's."""
    if sock.family == socket.AF_UNIX:
        return UNIX, UNIX
    try:
        return str(sock.getpeername()[0]), str(sock.getsockname()[0])
    except OSError:
        return "", ""


async def listen_unix(path: str) -> list[trio.SocketListener]:
    """A listener on a unix socket at `path` (a stale socket file there is replaced), which only
    its owner can open: whoever connects through it is this machine's user."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    try:
                        probe.connect(path)
                    except OSError:
                        os.unlink(path)  # left behind by a process that is gone
                    else:
                        raise OSError(errno.EADDRINUSE, "another process is serving on it")
        old = os.umask(0o177)
        try:
            await sock.bind(path)
        finally:
            os.umask(old)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {path}: {exc.strerror or exc}", errno=exc.errno) from None
    return [trio.SocketListener(sock)]


async def listen(host: str, port: int) -> list[trio.SocketListener]:
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", errno=exc.errno) from None


async def serve_http(
    handler: Handler,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; `task_status.started` gets the bound listeners."""
    listeners = await listen(host, port)
    await trio.serve_listeners(serve_connection(handler), listeners, task_status=task_status)


def serve_connection(
    handler: Handler,
    tls: ssl.SSLContext | None = None,
    *,
    gate: Gate | None = None,
    per_client: int | None = None,
) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """The per-connection task for `trio.serve_listeners`; with `tls`, HTTPS (the handshake must
    finish within HEADER_TIMEOUT, and a client the context refuses is dropped). `gate` sees each
    request's head before its body is read; `per_client` caps the connections of one address."""

    connections = trio.CapacityLimiter(MAX_CONNECTIONS)
    by_client: dict[str, int] = {}
    last_warning = -math.inf

    async def on_connection(stream: trio.SocketStream) -> None:
        nonlocal last_warning
        client = _addresses(stream.socket)[0]
        over_client = per_client is not None and by_client.get(client, 0) >= per_client
        if over_client or connections.available_tokens < 1:
            if trio.current_time() - last_warning > 60:  # an attack must not flood the log too
                last_warning = trio.current_time()
                log.warning(
                    "closing a new connection from %s: %s",
                    client or "?",
                    f"it has {per_client} open already"
                    if over_client
                    else f"{MAX_CONNECTIONS} connections are open",
                )
            await stream.aclose()
            return
        connections.acquire_on_behalf_of_nowait(stream)
        by_client[client] = by_client.get(client, 0) + 1
        try:
            await serve_one(stream)
        finally:
            connections.release_on_behalf_of(stream)
            by_client[client] -= 1
            if not by_client[client]:
                del by_client[client]

    async def serve_one(stream: trio.SocketStream) -> None:
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)
        if tls is None:
            await _Connection(stream, handler, gate).run()
            return
        secure = trio.SSLStream(stream, tls, server_side=True, https_compatible=True)
        try:
            with trio.fail_after(HEADER_TIMEOUT):
                await secure.do_handshake()
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("TLS handshake with a peer failed: %s", exc.__cause__ or exc)
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await stream.aclose()
            return
        await _Connection(secure, handler, gate).run()

    return on_connection
