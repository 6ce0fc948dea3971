"""The console's JSON API and server-wide event stream, all through the upload core.

    GET    /console/api/sessions          recent and active sessions (?state=&owner=&protocol=)
    GET    /console/api/sessions/{id}     one session: row, record, chunks, history
    DELETE /console/api/sessions/{id}     delete it (as `uploadsrv prune` would)
    GET    /console/api/events            Server-Sent Events: snapshot, then upload, chunk, tick

Every request must pass `ConsoleAccess`; the page itself carries no secret. The operator
(the console token) sees every session; a user of the server's auth sees their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from uploadsrv.auth import Authenticator
from uploadsrv.config import Settings
from uploadsrv.core import UploadService
from uploadsrv.core import errors as e
from uploadsrv.core.caller import Caller
from uploadsrv.operator import describe
from uploadsrv.protocols.chunks import PATH as CHUNKS_PATH
from uploadsrv.protocols.common import (
    IDENTITY,
    Identity,
    error_problem,
    make_caller,
    problem,
    sse_event,
    status_of,
)

from .hub import OPERATOR, TICK_SECONDS, ConsoleHub, SessionView, Viewer

SCAN_LIMIT = 500  #: uploads read from storage per listing (a listing must stay cheap on S3)
LIST_LIMIT = 200  #: rows in a listing, most recently active first
FILTERS = ("state", "owner", "protocol")

Handler = Callable[[Request], Awaitable[Response]]


class ConsoleAccess:
    """Who may use the console, from `Authorization: Bearer ...`: the holder of the console
    token is the operator and sees every session; with the server's auth on, whoever it
    authenticates sees their own sessions."""

    def __init__(self, token: str | None, authenticator: Authenticator | None) -> None:
        if not token and authenticator is None:
            raise ValueError("the console needs a token or the server's auth")
        self._token = token.encode() if token else None
        self._authenticator = authenticator

    def viewer(self, request: Request) -> Viewer | None:
        """Who sends `request`, or None if nobody the console knows."""
        scheme, _, credential = request.headers.get("authorization", "").partition(" ")
        if (
            self._token is not None
            and scheme.lower() == "bearer"
            and hmac.compare_digest(credential.strip().encode(), self._token)
        ):
            return OPERATOR
        if self._authenticator is None:
            return None
        try:
            owner = self._authenticator.authenticate(request.scope["headers"])
        except e.Unauthorized:
            return None
        return Viewer(owner) if owner else None


ViewerHandler = Callable[[Request, Viewer], Awaitable[Response]]


class ConsoleApi:
    def __init__(
        self, service: UploadService, hub: ConsoleHub, access: ConsoleAccess, settings: Settings
    ) -> None:
        self.service = service
        self.hub = hub
        self.access = access
        self.base_path = settings.base_path
        self.auth = settings.auth

    def guard(self, handler: ViewerHandler) -> Handler:
        async def guarded(request: Request) -> Response:
            viewer = self.access.viewer(request)
            if viewer is None:
                return problem(
                    401,
                    "the console needs a token (Authorization: Bearer ...)",
                    headers={"WWW-Authenticate": 'Bearer realm="uploadsrv console"'},
                )
            try:
                response = await handler(request, viewer)
            except e.UploadError as error:
                response = error_problem(error, status_of(error))
            response.headers["Cache-Control"] = "no-store"
            return response

        return guarded

    # -- handlers ----------------------------------------------------------------

    async def sessions(self, request: Request, viewer: Viewer) -> Response:
        filters = {name: request.query_params.get(name) or None for name in FILTERS}
        return JSONResponse({"sessions": await self.listing(viewer, **filters)})

    async def session(self, request: Request, viewer: Viewer) -> Response:
        upload_id = request.path_params["upload_id"]
        if viewer.operator:
            info = await self.service.peek_any(upload_id)
        else:  # the core decides what a user may see
            info = await self.service.peek(upload_id, _caller(request, viewer))
        view = self.hub.view(info)
        await self.hub.fill_chunks(view)
        complete = info.is_complete
        return JSONResponse(
            {
                "session": self.hub.row(view),
                "record": describe(self.service, info),
                "chunks": sorted(view.chunks.items()),
                "history": list(view.history),
                "download_url": self.base_path + info.id if complete else None,
            }
        )

    async def delete(self, request: Request, viewer: Viewer) -> Response:
        caller = None if viewer.operator else _caller(request, viewer)
        await self.service.terminate(request.path_params["upload_id"], caller)
        return Response(status_code=204)

    async def events(self, request: Request, viewer: Viewer) -> Response:
        return StreamingResponse(
            self._stream(viewer),
            media_type="text/event-stream",
            headers={"X-Accel-Buffering": "no"},  # nginx: do not hold events back
        )

    # -- reading -----------------------------------------------------------------

    async def listing(
        self,
        viewer: Viewer,
        *,
        state: str | None = None,
        owner: str | None = None,
        protocol: str | None = None,
    ) -> list[dict[str, object]]:
        """The most recently active sessions: what storage holds (up to SCAN_LIMIT of it)
        and what this process saw happen, deleted ones included."""
        await self._scan()
        views = [
            v for v in self.hub.views() if viewer.sees(v.info.owner) and _matches(v, state, owner, protocol)
        ]
        views.sort(key=_last_activity, reverse=True)
        rows = []
        for view in views[:LIST_LIMIT]:
            with contextlib.suppress(e.UploadError):  # gone meanwhile: the row says what was known
                await self.hub.fill_chunks(view)
            rows.append(self.hub.row(view))
        return rows

    async def _scan(self) -> None:
        """Show the hub what storage holds, up to SCAN_LIMIT uploads."""
        scanned = 0
        async for info in self.service.uploads():
            self.hub.view(info)
            scanned += 1
            if scanned >= SCAN_LIMIT:
                break

    async def _stream(self, viewer: Viewer) -> AsyncIterator[str]:
        """A snapshot, then every change as it happens and the rates every second, until
        the browser leaves or falls behind (then it reconnects for a new snapshot)."""
        async with self.hub.watch(viewer) as queue:
            yield sse_event(
                "snapshot",
                {
                    "sessions": await self.listing(viewer),
                    "throughput": self.hub.throughput(viewer),
                    "paths": {"files": self.base_path, "chunks": CHUNKS_PATH},
                    "auth": self.auth,
                    "viewer": {"owner": viewer.owner, "operator": viewer.operator},
                    **self.hub.tick(viewer),
                },
            )
            loop = asyncio.get_running_loop()
            tick_at = loop.time() + TICK_SECONDS
            while True:
                try:
                    name, data = await asyncio.wait_for(queue.get(), max(0.0, tick_at - loop.time()))
                except TimeoutError:
                    tick_at = loop.time() + TICK_SECONDS
                    yield sse_event("tick", self.hub.tick(viewer))
                    continue
                yield sse_event(name, data)
                if name == "resync":
                    return


def _matches(view: SessionView, state: str | None, owner: str | None, protocol: str | None) -> bool:
    """Whether the session passes the listing's filters (None: any)."""
    return (
        (state is None or view.state == state)
        and (owner is None or view.info.owner == owner)
        and (protocol is None or view.info.protocol == protocol)
    )


def _caller(request: Request, viewer: Viewer) -> Caller:
    """The core's view of a console user: the owner the server's auth found."""
    request.scope[IDENTITY] = Identity(viewer.owner)
    return make_caller(request, "console")


def _last_activity(view: SessionView) -> float:
    return view.recent[-1][0] if view.recent else view.info.updated_at
