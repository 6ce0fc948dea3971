"""The chunk API: JSON over HTTP for clients that send a file as numbered chunks.

    POST   /chunks/                    create a session            -> 201 session
    GET    /chunks/{id}                its status (cheap to poll)  -> 200 session
    PUT    /chunks/{id}/{n}            store chunk n (1-based)     -> 201 new, 200 same bytes again
    POST   /chunks/{id}/complete       assemble                    -> 200, again the same
    GET    /chunks/{id}/events         Server-Sent Events: status, chunk, completed, expired, aborted
    DELETE /chunks/{id}                abort                       -> 204

Each handler reads the request, calls `ChunkSessions` once and writes JSON back; errors
are `application/problem+json` from the core's error types.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeGuard

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from uploadsrv.body import RequestBody
from uploadsrv.config import Settings
from uploadsrv.core import Checksum, UploadEvent, UploadInfo
from uploadsrv.core import errors as e
from uploadsrv.core.caller import Caller
from uploadsrv.core.chunks import ChunkSessions, ChunkStatus, ChunkStored, SessionEnded, StoredChunk
from uploadsrv.exchange import note

from .common import (
    ERROR_STATUS,
    Links,
    content_length,
    error_headers,
    error_problem,
    make_caller,
    parse_base64,
    parse_content_digest,
    parse_offset,
    sse_event,
    status_of,
    with_reply,
)

PATH = "/chunks/"
MAX_JSON = 64 << 10  #: a session's JSON description is small; anything bigger is refused

#: A chunk's number on another kind of upload is not a session either.
STATUS = {**ERROR_STATUS, e.NotAppendable: 404}

#: The SSE event that tells a watcher how its session ended: a DELETE is "aborted".
SSE_ENDINGS = {
    UploadEvent.COMPLETED: "completed",
    UploadEvent.EXPIRED: "expired",
    UploadEvent.TERMINATED: "aborted",
}

#: Request headers a browser must be allowed to send beyond the draft's (Content-Digest).
REQUEST_HEADERS = ["Content-MD5"]

Handler = Callable[[Request, Caller], Awaitable[Response]]


class ChunkProtocol:
    def __init__(self, sessions: ChunkSessions, settings: Settings, links: Links) -> None:
        self.sessions = sessions
        self.base_path = settings.base_path
        self.links = links

    def routes(self) -> list[Route]:
        return [
            Route(PATH, self._guard(self.create), methods=["POST"]),
            Route(PATH + "{session_id}", self._guard(self.status), methods=["GET"]),
            Route(PATH + "{session_id}", self._guard(self.abort), methods=["DELETE"]),
            Route(PATH + "{session_id}/complete", self._guard(self.complete), methods=["POST"]),
            Route(PATH + "{session_id}/events", self._guard(self.events), methods=["GET"]),
            Route(PATH + "{session_id}/{number}", self._guard(self.put), methods=["PUT"]),
        ]

    def _guard(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def guarded(request: Request) -> Response:
            note(protocol="chunks")
            try:
                response = await handler(request, make_caller(request, "chunks"))
            except e.UploadError as error:
                response = error_problem(error, status_of(error, STATUS), error_headers(error))
            response.headers["Cache-Control"] = "no-store"
            return response

        return guarded

    # -- handlers ----------------------------------------------------------------

    async def create(self, request: Request, caller: Caller) -> Response:
        size, chunk_size, metadata, sha256 = _session_spec(await _json_object(request))
        info = await self.sessions.create(
            length=size, chunk_size=chunk_size, metadata=metadata, caller=caller, sha256=sha256
        )
        body = self._session(request, ChunkStatus(info, []))
        return JSONResponse(body, 201, headers={"Location": str(body["url"])})

    async def status(self, request: Request, caller: Caller) -> Response:
        status = await self.sessions.status(request.path_params["session_id"], caller)
        return JSONResponse(self._session(request, status))

    async def put(self, request: Request, caller: Caller) -> Response:
        raw = request.path_params["number"]
        number = parse_offset(raw, "the chunk number")
        chunk, new = await self.sessions.put(
            request.path_params["session_id"],
            number,
            RequestBody(request.scope, request.receive),
            caller=caller,
            content_length=content_length(request),
            checksum=_chunk_checksum(request),
        )
        return JSONResponse(_chunk(chunk), 201 if new else 200)

    async def complete(self, request: Request, caller: Caller) -> Response:
        info = await self.sessions.complete(request.path_params["session_id"], caller)
        url = self._upload_url(request, info)
        body = {
            "id": info.id,
            "state": "complete",
            "size": info.length,
            "sha256": info.sha256,
            "upload_url": url,
        }
        return with_reply(JSONResponse(body, headers={"Location": url}), info)

    async def abort(self, request: Request, caller: Caller) -> Response:
        await self.sessions.abort(request.path_params["session_id"], caller)
        return Response(status_code=204)

    async def events(self, request: Request, caller: Caller) -> Response:
        session_id = request.path_params["session_id"]
        await self.sessions.status(session_id, caller)  # unknown sessions get a 404, not an empty stream
        return StreamingResponse(
            self._event_stream(request, caller, session_id),
            media_type="text/event-stream",
            headers={"X-Accel-Buffering": "no"},  # nginx: do not hold events back
        )

    # -- translation -------------------------------------------------------------

    async def _event_stream(self, request: Request, caller: Caller, session_id: str) -> AsyncIterator[str]:
        """The session's news (`ChunkSessions.follow`) as Server-Sent Events."""
        async for news in self.sessions.follow(session_id, caller):
            if isinstance(news, ChunkStatus):
                yield sse_event("status", self._session(request, news))
            elif isinstance(news, ChunkStored):
                yield sse_event("chunk", _progress(news))
            elif isinstance(news, SessionEnded):
                yield sse_event(SSE_ENDINGS[news.event], self._ending_body(request, session_id, news.info))
            else:
                yield ": still here\n\n"  # keeps proxies from closing an idle stream

    def _ending_body(self, request: Request, session_id: str, info: UploadInfo | None) -> dict[str, object]:
        body: dict[str, object] = {"id": session_id}
        if info is not None and info.is_complete:
            body |= {"size": info.length, "upload_url": self._upload_url(request, info)}
        return body

    def _session(self, request: Request, status: ChunkStatus) -> dict[str, object]:
        info = status.info
        url = self.links.public(request, PATH + info.id)
        signature = self.links.signature(info)
        expires = self.sessions.expires_at(info)
        return {
            "id": info.id,
            "url": url + signature,
            "state": "complete" if info.is_complete else "incomplete",
            "size": info.length,
            "chunk_size": info.chunk_size,
            "chunk_count": info.chunk_count,
            "chunk_url_template": url + "/{n}" + signature,
            "complete_url": url + "/complete" + signature,
            "events_url": url + "/events" + signature,
            "upload_url": self._upload_url(request, info),
            "metadata": info.metadata,
            "sha256": info.sha256,
            "expires_at": None if expires is None else _timestamp(expires),
            "chunks_stored": len(status.chunks),
            "bytes_stored": status.stored_bytes,
            "fraction": round(status.fraction, 6),
            "missing": status.missing,
            "chunks": [_chunk(c) for c in status.chunks],
        }

    def _upload_url(self, request: Request, info: UploadInfo) -> str:
        """Where the finished file is downloaded: the same URL tus and the draft use."""
        return self.links.upload(request, self.base_path + info.id, info)


def _session_spec(
    spec: dict[str, object],
) -> tuple[int, int | None, dict[str, str | None], str | None]:
    """A session description's size, chunk size, metadata and sha256, each checked."""
    size, chunk_size, sha256 = spec.get("size"), spec.get("chunk_size"), spec.get("sha256")
    if not _is_count(size) or not (chunk_size is None or _is_count(chunk_size)):
        raise e.InvalidRequest("size (and chunk_size, if given) must be non-negative integers")
    metadata = _metadata(spec.get("metadata", {}))
    if sha256 is not None and not isinstance(sha256, str):
        raise e.InvalidRequest("sha256 must be a hex string")
    return size, chunk_size, metadata, sha256.lower() if sha256 else None


def _metadata(value: object) -> dict[str, str | None]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in value.items()
    ):
        raise e.InvalidRequest("metadata must be an object of strings")
    return value


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


async def _json_object(request: Request) -> dict[str, object]:
    body = bytearray()
    async for block in RequestBody(request.scope, request.receive):
        body += block
        if len(body) > MAX_JSON:
            raise e.TooLarge(f"a session description is at most {MAX_JSON} bytes")
    try:
        spec = json.loads(body)
    except (ValueError, RecursionError):
        raise e.InvalidRequest("the body must be a JSON object") from None
    if not isinstance(spec, dict):
        raise e.InvalidRequest("the body must be a JSON object")
    return spec


def _chunk_checksum(request: Request) -> Checksum | None:
    """`Content-Digest` (RFC 9530), or `Content-MD5` as S3 clients send it."""
    if "content-digest" in request.headers:
        return parse_content_digest(request.headers["content-digest"])
    if "content-md5" in request.headers:
        return Checksum("md5", parse_base64(request.headers["content-md5"], "Content-MD5"))
    return None


def _chunk(chunk: StoredChunk) -> dict[str, object]:
    return {"number": chunk.number, "size": chunk.size, "sha256": chunk.sha256}


def _progress(news: ChunkStored) -> dict[str, object]:
    return {
        **_chunk(news.chunk),
        "chunks_stored": news.chunks_stored,
        "chunk_count": news.chunk_count,
        "bytes_stored": news.bytes_stored,
        "fraction": round(news.fraction, 6),
    }


def _timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
