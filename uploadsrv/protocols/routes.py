"""The upload URLs, and which protocol answers a request to them.

tus and the IETF draft share the same URLs and the same uploads: a request naming an
interop version (and not tus) goes to the draft, everything else to tus.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from uploadsrv.exchange import note

from .ietf import IetfProtocol, is_draft_request
from .tus import TusProtocol


class UploadEndpoint:
    """A plain ASGI endpoint, so the draft's handler can send 1xx responses on `send`."""

    def __init__(self, tus: TusProtocol, ietf: IetfProtocol) -> None:
        self.tus = tus
        self.ietf = ietf

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        if is_draft_request(request):
            note(protocol="ietf")
            response = await self.ietf.handle(request, send)
        else:
            note(protocol="tus")
            response = await self.tus.handle(request)
        await response(scope, receive, send)


def upload_routes(base_path: str, tus: TusProtocol, ietf: IetfProtocol) -> list[Route]:
    endpoint = UploadEndpoint(tus, ietf)
    return [
        Route(base_path, endpoint, methods=["POST", "PUT", "OPTIONS"]),
        Route(
            base_path + "{upload_id}", endpoint, methods=["HEAD", "GET", "PATCH", "DELETE", "POST", "OPTIONS"]
        ),
    ]
