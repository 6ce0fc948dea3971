"""A lean keep-alive HTTP/1.1 connection on asyncio streams, for the benchmark's small requests.

A general client (httpx) spends more CPU per request than the servers it measures here
(1.2-1.8 ms on these cores), so it, not the server, would set the rate. This one writes
each request in one `write`, reads the answer head with one `readuntil`, and reads
Content-Length and chunked bodies: some 50 microseconds of CPU per request, which the benchmark shows
against a server that answers without storing. It knows HTTP only: what tus sends over it
is in `clients.py`, with the load test's clients.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit


class Answer:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[bytes, bytes], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


class Connection:
    """One keep-alive connection; one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: bytes) -> None:
        self._reader = reader
        self._writer = writer
        self._host = host

    @classmethod
    async def open(cls, url: str) -> Connection:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        return cls(reader, writer, parts.netloc.encode())

    async def request(self, method: bytes, path: bytes, headers: bytes = b"", body: bytes = b"") -> Answer:
        self._writer.write(
            b"%s %s HTTP/1.1\r\nHost: %s\r\n%sContent-Length: %d\r\n\r\n%s"
            % (method, path, self._host, headers, len(body), body)
        )
        while True:
            head = await self._reader.readuntil(b"\r\n\r\n")
            lines = head[:-4].split(b"\r\n")
            status = int(lines[0].split(b" ", 2)[1])
            if status >= 200:  # interim responses (104) carry no body: the final one follows
                break
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            fields[name.strip().lower()] = value.strip()
        if fields.get(b"transfer-encoding") == b"chunked":
            return Answer(status, fields, await self._chunked())
        length = int(fields.get(b"content-length", b"0"))
        return Answer(status, fields, await self._reader.readexactly(length) if length else b"")

    async def _chunked(self) -> bytes:
        body = b""
        while size := int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += (await self._reader.readexactly(size + 2))[:-2]
        await self._reader.readuntil(b"\r\n")  # no trailers expected
        return body

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()


def header_lines(headers: dict[str, str]) -> bytes:
    """`headers` as the lines of a request head, for `Connection.request`."""
    return b"".join(f"{name}: {value}\r\n".encode("latin-1") for name, value in headers.items())


def path_of(location: bytes) -> bytes:
    """The path of a Location, absolute or not."""
    if location.startswith(b"http"):
        return b"/" + location.split(b"/", 3)[3]
    return location
