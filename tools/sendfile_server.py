"""The least an HTTP server can do to send a file: the ceiling a blob server reaches on this
machine, for `bench` to put p2pimg's warm blob GET against.

    python -m tools.sendfile_server --listen 127.0.0.1:PORT FILE

Every GET but `/ready` is answered 200 with FILE's bytes, sent by the kernel (`os.sendfile`),
one connection at a time, the connection closed after each response; `GET /ready` answers 200
with no body. No parsing beyond the request line, no checks, no logging: nothing a real server
could do without.
"""

from __future__ import annotations

import argparse
import os
import socket


def serve(listen: str, path: str) -> None:
    host, port = listen.rsplit(":", 1)
    size = os.stat(path).st_size
    with socket.create_server((host, int(port))) as server:
        print(f"listening on {host}:{server.getsockname()[1]}", flush=True)
        while True:
            conn, _ = server.accept()
            with conn, open(path, "rb") as f:
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
                conn.sendall(head.encode())
                offset = 0
                try:
                    while offset < size:
                        sent = os.sendfile(conn.fileno(), f.fileno(), offset, size - offset)
                        if sent == 0:
                            break
                        offset += sent
                except OSError:
                    pass  # the client went away: the next one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("file")
    args = parser.parse_args()
    serve(args.listen, args.file)


if __name__ == "__main__":
    main()
