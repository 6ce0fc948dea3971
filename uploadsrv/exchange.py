"""One HTTP request and its response as metrics and logs see them.

`ExchangeMiddleware` wraps the whole application once: it gives each request an id (the
client's `X-Request-Id`, or a new one), echoes it in the response, counts body bytes both
ways, notes the status, the problem type of an error and the route's template, and hands
the `Exchange` to its observers when it starts and ends (metrics, the access log). Protocol handlers add
what only they know (which protocol answered, the upload, its owner) with `note`, through
a context variable, so no handler signature changes for it.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass

from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .uvicorn_protocols import INFORMATIONAL

REQUEST_ID_HEADER = "X-Request-Id"
REQUEST_ID = REQUEST_ID_HEADER.lower().encode()
#: A client's request id is used as it is when it looks like one; anything else is replaced.
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:/+=-]{1,128}")
_PROBLEM = b"application/problem+json"
_ids = random.Random()
os.register_at_fork(after_in_child=_ids.seed)  # a forked worker draws its own ids
_PROBLEM_PREFIXES = ("urn:uploadsrv:problem:", "https://iana.org/assignments/http-problem-types#")


@dataclass(slots=True)
class Exchange:
    """What happened to one request; `status` 0 means no response went out (dropped)."""

    method: str
    path: str
    request_id: str
    started: float
    route: str = "other"
    protocol: str = "other"
    upload_id: str | None = None
    owner: str | None = None
    status: int = 0
    problem: str | None = None
    received: int = 0
    sent: int = 0
    informational: int = 0
    seconds: float = 0.0


Observer = Callable[[Exchange], None]

_current: ContextVar[Exchange | None] = ContextVar("uploadsrv_exchange", default=None)


def current() -> Exchange | None:
    """The exchange being handled in this task, if any (for log lines)."""
    return _current.get()


def note(*, protocol: str | None = None, upload_id: str | None = None, owner: str | None = None) -> None:
    """Record what the protocol layer knows about the current request."""
    exchange = _current.get()
    if exchange is None:
        return
    if protocol is not None:
        exchange.protocol = protocol
    if upload_id is not None:
        exchange.upload_id = upload_id
    if owner is not None:
        exchange.owner = owner


def route_templates(routes: Iterable[BaseRoute]) -> dict[tuple[object, tuple[str, ...]], str]:
    """Each route's path template, keyed as a matched request's scope shows it: the
    endpoint and the names of its path parameters (several routes share an endpoint)."""
    return {
        (route.endpoint, tuple(route.param_convertors)): route.path
        for route in routes
        if isinstance(route, Route)
    }


class ExchangeMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        templates: dict[tuple[object, tuple[str, ...]], str],
        on_start: list[Observer],
        observers: list[Observer],
    ) -> None:
        self.app = app
        self.templates = templates
        self.on_start = on_start
        self.observers = observers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope["headers"])
        exchange = Exchange(scope["method"], scope["path"], request_id.decode(), time.perf_counter())
        token = _current.set(exchange)
        for observer in self.on_start:
            observer(exchange)
        problem_body = False

        async def counting_receive() -> Message:
            message = await receive()
            exchange.received += len(message.get("body", b""))
            return message

        async def observing_send(message: Message) -> None:
            nonlocal problem_body
            kind = message["type"]
            if kind == "http.response.body":
                body = message.get("body", b"")
                exchange.sent += len(body)
                if problem_body:
                    exchange.problem = _problem_type(body)
                    problem_body = False
            elif kind == "http.response.start":
                exchange.status = status = message["status"]
                headers = message.get("headers", [])
                if status >= 400 or (status == 201 and exchange.upload_id is None):
                    problem_body = _inspect_headers(exchange, headers)
                message["headers"] = [*headers, (REQUEST_ID, request_id)]
            elif kind == INFORMATIONAL:
                exchange.informational += 1
                if exchange.upload_id is None:
                    _inspect_headers(exchange, message.get("headers", []))
            await send(message)

        try:
            await self.app(scope, counting_receive, observing_send)
        except Exception:
            if exchange.status == 0:  # the server's error handler answers 500 outside this
                exchange.status, exchange.problem = 500, "internal-error"
            raise
        finally:
            _current.reset(token)
            exchange.seconds = time.perf_counter() - exchange.started
            exchange.route = self.templates.get(
                (scope.get("endpoint"), tuple(scope.get("path_params", ()))), "other"
            )
            if exchange.upload_id is None:
                params = scope.get("path_params", {})
                exchange.upload_id = params.get("upload_id") or params.get("session_id")
            for observer in self.observers:
                observer(exchange)


def _request_id(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    for name, value in headers:
        if name == REQUEST_ID:
            return value if _REQUEST_ID.fullmatch(value) else _new_request_id()
    return _new_request_id()


def _new_request_id() -> bytes:
    """32 random hex digits. Not a secret (it is echoed to the client and logged), so
    the process's PRNG, seeded from the OS in each worker: no system call per request."""
    return b"%032x" % _ids.getrandbits(128)


def _inspect_headers(exchange: Exchange, headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Take the new upload's id from `Location`; True if the body is a problem document."""
    problem = False
    for name, value in headers:
        if name == b"location" and exchange.upload_id is None:
            exchange.upload_id = value.decode("latin-1").rstrip("/").rsplit("/", 1)[-1][:64]
        elif name == b"content-type":
            problem = value.startswith(_PROBLEM)
    return problem


def _problem_type(body: bytes) -> str | None:
    """The short name of a problem document's `type`, for labels and log fields."""
    try:
        kind = json.loads(body).get("type")
    except (ValueError, AttributeError):
        return None
    if not isinstance(kind, str):
        return None
    for prefix in _PROBLEM_PREFIXES:
        if kind.startswith(prefix):
            return kind[len(prefix) :]
    return kind
