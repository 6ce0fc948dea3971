"""The lock every instance shares: a lease object taken with a conditional write."""

from __future__ import annotations

import asyncio
import json
from contextlib import suppress

from botocore.exceptions import ClientError

from uploadsrv.core.errors import StorageUnavailable, UploadBusy, UploadNotFound

from .client import S3Client

LEASE_SECONDS = 6.0  #: a lock whose holder died frees itself after this long...
RENEW_SECONDS = 2.0  #: ...as its holder renews it this often (a heartbeat)
#: A waiter's pauses between attempts: quick at first (a live holder lets go within
#: PREEMPT_POLL_SECONDS), then once a second until a dead holder's lease runs out.
LEASE_POLL_SECONDS = (0.2, 0.2, 0.2, 0.3, 0.4, 0.7, 1.0)
PREEMPT_POLL_SECONDS = 0.25  #: how often a lease holder looks for a waiter's marker
#: Where waiters leave their markers, under the prefix: one listing finds them all.
PREEMPT = "_preempt/"


class Markers:
    """The preempt markers waiters left for the leases this process holds, found with one
    listing per PREEMPT_POLL_SECONDS however many it holds. (A HEAD of each lease's
    marker was a request per upload every 0.25 s: on moto, 3.6 ms of its CPU each, a
    third as much again as the parts' own bytes cost it at 16 uploads.)"""

    def __init__(self, s3: S3Client) -> None:
        self._s3 = s3
        self._held: dict[str, Lease] = {}  #: marker key -> the lease it asks for
        self._poller: asyncio.Task[None] | None = None

    def watch(self, marker: str, lease: Lease) -> None:
        self._held[marker] = lease
        if self._poller is None or self._poller.done():
            self._poller = asyncio.ensure_future(self._poll())

    def forget(self, marker: str) -> None:
        self._held.pop(marker, None)

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with suppress(asyncio.CancelledError):
                await self._poller

    async def _poll(self) -> None:
        while self._held:
            await asyncio.sleep(PREEMPT_POLL_SECONDS)
            with suppress(StorageUnavailable):
                async for obj in self._s3.objects(self._s3.prefix + PREEMPT):
                    lease = self._held.get(obj["Key"])
                    if lease is not None:
                        lease.ask()


class Lease:
    """A lease object created with If-None-Match under ``<id><name>.lock``.

    The holder renews it while it holds it; a holder that died frees it after
    LEASE_SECONDS. A waiter leaves a preempt marker (``_preempt/<id><name>``) that the
    holder's `Markers` looks for.
    """

    def __init__(self, s3: S3Client, upload_id: str, name: str, markers: Markers) -> None:
        self._s3 = s3
        self._key = s3.key(upload_id, name + ".lock")
        self._marker = f"{s3.prefix}{PREEMPT}{upload_id}{name}"
        self._markers = markers
        self._etag: str | None = None
        self._asked = False
        self._keeper: asyncio.Task[None] | None = None

    def preempt_requested(self) -> bool:
        return self._asked

    def ask(self) -> None:
        """A waiter asked for this upload (its marker was found)."""
        self._asked = True

    async def acquire(self, timeout: float, preempt: bool) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        asked = False
        attempt = 0
        while not await self._try_take():
            if not preempt:
                raise UploadBusy()
            if not asked:
                await self._s3.put(self._marker)
                asked = True
            pause = LEASE_POLL_SECONDS[min(attempt, len(LEASE_POLL_SECONDS) - 1)]
            if loop.time() + pause > deadline:
                raise UploadBusy("another request holds this upload; retry shortly")
            attempt += 1
            await asyncio.sleep(pause)
        if asked:
            await self._s3.delete_quietly(self._marker)
        self._keeper = asyncio.ensure_future(self._keep())
        self._markers.watch(self._marker, self)

    def _body(self) -> bytes:
        return json.dumps({"expires": self._s3.clock() + LEASE_SECONDS, "owner": self._s3.instance}).encode()

    async def _try_take(self) -> bool:
        try:
            response = await self._s3.put(self._key, self._body(), IfNoneMatch="*")
        except ClientError:
            return await self._take_over_stale(self._body())
        self._etag = response["ETag"]
        return True

    async def _take_over_stale(self, body: bytes) -> bool:
        """Take a lease whose holder died (expired), or one this process failed to release
        (an S3 outage during release): this process's own per-upload lock is held here, so
        a lease it owns cannot belong to a live request."""
        try:
            current, etag = await self._s3.read_object(self._key)
        except UploadNotFound:
            return False  # released meanwhile; the next attempt takes it
        lease = json.loads(current)
        if lease.get("owner") != self._s3.instance and lease.get("expires", 0) > self._s3.clock():
            return False
        try:
            response = await self._s3.put(self._key, body, IfMatch=etag)
        except ClientError:
            return False
        self._etag = response["ETag"]
        return True

    async def _keep(self) -> None:
        """Renew the lease while held, RENEW_SECONDS after the last renewal began (a slow
        answer must not stretch the beat: on a saturated moto renewals took 2-3 s, and a
        pause counted from the answer made it 4-5 s of the lease's 6); after an outage,
        again at the next poll's pace."""
        loop = asyncio.get_running_loop()
        due = loop.time() + RENEW_SECONDS
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            began = loop.time()
            try:
                renewed = await self._renew()
            except StorageUnavailable:
                due = loop.time() + PREEMPT_POLL_SECONDS
                continue
            if not renewed:
                self._asked = True  # the lease was lost: stop writing
                return
            due = began + RENEW_SECONDS

    async def _renew(self) -> bool:
        try:
            response = await self._s3.put(self._key, self._body(), IfMatch=self._etag)
        except ClientError:
            return False
        self._etag = response["ETag"]
        return True

    async def release(self) -> None:
        self._markers.forget(self._marker)
        if self._keeper is not None:
            self._keeper.cancel()
            with suppress(asyncio.CancelledError):
                await self._keeper
        with suppress(StorageUnavailable, UploadNotFound, ClientError):
            await self._s3.call("delete_object", Key=self._key, IfMatch=self._etag)
