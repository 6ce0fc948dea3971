"""The durable hook events: committed with the change they report, sent until answered.

post-create, post-finish, post-terminate and post-expire are written to the storage's
`Outbox` *before* the change they report, as an intent: the event and the state of the
upload it expects. The writing process holds the intent (a claim) until the change is
made, then delivers it; a process that finds an intent nobody holds (its writer died, or
the change failed) asks `resolve` whether the change was made, and delivers the event if
it was, or drops it if it was not. So no crash between a change and its event loses the
event, and none is delivered for a change that never happened.

A `HookSender` in every server process delivers them: at once, then with exponential
backoff and jitter until the application answers 2xx or the event is older than
`max_age` (it is then kept as failed, for an operator to retry or drop). A restarted
server sends what is pending; several instances on one outbox claim an event before
sending it, so no two send it at the same time. Each event keeps its id, which goes out
as `webhook-id`: a receiver drops duplicates by it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .errors import HookInvalid, HookUnavailable
from .hooks import Delivery, Hook, HookMessage
from .model import UploadInfo
from .storage import Outbox

log = logging.getLogger("uploadsrv.hooks")

#: An intent: written before its change, not delivered until `resolve` says it was made.
INTENT, PENDING, FAILED = "intent", "pending", "failed"
MAX_BACKOFF = 300.0  #: the longest wait between two attempts at one event
SCAN_SECONDS = 5.0  #: how often the outbox is listed for events other processes left or that are due
#: How long a scan trusts what it read of an event's next attempt, before reading it again
#: (an operator may have made it due, another instance may have tried it).
RECHECK_SECONDS = 60.0
CONCURRENCY = 8  #: events delivered at once by one process
#: The claim on an intent while its writer holds it (the change, then the first delivery),
#: renewed every third of it: a writer that died holds it no longer than this.
INTENT_LEASE = 10.0
#: How often an intent waits for this process to be done with an earlier one of the same
#: id (a crash left it, and it is being resolved while the client retries): rare.
BUSY_POLL_SECONDS = 0.05

#: Told of every delivery attempt: (hook, outcome) with outcome "delivered", "failed" or "given-up".
DeliveryListener = Callable[[str, str], None]
#: Whether the change an intent announced was made: True (deliver it), False (drop it),
#: None (cannot tell now: the upload is busy; ask again later).
Resolver = Callable[[dict[str, Any]], Awaitable[bool | None]]


@dataclass
class PendingEvent:
    """One event as operators see it."""

    id: str
    hook: str
    upload_id: str
    state: str
    created_at: float
    attempts: int
    next_at: float
    last_error: str | None

    @classmethod
    def of(cls, record: dict[str, Any]) -> PendingEvent:
        return cls(
            record["id"],
            record["hook"],
            record["upload_id"],
            record["state"],
            record["created_at"],
            record["attempts"],
            record["next_at"],
            record.get("last_error"),
        )


class HookSender:
    def __init__(
        self,
        outbox: Outbox,
        delivery: Delivery,
        *,
        max_age: float | None,
        backoff: float,
        lease: float,
        scan_seconds: float = SCAN_SECONDS,
        send: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Without `send`, events are only committed (by an operator command): a server sends them."""
        self.outbox = outbox
        self._delivery = delivery
        self._max_age = max_age
        self._backoff = backoff
        self._lease = lease
        self._scan_seconds = scan_seconds
        self._send = send
        self._clock = clock
        self._slots = asyncio.Semaphore(CONCURRENCY)
        self._busy: set[str] = set()
        self._tasks: set[asyncio.Future[None]] = set()
        #: event id -> the task renewing this process's claim on an intent it holds.
        self._renewals: dict[str, asyncio.Future[None]] = {}
        #: What this process knows of pending events: id -> (created_at, next_at, read_at),
        #: for the metrics and so a scan skips events not due without reading them.
        self._known: dict[str, tuple[float, float, float]] = {}
        self.listeners: list[DeliveryListener] = []
        #: Asked about intents that nobody holds; set by the upload service.
        self.resolve: Resolver | None = None
        #: Told after each scan: (pending events, age of the oldest in seconds).
        self.scanned: list[Callable[[int, float], None]] = []

    async def intend(self, message: HookMessage, info: UploadInfo) -> Intent:
        """Commit the event durably as an intent, held by this process until it is settled
        (`Intent`): the change it reports is made meanwhile."""
        now = self._clock()
        record = {
            "id": message.id,
            "hook": message.hook.value,
            "upload_id": info.id,
            "upload_created_at": info.created_at,
            "state": INTENT,
            "created_at": now,
            "attempts": 0,
            "next_at": now,
            "last_error": None,
            "body": message.body.decode(),
            "forward": [list(pair) for pair in message.forward],
            "env": message.env,
        }
        while message.id in self._busy:  # the same change's earlier intent, being resolved
            await asyncio.sleep(BUSY_POLL_SECONDS)
        self._busy.add(message.id)  # this process's scans leave it to its writer
        try:
            await self.outbox.put_event(message.id, record, lease=INTENT_LEASE)
        except BaseException:
            self._busy.discard(message.id)
            raise
        self._renewals[message.id] = self._spawn(self._renewing(message.id))
        return Intent(self, record)

    async def _renewing(self, event_id: str) -> None:
        """Keep this process's claim on an intent alive until it is released (a long
        request holds one from its start, then its first delivery)."""
        while True:
            await asyncio.sleep(INTENT_LEASE / 3)
            if not await self.outbox.renew_event(event_id, INTENT_LEASE):
                return

    async def _settle(self, record: dict[str, Any], change_made: bool | None) -> None:
        """The end of an intent's hold: deliver it, drop it, or leave it to `resolve`."""
        event_id = record["id"]
        if change_made and self._send:
            record["state"] = PENDING  # written if the first attempt fails
            self._known[event_id] = (record["created_at"], record["next_at"], self._clock())
            self._spawn(self._attempt(event_id, record))
            return
        self._stop_renewing(event_id)
        try:
            if change_made is None:
                await self.outbox.release_event(event_id, record)
            else:  # made, for a server to send; or not made: nothing to report
                await self.outbox.release_event(
                    event_id, {**record, "state": PENDING} if change_made else None
                )
        finally:
            self._busy.discard(event_id)
        if change_made is None and self._send:
            self._start(event_id)

    # -- the sending loop ----------------------------------------------------------

    async def run(self) -> None:
        """Scan the outbox now (what a previous run left) and every few seconds."""
        while True:
            try:
                await self.scan()
            except Exception:
                log.exception("hook outbox scan failed")
            await asyncio.sleep(self._scan_seconds)

    async def scan(self) -> None:
        seen = set()
        async for event_id in self.outbox.event_ids():
            seen.add(event_id)
            known = self._known.get(event_id)
            now = self._clock()
            if known is None or known[1] <= now or known[2] + RECHECK_SECONDS <= now:
                self._start(event_id)
        for gone in set(self._known) - seen - self._busy:
            del self._known[gone]  # delivered or dropped by another process
        pending, oldest = self.pending_stats()
        for listener in self.scanned:
            listener(pending, oldest)

    def _start(self, event_id: str) -> None:
        if event_id in self._busy:
            return
        self._busy.add(event_id)
        self._spawn(self._attempt(event_id, None))

    def _spawn(self, work: Awaitable[None]) -> asyncio.Future[None]:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _stop_renewing(self, event_id: str) -> None:
        renewal = self._renewals.pop(event_id, None)
        if renewal is not None:
            renewal.cancel()

    async def _attempt(self, event_id: str, claimed: dict[str, Any] | None) -> None:
        """Deliver the event: `claimed` is its record when this process holds it already."""
        try:
            async with self._slots:
                record = claimed or await self._claim(event_id)
                if record is not None:
                    await self._deliver(record)
        except Exception:
            log.exception("hook event failed", extra={"event_id": event_id})
        finally:
            self._stop_renewing(event_id)
            self._busy.discard(event_id)

    async def _claim(self, event_id: str) -> dict[str, Any] | None:
        """The event's record, claimed, if it is due and not another process's; an intent
        resolved first (delivered if its change was made, dropped if not)."""
        record = await self.outbox.read_event(event_id)
        if record is None or record["state"] == FAILED:
            self._known.pop(event_id, None)
            return None
        self._known[event_id] = (record["created_at"], record["next_at"], self._clock())
        if record["next_at"] > self._clock():
            return None
        record = await self.outbox.claim_event(event_id, self._lease)
        if record is None or record["state"] != INTENT:  # None: another process has it, or it is gone
            return record
        try:
            change_made = None if self.resolve is None else await self.resolve(record)
        except BaseException:
            await self.outbox.release_event(event_id, record)
            raise
        if change_made is None:  # the upload is busy: its change may be under way
            record["next_at"] = self._clock() + self._scan_seconds
            self._known[event_id] = (record["created_at"], record["next_at"], self._clock())
            await self.outbox.release_event(event_id, record)
            return None
        if not change_made:
            await self.outbox.release_event(event_id, None)
            self._known.pop(event_id, None)
            log.info("hook intent dropped: its change was not made", extra={"event_id": event_id})
            return None
        record["state"] = PENDING
        return record

    async def _deliver(self, record: dict[str, Any]) -> None:
        """Send a claimed event once; it is removed when delivered, rescheduled when not."""
        event_id = record["id"]
        try:
            await self._delivery.deliver(_message(record), attempts=1)
        except (HookUnavailable, HookInvalid) as exc:
            self._failed(record, exc.detail)
            await self.outbox.release_event(event_id, record)
            return
        except BaseException:
            await self.outbox.release_event(event_id, record)
            raise
        await self.outbox.release_event(event_id, None)
        self._known.pop(event_id, None)
        self._tell(record["hook"], "delivered")
        log.info("hook delivered", extra={"event_id": event_id, "hook": record["hook"]})

    def _failed(self, record: dict[str, Any], error: str) -> None:
        """Schedule the next attempt, or give up on an event older than max_age."""
        now = self._clock()
        record["attempts"] += 1
        record["last_error"] = error
        delay = min(MAX_BACKOFF, self._backoff * 2 ** (record["attempts"] - 1)) * random.uniform(0.5, 1.0)
        record["next_at"] = now + delay
        if self._max_age is not None and now - record["created_at"] >= self._max_age:
            record["state"] = FAILED
            self._known.pop(record["id"], None)
            self._tell(record["hook"], "given-up")
            log.error(
                "hook given up", extra={"event_id": record["id"], "hook": record["hook"], "error": error}
            )
            return
        self._known[record["id"]] = (record["created_at"], record["next_at"], now)
        self._tell(record["hook"], "failed")
        log.warning("hook delivery failed", extra={"event_id": record["id"], "error": error})

    def _tell(self, hook: str, outcome: str) -> None:
        for listener in self.listeners:
            listener(hook, outcome)

    def pending_stats(self) -> tuple[int, float]:
        """Pending events this process knows of, and the age of the oldest (seconds)."""
        if not self._known:
            return 0, 0.0
        return len(self._known), self._clock() - min(known[0] for known in self._known.values())

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class Intent:
    """A durable event written before its change and held by this process: settled with
    `made` (deliver it now), `not_made` (drop it) or `undecided` (an error left the change
    in doubt: the sender resolves it from the upload's state)."""

    def __init__(self, sender: HookSender, record: dict[str, Any]) -> None:
        self._sender = sender
        self._record = record
        self._settled = False

    async def made(self) -> None:
        await self._settle(True)

    async def not_made(self) -> None:
        await self._settle(False)

    async def undecided(self) -> None:
        await self._settle(None)

    async def _settle(self, change_made: bool | None) -> None:
        if self._settled:
            return
        self._settled = True
        await self._sender._settle(self._record, change_made)


def _message(record: dict[str, Any]) -> HookMessage:
    return HookMessage(
        Hook(record["hook"]),
        record["body"].encode(),
        record["id"],
        forward=[tuple(pair) for pair in record["forward"]],
        env=record["env"],
    )


# -- operators ---------------------------------------------------------------------


async def pending_events(outbox: Outbox) -> AsyncIterator[PendingEvent]:
    """Every event in the outbox, pending or given up."""
    async for event_id in outbox.event_ids():
        record = await outbox.read_event(event_id)
        if record is not None:
            yield PendingEvent.of(record)


async def retry_event(outbox: Outbox, event_id: str, clock: Callable[[], float] = time.time) -> bool:
    """Make an event due now, a given-up one pending again with a fresh max age; a running
    server sends it on its next scan. False if there is no such event or a server is
    sending it right now."""
    record = await outbox.claim_event(event_id, 60.0)
    if record is None:
        return False
    now = clock()
    if record["state"] == FAILED:
        record.update(state=PENDING, created_at=now)
    record["next_at"] = now  # an intent stays one: a server resolves it before sending
    await outbox.release_event(event_id, record)
    return True


async def drop_event(outbox: Outbox, event_id: str) -> bool:
    record = await outbox.claim_event(event_id, 60.0)
    if record is None:
        return False
    await outbox.release_event(event_id, None)
    return True


@contextlib.asynccontextmanager
async def running(sender: HookSender) -> AsyncIterator[None]:
    """The sender's loop for the lifetime of the server."""
    task = asyncio.create_task(sender.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await sender.close()
