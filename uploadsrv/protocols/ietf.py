"""The IETF "Resumable Uploads for HTTP" draft, interop versions 3 to 9.

iOS 17+ URLSession speaks it natively: it POSTs a whole file with
`Upload-Draft-Interop-Version`, and if a 104 carrying the upload's URL reached it before
the connection broke, it later asks HEAD for the offset and PATCHes the rest, by itself.
One implementation on the upload core; what differs between versions is the small table
`VERSIONS`. Structured fields are parsed and written with `http_sf`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import http_sf
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Send

from uploadsrv.body import RequestBody
from uploadsrv.config import Settings
from uploadsrv.core import UploadInfo, UploadService
from uploadsrv.core import errors as e
from uploadsrv.core.caller import Caller
from uploadsrv.uvicorn_protocols import ABORT, INFORMATIONAL

from .common import (
    PROBLEM_TYPE,
    Links,
    content_length,
    error_headers,
    error_problem,
    make_caller,
    parse_content_digest,
    parse_metadata,
    parse_offset,
    problem,
    status_of,
    with_reply,
)
from .download import download

HEADER = "Upload-Draft-Interop-Version"
PARTIAL_UPLOAD = "application/partial-upload"
IANA = "https://iana.org/assignments/http-problem-types#"


@dataclass(frozen=True)
class Interop:
    """What one interop version does. Versions are echoed in every response."""

    version: int
    #: 3 (draft -01) says `Upload-Incomplete: ?1` where later versions say `Upload-Complete: ?0`.
    incomplete_header: bool
    #: 5+: more 104s while the body streams in, carrying the durable `Upload-Offset`.
    progress: bool
    #: 6+: appends must be `application/partial-upload`.
    partial_upload_type: bool
    #: 6+: the `Upload-Limit` dictionary; 6 names the expiry `expires`, 7+ `max-age`.
    limit_age_key: str | None
    #: 6+: IANA problem types (mismatching-upload-offset, completed-upload, ...).
    problem_types: bool
    #: 7+: every append carries `Upload-Complete`.
    complete_required: bool
    #: 8+: `Upload-Limit` also in the creation 104 and in HEAD responses.
    limit_everywhere: bool
    #: 9: offset retrieval by GET too.
    get_offset: bool


def _versions() -> dict[int, Interop]:
    """Each version as what changed since the one before, like the drafts' change logs."""
    v3 = Interop(3, True, False, False, None, False, False, False, False)
    v4 = replace(v3, version=4, incomplete_header=False)
    v5 = replace(v4, version=5, progress=True)
    v6 = replace(v5, version=6, partial_upload_type=True, limit_age_key="expires", problem_types=True)
    v7 = replace(v6, version=7, limit_age_key="max-age", complete_required=True)
    v8 = replace(v7, version=8, limit_everywhere=True)
    v9 = replace(v8, version=9, get_offset=True)
    return {v.version: v for v in (v3, v4, v5, v6, v7, v8, v9)}


VERSIONS = _versions()

IANA_TYPES = {
    e.OffsetMismatch: "mismatching-upload-offset",
    e.UploadComplete: "completed-upload",
    e.LengthConflict: "inconsistent-upload-length",
}
#: Request headers a browser must be allowed to send, and response headers it must see.
REQUEST_HEADERS = [
    HEADER,
    "Upload-Complete",
    "Upload-Incomplete",
    "Upload-Length",
    "Content-Digest",
    "Repr-Digest",
]
RESPONSE_HEADERS = [HEADER, "Upload-Complete", "Upload-Incomplete", "Upload-Limit"]


def is_draft_request(request: Request) -> bool:
    """A request for this handler: it names an interop version and is not tus."""
    return HEADER.lower() in request.headers and "tus-resumable" not in request.headers


def supported_version(raw: str) -> Interop | None:
    """The interop version a request's `Upload-Draft-Interop-Version` names, if spoken here."""
    return VERSIONS.get(int(raw)) if raw.isascii() and raw.isdigit() and len(raw) < 4 else None


class IetfProtocol:
    def __init__(self, service: UploadService, settings: Settings, links: Links) -> None:
        self.service = service
        self.base_path = settings.base_path
        self.links = links

    async def handle(self, request: Request, send: Send) -> Response:
        """Entry point from the router for any method on the collection or an upload."""
        raw = request.headers[HEADER]
        interop = supported_version(raw)
        if interop is None:
            return problem(
                400, f"unsupported {HEADER} {raw[:10]!r}; supported: {', '.join(map(str, VERSIONS))}"
            )
        upload_id = request.path_params.get("upload_id")
        handler = self._handler(request.method, upload_id is not None, interop)
        if handler is None:
            response = problem(405, f"{request.method} is not part of the resumable upload draft here")
        else:
            exchange = _Exchange(request, send, interop, make_caller(request, "ietf"))
            try:
                response = await handler(exchange)
            except e.UploadError as error:
                response = await self._error(exchange, error)
        response.headers[HEADER] = str(interop.version)
        return response

    def _handler(
        self, method: str, on_upload: bool, interop: Interop
    ) -> Callable[[_Exchange], Awaitable[Response]] | None:
        if not on_upload:
            return {"POST": self.create, "PUT": self.create, "OPTIONS": self.options}.get(method)
        handlers = {"HEAD": self.offset, "PATCH": self.append, "DELETE": self.cancel, "OPTIONS": self.options}
        handlers["GET"] = self.offset if interop.get_offset else self.download
        return handlers.get(method)

    # -- handlers ----------------------------------------------------------------

    async def options(self, x: _Exchange) -> Response:
        headers = {"Accept-Patch": PARTIAL_UPLOAD} if x.interop.partial_upload_type else {}
        limit = self._limit(x.interop, None)
        if limit:
            headers["Upload-Limit"] = limit
        return Response(status_code=204, headers=headers)

    async def create(self, x: _Exchange) -> Response:
        complete = x.upload_complete(required=True)
        length = x.declared_length(complete)
        metadata = parse_metadata(x.request.headers.get("upload-metadata", ""))  # tus-js-client sends it
        info = await self.service.create(length=length, metadata=metadata, caller=x.caller)
        x.location = self.links.upload(x.request, self.base_path + info.id, info)
        first = {"Location": x.location}
        limit = self._limit(x.interop, info) if x.interop.limit_everywhere else None
        if limit:
            first["Upload-Limit"] = limit
        await x.informational(first)  # the upload exists: tell the client where, before the body
        info = await self._append(x, info.id, 0, complete)
        created = Response(status_code=201, headers={"Location": x.location, **self._state(x.interop, info)})
        return with_reply(created, info)

    async def offset(self, x: _Exchange) -> Response:
        info = await self.service.get(x.request.path_params["upload_id"], x.caller)
        headers = self._state(x.interop, info, describe=True)
        return Response(status_code=204, headers={**headers, "Cache-Control": "no-store"})

    async def append(self, x: _Exchange) -> Response:
        if x.interop.partial_upload_type and x.content_type != PARTIAL_UPLOAD:
            return problem(415, f"Content-Type must be {PARTIAL_UPLOAD}")
        complete = x.upload_complete(required=x.interop.complete_required)
        offset = parse_offset(x.request.headers.get("upload-offset"), "Upload-Offset")
        info = await self._append(x, x.request.path_params["upload_id"], offset, complete)
        return with_reply(Response(status_code=204, headers=self._state(x.interop, info)), info)

    async def download(self, x: _Exchange) -> Response:
        info = await self.service.peek(x.request.path_params["upload_id"], x.caller)
        return await download(self.service, info, x.request)

    async def cancel(self, x: _Exchange) -> Response:
        await self.service.terminate(x.request.path_params["upload_id"], x.caller)
        return Response(status_code=204)

    # -- translation -------------------------------------------------------------

    async def _append(self, x: _Exchange, upload_id: str, offset: int, complete: bool) -> UploadInfo:
        headers = x.request.headers
        progress = None
        if x.interop.progress:

            async def progress(durable: int) -> None:
                await x.informational({"Upload-Offset": str(durable)})

        return await self.service.append(
            upload_id,
            offset,
            RequestBody(x.request.scope, x.request.receive),
            caller=x.caller,
            content_length=content_length(x.request),
            length=x.declared_length(complete),
            checksum=parse_content_digest(
                headers.get("content-digest") or _whole_in_one(headers, offset, complete)
            ),
            progress=progress,
            complete=complete,
            replay_finished=True,  # a repeated final request answers the final state
        )

    def _state(self, interop: Interop, info: UploadInfo, *, describe: bool = False) -> dict[str, str]:
        headers = {"Upload-Offset": str(info.offset)}
        if interop.incomplete_header:
            headers["Upload-Incomplete"] = http_sf.ser(not info.is_complete)
        else:
            headers["Upload-Complete"] = http_sf.ser(info.is_complete)
        if describe and interop.limit_age_key and info.length is not None:
            headers["Upload-Length"] = str(info.length)
        if describe and interop.limit_everywhere:
            limit = self._limit(interop, info)
            if limit:
                headers["Upload-Limit"] = limit
        return headers

    def _limit(self, interop: Interop, info: UploadInfo | None) -> str | None:
        """`Upload-Limit`, a structured dictionary (6+); the age is what is left for `info`."""
        if interop.limit_age_key is None:
            return None
        limit: dict[str, Any] = {"max-size": self.service.max_size}  # http_sf's item union
        if self.service.expiry is not None:
            expires = self.service.expires_at(info) if info is not None else None
            age = (
                self.service.expiry
                if info is None
                else None
                if expires is None
                else expires - info.updated_at
            )
            if age is not None:
                limit[interop.limit_age_key] = int(age)
        return http_sf.ser(limit)

    async def _error(self, x: _Exchange, error: e.UploadError) -> Response:
        if x.informed and error.resumable:
            await x.abort()  # the client knows where its upload is: let it resume, not give up
            return Response(status_code=503)  # never sent: the connection is gone
        if isinstance(error, e.Refused):  # the application's own answer
            return error_problem(error, error.status, {"Location": x.location} if x.location else None)
        status = status_of(error)  # a failed digest: 400, the draft has no status of its own
        headers = error_headers(error)
        if isinstance(error, e.OffsetMismatch):
            headers["Upload-Complete"] = "?0"
        kind = IANA_TYPES.get(type(error))
        type_ = IANA + kind if kind and x.interop.problem_types else PROBLEM_TYPE + error.slug
        if x.location:
            headers["Location"] = x.location
        return problem(status, error.detail, type_=type_, headers=headers, **error.extra)


class _Exchange:
    """One request of the draft, and what this server already told its client."""

    def __init__(self, request: Request, send: Send, interop: Interop, caller: Caller) -> None:
        self.request = request
        self.caller = caller
        self._send = send
        self.interop = interop
        self.location: str | None = None
        self.informed = False
        extensions = request.scope.get("extensions", {})
        self._can_inform = INFORMATIONAL in extensions
        self._can_abort = ABORT in extensions

    @property
    def content_type(self) -> str:
        return self.request.headers.get("content-type", "").split(";")[0].strip().lower()

    def upload_complete(self, *, required: bool) -> bool:
        """`Upload-Complete` (or version 3's inverted `Upload-Incomplete`), a structured boolean."""
        name = "upload-incomplete" if self.interop.incomplete_header else "upload-complete"
        raw = self.request.headers.get(name)
        if raw is None:
            if required:
                raise e.InvalidRequest(f"{name.title()} is required")
            return False
        try:
            parsed = http_sf.parse(raw.encode(), tltype="item")
        except (http_sf.StructuredFieldError, ValueError):
            parsed = None
        value = parsed[0] if isinstance(parsed, tuple) else None
        if not isinstance(value, bool):
            raise e.InvalidRequest(f"{name.title()} must be ?0 or ?1")
        return not value if self.interop.incomplete_header else value

    def declared_length(self, complete: bool) -> int | None:
        """The upload's total length, from `Upload-Length` or a final request's body."""
        headers = self.request.headers
        if "upload-length" in headers:
            return parse_offset(headers["upload-length"], "Upload-Length")
        if complete and "upload-offset" not in headers:  # creation with all the data
            return content_length(self.request)
        return None

    async def informational(self, headers: dict[str, str]) -> None:
        if not self._can_inform:
            return
        fields = [(HEADER.lower().encode(), str(self.interop.version).encode())]
        fields += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        await self._send({"type": INFORMATIONAL, "status": 104, "headers": fields})
        self.informed = True

    async def abort(self) -> None:
        if self._can_abort:
            await self._send({"type": ABORT})


def _whole_in_one(headers: Headers, offset: int, complete: bool) -> str | None:
    """`Repr-Digest` covers the whole upload; it can be checked when one request carries it all."""
    return headers.get("repr-digest") if offset == 0 and complete else None
