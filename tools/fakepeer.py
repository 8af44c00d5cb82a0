"""A fake LAN peer: claims to hold every blob, then never delivers. For tests and benchmarks.

    python -m tools.fakepeer --mode reset|garbage|stall [--listen 127.0.0.1:0]
    python -m tools.fakepeer --mode coming --blob sha256:...=SIZE [--blob ...] [--chunk-size N]

It speaks just enough of the peer protocol to be believed: `/p2pimg/v1/info` names a node,
`/p2pimg/v1/have/<digest>` says `complete` for any digest. Span requests to
`/p2pimg/v1/blobs/<digest>` then get, by mode:

    reset    the connection reset (RST) at once
    garbage  a 206 of the asked length, all zeros
    stall    a 206 head and 100 bytes, then nothing, for as long as the asker waits

In mode `coming` it says instead, for each `--blob`, that it is fetching every chunk itself (and
never finishes one), so that others wait for it; it holds no chunk, so nobody asks it for spans.

Everything else is 404. It prints `listening on HOST:PORT` on stdout when ready, and
`GET /__fakepeer/stats` answers how many span requests it got.
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import struct
import sys

import h11
import trio

_ZEROS = bytes(256 << 10)


class FakePeer:
    def __init__(self, mode: str, blobs: dict[str, int]) -> None:
        self.mode = mode
        self.blobs = blobs  # digest -> chunks, for mode "coming"
        self.spans = 0
        self.haves = 0
        self.node = f"fake-{mode}"

    async def handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                while event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    conn.receive_data(data)
                    event = conn.next_event()
                if not isinstance(event, h11.Request):
                    return
                while not isinstance(conn.next_event(), h11.EndOfMessage):  # no bodies expected
                    conn.receive_data(await stream.receive_some(65536))
                if not await self.respond(conn, stream, event):
                    return
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            await stream.aclose()

    async def respond(self, conn: h11.Connection, stream: trio.SocketStream, request: h11.Request) -> bool:
        path = request.target.decode("latin-1").partition("?")[0]
        if path == "/__fakepeer/stats":
            return await self.json(conn, stream, {"spans": self.spans, "haves": self.haves})
        if path == "/p2pimg/v1/info":
            return await self.json(conn, stream, {"version": 1, "node": self.node})
        if path.startswith("/p2pimg/v1/have/"):
            digest = path.rpartition("/")[2]
            self.haves += 1
            if self.mode != "coming":
                return await self.json(conn, stream, {"digest": digest, "complete": True, "node": self.node})
            if digest in self.blobs:
                chunks = base64.b64encode(b"\x02" * self.blobs[digest]).decode()
                return await self.json(
                    conn, stream, {"digest": digest, "complete": False, "node": self.node, "chunks": chunks}
                )
        if not path.startswith("/p2pimg/v1/blobs/"):
            await stream.send_all(
                conn.send(h11.Response(status_code=404, headers=[("content-length", "0")]))
                + conn.send(h11.EndOfMessage())
            )
            return True
        self.spans += 1
        length = _range_length(dict(request.headers).get(b"range", b""))
        if self.mode == "reset" or length is None:
            # SO_LINGER 0: close with RST, as a crashed or hostile host would.
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        head = h11.Response(
            status_code=206,
            headers=[("content-type", "application/octet-stream"), ("content-length", str(length))],
        )
        await stream.send_all(conn.send(head))
        if self.mode == "stall":
            await stream.send_all(conn.send(h11.Data(data=_ZEROS[: min(100, length)])))
            await trio.sleep_forever()
        sent = 0
        while sent < length:
            piece = _ZEROS[: min(len(_ZEROS), length - sent)]
            await stream.send_all(conn.send(h11.Data(data=piece)))
            sent += len(piece)
        await stream.send_all(conn.send(h11.EndOfMessage()))
        return True

    @staticmethod
    async def json(conn: h11.Connection, stream: trio.SocketStream, doc: object) -> bool:
        body = json.dumps(doc).encode()
        await stream.send_all(
            conn.send(
                h11.Response(
                    status_code=200,
                    headers=[("content-type", "application/json"), ("content-length", str(len(body)))],
                )
            )
            + conn.send(h11.Data(data=body))
            + conn.send(h11.EndOfMessage())
        )
        return True


def _range_length(value: bytes) -> int | None:
    try:
        first, _, last = value.decode().removeprefix("bytes=").partition("-")
        return int(last) - int(first) + 1
    except ValueError:
        return None


async def main(args: argparse.Namespace) -> None:
    host, _, port = args.listen.rpartition(":")
    blobs = {}
    for spec in args.blob:
        digest, _, size = spec.partition("=")
        blobs[digest] = max(1, -(-int(size) // args.chunk_size))
    peer = FakePeer(args.mode, blobs)
    listeners = await trio.open_tcp_listeners(int(port), host=host)
    bound = listeners[0].socket.getsockname()
    print(f"listening on {bound[0]}:{bound[1]}", flush=True)
    await trio.serve_listeners(peer.handle, listeners)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("reset", "garbage", "stall", "coming"), required=True)
    p.add_argument(
        "--blob",
        action="append",
        default=[],
        metavar="DIGEST=SIZE",
        help="mode coming: a blob to claim to be fetching",
    )
    p.add_argument("--chunk-size", type=int, default=1 << 20)
    p.add_argument("--listen", default="127.0.0.1:0")
    return p.parse_args(argv)


if __name__ == "__main__":
    try:
        trio.run(main, parse_args())
    except KeyboardInterrupt:
        sys.exit(0)
