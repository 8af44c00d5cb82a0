"""The least an HTTP server can do to send a file that is already in memory: the ceiling for a
blob GET on this machine, for `bench` to put p2pimg's warm blob GET against.

    python -m tools.ceiling_server --listen 127.0.0.1:PORT FILE

FILE is mapped into memory once; every GET but `/ready` is answered 200 with its bytes, sent
with plain `send` in 1 MiB slices of the mapping (a 4 MiB send buffer, as p2pimg sets), one
connection at a time, closed after each response; `GET /ready` answers 200 with no body. No
parsing beyond the request line, no file reads, no checks: what is left is loopback TCP and the
client. (Measured here, `os.sendfile` from the page cache in a loop like this one reached less:
about 2 GB/s against 3.4-4.8 GB/s for `send` from the mapping, so the mapping is the ceiling.)
"""

from __future__ import annotations

import argparse
import mmap
import os
import socket

_SLICE = 1 << 20
_SEND_BUFFER = 4 << 20


def serve(listen: str, path: str) -> None:
    host, port = listen.rsplit(":", 1)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        body = memoryview(mapped)
        size = len(body)
        with socket.create_server((host, int(port))) as server:
            print(f"listening on {host}:{server.getsockname()[1]}", flush=True)
            while True:
                conn, _ = server.accept()
                with conn:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)
                    request = b""
                    while b"\r\n\r\n" not in request and len(request) < 65536:
                        piece = conn.recv(65536)
                        if not piece:
                            break
                        request += piece
                    if request.startswith(b"GET /ready "):
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        continue
                    head = f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
                    try:
                        conn.sendall(head.encode())
                        offset = 0
                        while offset < size:
                            offset += conn.send(body[offset : offset + _SLICE])
                    except OSError:
                        pass  # the client went away: the next one
            body.release()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("file")
    args = parser.parse_args()
    if not os.path.isfile(args.file):
        parser.error(f"{args.file}: no such file")
    serve(args.listen, args.file)


if __name__ == "__main__":
    main()
