"""The Starlette application: storage, core, protocols, CORS, metrics and background expiry."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import auth, memory, metrics
from .backend import open_storage
from .config import Settings
from .coordination import open_coordinator
from .core import UploadService
from .core.capabilities import Capabilities
from .core.chunks import ChunkSessions
from .core.coordination import Coordinator
from .core.outbox import running
from .core.quotas import LocalCounters, OwnerQuotas
from .core.storage import Storage
from .exchange import REQUEST_ID_HEADER as REQUEST_ID
from .exchange import ExchangeMiddleware, Observer, route_templates
from .hook_delivery import open_hooks
from .logs import AccessLog
from .protocols import chunks, ietf, openapi, tus
from .protocols.common import Links, problem
from .protocols.routes import UploadRouter, upload_routes
from .readiness import Readiness

log = logging.getLogger("uploadsrv")


def create_app(settings: Settings | None = None, storage: Storage | None = None) -> Starlette:
    """The server for `settings`, on the backend they name (or on `storage`, for tests)."""
    settings = settings or Settings.from_env()
    memory.tune()
    clock = time.time  # one clock for the core and the backend
    storage = storage or open_storage(settings, clock)
    coordinator = open_coordinator(settings.redis_url)
    authenticator = auth.authenticator(settings)
    signer = auth.url_signer(settings)
    quotas = _owner_quotas(settings, coordinator)
    capabilities = Capabilities.of(storage)  # what the backend can do, recorded once
    hooks = open_hooks(settings, capabilities)
    service = UploadService(
        storage,
        **settings.core_limits(),
        coordinator=coordinator,
        enforce_owners=authenticator is not None,
        quotas=quotas,
        hooks=hooks,
        clock=clock,
        capabilities=capabilities,
    )
    on_start, observers = _observers(settings, service)
    links = Links(trust_proxy=settings.trust_proxy, signer=signer, lifetime=settings.expiry)
    sessions = None
    if capabilities.chunks is not None:  # else: tus and the draft only, no /chunks/
        sessions = ChunkSessions(service, chunk_size=settings.chunk_size)
    readiness = Readiness({"storage": storage.check})
    if coordinator is not None:
        readiness.checks["redis"] = coordinator.check
    uploads = upload_routes(
        settings.base_path,
        tus.TusProtocol(service, settings, links),
        ietf.IetfProtocol(service, settings, links),
    )
    routes: list[BaseRoute] = [
        *uploads,
        *_chunk_routes(sessions, settings, links),
        Route("/healthz", _health),
        Route("/readyz", readiness.endpoint),
    ]
    if settings.metrics:
        routes.append(Route(settings.metrics_path, metrics.endpoint(settings.metrics_token)))
    if settings.console and sessions is not None:  # the console shows chunk sessions too
        routes += _console_routes(service, sessions, settings, authenticator)
    app = _Server(
        uploads=uploads,
        routes=routes,
        middleware=[
            Middleware(
                ExchangeMiddleware, templates=route_templates(routes), on_start=on_start, observers=observers
            ),
            _cors(settings),
            # inside CORS, so that a 401 still carries the CORS headers a browser needs
            *_auth_middleware(settings, authenticator, signer, quotas),
        ],
        lifespan=_lifespan(service, settings, authenticator),
        exception_handlers={Exception: _internal_error, HTTPException: _http_error},
    )
    app.state.service = service
    return app


class _Server(Starlette):
    """Starlette, with the upload URLs dispatched ahead of its router (`UploadRouter`),
    inside the same middleware (errors, request ids, metrics and logs, CORS, auth)."""

    def __init__(self, *, uploads: tuple[Route, Route], **options: Any) -> None:
        self._uploads = uploads
        super().__init__(**options)

    def build_middleware_stack(self) -> ASGIApp:
        """Starlette's own stack, with `UploadRouter` in front of its exception middleware."""
        handlers = dict(self.exception_handlers)
        on_error = handlers.pop(Exception, None) or handlers.pop(500, None)
        inner = ExceptionMiddleware(self.router, handlers=handlers, debug=self.debug)
        app: ASGIApp = UploadRouter(*self._uploads, fallback=inner)
        outer = [Middleware(ServerErrorMiddleware, handler=on_error, debug=self.debug), *self.user_middleware]
        for cls, args, kwargs in reversed(outer):
            app = cls(app, *args, **kwargs)
        return app


def _owner_quotas(settings: Settings, coordinator: Coordinator | None) -> OwnerQuotas | None:
    """Per-owner limits, counted in Redis when instances share one, else in this process."""
    if settings.max_uploads_per_owner is None and settings.max_requests_per_owner is None:
        return None
    return OwnerQuotas(
        coordinator.counters if coordinator is not None else LocalCounters(),
        max_uploads=settings.max_uploads_per_owner,
        max_requests=settings.max_requests_per_owner,
    )


def _observers(settings: Settings, service: UploadService) -> tuple[list[Observer], list[Observer]]:
    """Who watches each exchange as it starts and once it ends: the access log, and metrics
    (which also follow the core's events, its locks and the hooks) when they are on."""
    on_start: list[Observer] = []
    observers: list[Observer] = [AccessLog(every_request=settings.access_log)]
    if settings.metrics:
        on_start.append(metrics.exchange_started)
        metrics.instrument(service.storage)
        service.subscribe(metrics.on_event)
        service.locks.subscribe(metrics.on_lock)
        observers.append(metrics.observe_exchange)
        if service.hooks is not None:
            metrics.watch_hooks(service.hooks)
    return on_start, observers


def _chunk_routes(sessions: ChunkSessions | None, settings: Settings, links: Links) -> list[BaseRoute]:
    """The chunk API and its description, where the backend stores chunk sessions."""
    if sessions is None:
        return []
    return [
        *chunks.ChunkProtocol(sessions, settings, links).routes(),
        Route("/openapi.json", openapi.endpoint),
    ]


class _Cors(CORSMiddleware):
    """Starlette's CORS, with a lean path for a request without `Origin` (every client
    but a browser's cross-origin one): nothing to allow, only `Vary: Origin` to add, as
    Starlette does, without its header objects (a twentieth of a small upload's calls)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, _ in scope["headers"]:
                if name == b"origin":
                    break
            else:
                await self.app(scope, receive, functools.partial(_vary_on_origin, send=send))
                return
        await super().__call__(scope, receive, send)


async def _vary_on_origin(message: Message, send: Send) -> None:
    """A response start with `Origin` added to its `Vary` (kept as one header)."""
    if message["type"] == "http.response.start":
        headers = list(message.get("headers", ()))
        vary = [value for name, value in headers if name == b"vary"]
        if vary:
            headers = [(name, value) for name, value in headers if name != b"vary"]
        headers.append((b"vary", b", ".join([*vary, b"Origin"])))
        message["headers"] = headers
    await send(message)


def _cors(settings: Settings) -> Middleware:
    return Middleware(
        _Cors,
        allow_origins=settings.cors_origins,
        allow_methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
        allow_headers=[
            *tus.REQUEST_HEADERS,
            *ietf.REQUEST_HEADERS,
            *chunks.REQUEST_HEADERS,
            "Authorization",
            REQUEST_ID,
        ],
        expose_headers=[
            *tus.RESPONSE_HEADERS,
            *ietf.RESPONSE_HEADERS,
            "WWW-Authenticate",
            "Retry-After",
            REQUEST_ID,
        ],
        max_age=86400,
    )


def _auth_middleware(
    settings: Settings,
    authenticator: auth.Authenticator | None,
    signer: auth.UrlSigner | None,
    quotas: OwnerQuotas | None,
) -> list[Middleware]:
    """Authentication of the upload and chunk URLs, when it is on."""
    if authenticator is None or signer is None:
        return []
    return [
        Middleware(
            auth.AuthMiddleware,
            authenticator=authenticator,
            signer=signer,
            prefixes=(settings.base_path, chunks.PATH),
            quotas=quotas,
        )
    ]


def _lifespan(
    service: UploadService, settings: Settings, authenticator: auth.Authenticator | None
) -> Callable[[Starlette], AbstractAsyncContextManager[None]]:
    """Start-up (storage check, Redis, owners' counts, the expiry reaper, the hook sender)
    and shutdown (appends cancelled at shutdown commit first, then the storage closes)."""
    storage, coordinator, hooks = service.storage, service.coordinator, service.hooks

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await storage.check()
        if coordinator is not None:
            await coordinator.start()
        if service.quotas is not None:
            await service.quotas.count_existing(service.uploads())
        if isinstance(authenticator, auth.TokenFileAuth):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, authenticator.reload)
        reaper = asyncio.create_task(_expire_periodically(service, settings.expiry_interval))
        log.info(
            "serving",
            extra={
                "storage": repr(storage),
                "coordinator": repr(coordinator),
                "base_path": settings.base_path,
            },
        )
        try:
            async with contextlib.AsyncExitStack() as stack:
                if hooks is not None:
                    stack.push_async_callback(hooks.close)
                    if hooks.sender is not None:
                        await stack.enter_async_context(running(hooks.sender))
                yield
        finally:
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
            with contextlib.suppress(TimeoutError):  # appends ended at shutdown commit first
                async with asyncio.timeout(settings.lock_timeout):
                    await service.locks.idle()
            if coordinator is not None:
                await coordinator.close()
            await storage.close()
            if settings.metrics:  # a stopped worker's counts stay in the shared files
                metrics.TALLY.flush()

    return lifespan


async def _health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


def _console_routes(
    service: UploadService,
    sessions: ChunkSessions,
    settings: Settings,
    authenticator: auth.Authenticator | None,
) -> list[BaseRoute]:
    from .console import console_routes  # loaded only with --console

    return console_routes(service, sessions, settings, authenticator)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return problem(exc.status_code, exc.detail, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    return problem(500, "internal server error; the upload stays resumable from its last offset")


async def _expire_periodically(service: UploadService, interval: float | None) -> None:
    if interval is None or service.expiry is None:
        return
    while True:
        await asyncio.sleep(interval)
        try:
            removed = await service.expire()
        except Exception:
            log.exception("expiry pass failed")
        else:
            if removed:
                log.info("expired uploads removed", extra={"count": len(removed)})
