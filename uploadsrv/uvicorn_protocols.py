"""uvicorn HTTP/1.1 protocols with two ASGI extensions uploadsrv needs.

- ``http.response.informational``: the app may send
  ``{"type": "http.response.informational", "status": 104, "headers": [...]}`` any number
  of times before ``http.response.start``; each goes out at once as an interim response.
  ASGI has no such message (only 103 early hints), and the IETF resumable-upload draft
  needs 104s: one with the upload's URL before the body is read, more as progress. Never
  sent to HTTP/1.0 clients, which do not understand 1xx; the extension is then absent.
- ``uploadsrv.abort``: ``{"type": "uploadsrv.abort"}`` drops the connection without a
  final response. After a 104 has told an iOS client where its upload lives, a transient
  storage failure must look like a network failure (which it resumes from), not a 5xx.
- ``uploadsrv.trailers``: trailer fields of a chunked request body (tus
  ``checksum-trailer``), a list of ``(name, value)`` pairs filled by the time the last
  body message is received.

And two changes of behaviour. Body bytes that arrived before the client dropped the
connection are received before ``http.disconnect`` (uvicorn discards what it buffered), so
the core keeps them and the client resumes after them: a phone losing its network while
sending a small body would otherwise lose all of it. And the body is buffered as the
parser's blocks, not copied twice more through a bytearray (`_BodyBlocks`).

They also keep the open-connections gauge of `metrics.py`, which only the HTTP protocol
sees. `uploadsrv serve` selects these classes for both of uvicorn's parsers (httptools, h11).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import httptools
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .metrics import OPEN_CONNECTIONS
from .socket_body import MIN_LENGTH, SOCKET_BODY, SocketBody

TRAILERS = "uploadsrv.trailers"
INFORMATIONAL = "http.response.informational"
ABORT = "uploadsrv.abort"
REASONS = {100: b"Continue", 102: b"Processing", 103: b"Early Hints", 104: b"Upload Resumption Supported"}

Send = Callable[[dict[str, Any]], Awaitable[None]]


def _extensions(scope: Any) -> dict[str, Any]:
    """The scope's extensions (uvicorn's TypedDict types their values too narrowly)."""
    extensions: dict[str, Any] = scope.setdefault("extensions", {})
    return extensions


def _start_trailers(scope: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    trailers: list[tuple[bytes, bytes]] = []
    scope.setdefault("extensions", {})[TRAILERS] = trailers
    return trailers


def _with_informational(cycle: Any, encode: Callable[[int, list[tuple[bytes, bytes]]], bytes]) -> None:
    """Teach one request's `send` the informational message; HTTP/1.1 only."""
    if cycle.scope.get("http_version") != "1.1":
        return
    extensions = cycle.scope.setdefault("extensions", {})
    extensions[INFORMATIONAL] = extensions[ABORT] = {}
    send: Send = cycle.send

    async def send_with_informational(message: dict[str, Any]) -> None:
        if message["type"] == ABORT:
            cycle.disconnected = True  # uvicorn then sends no 500 of its own
            cycle.transport.close()
            return
        if message["type"] != INFORMATIONAL:
            await send(message)
            return
        status = int(message["status"])
        if not 100 <= status < 200 or status == 101:
            raise RuntimeError(f"not an informational status: {status}")
        if cycle.response_started or cycle.disconnected or cycle.transport.is_closing():
            return  # too late for an interim response, or nobody to send it to
        cycle.transport.write(encode(status, list(message.get("headers", []))))

    cycle.send = send_with_informational


class _BodyBlocks:
    """uvicorn's buffer of request body bytes the app has not received, kept as blocks.

    uvicorn appends every block to a bytearray and copies that into bytes for the app: two
    copies of every byte on the event loop, holding the GIL (a quarter of the loop's time
    while S3 uploads stream in). This buffer has the operations uvicorn uses on its own
    (``+=``, ``len`` for flow control, ``bytes`` when the app receives); a single block goes
    to the app as it is, several are joined with one copy.
    """

    __slots__ = ("_blocks", "_size")

    def __init__(self) -> None:
        self._blocks: list[bytes] = []
        self._size = 0

    def __iadd__(self, block: bytes) -> _BodyBlocks:
        self._blocks.append(block)
        self._size += len(block)
        return self

    def __len__(self) -> int:
        return self._size

    def __bytes__(self) -> bytes:
        """Everything buffered; the buffer is empty afterwards (uvicorn replaces it anyway)."""
        blocks, self._blocks, self._size = self._blocks, [], 0
        if len(blocks) == 1 and type(blocks[0]) is bytes:
            return blocks[0]
        return b"".join(blocks)  # h11 hands over bytearrays


def _buffer_body_as_blocks(cycle: Any) -> None:
    """Give a request a `_BodyBlocks` buffer, and hand the app what it holds when the
    connection drops before ``http.disconnect`` (uvicorn would discard it)."""
    buffered = _BodyBlocks()
    if cycle.body:  # h11 may have parsed body bytes in the same pass as the headers
        buffered += bytes(cycle.body)
    cycle.body = buffered
    receive = cycle.receive

    async def receive_from_blocks() -> dict[str, Any]:
        message = await receive()
        cycle.body = buffered  # uvicorn starts a new bytearray after each body message
        if message["type"] == "http.disconnect" and cycle.disconnected and buffered:
            return {"type": "http.request", "body": bytes(buffered), "more_body": True}
        return message

    cycle.receive = receive_from_blocks


def _reason(status: int) -> bytes:
    return REASONS.get(status, b"")


def _encode_raw(status: int, headers: list[tuple[bytes, bytes]]) -> bytes:
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, _reason(status))]
    lines += [name + b": " + value + b"\r\n" for name, value in headers]
    return b"".join(lines) + b"\r\n"


class _CountsConnections(asyncio.Protocol):
    """Keeps the open-connections gauge; first in each protocol class's bases."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        OPEN_CONNECTIONS.inc()
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        OPEN_CONNECTIONS.dec()
        super().connection_lost(exc)


class HttpToolsUploadProtocol(_CountsConnections, HttpToolsProtocol):
    """llhttp reports trailer fields through `on_header` after the headers are complete.

    A large body may be read straight from the socket (`SocketBody`), so this protocol
    counts the body bytes its parser has seen, and starts a fresh parser after a body it
    did not see.
    """

    _trailers: list[tuple[bytes, bytes]] | None = None
    body_bytes_parsed = 0

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._trailers = None
        self.body_bytes_parsed = 0

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._trailers = _start_trailers(self.scope)  # type: ignore[arg-type]  # uvicorn's TypedDict scope
        if self.cycle is not None and self.cycle.scope is self.scope:
            _with_informational(self.cycle, _encode_raw)
            _buffer_body_as_blocks(self.cycle)
            length = self._direct_length()
            if length is not None:
                _extensions(self.scope)[SOCKET_BODY] = SocketBody(self, self.cycle, length)

    def on_body(self, body: bytes) -> None:
        self.body_bytes_parsed += len(body)
        super().on_body(body)

    def _direct_length(self) -> int | None:
        """The Content-Length of a body that may bypass the parser: plain TCP, not
        pipelined behind another request, no Transfer-Encoding, at least MIN_LENGTH."""
        if self.pipeline or self.transport.get_extra_info("sslcontext") is not None:
            return None
        length = None
        for name, value in self.headers:
            if name == b"transfer-encoding":
                return None
            if name == b"content-length":
                length = int(value) if value.isdigit() else None
        return length if length is not None and length >= MIN_LENGTH else None

    def shutdown(self) -> None:
        direct = _extensions(self.scope).get(SOCKET_BODY) if self.scope else None
        if direct is not None and self.cycle is not None and not self.cycle.response_complete:
            direct.shutdown()
        super().shutdown()

    def body_read_directly(self) -> None:
        """The rest of the current body was read past the parser: parse afresh from the
        next request on, with uvicorn's own parser settings."""
        self.parser = httptools.HttpRequestParser(self)
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._trailers is None:
            super().on_header(name, value)
        else:
            self._trailers.append((name.lower(), value))


class H11UploadProtocol(_CountsConnections, H11Protocol):
    """h11 reports trailers on `EndOfMessage` and encodes interim responses itself."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        next_event = self.conn.next_event

        def next_event_with_extensions() -> Any:
            event = next_event()
            if isinstance(event, h11.EndOfMessage) and event.headers and self.cycle is not None:
                trailers = _start_trailers(self.scope)  # type: ignore[arg-type]  # uvicorn's TypedDict scope
                trailers.extend((name.lower(), value) for name, value in event.headers)
            return event

        # h11 has no hook for trailers: its connection's next_event is the seam.
        self.conn.next_event = next_event_with_extensions  # type: ignore[method-assign]

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not None and self.cycle is not cycle:  # a new request began
            _with_informational(self.cycle, self._encode_h11)
            _buffer_body_as_blocks(self.cycle)

    def _encode_h11(self, status: int, headers: list[tuple[bytes, bytes]]) -> bytes:
        reason = b"Upload Resumption Supported" if status == 104 else b""
        return (
            self.conn.send(h11.InformationalResponse(status_code=status, headers=headers, reason=reason))
            or b""
        )
