"""uvicorn HTTP/1.1 protocols with an ASGI extension for request trailers.

ASGI has no way to hand a request's trailers to the app, and tus `checksum-trailer`
sends the checksum there. These subclasses collect trailer fields into
``scope["extensions"]["uploadsrv.trailers"]`` (a list of ``(name, value)`` byte pairs,
filled by the time the last body message is received). `uploadsrv serve` selects them.
"""

from __future__ import annotations

from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

TRAILERS = "uploadsrv.trailers"


def _start_trailers(scope: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    trailers: list[tuple[bytes, bytes]] = []
    scope.setdefault("extensions", {})[TRAILERS] = trailers
    return trailers


class HttpToolsTrailersProtocol(HttpToolsProtocol):
    """llhttp reports trailer fields through `on_header` after the headers are complete."""

    _trailers: list[tuple[bytes, bytes]] | None = None

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._trailers = None

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._trailers = _start_trailers(self.scope)  # type: ignore[arg-type]

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._trailers is None:
            super().on_header(name, value)
        else:
            self._trailers.append((name.lower(), value))


class H11TrailersProtocol(H11Protocol):
    """h11 reports trailers on `EndOfMessage`; catch them as events are pulled."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        next_event = self.conn.next_event

        def next_event_with_trailers() -> Any:
            event = next_event()
            if isinstance(event, h11.EndOfMessage) and event.headers and self.cycle is not None:
                trailers = _start_trailers(self.scope)  # type: ignore[arg-type]
                trailers.extend((name.lower(), value) for name, value in event.headers)
            return event

        self.conn.next_event = next_event_with_trailers  # type: ignore[method-assign]
