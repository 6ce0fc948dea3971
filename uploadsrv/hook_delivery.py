"""How hooks reach the application: an HTTP POST (signed per Standard Webhooks) or an
executable in a directory (tusd's file hooks). Both speak tusd's JSON both ways."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import random
import time
from typing import TYPE_CHECKING

from .config import Settings
from .core.capabilities import Capabilities
from .core.errors import HookInvalid, HookUnavailable
from .core.hooks import HookAnswer, HookMessage, Hooks
from .core.outbox import HookSender

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("uploadsrv.hooks")
# httpx logs every request at info; hooks log what matters (failures, deliveries) themselves.
logging.getLogger("httpx").setLevel(logging.WARNING)

MAX_ANSWER = 64 << 10  #: a hook's answer is small JSON; more is refused


class HttpDelivery:
    """POST the hook's JSON to one URL; 5xx and network errors are retried with backoff."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        backoff: float,
        secret: str | None = None,
    ) -> None:
        self.url = url
        self._backoff = backoff
        self._key = signing_key(secret) if secret else None
        # Imported here, at start-up with --hooks-http only (httpx adds 5 MB to the RSS of a
        # server without hooks). anyio's asyncio backend too: httpx's first request imports
        # it, on the event loop, which py-spy showed as a stall of up to 0.16 s of every
        # upload in a fresh server (at its first post-receive, mid-body).
        import anyio._backends._asyncio  # noqa: F401
        import httpx

        self._client: httpx.AsyncClient = httpx.AsyncClient(timeout=timeout, follow_redirects=False)

    async def deliver(self, message: HookMessage, *, attempts: int) -> HookAnswer:
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(backoff_delay(self._backoff, attempt))
            try:
                return await self._post(message)
            except _Retryable as exc:
                error = str(exc)
        raise HookUnavailable(f"{message.hook.value} hook failed: {error}")

    async def _post(self, message: HookMessage) -> HookAnswer:
        import httpx  # loaded by __init__

        headers = {name: value for name, value in message.forward}
        headers.update({"Content-Type": "application/json", "Accept": "application/json"})
        timestamp = int(time.time())
        headers.update({"webhook-id": message.id, "webhook-timestamp": str(timestamp)})
        if self._key is not None:
            headers["webhook-signature"] = signature(self._key, message.id, message.body, timestamp)
        try:
            async with self._client.stream(
                "POST", self.url, content=message.body, headers=headers
            ) as response:
                if response.status_code >= 500:
                    raise _Retryable(f"{self.url} answered {response.status_code}")
                if not 200 <= response.status_code < 300:
                    raise HookUnavailable(f"{message.hook.value} hook answered {response.status_code}")
                body = b""
                async for block in response.aiter_bytes():
                    body += block
                    if len(body) > MAX_ANSWER:
                        raise HookInvalid(
                            f"the {message.hook.value} hook's answer is over {MAX_ANSWER} bytes"
                        )
        except httpx.HTTPError as exc:
            raise _Retryable(f"{self.url}: {type(exc).__name__} {exc}".strip()) from None
        return HookAnswer.parse(body)

    async def close(self) -> None:
        await self._client.aclose()


class FileDelivery:
    """Run `<dir>/<event>` with the JSON on stdin and TUS_ID, TUS_OFFSET, TUS_SIZE in its
    environment; its stdout is the answer. No executable for an event: nothing to ask."""

    def __init__(self, directory: str, *, timeout: float, backoff: float) -> None:
        self.directory = directory
        self._timeout = timeout
        self._backoff = backoff

    async def deliver(self, message: HookMessage, *, attempts: int) -> HookAnswer:
        path = os.path.join(self.directory, message.hook.value)
        if not os.access(path, os.X_OK):
            return HookAnswer()
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(backoff_delay(self._backoff, attempt))
            try:
                return HookAnswer.parse(await self._run(path, message))
            except _Retryable as exc:
                error = str(exc)
        raise HookUnavailable(f"{message.hook.value} hook failed: {error}")

    async def _run(self, path: str, message: HookMessage) -> bytes:
        env = {**os.environ, **message.env, "WEBHOOK_ID": message.id}
        process = await asyncio.create_subprocess_exec(
            path, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env
        )
        try:
            async with asyncio.timeout(self._timeout):
                stdout, _ = await process.communicate(message.body)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise _Retryable(f"{path} ran longer than {self._timeout} s") from None
        if process.returncode != 0:
            raise _Retryable(f"{path} exited with {process.returncode}")
        return stdout[: MAX_ANSWER + 1]

    async def close(self) -> None:
        return None


class _Retryable(Exception):
    """A failure worth another attempt: 5xx, timeouts, refused connections, a crashed script."""


def backoff_delay(base: float, attempt: int) -> float:
    """Exponential backoff with jitter: about base, 2 base, 4 base, ... each 50-100% of that."""
    return base * 2 ** (attempt - 1) * random.uniform(0.5, 1.0)


def signing_key(secret: str) -> bytes:
    """A Standard Webhooks secret, `whsec_` and base64."""
    encoded = secret.removeprefix("whsec_")
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except ValueError:
        raise ValueError("the hooks secret must be whsec_ followed by base64") from None
    if not key:
        raise ValueError("the hooks secret is empty")
    return key


def signature(key: bytes, message_id: str, body: bytes, timestamp: int) -> str:
    """Standard Webhooks' webhook-signature: v1, HMAC-SHA256 of `id.timestamp.body`."""
    signed = message_id.encode() + b"." + str(timestamp).encode() + b"." + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def open_delivery(settings: Settings) -> HttpDelivery | FileDelivery | None:
    """The delivery the settings name, if any: --hooks-http or --hooks-dir."""
    if settings.hooks_http:
        return HttpDelivery(
            settings.hooks_http,
            timeout=settings.hooks_http_timeout,
            backoff=settings.hooks_http_backoff,
            secret=settings.hooks_secret,
        )
    if settings.hooks_dir:
        return FileDelivery(
            str(settings.hooks_dir), timeout=settings.hooks_http_timeout, backoff=settings.hooks_http_backoff
        )
    return None


def open_hooks(settings: Settings, capabilities: Capabilities, *, send: bool = True) -> Hooks | None:
    """The hooks the settings configure, with the durable outbox when the storage has one;
    None without --hooks-http or --hooks-dir. Without `send` (operator commands) durable
    events are only recorded, for a server to deliver."""
    delivery = open_delivery(settings)
    if delivery is None:
        return None
    hooks = Hooks(
        delivery,
        events=settings.hooks_enabled_events,
        progress_interval=settings.progress_hooks_interval,
        locate=capabilities.locating.location if capabilities.locating else lambda info: None,
        forward_headers=settings.hooks_http_forward_headers,
        attempts=settings.hooks_http_retry + 1,
    )
    if capabilities.outbox is not None:
        hooks.sender = HookSender(
            capabilities.outbox,
            delivery,
            max_age=settings.hooks_max_age,
            backoff=settings.hooks_http_backoff,
            lease=settings.hooks_http_timeout + 30,
            send=send,
        )
    return hooks
