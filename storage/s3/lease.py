"""The lock every instance shares: a lease object taken with a conditional write.

An upload's lease object is written twice, when taken and when released: while a
request holds it longer, its process's `Heartbeat` (one object per process, renewed
every RENEW_SECONDS) keeps it, instead of a renewal of every lease object every
RENEW_SECONDS (16 uploads: 8 requests a second). A chunk's lease is renewed itself:
`chunks.busy` goes by its LastModified.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import suppress
from typing import Any

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
#: Where each process's heartbeat lives, under the prefix (no upload id starts with `_`).
HEARTBEATS = "_heartbeats/"
#: The `expires` of a heartbeat-kept lease, for instances from before heartbeats, which
#: read only that: they wait this long for a dead holder, never take a live one's.
LEGACY_EXPIRY_SECONDS = 60.0
#: A heartbeat that lands this close to a lease's end (or later) may have come too late:
#: a waiter could have taken the lease meanwhile, so its holder stops.
LAPSE_MARGIN_SECONDS = 0.5


class Heartbeat:
    """This process's liveness for the upload leases it holds: one object, renewed every
    RENEW_SECONDS while it holds a lease taken RENEW_SECONDS ago or more. A lease object
    names it; a waiter finding the lease's own time run out reads the heartbeat.

    A beat that landed after a held lease could have lapsed (the process paused, S3 was
    slow or away) tells that lease it may be lost, as a failed renewal did."""

    def __init__(self, s3: S3Client) -> None:
        self._s3 = s3
        self.key = f"{s3.prefix}{HEARTBEATS}{s3.instance}"
        self._held: dict[Lease, float] = {}  #: lease -> the loop time its liveness runs out
        self._keeper: asyncio.Task[None] | None = None

    def join(self, lease: Lease, taken: float) -> None:
        """`lease` was taken at loop time `taken`: its own object keeps it LEASE_SECONDS."""
        self._held[lease] = taken + LEASE_SECONDS
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.ensure_future(self._keep(taken + RENEW_SECONDS))

    def leave(self, lease: Lease) -> None:
        self._held.pop(lease, None)

    async def close(self) -> None:
        await _stopped(self._keeper)

    async def _keep(self, due: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            self._lapse(loop.time())
            if not self._held:
                return
            began = loop.time()
            body = json.dumps({"expires": self._s3.clock() + LEASE_SECONDS}).encode()
            try:
                await self._s3.put(self.key, body)
            except (StorageUnavailable, UploadNotFound):  # missed: a lease lapses unless one lands
                due = loop.time() + PREEMPT_POLL_SECONDS
                continue
            self._lapse(loop.time())
            for lease in self._held:
                self._held[lease] = max(self._held[lease], began + LEASE_SECONDS)
            due = began + RENEW_SECONDS

    def _lapse(self, now: float) -> None:
        """Tell the leases whose liveness ran out (as far as a waiter knows) they may be lost."""
        for lease, until in list(self._held.items()):
            if now > until - LAPSE_MARGIN_SECONDS:
                lease.ask()
                del self._held[lease]


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
        await _stopped(self._poller)

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

    def __init__(
        self, s3: S3Client, upload_id: str, name: str, markers: Markers, heartbeat: Heartbeat | None
    ) -> None:
        self._s3 = s3
        self._key = s3.key(upload_id, name + ".lock")
        self._marker = f"{s3.prefix}{PREEMPT}{upload_id}{name}"
        self._markers = markers
        #: Keeps this lease past its own LEASE_SECONDS; None: the lease object is renewed.
        self._heartbeat = heartbeat
        self._etag: str | None = None
        self._asked = False
        self._keeper: asyncio.Task[None] | None = None
        self._taken = 0.0  #: the loop time the last attempt to take it began

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
        if self._heartbeat is None:
            self._keeper = asyncio.ensure_future(self._keep())
        else:
            self._heartbeat.join(self, self._taken)
        self._markers.watch(self._marker, self)

    def _body(self) -> bytes:
        now = self._s3.clock()
        if self._heartbeat is None:
            return json.dumps({"expires": now + LEASE_SECONDS, "owner": self._s3.instance}).encode()
        lease = {"until": now + LEASE_SECONDS, "heartbeat": self._heartbeat.key, "owner": self._s3.instance}
        return json.dumps({**lease, "expires": now + LEGACY_EXPIRY_SECONDS}).encode()

    async def _try_take(self) -> bool:
        self._taken = asyncio.get_running_loop().time()  # the lease's own time counts from here
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
        if lease.get("owner") != self._s3.instance and await self._alive(lease):
            return False
        try:
            response = await self._s3.put(self._key, body, IfMatch=etag)
        except ClientError:
            return False
        self._etag = response["ETag"]
        return True

    async def _alive(self, lease: dict[str, Any]) -> bool:
        """Whether another process's lease still holds: its own time, else its heartbeat's."""
        now = self._s3.clock()
        if lease.get("until", lease.get("expires", 0)) > now:
            return True
        if "heartbeat" not in lease:
            return False
        try:
            beat, _ = await self._s3.read_object(lease["heartbeat"])
        except UploadNotFound:
            return False
        return json.loads(beat).get("expires", 0) > now

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
        if self._heartbeat is not None:
            self._heartbeat.leave(self)
        await _stopped(self._keeper)
        with suppress(StorageUnavailable, UploadNotFound, ClientError):
            await self._s3.call("delete_object", Key=self._key, IfMatch=self._etag)


async def _stopped(task: asyncio.Task[None] | None) -> None:
    """Cancel a background task, if there is one, and wait until it has ended."""
    if task is not None:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
