"""The web console (`--console`): a page served from this package, and its API.

The page (static HTML, CSS and JavaScript in `static/`, no build step) is public and holds
no secret; the API under /console/api/ needs the console token, which the user types in
or passes once in the URL fragment (`/console/#token=...`, never sent to a server).
"""

from __future__ import annotations

import logging
import secrets
from importlib.resources import files

from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from uploadsrv.auth import Authenticator
from uploadsrv.config import Settings
from uploadsrv.core import UploadService
from uploadsrv.core.chunks import ChunkSessions

from .api import ConsoleAccess, ConsoleApi
from .hub import ConsoleHub

log = logging.getLogger("uploadsrv.console")

PATH = "/console/"
STATIC = files("uploadsrv.console") / "static"

#: The page loads only its own files and talks only to this server.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def ensure_token(settings: Settings) -> bool:
    """Give the console a random token if it is on, has none and the server's auth is off
    (with auth on, its users sign in with their own credentials); True if one was made."""
    if not settings.console or settings.console_token or settings.auth != "none":
        return False
    settings.console_token = secrets.token_urlsafe(24)
    return True


def console_url(settings: Settings) -> str:
    """Where to open the console, token included (in the fragment, which no server sees)."""
    scheme = "https" if settings.tls_cert else "http"
    return f"{scheme}://{settings.host}:{settings.port}{PATH}#token={settings.console_token}"


def console_routes(
    service: UploadService,
    sessions: ChunkSessions,
    settings: Settings,
    authenticator: Authenticator | None,
) -> list[BaseRoute]:
    if ensure_token(settings):
        log.warning("console token generated; open %s", console_url(settings))
    access = ConsoleAccess(settings.console_token, authenticator)
    api = ConsoleApi(service, ConsoleHub(service, sessions), access, settings)
    guard = api.guard
    return [
        Route(PATH.rstrip("/"), _to_page),
        Route(PATH, _page),
        Mount(PATH + "static", app=_with_page_headers(StaticFiles(directory=str(STATIC)))),
        Route(PATH + "api/sessions", guard(api.sessions), methods=["GET"]),
        Route(PATH + "api/sessions/{upload_id}", guard(api.session), methods=["GET"]),
        Route(PATH + "api/sessions/{upload_id}", guard(api.delete), methods=["DELETE"]),
        Route(PATH + "api/events", guard(api.events), methods=["GET"]),
    ]


async def _to_page(request: Request) -> Response:
    return RedirectResponse(PATH, status_code=308)


async def _page(request: Request) -> Response:
    return FileResponse(str(STATIC / "index.html"), headers=PAGE_HEADERS, media_type="text/html")


def _with_page_headers(app: ASGIApp) -> ASGIApp:
    async def with_headers(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", []),
                    *((k.lower().encode(), v.encode()) for k, v in PAGE_HEADERS.items()),
                ]
            await send(message)

        await app(scope, receive, send_with_headers)

    return with_headers
