"""tus 1.0.0 with creation, creation-with-upload, creation-defer-length, termination,
expiration, checksum, checksum-trailer and concatenation.

Each handler reads headers, calls the upload core once, and writes headers back. Core
errors get the statuses of `common.ERROR_STATUS`, with tus's own in `STATUS` (460).
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response

from uploadsrv.body import RequestBody
from uploadsrv.config import Settings
from uploadsrv.core import ALGORITHMS, Checksum, UploadInfo, UploadService, is_upload_id
from uploadsrv.core import errors as e
from uploadsrv.core.caller import Caller

from .common import (
    ERROR_STATUS,
    Links,
    content_length,
    error_headers,
    error_problem,
    http_date,
    make_caller,
    parse_base64,
    parse_metadata,
    parse_offset,
    problem,
    status_of,
    with_reply,
)
from .download import download

VERSION = "1.0.0"
OFFSET_STREAM = "application/offset+octet-stream"

#: tus answers a failed checksum with its own 460.
STATUS = {**ERROR_STATUS, e.ChecksumMismatch: 460}

#: Request headers a browser must be allowed to send, and response headers it must see.
REQUEST_HEADERS = [
    "Tus-Resumable",
    "Upload-Length",
    "Upload-Defer-Length",
    "Upload-Offset",
    "Upload-Metadata",
    "Upload-Checksum",
    "Upload-Concat",
    "X-HTTP-Method-Override",
    "X-Requested-With",
    "Content-Type",
]
RESPONSE_HEADERS = [
    "Location",
    "Upload-Offset",
    "Upload-Length",
    "Upload-Defer-Length",
    "Upload-Metadata",
    "Upload-Expires",
    "Upload-Concat",
    "Tus-Resumable",
    "Tus-Version",
    "Tus-Extension",
    "Tus-Max-Size",
    "Tus-Checksum-Algorithm",
]

Handler = Callable[[Request, Caller], Awaitable[Response]]


class TusProtocol:
    def __init__(self, service: UploadService, settings: Settings, links: Links) -> None:
        self.service = service
        self.base_path = settings.base_path
        self.links = links
        extensions = [
            "creation",
            "creation-with-upload",
            "creation-defer-length",
            "termination",
            "expiration",
            "checksum",
            "checksum-trailer",
        ]
        if service.capabilities.concatenation is not None:
            extensions.append("concatenation")
        self.extensions = ",".join(extensions)

    # -- dispatch ----------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        """Entry point from the router for any method on the collection or an upload."""
        method = request.method
        if method == "POST" and "x-http-method-override" in request.headers:
            method = request.headers["x-http-method-override"].upper()
        upload_id = request.path_params.get("upload_id")
        handler = self._handler(method, upload_id is not None)
        if handler is None:
            return problem(405, f"{method} is not allowed here", headers=self._tus_headers())
        if method not in ("OPTIONS", "GET") and request.headers.get("tus-resumable") != VERSION:
            return problem(
                412,
                f"Tus-Resumable must be {VERSION}",
                headers={"Tus-Version": VERSION, **self._tus_headers()},
            )
        try:
            response = await handler(request, make_caller(request, "tus"))
        except e.UploadError as error:
            response = self._error(error)
        _set_tus_headers(response)
        return response

    def _handler(self, method: str, on_upload: bool) -> Handler | None:
        if method == "OPTIONS":
            return self.options
        if not on_upload:
            return self.create if method == "POST" else None
        return {"HEAD": self.head, "GET": self.get, "PATCH": self.patch, "DELETE": self.delete}.get(method)

    def _error(self, error: e.UploadError, headers: dict[str, str] | None = None) -> Response:
        return error_problem(error, status_of(error, STATUS), {**(headers or {}), **error_headers(error)})

    def _tus_headers(self) -> dict[str, str]:
        return {"Tus-Resumable": VERSION, "Cache-Control": "no-store"}

    # -- handlers ----------------------------------------------------------------

    async def options(self, request: Request, caller: Caller) -> Response:
        return Response(
            status_code=204,
            headers={
                "Tus-Version": VERSION,
                "Tus-Extension": self.extensions,
                "Tus-Max-Size": str(self.service.max_size),
                "Tus-Checksum-Algorithm": ",".join(ALGORITHMS),
            },
        )

    async def create(self, request: Request, caller: Caller) -> Response:
        headers = request.headers
        metadata = parse_metadata(headers.get("upload-metadata", ""))
        concat = headers.get("upload-concat")
        if concat is not None and concat.startswith("final"):
            part_ids = self._parse_final(concat)
            info = await self.service.concatenate(part_ids, metadata=metadata, caller=caller)
            created = Response(
                status_code=201, headers={"Location": self._url(request, info), **self._state(info)}
            )
            return with_reply(created, info)
        if concat not in (None, "partial"):
            raise e.InvalidRequest("Upload-Concat must be 'partial' or 'final;<urls>'")
        if headers.get("upload-defer-length") is not None:
            if headers["upload-defer-length"] != "1" or "upload-length" in headers:
                raise e.InvalidRequest("Upload-Defer-Length must be 1 and excludes Upload-Length")
            length = None
        else:
            length = parse_offset(headers.get("upload-length"), "Upload-Length")
        info = await self.service.create(
            length=length, metadata=metadata, caller=caller, partial=concat == "partial"
        )
        location = {"Location": self._url(request, info)}
        if _has_body(request):
            if _content_type(request) != OFFSET_STREAM:
                raise e.InvalidRequest(f"a body sent with creation must be {OFFSET_STREAM}")
            try:
                info = await self._append(request, caller, info.id, 0)
            except e.UploadError as error:
                # The upload exists: tell the client where, so it can resume.
                return self._error(error, location)
        return with_reply(Response(status_code=201, headers={**location, **self._state(info)}), info)

    async def head(self, request: Request, caller: Caller) -> Response:
        info = await self.service.get(request.path_params["upload_id"], caller)
        return Response(status_code=200, headers=self._state(info, describe=True))

    async def patch(self, request: Request, caller: Caller) -> Response:
        if _content_type(request) != OFFSET_STREAM:
            return problem(415, f"Content-Type must be {OFFSET_STREAM}")
        offset = parse_offset(request.headers.get("upload-offset"), "Upload-Offset")
        info = await self._append(request, caller, request.path_params["upload_id"], offset)
        return with_reply(Response(status_code=204, headers=self._state(info)), info)

    async def delete(self, request: Request, caller: Caller) -> Response:
        await self.service.terminate(request.path_params["upload_id"], caller)
        return Response(status_code=204)

    async def get(self, request: Request, caller: Caller) -> Response:
        info = await self.service.peek(request.path_params["upload_id"], caller)
        return await download(self.service, info, request)

    # -- translation -------------------------------------------------------------

    async def _append(self, request: Request, caller: Caller, upload_id: str, offset: int) -> UploadInfo:
        headers = request.headers
        body = RequestBody(request.scope, request.receive)
        length_header = headers.get("upload-length")
        trailer = "upload-checksum" in headers.get("trailer", "").lower()
        return await self.service.append(
            upload_id,
            offset,
            body,
            caller=caller,
            content_length=content_length(request),
            length=None if length_header is None else parse_offset(length_header, "Upload-Length"),
            checksum=parse_checksum(headers["upload-checksum"]) if "upload-checksum" in headers else None,
            trailer_checksum=(lambda: _trailer_checksum(body)) if trailer else None,
        )

    def _state(self, info: UploadInfo, *, describe: bool = False) -> dict[str, str]:
        """Upload-* headers for `info`; `describe` adds what only HEAD reports."""
        headers = {"Upload-Offset": str(info.offset)}
        expires = self.service.expires_at(info)
        if expires is not None:
            headers["Upload-Expires"] = http_date(expires)
        if not describe:
            return headers
        if info.length is None:
            headers["Upload-Defer-Length"] = "1"
        else:
            headers["Upload-Length"] = str(info.length)
        if info.metadata:
            headers["Upload-Metadata"] = format_metadata(info.metadata)
        if info.partial:
            headers["Upload-Concat"] = "partial"
        elif info.parts is not None:
            parts = (self.base_path + part + self.links.signature(info, part) for part in info.parts)
            headers["Upload-Concat"] = "final;" + " ".join(parts)
        return headers

    def _url(self, request: Request, info: UploadInfo) -> str:
        return self.links.upload(request, self.base_path + info.id, info)

    def _parse_final(self, header: str) -> list[str]:
        kind, _, urls = header.partition(";")
        if kind.strip() != "final" or not urls.strip():
            raise e.InvalidRequest("Upload-Concat: final needs a list of partial upload URLs")
        part_ids = []
        for url in urls.split():
            path = urlsplit(url).path
            upload_id = path[len(self.base_path) :] if path.startswith(self.base_path) else ""
            if not is_upload_id(upload_id):
                raise e.InvalidRequest(f"{url[:100]!r} is not an upload of this server")
            part_ids.append(upload_id)
        return part_ids


_TUS_RAW = [(b"tus-resumable", VERSION.encode()), (b"cache-control", b"no-store")]


def _set_tus_headers(response: Response) -> None:
    """Tus-Resumable and Cache-Control on every answer, replacing any the handler set;
    in the raw list, as one pass (Starlette's MutableHeaders scans it once per header)."""
    raw = response.raw_headers
    raw[:] = [header for header in raw if header[0] not in (b"tus-resumable", b"cache-control")]
    raw.extend(_TUS_RAW)


def format_metadata(metadata: dict[str, str | None]) -> str:
    return ",".join(
        key
        if value is None
        else f"{key} {base64.b64encode(value.encode('utf-8', 'surrogateescape')).decode()}"
        for key, value in metadata.items()
    )


def parse_checksum(header: str) -> Checksum:
    """`Upload-Checksum: <algorithm> <base64 digest>`."""
    algorithm, _, encoded = header.strip().partition(" ")
    if algorithm not in ALGORITHMS:
        raise e.UnsupportedChecksum(f"checksum algorithm {algorithm[:20]!r} is not supported")
    return Checksum(algorithm, parse_base64(encoded.strip(), "Upload-Checksum digest"))


def _trailer_checksum(body: RequestBody) -> Checksum | None:
    value = body.trailer("upload-checksum")
    return None if value is None else parse_checksum(value)


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _has_body(request: Request) -> bool:
    return content_length(request) not in (None, 0) or "chunked" in request.headers.get(
        "transfer-encoding", ""
    )
