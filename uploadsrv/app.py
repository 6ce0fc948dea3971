"""The Starlette application: storage, core, protocols, CORS, metrics and background expiry."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .backend import open_storage
from .config import Settings
from .coordination import open_coordinator
from .core import UploadService
from .core.chunks import ChunkSessions
from .metrics import Metrics
from .protocols import chunks, ietf, openapi, tus
from .protocols.common import problem
from .protocols.routes import upload_routes

log = logging.getLogger("uploadsrv")


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings.from_env()
    storage = open_storage(settings)
    coordinator = open_coordinator(settings.redis_url)
    service = UploadService(
        storage,
        max_size=settings.max_size,
        expiry=settings.expiry,
        lock_timeout=settings.lock_timeout,
        coordinator=coordinator,
    )
    metrics = Metrics()
    service.subscribe(metrics.on_event)
    tus_protocol = tus.TusProtocol(service, settings)
    ietf_protocol = ietf.IetfProtocol(service, settings)
    chunk_protocol = chunks.ChunkProtocol(ChunkSessions(service, chunk_size=settings.chunk_size), settings)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await storage.check()
        if coordinator is not None:
            await coordinator.start()
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
            yield
        finally:
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
            if coordinator is not None:
                await coordinator.close()
            await storage.close()

    app = Starlette(
        routes=[
            *upload_routes(settings.base_path, tus_protocol, ietf_protocol),
            *chunk_protocol.routes(),
            Route("/openapi.json", openapi.endpoint),
            Route("/healthz", health),
            Route("/metrics", metrics.endpoint),
        ],
        middleware=[
            Middleware(metrics.middleware),
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_origins,
                allow_methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
                allow_headers=tus.REQUEST_HEADERS + ietf.REQUEST_HEADERS + chunks.REQUEST_HEADERS,
                expose_headers=tus.RESPONSE_HEADERS + ietf.RESPONSE_HEADERS,
                max_age=86400,
            ),
        ],
        lifespan=lifespan,
        exception_handlers={Exception: _internal_error, HTTPException: _http_error},
    )
    app.state.service = service
    return app


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
