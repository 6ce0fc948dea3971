"""Pieces every protocol handler needs: problem responses, public URLs, HTTP dates."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import formatdate
from functools import lru_cache
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import http_sf
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from uploadsrv.core import Checksum
from uploadsrv.core import errors as e
from uploadsrv.core.caller import Caller
from uploadsrv.core.errors import InvalidRequest, UploadError
from uploadsrv.core.model import UploadInfo
from uploadsrv.exchange import note

if TYPE_CHECKING:
    from uploadsrv.auth import UrlSigner

PROBLEM_TYPE = "urn:uploadsrv:problem:"

#: RFC 9530 digest names, and the names of the same algorithms in the core.
DIGESTS = {"sha-256": "sha256", "sha-512": "sha512", "md5": "md5", "sha": "sha1", "crc32": "crc32"}

#: Status codes for the core's errors, by class: `status_of` takes the entry of an error's
#: nearest class, so a new error needs an entry only if its middle class's status is not
#: right for it. Each protocol overrides what its spec says otherwise (tus: 460).
ERROR_STATUS: dict[type[e.UploadError], int] = {
    e.UploadError: 500,
    e.ClientError: 400,
    e.Unauthorized: 401,
    e.NotAppendable: 403,
    e.UploadNotFound: 404,
    e.Conflict: 409,
    e.Gone: 410,
    e.TooLarge: 413,
    e.Retryable: 503,
    e.UploadBusy: 423,
    e.TooManyRequests: 429,
    e.StorageFull: 507,
    e.HookInvalid: 502,
}


def status_of(error: e.UploadError, statuses: Mapping[type[e.UploadError], int] = ERROR_STATUS) -> int:
    """The status of `error`: the entry of the nearest class along its hierarchy."""
    return next(statuses[cls] for cls in type(error).__mro__ if cls in statuses)


def error_headers(error: e.UploadError) -> dict[str, str]:
    """Headers every protocol adds for an error: when to retry, where the upload really is."""
    headers = {}
    if isinstance(error, e.Retryable):
        headers["Retry-After"] = str(error.retry_after)
    if isinstance(error, e.Unauthorized):
        headers["WWW-Authenticate"] = error.challenge
    if isinstance(error, e.OffsetMismatch):
        headers["Upload-Offset"] = str(error.expected)
    return headers


def problem(
    status: int,
    detail: str,
    *,
    type_: str = "about:blank",
    headers: Mapping[str, str] | None = None,
    **extra: object,
) -> Response:
    """A short RFC 9457 `application/problem+json` response."""
    body = {"type": type_, "title": _title(status), "status": status, "detail": detail}
    body.update({key.replace("_", "-"): value for key, value in extra.items()})
    return Response(json.dumps(body), status, headers, media_type="application/problem+json")


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:  # tus's own 460
        return "Checksum Mismatch" if status == 460 else "Error"


def error_problem(error: UploadError, status: int, headers: Mapping[str, str] | None = None) -> Response:
    """The error as problem+json; one the application answered itself (a hook) as it answered."""
    if isinstance(error, e.Refused):
        return Response(error.body, error.status, {**(headers or {}), **error.headers})
    return problem(status, error.detail, type_=PROBLEM_TYPE + error.slug, headers=headers, **error.extra)


#: Where the auth middleware leaves the request's `Identity` in the ASGI scope.
IDENTITY = "uploadsrv.identity"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who the auth middleware found a request to come from."""

    owner: str | None
    grant: str | None = None
    grant_expires: float | None = None


ANONYMOUS = Identity(None)


def with_reply(response: Response, info: UploadInfo) -> Response:
    """The answer that finished an upload, with what the application adds to it (pre-finish)."""
    reply = info.reply
    if reply is None:
        return response
    if reply.status is not None:
        response.status_code = reply.status
    if reply.body is not None and response.status_code not in (204, 304):
        response.body = reply.body.encode()
        response.headers["content-length"] = str(len(response.body))
    response.headers.update(reply.headers)
    return response


def make_caller(request: Request, protocol: str) -> Caller:
    """The core's view of who sends `request`: built once per request, its headers as they came."""
    scope = request.scope
    identity: Identity = scope.get(IDENTITY, ANONYMOUS)
    client = scope.get("client")
    query = scope.get("query_string")
    note(owner=identity.owner)
    return Caller(
        owner=identity.owner,
        protocol=protocol,
        method=scope["method"],
        uri=scope["path"] + "?" + query.decode("latin-1") if query else scope["path"],
        remote_addr=f"{client[0]}:{client[1]}" if client else "",
        raw_headers=scope["headers"],
        grant=identity.grant,
        grant_expires=identity.grant_expires,
    )


class Links:
    """The absolute URLs the server hands out for uploads; with auth on, each carries a
    signature that lets it act for the upload's owner on that upload alone."""

    def __init__(self, *, trust_proxy: bool, signer: UrlSigner | None, lifetime: float | None) -> None:
        self.trust_proxy = trust_proxy
        self._signer = signer
        self._lifetime = lifetime  #: how long a signature stands on its own (the upload expiry)

    def public(self, request: Request, path: str) -> str:
        """The absolute URL of `path`, as seen from outside a trusted proxy."""
        return public_url(request, path, trust_proxy=self.trust_proxy)

    def signature(self, info: UploadInfo, upload_id: str | None = None) -> str:
        """`?sig=...` to append to any URL of `info` (or of `upload_id`, another upload
        of its owner's, such as a part of it), or '' with auth off."""
        if self._signer is None or info.owner is None:
            return ""
        return "?" + self._signer.query(upload_id or info.id, info.owner, self._lifetime)

    def upload(self, request: Request, path: str, info: UploadInfo) -> str:
        """The signed absolute URL of `path`, which names `info`."""
        return self.public(request, path) + self.signature(info)


def public_url(request: Request, path: str, *, trust_proxy: bool) -> str:
    """The absolute URL clients should use for `path`, as seen from outside a trusted proxy."""
    scheme = request.scope.get("scheme", "http")  # as request.url has it, without parsing a URL
    host = request.headers.get("host") or request.url.netloc
    if trust_proxy:
        scheme = _first(request.headers.get("x-forwarded-proto")) or scheme
        host = _first(request.headers.get("x-forwarded-host")) or host
    return f"{scheme}://{host}{path}"


def _first(value: str | None) -> str | None:
    return value.split(",")[0].strip() if value else None


def sse_event(name: str, data: object) -> str:
    """One Server-Sent Event with a JSON payload."""
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def http_date(timestamp: float) -> str:
    return _http_date(int(timestamp))  # whole seconds, as formatdate has them


@lru_cache(maxsize=8)
def _http_date(second: int) -> str:
    """Kept: many answers in one second carry the same date (Upload-Expires)."""
    return formatdate(second, usegmt=True)


class RequestHeaders(Headers):
    """Starlette's request headers, decoded once into a dict: a handler asks for a
    dozen, and each plain `Headers` lookup decodes and compares every header sent.
    Names are looked up as given first (the handlers ask in lowercase), then lowercased."""

    def __init__(self, scope: Scope) -> None:
        super().__init__(scope=scope)
        first: dict[str, str] = {}
        for name, value in self._list:
            key = name.decode("latin-1")
            if key not in first:
                first[key] = value.decode("latin-1")
        self._first = first

    def __getitem__(self, key: str) -> str:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def get(self, key: str, default: Any = None) -> Any:
        value = self._first.get(key)
        if value is None:
            value = self._first.get(key.lower())
        return default if value is None else value


class UploadRequest(Request):
    """A request to the upload URLs, its `RequestHeaders` a plain attribute: a handler
    reads them a dozen times, each a call of Starlette's property."""

    headers: RequestHeaders = None  # type: ignore[assignment]  # set in __init__; shadows the property

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        super().__init__(scope, receive, send)
        self.headers = RequestHeaders(scope)


def content_length(request: Request) -> int | None:
    """The request's Content-Length, if it has one (a chunked body has none)."""
    value = request.headers.get("content-length")
    return None if value is None else parse_offset(value, "Content-Length")


def parse_offset(text: str | None, name: str) -> int:
    """A non-negative decimal header value; anything else is the client's error."""
    if text is None:
        raise InvalidRequest(f"{name} is required")
    if not text.isascii() or not text.isdigit() or len(text) > 19:
        raise InvalidRequest(f"{name} must be a non-negative integer, got {text[:40]!r}")
    return int(text)


def parse_base64(text: str, name: str) -> bytes:
    """Strict base64 from a header; non-ASCII text is as malformed as a bad padding."""
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error, or non-ASCII characters in a str
        raise InvalidRequest(f"{name} is not base64") from None


def parse_metadata(header: str) -> dict[str, str | None]:
    """`Upload-Metadata`: comma-separated `key base64value` pairs; the value may be absent.

    tus defines it; tus-js-client sends it on the IETF draft too."""
    metadata: dict[str, str | None] = {}
    if not header.strip():
        return metadata
    for pair in header.split(","):
        fields = pair.strip().split(" ")
        key = fields[0]
        if not key or len(fields) > 2 or not key.isascii() or key in metadata:
            raise InvalidRequest(f"malformed Upload-Metadata pair {pair.strip()[:60]!r}")
        if len(fields) == 1:
            metadata[key] = None
            continue
        value = parse_base64(fields[1], f"Upload-Metadata value of {key[:60]!r}")
        metadata[key] = value.decode("utf-8", "surrogateescape")
    return metadata


def parse_content_digest(header: str | None) -> Checksum | None:
    """RFC 9530 `Content-Digest`: the strongest algorithm we support of those sent."""
    if header is None:
        return None
    try:
        digests = http_sf.parse(header.encode(), tltype="dictionary")
    except (http_sf.StructuredFieldError, ValueError):
        raise InvalidRequest("Content-Digest is not a structured dictionary") from None
    for name in ("sha-512", "sha-256", "sha", "md5", "crc32"):
        member = digests.get(name) if isinstance(digests, dict) else None
        if isinstance(member, tuple) and isinstance(member[0], bytes):
            return Checksum(DIGESTS[name], member[0])
    raise e.UnsupportedChecksum("no supported algorithm in Content-Digest (use sha-256)")
