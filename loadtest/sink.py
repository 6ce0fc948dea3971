"""The bare sink the benchmark measures every server against: the least work that accepts
an upload durably, with nothing between the socket and the disk.

    python -m uploadsrv.loadtest.sink --port 8001 [--dir DIR] [--asgi]

A plain socket server, a thread per connection: it parses a minimal HTTP/1.1 request head
(Content-Length bodies, keep-alive), `recv_into` a 1 MiB buffer, `pwrite`s each read at
its place and `fdatasync`s the file before it answers. It speaks just enough tus for the
benchmark's clients: ``POST`` creates (``201``, ``Location: /files/<n>``; with a body, the
body is stored in the same request), ``PATCH /files/<n>`` writes at ``Upload-Offset``
(``204``), ``GET`` answers ``200`` (readiness).

Without ``--dir`` it stores nothing and answers at once: what the benchmark's clients reach
when the server costs nothing. With ``--asgi`` the same requests go through uvicorn
(httptools, uvloop) to a one-function ASGI app that writes each body message with
`os.write` on the event loop: the price of the HTTP stack alone.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import socket
import threading
from typing import Any

BUFFER = 1 << 20  #: bytes per recv_into
HEAD_LIMIT = 16 << 10

_names = itertools.count()


class Request:
    """One parsed request head: what the sink needs of it."""

    __slots__ = ("close", "expect", "length", "method", "offset", "path")

    def __init__(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        self.method, self.path, version = lines[0].split(" ", 2)
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        self.length = int(fields.get("content-length", "0"))
        self.offset = int(fields.get("upload-offset", "0"))
        self.expect = fields.get("expect", "").lower() == "100-continue"
        self.close = version == "HTTP/1.0" or fields.get("connection", "").lower() == "close"


class Connection:
    """Serves the requests of one connection, in the thread that runs `serve`."""

    def __init__(self, sock: socket.socket, directory: str | None) -> None:
        self.sock = sock
        self.directory = directory
        self.buffer = bytearray(BUFFER)
        self.view = memoryview(self.buffer)
        self.filled = 0  #: bytes in `buffer` not yet consumed (the start of the next request)

    def serve(self) -> None:
        with self.sock:
            while (request := self.read_head()) is not None:
                self.answer(request)
                if request.close:
                    return

    def read_head(self) -> Request | None:
        while (end := self.buffer.find(b"\r\n\r\n", 0, self.filled)) < 0:
            if self.filled >= HEAD_LIMIT:
                return None
            got = self.sock.recv_into(self.view[self.filled :])
            if not got:
                return None
            self.filled += got
        request = Request(bytes(self.view[:end]))
        self.consume(end + 4)
        return request

    def consume(self, count: int) -> None:
        """Drop the first `count` buffered bytes, keeping what follows them."""
        rest = self.filled - count
        self.view[:rest] = self.view[count : self.filled]
        self.filled = rest

    def answer(self, request: Request) -> None:
        if request.expect:
            self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        if request.method == "GET":
            return self.respond(b"200 OK", b"")
        if request.method == "POST":
            name = str(next(_names))
            self.store(name, 0, request.length, create=True)
            location = b"Location: /files/%s\r\n" % name.encode()
            return self.respond(b"201 Created", location + b"Upload-Offset: %d\r\n" % request.length)
        name = request.path.rsplit("/", 1)[-1]
        self.store(name, request.offset, request.length, create=False)
        self.respond(b"204 No Content", b"Upload-Offset: %d\r\n" % (request.offset + request.length))

    def store(self, name: str, offset: int, length: int, *, create: bool) -> None:
        """Read `length` body bytes; with a directory, write them at `offset` and fdatasync."""
        fd = _open(self.directory, name, create=create) if length or create else -1
        try:
            self.receive(fd, offset, length)
            if fd >= 0 and length:  # a create without a body is not synced (uploadsrv's is not)
                os.fdatasync(fd)
        finally:
            if fd >= 0:
                os.close(fd)

    def receive(self, fd: int, offset: int, length: int) -> None:
        """The body's `length` bytes, what is buffered first; written at `offset` if `fd` is a file."""
        while length:
            if not self.filled:
                self.filled = self.sock.recv_into(self.view, min(length, BUFFER))
                if not self.filled:
                    raise ConnectionError("body cut off")
            take = min(self.filled, length)
            if fd >= 0:
                os.pwrite(fd, self.view[:take], offset)
            offset += take
            length -= take
            self.consume(take)

    def respond(self, status: bytes, headers: bytes) -> None:
        self.sock.sendall(
            b"HTTP/1.1 " + status + b"\r\nTus-Resumable: 1.0.0\r\n" + headers + b"Content-Length: 0\r\n\r\n"
        )


def serve(port: int, directory: str | None) -> None:
    with socket.create_server(("127.0.0.1", port), backlog=512) as listener:
        while True:
            sock, _ = listener.accept()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=_serve_quietly, args=(sock, directory), daemon=True).start()


def _serve_quietly(sock: socket.socket, directory: str | None) -> None:
    with contextlib.suppress(ConnectionError, ValueError):  # a client went away, or sent nonsense
        Connection(sock, directory).serve()


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The same sink as an ASGI app (``--asgi``): `SINK_DIR` in the environment, if storing."""
    if scope["type"] != "http":
        return
    name, offset, status = _target(scope)
    fd = -1 if scope["method"] == "GET" else _open(os.environ.get("SINK_DIR"), name, create=status == 201)
    try:
        offset = await _receive_body(receive, fd, offset)
        if fd >= 0 and offset:
            os.fdatasync(fd)
    finally:
        if fd >= 0:
            os.close(fd)
    answer = [(b"tus-resumable", b"1.0.0"), (b"upload-offset", b"%d" % offset), (b"content-length", b"0")]
    if status == 201:
        answer.append((b"location", b"/files/" + name.encode()))
    await send({"type": "http.response.start", "status": status, "headers": answer})
    await send({"type": "http.response.body", "body": b""})


def _target(scope: dict[str, Any]) -> tuple[str, int, int]:
    """The file a request writes, where in it, and the status it answers: a POST makes a new one."""
    if scope["method"] == "POST":
        return str(next(_names)), 0, 201
    headers = dict(scope["headers"])
    status = 204 if scope["method"] == "PATCH" else 200
    return scope["path"].rsplit("/", 1)[-1], int(headers.get(b"upload-offset", b"0")), status


async def _receive_body(receive: Any, fd: int, offset: int) -> int:
    """Every body message, written at its place if `fd` is a file; returns the end offset."""
    more = True
    while more:
        message = await receive()
        body = message.get("body", b"")
        if fd >= 0 and body:
            offset += os.pwrite(fd, body, offset)
        elif body:
            offset += len(body)
        more = message.get("more_body", False)
    return offset


def _open(directory: str | None, name: str, *, create: bool) -> int:
    """The file `name` to write into, or -1 without a directory (storing nothing)."""
    if directory is None:
        return -1
    flags = os.O_WRONLY | (os.O_CREAT if create else 0)
    return os.open(os.path.join(directory, name), flags, 0o644)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", help="store into this directory (default: store nothing)")
    parser.add_argument("--asgi", action="store_true", help="through uvicorn and ASGI instead")
    args = parser.parse_args()
    if args.dir is not None:
        os.makedirs(args.dir, exist_ok=True)
    if not args.asgi:
        serve(args.port, args.dir)
        return
    import uvicorn

    if args.dir is not None:
        os.environ["SINK_DIR"] = args.dir
    uvicorn.run(app, port=args.port, http="httptools", loop="uvloop", access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
