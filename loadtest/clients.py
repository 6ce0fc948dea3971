"""The load test's and the benches' clients, one per protocol: what each sends is written
here once, whichever HTTP client carries it.

Simulated clients resume the way each protocol's real clients do (httpx, with the load
test's network trouble); the benches send the same tus requests in one PATCH (httpx) or,
for small uploads, over `lean.Connection`, whose CPU per request stays below the servers'.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import httpx

from uploadsrv.client import ChunkClient

from .lean import Connection, header_lines, path_of
from .report import Report

PIECE = 256 * 1024  #: bytes per body piece a client hands to httpx

# -- tus: the requests ------------------------------------------------------------------

TUS = {"Tus-Resumable": "1.0.0"}
OFFSET_STREAM = {"Content-Type": "application/offset+octet-stream"}  #: a tus body


def tus_create_headers(length: int) -> dict[str, str]:
    return {**TUS, "Upload-Length": str(length)}


def tus_append_headers(offset: int) -> dict[str, str]:
    return {**TUS, "Upload-Offset": str(offset), **OFFSET_STREAM}


# The same requests as header lines for `lean.Connection`, made once (small uploads
# measure the server's cost per request, not the client's).
_TUS_LINES = header_lines(TUS)
_APPEND_AT_0 = header_lines(tus_append_headers(0))
_IN_ONE = header_lines({**TUS, **OFFSET_STREAM})


async def tus_create(connection: Connection, length: int) -> bytes:
    """An empty upload of `length` bytes; returns its path."""
    created = await connection.request(b"POST", b"/files/", _TUS_LINES + b"Upload-Length: %d\r\n" % length)
    if created.status != 201:
        raise RuntimeError(f"create answered {created.status}: {created.body[:200]!r}")
    return path_of(created.headers[b"location"])


async def tus_pair(connection: Connection, body: bytes) -> bytes:
    """Create an upload, then append `body` in one PATCH; returns the upload's path."""
    path = await tus_create(connection, len(body))
    appended = await connection.request(b"PATCH", path, _APPEND_AT_0, body)
    if appended.status != 204 or appended.headers.get(b"upload-offset") != b"%d" % len(body):
        raise RuntimeError(f"PATCH answered {appended.status}: {appended.body[:200]!r}")
    return path


async def tus_in_one(connection: Connection, body: bytes) -> bytes:
    """The whole upload in its creation request (creation-with-upload)."""
    headers = _IN_ONE + b"Upload-Length: %d\r\n" % len(body)
    created = await connection.request(b"POST", b"/files/", headers, body)
    if created.status != 201 or created.headers.get(b"upload-offset") != b"%d" % len(body):
        raise RuntimeError(f"create answered {created.status}: {created.body[:200]!r}")
    return path_of(created.headers[b"location"])


def tus_upload_in_one(
    http: httpx.Client,
    base_url: str,
    blocks: Iterable[bytes],
    length: int,
    *,
    via: str | None = None,
    content_length: bool = True,
) -> str:
    """One tus upload of `length` bytes: created at `base_url`, its bytes in one PATCH (as
    background clients send a file), through the instance at `via` if given. Without
    `content_length` the body is sent chunked. Returns the upload's URL."""
    created = http.post(base_url + "/files/", headers=tus_create_headers(length))
    created.raise_for_status()
    url = created.headers["location"]
    if via is not None:
        url = via + "/files/" + url.split("/files/", 1)[1]
    headers = tus_append_headers(0)
    if content_length:
        headers["Content-Length"] = str(length)
    response = http.patch(url, content=blocks, headers=headers)
    if response.status_code != 204 or response.headers["upload-offset"] != str(length):
        raise RuntimeError(f"upload failed: {response.status_code} {response.text}")
    return url


class CutOff(httpx.TransportError):
    """The simulated network dropped the connection mid-body."""


@dataclass
class Trouble:
    """What the network does to a request body: cut it off, or stall it for a while."""

    interrupt: float = 0.0  #: fraction of bodies cut off at a random point
    pause: float = 0.0  #: fraction of bodies stalled midway
    pause_seconds: float = 0.5

    def body(self, data: memoryview, rng: random.Random) -> tuple[AsyncIterator[bytes], bool]:
        cut = rng.randrange(1, len(data)) if len(data) > 1 and rng.random() < self.interrupt else None
        stall = rng.randrange(0, len(data)) if cut is None and rng.random() < self.pause else None

        async def pieces() -> AsyncIterator[bytes]:
            for start in range(0, len(data), PIECE):
                end = min(start + PIECE, len(data))
                if cut is not None and end >= cut:
                    if cut > start:
                        yield bytes(data[start:cut])
                    raise CutOff("cut off mid-body")
                if stall is not None and start <= stall < end:
                    await asyncio.sleep(self.pause_seconds)
                yield bytes(data[start:end])

        return pieces(), cut is not None


class Client:
    """Uploads one file in chunks with PATCH, resuming from HEAD after every cut."""

    name = "base"
    max_attempts = 50

    def __init__(self, http: httpx.AsyncClient, endpoint: str, report: Report, trouble: Trouble) -> None:
        self.http = http
        self.endpoint = endpoint
        self.report = report
        self.trouble = trouble

    async def timed(self, kind: str, method: str, url: str, **kwargs: Any) -> httpx.Response:
        started = time.perf_counter()
        try:
            response = await self.http.request(method, url, **kwargs)
        finally:
            self.report.record(kind, time.perf_counter() - started)
        if response.status_code >= 400:
            self.report.errors[f"{kind} {response.status_code}"] += 1
        return response

    async def upload(self, data: bytes, chunk_size: int, rng: random.Random) -> str:
        url = await self.create(len(data))
        view = memoryview(data)
        offset = 0
        for _ in range(self.max_attempts):
            if offset >= len(data):
                return url
            end = min(offset + chunk_size, len(data))
            body, _ = self.trouble.body(view[offset:end], rng)
            try:
                response = await self.timed(
                    "append", "PATCH", url, content=body, headers=self.append_headers(offset, end, len(data))
                )
            except httpx.TransportError as error:
                if not isinstance(error, CutOff):  # a real failure, not a simulated cut
                    self.report.errors[f"append {type(error).__name__}"] += 1
                self.report.resumes += 1
                offset = await self.offset(url)
                continue
            if response.status_code >= 300:
                offset = await self.offset(url)
                continue
            offset = int(response.headers["upload-offset"])
        raise RuntimeError(f"gave up on {url} at offset {offset}")

    async def offset(self, url: str) -> int:
        response = await self.timed("head", "HEAD", url, headers=self.base_headers())
        if response.status_code >= 300:
            raise RuntimeError(f"HEAD {url}: {response.status_code}")
        return int(response.headers["upload-offset"])

    async def create(self, length: int) -> str:
        raise NotImplementedError

    def base_headers(self) -> dict[str, str]:
        raise NotImplementedError

    def append_headers(self, offset: int, end: int, length: int) -> dict[str, str]:
        raise NotImplementedError


class TusClient(Client):
    name = "tus"

    def base_headers(self) -> dict[str, str]:
        return dict(TUS)

    async def create(self, length: int) -> str:
        response = await self.timed("create", "POST", self.endpoint, headers=tus_create_headers(length))
        response.raise_for_status()
        return response.headers["location"]

    def append_headers(self, offset: int, end: int, length: int) -> dict[str, str]:
        return tus_append_headers(offset)


class IetfClient(Client):
    """The IETF draft (interop 8, as iOS 26 sends it), appending with PATCH.

    httpx does not surface 104s, so this client creates with an empty POST (it gets the
    URL in the 201) instead of sending the whole file in the POST as URLSession does.
    """

    name = "ietf"

    def base_headers(self) -> dict[str, str]:
        return {"Upload-Draft-Interop-Version": "8"}

    async def create(self, length: int) -> str:
        headers = {**self.base_headers(), "Upload-Complete": "?0", "Upload-Length": str(length)}
        response = await self.timed("create", "POST", self.endpoint, headers=headers)
        response.raise_for_status()
        return response.headers["location"]

    def append_headers(self, offset: int, end: int, length: int) -> dict[str, str]:
        return {
            **self.base_headers(),
            "Upload-Offset": str(offset),
            "Upload-Complete": "?1" if end == length else "?0",
            "Content-Type": "application/partial-upload",
        }


class ChunkApiClient(Client):
    """The chunk API through the project's own client: chunks in parallel, a cut chunk
    retried on its own, then the session's status says what is still missing."""

    name = "chunks"
    parallel = 4

    async def upload(self, data: bytes, chunk_size: int, rng: random.Random) -> str:
        helper = _TimedChunkClient(self, rng)
        done = await helper.upload(data, chunk_size=chunk_size)
        self.report.resumes += helper.resumes + helper.cuts
        return done["upload_url"]


class _TimedChunkClient(ChunkClient):
    """`ChunkClient` with the load test's timing and simulated network trouble."""

    def __init__(self, outer: ChunkApiClient, rng: random.Random) -> None:
        base = str(httpx.URL(outer.endpoint).copy_with(path="/"))
        super().__init__(outer.http, base, parallel=outer.parallel, backoff=0.05, attempts=outer.max_attempts)
        self._outer = outer
        self._rng = rng
        self.cuts = 0

    async def request(self, kind: str, method: str, url: str, **kwargs: object) -> httpx.Response:
        try:
            return await self._outer.timed(kind, method, url, **kwargs)
        except CutOff:
            self.cuts += 1
            raise

    def chunk_body(self, data: memoryview) -> AsyncIterator[bytes]:
        return self._outer.trouble.body(data, self._rng)[0]


PROTOCOLS: dict[str, type[Client]] = {
    client.name: client for client in (TusClient, IetfClient, ChunkApiClient)
}
