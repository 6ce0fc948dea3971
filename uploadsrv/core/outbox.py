"""The durable hook events: committed with the change they report, sent until answered.

post-create, post-finish, post-terminate and post-expire are written to the storage's
`Outbox` before the client hears of the change, and a `HookSender` in every server process
delivers them: at once, then with exponential backoff and jitter until the application
answers 2xx or the event is older than `max_age` (it is then kept as failed, for an
operator to retry or drop). A restarted server sends what is pending; several instances on
one outbox claim an event before sending it, so no two send it at the same time. Each
event keeps its id, which goes out as `webhook-id`: a receiver drops duplicates by it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from .errors import HookInvalid, HookUnavailable
from .hooks import Delivery, Hook, HookMessage
from .storage import Outbox

log = logging.getLogger("uploadsrv.hooks")

PENDING, FAILED = "pending", "failed"
MAX_BACKOFF = 300.0  #: the longest wait between two attempts at one event
SCAN_SECONDS = 5.0  #: how often the outbox is listed for events other processes left or that are due
#: How long a scan trusts what it read of an event's next attempt, before reading it again
#: (an operator may have made it due, another instance may have tried it).
RECHECK_SECONDS = 60.0
CONCURRENCY = 8  #: events delivered at once by one process

#: Told of every delivery attempt: (hook, outcome) with outcome "delivered", "failed" or "given-up".
DeliveryListener = Callable[[str, str], None]


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
        self._tasks: set[asyncio.Task[None]] = set()
        #: What this process knows of pending events: id -> (created_at, next_at, read_at),
        #: for the metrics and so a scan skips events not due without reading them.
        self._known: dict[str, tuple[float, float, float]] = {}
        self.listeners: list[DeliveryListener] = []
        #: Told after each scan: (pending events, age of the oldest in seconds).
        self.scanned: list[Callable[[int, float], None]] = []

    async def put(self, message: HookMessage, upload_id: str) -> None:
        """Commit the event durably, then start delivering it."""
        now = self._clock()
        record = {
            "id": message.id,
            "hook": message.hook.value,
            "upload_id": upload_id,
            "state": PENDING,
            "created_at": now,
            "attempts": 0,
            "next_at": now,
            "last_error": None,
            "body": message.body.decode(),
            "forward": [list(pair) for pair in message.forward],
            "env": message.env,
        }
        await self.outbox.put_event(message.id, record)
        if self._send:
            self._known[message.id] = (now, now, now)
            self._start(message.id)

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
        task = asyncio.ensure_future(self._attempt(event_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _attempt(self, event_id: str) -> None:
        try:
            async with self._slots:
                await self._deliver(event_id)
        except Exception:
            log.exception("hook event failed", extra={"event_id": event_id})
        finally:
            self._busy.discard(event_id)

    async def _deliver(self, event_id: str) -> None:
        record = await self.outbox.read_event(event_id)
        if record is None or record["state"] != PENDING:
            self._known.pop(event_id, None)
            return
        self._known[event_id] = (record["created_at"], record["next_at"], self._clock())
        if record["next_at"] > self._clock():
            return
        record = await self.outbox.claim_event(event_id, self._lease)
        if record is None:  # another process is sending it, or it is gone
            return
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
        record["created_at"] = now
    record.update(state=PENDING, next_at=now)
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
