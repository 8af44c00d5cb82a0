"""Misbehaving and ordinary HTTP clients against one URL, for tests and the soak benchmark.

    python -m tools.loadclients --host 127.0.0.1:5050 --path /v2/demo/app/blobs/sha256:... \
        [--range 0-1048575] [--slow 600 --slow-rate 1024] [--vanish-rate 50] [--normal-rate 2] \
        [--digest sha256:...] [--duration 60]

- `--slow N`: N connections that each ask for the body, then read `--slow-rate` bytes a second
  (with a 4 KiB receive buffer, so the kernel does not read ahead for them). The tool prints
  `ready` on stdout once every one has its first bytes.
- `--vanish-rate R`: R new connections a second that send the request and reset (RST) at once,
  cycling through three moments: after the request line, after the whole head, and after the
  first bytes of the body.
- `--normal-rate R`: R ordinary GETs a second that read the whole body (checked against
  `--digest` when given; with `--range` only its length is checked).

It stops by itself after `--duration` seconds (or when its stdin closes, if `--until-eof`), then
prints one JSON line: counts of each kind, how many slow readers the server cut, how many
ordinary GETs succeeded, and their times. Traffic goes only to `--host`, which must be a
loopback or test-namespace address the caller controls.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable

import trio

_RECV = 256 << 10


class Load:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        host, _, port = args.host.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        range_line = f"Range: bytes={args.range}\r\n" if args.range else ""
        self.head = (
            f"GET {args.path} HTTP/1.1\r\nHost: {args.host}\r\n{range_line}Accept: */*\r\n\r\n"
        ).encode()
        self.counts = {
            "slow": 0,
            "slow_ready": 0,
            "slow_cut": 0,
            "slow_errors": 0,
            "vanished": 0,
            "vanish_errors": 0,
            "normal_ok": 0,
            "normal_failed": 0,
        }
        self.normal_seconds: list[float] = []
        self.all_ready = trio.Event()
        self.moment = 0

    async def connect(self, rcvbuf: int | None = None) -> trio.SocketStream:
        sock = trio.socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        try:
            with trio.fail_after(10):
                await sock.connect((self.host, self.port))
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)

    async def slow(self) -> None:
        self.counts["slow"] += 1
        try:
            stream = await self.connect(rcvbuf=4096)
        except (OSError, trio.TooSlowError):
            self.counts["slow_errors"] += 1
            self._slow_ready()
            return
        first = True
        async with stream:
            try:
                await stream.send_all(self.head)
                while True:
                    data = await stream.receive_some(self.args.slow_rate)
                    if first:
                        first = False
                        self._slow_ready()
                    if not data:
                        self.counts["slow_cut"] += 1
                        return
                    await trio.sleep(1)
            except (trio.BrokenResourceError, OSError):
                if first:
                    self._slow_ready()
                self.counts["slow_cut"] += 1

    def _slow_ready(self) -> None:
        self.counts["slow_ready"] += 1
        if self.counts["slow_ready"] == self.args.slow:
            self.all_ready.set()

    async def vanish(self, moment: int) -> None:
        try:
            stream = await self.connect()
        except (OSError, trio.TooSlowError):
            self.counts["vanish_errors"] += 1
            return
        try:
            line_end = self.head.index(b"\r\n") + 2
            await stream.send_all(self.head[:line_end] if moment == 0 else self.head)
            if moment == 2:
                with trio.move_on_after(5):
                    await stream.receive_some(65536)
            self.counts["vanished"] += 1
        except (trio.BrokenResourceError, OSError):
            self.counts["vanish_errors"] += 1
        finally:
            # SO_LINGER 0: the close resets the connection, as a killed client's kernel would.
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            stream.socket.close()

    async def normal(self) -> None:
        began = time.monotonic()
        try:
            stream = await self.connect()
            async with stream:
                await stream.send_all(self.head)
                ok = await self._read_response(stream)
        except (OSError, trio.BrokenResourceError, trio.TooSlowError, ValueError):
            ok = False
        self.counts["normal_ok" if ok else "normal_failed"] += 1
        if ok:
            self.normal_seconds.append(time.monotonic() - began)

    async def _read_response(self, stream: trio.SocketStream) -> bool:
        buf = b""
        with trio.fail_after(120):
            while b"\r\n\r\n" not in buf:
                data = await stream.receive_some(_RECV)
                if not data:
                    return False
                buf += data
            head, _, body = buf.partition(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")[1:]
                if line.lower().startswith(b"content-length:")
            )
            digest = hashlib.sha256(body)
            got = len(body)
            while got < length:
                data = await stream.receive_some(_RECV)
                if not data:
                    return False
                digest.update(data)
                got += len(data)
        if status not in (200, 206) or got != length:
            return False
        return (
            self.args.range is not None
            or self.args.digest is None
            or ("sha256:" + digest.hexdigest() == self.args.digest)
        )

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.cancel_scope.deadline = trio.current_time() + self.args.duration
            for _ in range(self.args.slow):
                nursery.start_soon(self.slow)
            if not self.args.slow:
                self.all_ready.set()
            nursery.start_soon(self._announce)
            if self.args.until_eof:
                nursery.start_soon(self._stop_on_eof, nursery.cancel_scope)
            nursery.start_soon(self._every, self.args.vanish_rate, self._next_vanish)
            nursery.start_soon(self._every, self.args.normal_rate, self.normal)

    async def _announce(self) -> None:
        await self.all_ready.wait()
        print("ready", flush=True)

    async def _stop_on_eof(self, scope: trio.CancelScope) -> None:
        await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
        scope.cancel()

    async def _next_vanish(self) -> None:
        """The next vanishing client, cycling through the three moments it leaves at."""
        moment, self.moment = self.moment, (self.moment + 1) % 3
        await self.vanish(moment)

    async def _every(self, rate: float, client: Callable[[], Awaitable[None]]) -> None:
        if rate <= 0:
            return
        await self.all_ready.wait()
        async with trio.open_nursery() as nursery:
            while True:
                nursery.start_soon(client)
                await trio.sleep(1 / rate)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--range", help="FIRST-LAST: ask for this byte range")
    p.add_argument("--digest", help="check ordinary GETs of the whole body against this sha256 digest")
    p.add_argument("--slow", type=int, default=0)
    p.add_argument("--slow-rate", type=int, default=1024)
    p.add_argument("--vanish-rate", type=float, default=0.0)
    p.add_argument("--normal-rate", type=float, default=0.0)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--until-eof", action="store_true", help="also stop when stdin closes")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    load = Load(parse_args(argv))
    trio.run(load.run)
    seconds = sorted(load.normal_seconds)
    summary = {
        **load.counts,
        "normal_median_s": seconds[len(seconds) // 2] if seconds else None,
        "normal_max_s": seconds[-1] if seconds else None,
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
