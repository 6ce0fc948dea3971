"""A test double: uploadsrv that flips one byte of every download, to prove the load test notices.

Only downloads of uploads are touched; the chunk API's status JSON stays readable.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from uploadsrv.app import create_app


def corrupting(app: ASGIApp) -> ASGIApp:
    async def flip_first_byte(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET" or not scope["path"].startswith("/files/"):
            await app(scope, receive, send)
            return
        flipped = False

        async def send_flipped(message: Message) -> None:
            nonlocal flipped
            body = message.get("body", b"")
            if message["type"] == "http.response.body" and body and not flipped:
                message = {**message, "body": bytes([body[0] ^ 0xFF]) + body[1:]}
                flipped = True
            await send(message)

        await app(scope, receive, send_flipped)

    return flip_first_byte


def create() -> ASGIApp:
    return corrupting(create_app())
