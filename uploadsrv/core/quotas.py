"""Per-owner limits: how many unfinished uploads, and how many requests in flight, one
authenticated subject may have at once.

The counting sits behind `Counters`, so that several instances can share one count (a
Redis implementation) while a single process counts in memory.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from .errors import TooManyRequests
from .model import UploadInfo

#: Seconds a client is told to wait: a request in flight ends soon; an unfinished upload
#: ends when the client finishes or deletes it.
REQUEST_RETRY_AFTER = 1
UPLOAD_RETRY_AFTER = 60
#: An owner at the limit has its unfinished uploads recounted from storage at most this
#: often: uploads removed by another process (`uploadsrv prune`) then stop counting.
RECOUNT_SECONDS = 10.0


class Counters(Protocol):
    """Named non-negative counts that go up only while below a limit."""

    async def acquire(self, key: str, limit: int) -> bool:
        """Add one to `key` if it is below `limit`; whether it was."""
        ...

    async def release(self, key: str) -> None:
        """Take one from `key` (never below zero)."""
        ...

    async def seed(self, counts: dict[str, int]) -> None:
        """Add counts found in storage at start-up."""
        ...

    async def reset(self, key: str, count: int) -> None:
        """Set `key` to `count`, as recounted from storage."""
        ...


class LocalCounters:
    """Counts in this process's memory."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    async def acquire(self, key: str, limit: int) -> bool:
        count = self._counts.get(key, 0)
        if count >= limit:
            return False
        self._counts[key] = count + 1
        return True

    async def release(self, key: str) -> None:
        count = self._counts.get(key, 0) - 1
        if count > 0:
            self._counts[key] = count
        else:
            self._counts.pop(key, None)

    async def seed(self, counts: dict[str, int]) -> None:
        for key, count in counts.items():
            self._counts[key] = self._counts.get(key, 0) + count

    async def reset(self, key: str, count: int) -> None:
        if count > 0:
            self._counts[key] = count
        else:
            self._counts.pop(key, None)


class OwnerQuotas:
    """`--max-uploads-per-owner` and `--max-requests-per-owner`; None is no limit."""

    def __init__(
        self, counters: Counters, *, max_uploads: int | None = None, max_requests: int | None = None
    ) -> None:
        self._counters = counters
        self.max_uploads = max_uploads
        self.max_requests = max_requests
        self._recounted: dict[str, float] = {}  #: owner -> when its uploads were last recounted
        self._recounting = asyncio.Lock()  #: one storage scan at a time, however many owners ask

    async def reserve_upload(self, owner: str, count_stored: Callable[[str], Awaitable[int]]) -> None:
        """Count a new unfinished upload of `owner`, or refuse it with 429.

        At the limit, the owner's unfinished uploads in storage are counted again first
        (`count_stored`, at most every RECOUNT_SECONDS per owner): the count is kept by
        the server, and an upload removed by another process (the operator's `prune`)
        would otherwise count for good.
        """
        if self.max_uploads is None:
            return
        key = "uploads:" + owner
        if await self._counters.acquire(key, self.max_uploads):
            return
        if await self._recount(owner, key, count_stored) and await self._counters.acquire(
            key, self.max_uploads
        ):
            return
        raise TooManyRequests(
            f"at most {self.max_uploads} unfinished uploads per owner; finish or delete one first",
            retry_after=UPLOAD_RETRY_AFTER,
        )

    async def _recount(self, owner: str, key: str, count_stored: Callable[[str], Awaitable[int]]) -> bool:
        """Set the owner's count from storage, unless it was done lately; whether it was."""
        async with self._recounting:
            now = time.monotonic()
            if now - self._recounted.get(owner, -RECOUNT_SECONDS) < RECOUNT_SECONDS:
                return False
            self._recounted = {o: t for o, t in self._recounted.items() if now - t < RECOUNT_SECONDS}
            self._recounted[owner] = now
            await self._counters.reset(key, await count_stored(owner))
        return True

    async def upload_ended(self, owner: str) -> None:
        if self.max_uploads is not None:
            await self._counters.release("uploads:" + owner)

    async def begin_request(self, owner: str) -> None:
        """Count one request of `owner` until `end_request`, or refuse it with 429."""
        limit = self.max_requests
        if limit is not None and not await self._counters.acquire("requests:" + owner, limit):
            raise TooManyRequests(
                f"at most {limit} requests per owner at once", retry_after=REQUEST_RETRY_AFTER
            )

    async def end_request(self, owner: str) -> None:
        if self.max_requests is not None:
            await self._counters.release("requests:" + owner)

    async def count_existing(self, uploads: AsyncIterator[UploadInfo]) -> None:
        """Seed the upload counts from what storage holds (at start-up)."""
        if self.max_uploads is None:
            return
        counts: dict[str, int] = {}
        async for info in uploads:
            if info.owner is not None and not info.is_complete:
                counts["uploads:" + info.owner] = counts.get("uploads:" + info.owner, 0) + 1
        await self._counters.seed(counts)
