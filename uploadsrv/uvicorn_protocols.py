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

And the limits a server facing the internet needs, per connection (`_ConnectionLimits`,
shared by both classes): a request head of at most `--max-header-size` bytes and 100
header lines (431); `--header-timeout` for a complete head and `--idle-timeout` for a
stalled body (the connection is closed; the app keeps what arrived); at most
`--max-connections` open connections (503). Both timeouts are one timer per connection,
re-armed only when it fires: a body block costs one timestamp.

They also keep the open-connections gauge of `metrics.py`, which only the HTTP protocol
sees. `uploadsrv serve` selects these classes for both of uvicorn's parsers (httptools, h11).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import h11
import httptools
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from . import memory
from .config import Settings
from .metrics import OPEN_CONNECTIONS
from .socket_body import MIN_LENGTH, SOCKET_BODY, SocketBody

log = logging.getLogger("uploadsrv")

TRAILERS = "uploadsrv.trailers"
INFORMATIONAL = "http.response.informational"
ABORT = "uploadsrv.abort"
REASONS = {100: b"Continue", 102: b"Processing", 103: b"Early Hints", 104: b"Upload Resumption Supported"}

Send = Callable[[dict[str, Any]], Awaitable[None]]


def _extensions(scope: Any) -> dict[str, Any]:
    """The scope's extensions (uvicorn's TypedDict types their values too narrowly)."""
    extensions: dict[str, Any] = scope.setdefault("extensions", {})
    return extensions


def _fields_size(fields: Iterable[tuple[bytes, bytes]]) -> int:
    """Bytes of header (or trailer) fields as a head carries them: `name: value` and CRLF."""
    size = 0
    for name, value in fields:
        size += len(name) + len(value) + 4
    return size


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


@dataclass(frozen=True)
class EdgeLimits:
    """What one connection may cost; from the settings, once per worker process."""

    max_head: int
    header_timeout: float | None
    idle_timeout: float | None
    max_connections: int
    max_header_lines: int = 100
    #: Seconds a refused connection is drained before it is closed, so that the client
    #: reads the refusal instead of a reset (closing with unread input sends an RST).
    linger: float = 2.0
    retry_after: int = 5

    @classmethod
    def from_settings(cls, settings: Settings) -> EdgeLimits:
        return cls(
            settings.max_header_size, settings.header_timeout, settings.idle_timeout, settings.max_connections
        )


@functools.cache
def edge_limits() -> EdgeLimits:
    """The worker's limits: `uploadsrv serve` passes its settings on in the environment."""
    return EdgeLimits.from_settings(Settings.from_env())


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a request that has been refused."""


#: Logs nothing; made outside logging's registry, which `dictConfig` resets.
_QUIET = logging.Logger("uploadsrv.quiet", logging.CRITICAL + 1)

#: Where a connection stands, for its timer.
HEAD, BODY, WAIT, IDLE, LINGER = range(5)


class _ConnectionLimits:
    """Head size and line limits, header and idle timeouts and the connection limit, for
    any uvicorn HTTP protocol class that calls `_head_complete` and `_body_complete`.

    One timer per connection, armed for the earliest deadline of its phase: the head's
    (`HEAD`, from its first byte), the body's last byte plus the idle timeout (`BODY`,
    unless uvicorn paused reading because the app is behind), or the end of lingering
    after a refusal. `WAIT` (the app answers) and `IDLE` (keep-alive, uvicorn's timer)
    have none.
    """

    loop: Any
    transport: Any
    flow: Any
    connections: set[Any]
    cycle: Any
    _phase: int
    _last_read: float
    _head_began: float
    _head_bytes: int  #: raw bytes received since the head began
    _head_size: int  #: bytes of the head the parser has reported
    _head_lines: int
    _refusal: int | None = None  #: the status this connection was refused with

    #: uvicorn's logger for this connection. Once uploadsrv has refused it (and logged
    #: that), uvicorn's own "Invalid HTTP request received." for the same request is
    #: not repeated.
    @property
    def logger(self) -> logging.Logger:
        return _QUIET if self._refusal is not None else self._uvicorn_logger

    @logger.setter
    def logger(self, logger: logging.Logger) -> None:
        self._uvicorn_logger = logger

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._limits = edge_limits()
        self._timer: Any = None
        self._timer_at = float("inf")
        self._write_paused_at: float | None = None  #: since when the client reads no response
        self._begin_head(self.loop.time())
        if len(self.connections) > self._limits.max_connections:
            self._refuse(
                503,
                "too many connections; retry later",
                [(b"retry-after", str(self._limits.retry_after).encode())],
            )

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)  # type: ignore[misc]
        memory.trim_soon(self.loop)

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:
            return  # lingering after a refusal: what the client still sends is dropped
        now = self._last_read = self.loop.time()
        if self._phase == IDLE:
            self._begin_head(now)
        if self._phase == HEAD:
            self._head_bytes += len(data)
        super().data_received(data)  # type: ignore[misc]
        if self._phase == HEAD and self._head_bytes > self._limits.max_head and self._refusal is None:
            self._refuse_head()  # an unfinished head, already larger than any we accept

    def pause_writing(self) -> None:
        """The client stopped reading the response, for now: it has `--idle-timeout` to
        read on, or the connection is dropped (a download ends and closes its file)."""
        super().pause_writing()  # type: ignore[misc]
        self._write_paused_at = now = self.loop.time()
        if self._limits.idle_timeout is not None:
            self._arm(now + self._limits.idle_timeout)

    def resume_writing(self) -> None:
        self._write_paused_at = None
        super().resume_writing()  # type: ignore[misc]

    @property
    def body_idle_timeout(self) -> float | None:
        """For a body read past the parser (`SocketBody`), which times its own waits."""
        return self._limits.idle_timeout

    def send_400_response(self, msg: str) -> None:
        if self._refusal is None:  # else the refusal is already on its way
            super().send_400_response(msg)  # type: ignore[misc]

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if self._phase == WAIT:
            self._phase = IDLE

    # -- what the parser subclasses report -------------------------------------------

    def _count_head(self, size: int, lines: int = 0, *, trailer: bool = False) -> None:
        """Count a piece of the head (or of the trailers) the parser has taken apart;
        refuse once it is too big."""
        self._head_size += size
        self._head_lines += lines
        if self._head_size > self._limits.max_head or self._head_lines > self._limits.max_header_lines:
            if trailer:  # the app is running: no 431 now, just the end of its body
                self._refusal = 431
                log.warning("request trailers too large: connection closed")
                self.transport.close()
            else:
                self._refuse_head()
            raise _Refused()

    def _head_complete(self) -> None:
        self._phase = BODY
        self._arm(self._last_read + (self._limits.idle_timeout or float("inf")))

    def _body_complete(self) -> None:
        if self._phase == BODY:
            answered = self.cycle is not None and self.cycle.response_complete
            self._phase = IDLE if answered else WAIT  # answered before the body ended: next head

    # -- timers and refusals ---------------------------------------------------------

    def _begin_head(self, now: float) -> None:
        self._phase = HEAD
        self._last_read = self._head_began = now
        self._head_bytes = self._head_size = self._head_lines = 0
        self._arm(now + (self._limits.header_timeout or float("inf")))

    def _deadline(self) -> float | None:
        """The earliest of the phase's deadline and the unread response's."""
        deadlines = [d for d in (self._phase_deadline(), self._unread_deadline()) if d is not None]
        return min(deadlines, default=None)

    def _unread_deadline(self) -> float | None:
        if self._write_paused_at is None or self._limits.idle_timeout is None:
            return None
        return self._write_paused_at + self._limits.idle_timeout

    def _phase_deadline(self) -> float | None:
        limits = self._limits
        if self._phase == HEAD and limits.header_timeout is not None:
            return self._head_began + limits.header_timeout
        if self._phase == BODY and limits.idle_timeout is not None:
            if self.flow.read_paused:  # the app is behind, not the client
                return self.loop.time() + limits.idle_timeout
            return self._last_read + limits.idle_timeout
        if self._phase == LINGER:
            return self._head_began + limits.linger
        return None

    def _arm(self, deadline: float) -> None:
        if deadline == float("inf") or deadline >= self._timer_at:
            return  # the pending timer fires first and looks again
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        deadline = self._deadline()
        if deadline is None:
            return
        if self.loop.time() < deadline:
            self._arm(deadline)
        elif deadline == self._unread_deadline():  # the client stopped reading the response
            log.info(
                "response not read: connection closed", extra={"idle_timeout": self._limits.idle_timeout}
            )
            self.transport.abort()  # close() would wait for the client to read what is buffered
        else:
            if self._phase == BODY:
                log.info(
                    "request body idle: connection closed", extra={"idle_timeout": self._limits.idle_timeout}
                )
            self.transport.close()  # a request under way sees the disconnect and keeps what arrived

    def _refuse_head(self) -> None:
        self._refuse(431, f"the request head is over {self._limits.max_head} bytes or 100 header lines")

    def _refuse(self, status: int, detail: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        """Answer with a problem and close, without running the app: a refused request
        never had a head worth parsing, or the server has no room for it."""
        self._refusal = status
        log.warning("request refused", extra={"status": status, "detail": detail})
        body = json.dumps(
            {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": detail}
        ).encode()
        fields = [
            (b"content-type", b"application/problem+json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *headers,
        ]
        line = b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode())
        self.transport.write(line + b"".join(n + b": " + v + b"\r\n" for n, v in fields) + b"\r\n" + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._phase, self._head_began = LINGER, self.loop.time()
        self._arm(self._head_began + self._limits.linger)


class HttpToolsUploadProtocol(_CountsConnections, _ConnectionLimits, HttpToolsProtocol):
    """llhttp reports trailer fields through `on_header` after the headers are complete.

    A large body may be read straight from the socket (`SocketBody`), so this protocol
    counts the body bytes its parser has seen, and starts a fresh parser after a body it
    did not see.

    httptools has no limit of its own on the head: the callbacks count it.
    """

    _trailers: list[tuple[bytes, bytes]] | None = None
    body_bytes_parsed = 0

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._trailers = None
        self.body_bytes_parsed = 0
        self._head_size = self._head_lines = 0  # a pipelined head counts from its own start

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_headers_complete(self) -> None:
        # The head's fields are counted once they are all parsed, before the app starts
        # (not per field: two calls per header of every request); its bytes were already
        # counted as they arrived (`data_received`), so a long head is still cut off early.
        self._count_head(_fields_size(self.headers), len(self.headers))
        super().on_headers_complete()
        self._head_complete()
        self._trailers = _start_trailers(self.scope)  # type: ignore[arg-type]  # uvicorn's TypedDict scope
        self._head_size = self._head_lines = 0  # trailers get a budget of their own
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
        self._body_complete()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._trailers is None:
            super().on_header(name, value)
        else:
            self._count_head(len(name) + len(value) + 4, 1, trailer=True)
            self._trailers.append((name.lower(), value))

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._body_complete()


class H11UploadProtocol(_CountsConnections, _ConnectionLimits, H11Protocol):
    """h11 reports trailers on `EndOfMessage` and encodes interim responses itself.

    h11 refuses an unfinished head over `h11_max_incomplete_event_size` (431); a finished
    one of any size is counted here.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        next_event = self.conn.next_event

        def next_event_with_extensions() -> Any:
            try:
                event = next_event()
            except h11.RemoteProtocolError as error:
                if error.error_status_hint == 431:
                    self._refuse_head()
                raise
            if isinstance(event, h11.Request):
                try:
                    self._count_head(
                        len(event.target) + _fields_size(event.headers),
                        len(event.headers),
                    )
                except _Refused:
                    raise h11.RemoteProtocolError("request head too large", 431) from None
                self._head_complete()
            elif isinstance(event, h11.EndOfMessage):
                if event.headers:
                    self._count_trailers(event.headers)
                self._body_complete()
                if event.headers and self.cycle is not None:
                    trailers = _start_trailers(self.scope)  # type: ignore[arg-type]  # uvicorn's TypedDict scope
                    trailers.extend((name.lower(), value) for name, value in event.headers)
            return event

        # h11 has no hook for trailers: its connection's next_event is the seam.
        self.conn.next_event = next_event_with_extensions  # type: ignore[method-assign]

    def _count_trailers(self, fields: Sequence[tuple[bytes, bytes]]) -> None:
        """Trailers get a budget of their own, as on llhttp: the head's limits again."""
        self._head_size = self._head_lines = 0
        try:
            self._count_head(_fields_size(fields), len(fields), trailer=True)
        except _Refused:
            raise h11.RemoteProtocolError("request trailers too large") from None

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
