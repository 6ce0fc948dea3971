"""The bare sink the benchmark measures uploadsrv against: reads a body, writes it, fsyncs.

No protocol, no batching, no checks: the least a server must do to accept an upload, on the
same uvicorn stack and the same disk. Run by `python -m loadtest.bench`.
"""

from __future__ import annotations

import itertools
import os

from starlette.types import Receive, Scope, Send

_names = itertools.count()


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    if scope["method"] == "GET":  # readiness
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
        return
    path = os.path.join(os.environ["SINK_DIR"], str(next(_names)))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        more = True
        while more:
            message = await receive()
            os.write(fd, message.get("body", b""))
            more = message.get("more_body", False)
        os.fsync(fd)
    finally:
        os.close(fd)
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})
