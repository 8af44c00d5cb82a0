"""An HTTP proxy in front of an origin (an S3 server) that misbehaves on purpose.

    python -m tools.faultproxy --upstream http://127.0.0.1:9000 --listen 127.0.0.1:0 \
        [--latency 0.05] [--rate 20e6] [--faults fail,busy,reset,stall,corrupt] [--every 3] [--max-faults 6]

Faults hit only ranged GETs (the bytes of blobs), every `--every`th one, cycling through the
listed kinds, at most `--max-faults` times; everything else is passed through untouched:

    fail     answer 503 SlowDown without asking the upstream
    busy     answer 429 (a peer saying "not now") without asking the upstream
    reset    send the headers and part of the body, then reset the connection
    stall    send the headers and part of the body, then send nothing more
    corrupt  flip one byte in the middle of the body

`--no-ranges` drops the Range header of every request, so the upstream answers 200 with the
whole body (a server that does not do ranges). `--latency` delays every response (a far
origin); `--rate` caps each connection's bytes/s and `--total-rate` all of them together (the
origin's uplink). It prints `listening on HOST:PORT` on stdout when ready, and a line per fault
on stderr.
`GET /__faultproxy/stats` answers how many ranged GETs and body bytes went through (the origin's
egress as its clients see it), and how many requests each path got (`paths`, query left off).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import socket
import struct
import sys
from collections.abc import Iterator

import h11
import httpx
import trio

_HOP = {
    b"connection",
    b"keep-alive",
    b"transfer-encoding",
    b"te",
    b"trailer",
    b"upgrade",
    b"proxy-connection",
    b"content-length",
}


class Proxy:
    def __init__(self, args: argparse.Namespace) -> None:
        self.upstream = args.upstream.rstrip("/")
        self.latency = args.latency
        self.rate = args.rate
        self.total_rate = args.total_rate
        self.uplink_free_at = 0.0  # when the shared uplink can take the next piece
        self.kinds: Iterator[str] = itertools.cycle([k for k in args.faults.split(",") if k] or ["none"])
        self.every = max(1, args.every)
        self.max_faults = args.max_faults
        self.no_ranges = args.no_ranges
        self.ranged = 0
        self.faults = 0
        self.body_bytes = 0
        self.requests = 0
        self.paths: collections.Counter[str] = collections.Counter()
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(120, connect=10), limits=httpx.Limits(max_connections=64)
        )

    def next_fault(self, method: bytes, headers: dict[bytes, bytes]) -> str | None:
        if method != b"GET" or b"range" not in headers or self.faults >= self.max_faults:
            return None
        self.ranged += 1
        if self.ranged % self.every:
            return None
        kind = next(self.kinds)
        if kind == "none":
            return None
        self.faults += 1
        print(f"fault {self.faults}: {kind} on ranged GET #{self.ranged}", file=sys.stderr, flush=True)
        return kind

    async def send(self, stream: trio.SocketStream, data: bytes) -> None:
        if not self.rate and not self.total_rate:
            await stream.send_all(data)
            return
        for i in range(0, len(data), 16384):
            piece = data[i : i + 16384]
            if self.total_rate:
                # One queue for the uplink: each piece waits for the pieces sent before it.
                now = trio.current_time()
                self.uplink_free_at = max(self.uplink_free_at, now) + len(piece) / self.total_rate
                await trio.sleep_until(self.uplink_free_at)
            await stream.send_all(piece)
            if self.rate:
                await trio.sleep(len(piece) / self.rate)

    async def handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request = await self.next_event(conn, stream)
                if not isinstance(request, h11.Request):
                    return
                body = b""
                while True:
                    event = await self.next_event(conn, stream)
                    if isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    else:
                        return
                if not await self.respond(conn, stream, request, body):
                    return
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, httpx.HTTPError):
            return
        finally:
            await stream.aclose()

    async def next_event(self, conn: h11.Connection, stream: trio.SocketStream) -> object:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            conn.receive_data(await stream.receive_some(65536))

    async def respond(
        self, conn: h11.Connection, stream: trio.SocketStream, request: h11.Request, body: bytes
    ) -> bool:
        headers = {k.lower(): v for k, v in request.headers}
        if request.target == b"/__faultproxy/stats":
            stats = json.dumps(
                {
                    "ranged_gets": self.ranged,
                    "requests": self.requests,
                    "body_bytes": self.body_bytes,
                    "faults": self.faults,
                    "paths": dict(self.paths),
                }
            ).encode()
            await stream.send_all(
                conn.send(
                    h11.Response(
                        status_code=200,
                        headers=[
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(stats)).encode()),
                        ],
                    )
                )
            )
            await stream.send_all(conn.send(h11.Data(data=stats)) + conn.send(h11.EndOfMessage()))
            return True
        self.requests += 1
        self.paths[request.target.decode("latin-1").partition("?")[0]] += 1
        fault = self.next_fault(request.method, headers)
        if self.latency:
            await trio.sleep(self.latency)
        if fault in ("fail", "busy"):
            payload = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
            await self.send(
                stream,
                conn.send(
                    h11.Response(
                        status_code=503 if fault == "fail" else 429,
                        headers=[
                            (b"content-type", b"application/xml"),
                            (b"content-length", str(len(payload)).encode()),
                        ],
                    )
                ),
            )
            await self.send(stream, conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage()))
            return True
        upstream_request = self.client.build_request(
            request.method.decode(),
            self.upstream + request.target.decode(),
            headers=[
                (k, v)
                for k, v in request.headers
                if k.lower() not in _HOP and not (self.no_ranges and k.lower() == b"range")
            ],
            content=body,
        )
        response = await self.client.send(upstream_request, stream=True)
        try:
            out_headers = [(k, v) for k, v in response.headers.raw if k.lower() not in _HOP]
            length = response.headers.get("content-length")
            if length is not None:
                out_headers.append((b"content-length", length.encode()))
            await self.send(
                stream, conn.send(h11.Response(status_code=response.status_code, headers=out_headers))
            )
            sent = 0
            total = int(length) if length else 0
            async for piece in response.aiter_raw():
                if fault in ("reset", "stall") and sent + len(piece) > total // 3:
                    piece = piece[: max(0, total // 3 - sent)]
                    if piece:
                        self.body_bytes += len(piece)
                        await self.send(stream, conn.send(h11.Data(data=piece)))
                    if fault == "stall":
                        await trio.sleep_forever()
                    # SO_LINGER 0: close with RST, as a crashed or cut-off server would.
                    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return False
                if fault == "corrupt" and sent <= total // 2 < sent + len(piece):
                    mutable = bytearray(piece)
                    mutable[total // 2 - sent] ^= 0xFF
                    piece = bytes(mutable)
                sent += len(piece)
                self.body_bytes += len(piece)
                await self.send(stream, conn.send(h11.Data(data=piece)))
            await self.send(stream, conn.send(h11.EndOfMessage()))
            return True
        finally:
            await response.aclose()


async def main(args: argparse.Namespace) -> None:
    proxy = Proxy(args)
    host, _, port = args.listen.rpartition(":")
    listeners = await trio.open_tcp_listeners(int(port), host=host)
    bound = listeners[0].socket.getsockname()
    print(f"listening on {bound[0]}:{bound[1]}", flush=True)
    await trio.serve_listeners(proxy.handle, listeners)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--upstream", required=True)
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--latency", type=float, default=0.0, help="seconds added to every response")
    p.add_argument("--rate", type=float, default=0.0, help="bytes/s per connection (0 = unlimited)")
    p.add_argument("--total-rate", type=float, default=0.0, help="bytes/s, all connections")
    p.add_argument("--faults", default="", help="comma-separated: fail,busy,reset,stall,corrupt")
    p.add_argument("--every", type=int, default=3, help="fault every Nth ranged GET")
    p.add_argument("--max-faults", type=int, default=1_000_000)
    p.add_argument("--no-ranges", action="store_true", help="drop Range headers: whole bodies only")
    return p.parse_args(argv)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(main, parse_args())
