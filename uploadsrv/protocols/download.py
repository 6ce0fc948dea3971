"""GET of a finished upload: streamed from storage, with single byte ranges.

Shared by every protocol, since a finished upload is the same object whichever
protocol made it.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from uploadsrv.core import UploadInfo, UploadService

from .common import problem

RANGE = re.compile(r"bytes=(\d{0,19})-(\d{0,19})", re.ASCII)


async def download(service: UploadService, info: UploadInfo, request: Request) -> Response:
    redirect = await service.download_url(info)
    if redirect is not None:
        return RedirectResponse(redirect, status_code=302)
    length = info.offset
    etag = f'"{info.id}"'
    headers = {
        "Accept-Ranges": "bytes",
        "ETag": etag,
        "Content-Type": info.served_type,
        "Content-Disposition": info.content_disposition,
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'; sandbox",
    }
    start, end, status = 0, length, 200
    range_header = request.headers.get("range")
    if range_header and request.headers.get("if-range", etag) == etag:
        match = RANGE.fullmatch(range_header.strip())
        if match and (match[1] or match[2]):
            first, last = match[1], match[2]
            if first:
                start, end = int(first), min(int(last) + 1, length) if last else length
            else:  # a suffix: the last N bytes
                start, end = max(length - int(last), 0), length
            if start >= end:
                return problem(
                    416,
                    f"range not satisfiable for {length} bytes",
                    headers={"Content-Range": f"bytes */{length}"},
                )
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{length}"
    headers["Content-Length"] = str(end - start)
    return _Download(service.read(info, start, end), status_code=status, headers=headers)


class _Download(StreamingResponse):
    """Closes the storage's reader however the response ends.

    A client that goes away cancels the response between two blocks; left to the garbage
    collector, the suspended reader would keep its file (or S3 stream) open for good.
    """

    body_iterator: AsyncGenerator[bytes, None]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
