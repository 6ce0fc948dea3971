"""Prometheus metrics: upload lifecycle counters from core events, request counts and timings."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from uploadsrv.core import UploadEvent, UploadInfo


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.events = Counter(
            "uploadsrv_upload_events",
            "Upload lifecycle events",
            ["event", "protocol"],
            registry=self.registry,
        )
        self.requests = Histogram(
            "uploadsrv_request_seconds",
            "HTTP request duration",
            ["method", "status"],
            buckets=(0.005, 0.02, 0.1, 0.5, 2, 10, 60, 600),
            registry=self.registry,
        )

    def on_event(self, event: UploadEvent, info: UploadInfo) -> None:
        self.events.labels(event, info.protocol).inc()

    async def endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    def middleware(self, app: ASGIApp) -> ASGIApp:
        async def timed(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            started = time.perf_counter()
            status = 500

            async def send_with_status(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            try:
                await app(scope, receive, send_with_status)
            finally:
                self.requests.labels(scope["method"], str(status)).observe(time.perf_counter() - started)

        return timed
