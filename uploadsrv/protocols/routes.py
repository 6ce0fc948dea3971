"""The upload URLs, and which protocol answers a request to them.

tus and the IETF draft share the same URLs and the same uploads: a request naming an
interop version (and not tus) goes to the draft, everything else to tus.
"""

from __future__ import annotations

from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from uploadsrv.exchange import note

from .common import UploadRequest
from .ietf import IetfProtocol, is_draft_request
from .tus import TusProtocol


class UploadEndpoint:
    """A plain ASGI endpoint, so the draft's handler can send 1xx responses on `send`."""

    def __init__(self, tus: TusProtocol, ietf: IetfProtocol) -> None:
        self.tus = tus
        self.ietf = ietf

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = UploadRequest(scope, receive, send)
        if is_draft_request(request):
            note(protocol="ietf")
            response = await self.ietf.handle(request, send)
        else:
            note(protocol="tus")
            response = await self.tus.handle(request)
        await response(scope, receive, send)


def upload_routes(base_path: str, tus: TusProtocol, ietf: IetfProtocol) -> tuple[Route, Route]:
    """The collection's route and an upload's, sharing one endpoint."""
    endpoint = UploadEndpoint(tus, ietf)
    return (
        Route(base_path, endpoint, methods=["POST", "PUT", "OPTIONS"]),
        Route(
            base_path + "{upload_id}", endpoint, methods=["HEAD", "GET", "PATCH", "DELETE", "POST", "OPTIONS"]
        ),
    )


class UploadRouter:
    """The upload URLs dispatched as plain ASGI, ahead of Starlette's router.

    Two paths matched as strings instead of every route's regex, and no exception
    middleware (the upload endpoint answers its errors itself; anything it raises is
    Starlette's 500, from the outermost middleware): together a tenth of a small
    upload's CPU. Every other request, and a method the upload routes do not take (405),
    goes to `fallback`: Starlette's exception middleware and router, as before.
    """

    def __init__(self, collection: Route, upload: Route, fallback: ASGIApp) -> None:
        self.base_path = collection.path
        self.endpoint = collection.endpoint
        self.collection_methods = collection.methods or set()
        self.upload_methods = upload.methods or set()
        self.fallback = fallback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = self._match(scope)
        if params is None:
            await self.fallback(scope, receive, send)
            return
        scope["endpoint"] = self.endpoint  # as a matched Route sets them (metrics' route label)
        scope["path_params"] = params
        await self.endpoint(scope, receive, send)

    def _match(self, scope: Scope) -> dict[str, str] | None:
        if scope["type"] != "http" or scope.get("root_path"):  # a root path: Starlette's rules
            return None
        path: str = scope["path"]
        if not path.startswith(self.base_path):
            return None
        upload_id = path[len(self.base_path) :]
        if not upload_id:
            return {} if scope["method"] in self.collection_methods else None
        if "/" in upload_id or scope["method"] not in self.upload_methods:
            return None
        return {"upload_id": upload_id}
