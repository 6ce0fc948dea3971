"""The bare sink the benchmark measures uploadsrv against: reads a body, writes it, fsyncs.

No protocol, no batching, no checks: the least a server must do to accept an upload, on the
same uvicorn stack and the same disk. Run by `python -m uploadsrv.loadtest.bench`.

`SINK_DIR` unset, it stores nothing and answers tus creates and appends at once: the
fastest a tus server could be, which bounds what the benchmark's client can measure.
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
    if "SINK_DIR" not in os.environ:
        await _answer_tus(scope, receive, send)
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


async def _answer_tus(scope: Scope, receive: Receive, send: Send) -> None:
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    headers = [(b"tus-resumable", b"1.0.0")]
    if scope["method"] == "POST":
        host = dict(scope["headers"])[b"host"]
        location = b"http://%s/files/%d" % (host, next(_names))
        headers += [(b"location", location), (b"upload-offset", b"0"), (b"content-length", b"0")]
        status = 201
    else:
        headers.append((b"upload-offset", dict(scope["headers"]).get(b"content-length", b"0")))
        status = 204
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b""})
