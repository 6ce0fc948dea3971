"""A Python client for the chunk API: split a file, send its chunks in parallel, retry, resume.

    async with httpx.AsyncClient() as http:
        done = await ChunkClient(http, "http://127.0.0.1:1080").upload(Path("video.mov"))
        print(done["upload_url"])

Every chunk carries `Content-Digest: sha-256`, so a corrupted chunk is refused, not
stored. A chunk that fails (a dropped connection, 423, 5xx) is retried on its own with
backoff, as a background URLSession retries a task; after that the session's status
says what is still missing, which is sent again before completing.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx

RETRY_STATUS = {423, 429, 500, 502, 503, 504}
MAX_RETRY_AFTER = 60.0  #: seconds; a server asking for longer is not waited for that long
PIECE = 256 << 10  #: bytes per body piece handed to httpx


class ChunkUploadFailed(Exception):
    """The upload could not be finished within the client's attempts."""


class Source:
    """The file being uploaded: a path (read a chunk at a time) or bytes in memory."""

    def __init__(self, source: bytes | str | os.PathLike[str]) -> None:
        self._data = memoryview(source) if isinstance(source, bytes) else None
        self._path = None if isinstance(source, bytes) else Path(source)
        self.size = len(source) if isinstance(source, bytes) else Path(source).stat().st_size

    async def read(self, start: int, end: int) -> memoryview:
        if self._data is not None:
            return self._data[start:end]
        assert self._path is not None
        return memoryview(await asyncio.to_thread(_pread, self._path, start, end))

    async def sha256(self) -> str:
        digest = hashlib.sha256()
        for start in range(0, self.size, 8 << 20):
            block = await self.read(start, min(start + (8 << 20), self.size))
            await asyncio.to_thread(digest.update, block)
        return digest.hexdigest()


class ChunkClient:
    """Uploads files through the chunk API of the server at `base_url`.

    `request` and `chunk_body` are the seams a load test overrides to time requests and
    to cut bodies off.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        base_url: str,
        *,
        parallel: int = 4,
        attempts: int = 8,
        backoff: float = 0.2,
    ) -> None:
        self.http = http
        self.endpoint = base_url.rstrip("/") + "/chunks/"
        self.parallel = parallel
        self.attempts = attempts
        self.backoff = backoff
        self.resumes = 0  #: how often a session was resumed from its status

    async def upload(
        self,
        source: bytes | str | os.PathLike[str],
        *,
        chunk_size: int | None = None,
        metadata: dict[str, str] | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, Any]:
        """Upload a whole file; returns the completed session (with `upload_url`)."""
        file = Source(source)
        spec: dict[str, object] = {"size": file.size, "sha256": await file.sha256()}
        if chunk_size:
            spec["chunk_size"] = chunk_size
        if metadata:
            spec["metadata"] = metadata
        response = await self._retrying("create", "POST", self.endpoint, json=spec)
        return await self.resume(response.json()["url"], file, on_progress=on_progress)

    async def resume(
        self,
        session_url: str,
        source: bytes | str | os.PathLike[str] | Source,
        *,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, Any]:
        """Send whatever the session is missing, then complete it."""
        file = source if isinstance(source, Source) else Source(source)
        for round_ in range(self.attempts):
            session = (await self._retrying("status", "GET", session_url)).json()
            if session["state"] == "complete":
                return session
            if round_:
                self.resumes += 1
            await self._send_missing(session, file, on_progress)
            response = await self._retrying("complete", "POST", session["complete_url"], ok=frozenset({409}))
            if response.status_code == 200:
                return {**session, **response.json()}
        raise ChunkUploadFailed(f"{session_url} still misses chunks after {self.attempts} rounds")

    async def _send_missing(
        self, session: dict[str, Any], file: Source, on_progress: Callable[[int, int], None] | None
    ) -> None:
        """Send the chunks the session's status lists as missing, `parallel` at a time."""
        confirmed = session["chunks_stored"]
        if on_progress:
            on_progress(confirmed, session["chunk_count"])
        gate = asyncio.Semaphore(self.parallel)

        async def send(number: int) -> None:
            nonlocal confirmed
            async with gate:
                if await self._send_chunk(session, file, number):
                    confirmed += 1
                    if on_progress:
                        on_progress(confirmed, session["chunk_count"])

        missing = [n for first, last in session["missing"] for n in range(first, last + 1)]
        try:
            async with asyncio.TaskGroup() as group:  # one chunk failing for good stops the others
                for number in missing:
                    group.create_task(send(number))
        except ExceptionGroup as failed:
            raise failed.exceptions[0] from None

    async def request(self, kind: str, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One HTTP request; `kind` names it ("create", "chunk", "status", "complete")."""
        return await self.http.request(method, url, **kwargs)

    def chunk_body(self, data: memoryview) -> AsyncIterator[bytes]:
        """The request body for one chunk, in pieces (never a second copy of the chunk)."""

        async def pieces() -> AsyncIterator[bytes]:
            for start in range(0, len(data), PIECE):
                yield bytes(data[start : start + PIECE])

        return pieces()

    async def _send_chunk(self, session: dict[str, Any], file: Source, number: int) -> bool:
        """PUT one chunk, retrying it alone; False if it is still not stored (status will say)."""
        start = (number - 1) * session["chunk_size"]
        data = await file.read(start, min(start + session["chunk_size"], file.size))
        digest = base64.b64encode(await asyncio.to_thread(lambda: hashlib.sha256(data).digest())).decode()
        headers = {
            "Content-Digest": f"sha-256=:{digest}:",
            "Content-Type": "application/octet-stream",
            "Content-Length": str(len(data)),
        }
        url = session["chunk_url_template"].replace("{n}", str(number))
        response = await self._attempts(
            "chunk", "PUT", url, body=lambda: self.chunk_body(data), headers=headers
        )
        return response is not None

    async def _retrying(self, kind: str, method: str, url: str, **kwargs: Any) -> httpx.Response:
        response = await self._attempts(kind, method, url, **kwargs)
        if response is None:
            raise ChunkUploadFailed(f"{kind} {url}: no answer after {self.attempts} attempts")
        return response

    async def _attempts(
        self,
        kind: str,
        method: str,
        url: str,
        *,
        ok: frozenset[int] = frozenset(),
        body: Callable[[], AsyncIterator[bytes]] | None = None,
        **kwargs: Any,
    ) -> httpx.Response | None:
        """A request retried with backoff on network errors and retryable statuses; None if
        every attempt failed. Other errors raise ChunkUploadFailed."""
        for attempt in range(self.attempts):
            try:
                response = await self.request(kind, method, url, content=body() if body else None, **kwargs)
            except httpx.TransportError:
                await asyncio.sleep(self.backoff * 2**attempt)
                continue
            if response.status_code < 300 or response.status_code in ok:
                return response
            if response.status_code not in RETRY_STATUS:
                raise ChunkUploadFailed(f"{kind} {url}: {response.status_code} {response.text[:200]}")
            await asyncio.sleep(_retry_after(response, self.backoff * 2**attempt))
        return None


def _retry_after(response: httpx.Response, default: float) -> float:
    value = response.headers.get("retry-after", "")
    return min(float(value), MAX_RETRY_AFTER) if value.isdigit() else default


def _pread(path: Path, start: int, end: int) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), end - start, start)
