"""A request body as an async iterator of bytes, straight from ASGI `receive`."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.types import Receive, Scope

from .core.errors import ClientDisconnected
from .exchange import current
from .socket_body import SOCKET_BODY, SocketReader
from .uvicorn_protocols import TRAILERS


class RequestBody:
    """Yields body chunks as they arrive; raises ClientDisconnected if the client goes away.

    Reading `receive` directly (not Starlette's `Request.stream`) keeps the hot path to
    one await per chunk and gives access to trailers.
    """

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self._scope = scope
        self._receive = receive

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected()
            chunk, more = message.get("body", b""), message.get("more_body", False)
            del message
            if chunk:
                yield chunk
            # Not kept by this frame while it waits for the next message: a stalled body
            # would hold its last chunk for as long as it stalls.
            del chunk
            if not more:
                return

    def start_direct(self) -> tuple[list[bytes], SocketReader] | None:
        """The core's `DirectBody`: the rest of a large body straight from the socket,
        when the HTTP server offers it (plain TCP, Content-Length; see `socket_body`)."""
        direct = self._scope.get("extensions", {}).get(SOCKET_BODY)
        return None if direct is None else direct.start()

    def finish_direct(self) -> None:
        received = self._scope["extensions"][SOCKET_BODY].finish()
        exchange = current()  # bytes that bypassed `receive`, which the exchange counts
        if exchange is not None:
            exchange.received += received

    def trailer(self, name: str) -> str | None:
        """A trailer field, available once the body has been read to its end."""
        wanted = name.lower().encode()
        for key, value in self._scope.get("extensions", {}).get(TRAILERS, ()):
            if key == wanted:
                return value.decode("latin-1")
        return None
