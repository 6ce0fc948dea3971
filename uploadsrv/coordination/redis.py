"""Leases, release requests and events for several instances, in Redis (redis-py asyncio).

Keys, hash-tagged by upload so a Cluster keeps each upload's keys in one slot:

``uploadsrv:{<id>}:lock``        the upload's lease: the holder's name, with a TTL
``uploadsrv:{<id>}:chunk:<n>``   the lease on chunk n of a chunk session
``uploadsrv:{<id>}:chunks``      sorted set: leased chunk numbers by expiry (for expiry's "busy?")
``uploadsrv:{<id>}:fence``       INCR'd on every grant: the fencing token

Channels: ``uploadsrv:release`` (a lease key whose holder should let go),
``uploadsrv:released`` (a lease key just freed: waiters try again at once) and
``uploadsrv:events`` (upload events for other instances' event streams).

A lease lives LEASE_SECONDS and is renewed every third of that while held, so a dead
instance's leases free themselves within LEASE_SECONDS. A holder whose lease was taken
over stops at once; one that cannot reach Redis stops STOP_MARGIN_SECONDS before its
lease would run out, and records what it received while the lease surely still holds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from uploadsrv.core.coordination import RemoteListener
from uploadsrv.core.errors import StorageUnavailable, UploadBusy

log = logging.getLogger("uploadsrv.redis")

LEASE_SECONDS = 5.0  #: a dead instance's lease is free after this long
RENEW_SECONDS = LEASE_SECONDS / 3
#: A holder that cannot renew stops this long before its lease runs out, so it records
#: what it received while the lease still surely holds.
STOP_MARGIN_SECONDS = LEASE_SECONDS * 0.4
REASK_SECONDS = 1.0  #: a waiter asks again (and retries) at least this often, should a message be lost
RECONNECT_SECONDS = (0.05, 1.0)  #: the subscriber's first and longest pause before reconnecting
OUTBOX = 10_000  #: events queued for publishing while Redis is slow; more are dropped
FENCE_KEEP_MS = 86_400_000  #: an upload's fence counter outlives a day without grants

RELEASE, RELEASED, EVENTS = "uploadsrv:release", "uploadsrv:released", "uploadsrv:events"

#: Take the lease if free and return a new fencing token, else minus the ms it has left.
#: KEYS: lease, fence, chunk set; ARGV: holder, ttl ms, chunk number or "".
ACQUIRE = """
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if ARGV[3] ~= '' then
    local now = redis.call('time')
    redis.call('zadd', KEYS[3], now[1] * 1000 + math.floor(now[2] / 1000) + ARGV[2], ARGV[3])
    if redis.call('pttl', KEYS[3]) < tonumber(ARGV[2]) then redis.call('pexpire', KEYS[3], ARGV[2]) end
  end
  local fence = redis.call('incr', KEYS[2])
  redis.call('pexpire', KEYS[2], ARGV[4])
  return fence
end
local left = redis.call('pttl', KEYS[1])
if left < 1 then left = 1 end
return -left
"""
#: Extend the lease if still ours: 1, else 0. KEYS: lease, chunk set; ARGV: holder, ttl ms, chunk.
RENEW = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('pexpire', KEYS[1], ARGV[2])
if ARGV[3] ~= '' then
  local now = redis.call('time')
  redis.call('zadd', KEYS[2], now[1] * 1000 + math.floor(now[2] / 1000) + ARGV[2], ARGV[3])
  if redis.call('pttl', KEYS[2]) < tonumber(ARGV[2]) then redis.call('pexpire', KEYS[2], ARGV[2]) end
end
return 1
"""
#: Free the lease if still ours and tell the waiters. KEYS: lease, chunk set; ARGV: holder, chunk, channel.
RELEASE_SCRIPT = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('del', KEYS[1])
if ARGV[2] ~= '' then redis.call('zrem', KEYS[2], ARGV[2]) end
redis.call('publish', ARGV[3], KEYS[1])
return 1
"""
#: A new token above `floor` if the lease is still ours (Redis lost its counter), else 0.
#: KEYS: lease, fence; ARGV: holder, floor.
REFENCE = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
local fence = redis.call('incr', KEYS[2])
if fence <= tonumber(ARGV[2]) then
  fence = tonumber(ARGV[2]) + 1
  redis.call('set', KEYS[2], fence)
end
return fence
"""
#: Add one if below the limit: 1, else 0. KEYS: count; ARGV: limit, ms it lives unused (or 0).
COUNT_UP = """
local count = tonumber(redis.call('get', KEYS[1]) or '0')
if count >= tonumber(ARGV[1]) then return 0 end
redis.call('incr', KEYS[1])
if tonumber(ARGV[2]) > 0 then redis.call('pexpire', KEYS[1], ARGV[2]) end
return 1
"""
#: Take one, never below zero. KEYS: count.
COUNT_DOWN = """
if redis.call('decr', KEYS[1]) <= 0 then redis.call('del', KEYS[1]) end
return 1
"""
#: Add the counts found in storage, once for all instances (the first to start seeds).
#: KEYS: the seeded marker, then the counts; ARGV: the counts.
SEED = """
if not redis.call('set', KEYS[1], '1', 'NX') then return 0 end
for i = 2, #KEYS do redis.call('incrby', KEYS[i], ARGV[i - 1]) end
return 1
"""
#: Set a count recounted from storage. KEYS: the count; ARGV: its value.
RESET = """
if tonumber(ARGV[1]) > 0 then redis.call('set', KEYS[1], ARGV[1]) else redis.call('del', KEYS[1]) end
return 1
"""
#: A count of requests in flight lives this long after its last use, should the instance
#: counting them die with some in flight.
REQUEST_COUNT_MS = 600_000
#: How many chunk leases of a session are live. KEYS: chunk set.
CHUNKS_BUSY = """
local now = redis.call('time')
return redis.call('zcount', KEYS[1], '(' .. (now[1] * 1000 + math.floor(now[2] / 1000)), '+inf')
"""

#: Fail fast when Redis is down (a refused connection is retried once, at once), so a
#: request answers 503 instead of hanging; a silent Redis is given a second.
CLIENT_OPTIONS: dict[str, Any] = {
    "socket_connect_timeout": 1.0,
    "socket_timeout": 2.0,
    "retry": Retry(NoBackoff(), 1),
}


def client_from_url(url: str) -> aioredis.Redis | RedisCluster:
    """A client for `redis://`, `rediss://` or `unix://` (redis-py's own URLs),
    `redis+sentinel://host:port[,host:port...]/service[/db]` and
    `redis+cluster://host:port` (either with `rediss+` for TLS). Raises ValueError."""
    scheme, _, _ = url.partition("://")
    if scheme in ("redis+sentinel", "rediss+sentinel"):
        return _sentinel_client(url)
    if scheme in ("redis+cluster", "rediss+cluster"):
        return RedisCluster.from_url(url.replace("+cluster", "", 1), **CLIENT_OPTIONS)
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"not a Redis URL: {url!r} (redis://host:port/db, rediss://, redis+sentinel://)")
    return aioredis.Redis.from_url(url, **CLIENT_OPTIONS)


def _sentinel_client(url: str) -> aioredis.Redis:
    parts = urlsplit(url)
    hosts = []
    for member in parts.netloc.rpartition("@")[2].split(","):
        host, _, port = member.partition(":")
        hosts.append((host, int(port or 26379)))
    service, _, db = parts.path.strip("/").partition("/")
    if not service or not hosts[0][0]:
        raise ValueError(f"a Sentinel URL names its sentinels and service: {url!r}")
    options = dict(CLIENT_OPTIONS, **dict(parse_qsl(parts.query)))
    if parts.password:
        options["password"] = parts.password
    if parts.username:
        options["username"] = parts.username
    if parts.scheme.startswith("rediss"):
        options["ssl"] = True
    sentinel = Sentinel(hosts, sentinel_kwargs={"socket_timeout": 1.0}, **options)
    return sentinel.master_for(service, db=int(db or 0))


def _keys(upload_id: str, chunk: int | None) -> tuple[str, str, str]:
    """The lease key, the fence key and the chunk set key of an upload (or chunk)."""
    base = f"uploadsrv:{{{upload_id}}}"
    lease = f"{base}:lock" if chunk is None else f"{base}:chunk:{chunk}"
    return lease, f"{base}:fence", f"{base}:chunks"


class RedisCoordinator:
    """The `Coordinator` contract on one Redis (standalone, Sentinel or Cluster)."""

    def __init__(self, url: str, *, lease_seconds: float = LEASE_SECONDS) -> None:
        self._url = urlsplit(url)._replace(netloc=urlsplit(url).netloc.rpartition("@")[2]).geturl()
        self._client = client_from_url(url)
        self.lease_seconds = lease_seconds
        self.instance = secrets.token_hex(8)
        self._held: dict[str, RedisLease] = {}
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._listeners: list[RemoteListener] = []
        self._outbox: asyncio.Queue[str] = asyncio.Queue(OUTBOX)
        self._tasks: list[asyncio.Task[None]] = []
        self._scripts = {
            name: self._client.register_script(source)
            for name, source in {
                "acquire": ACQUIRE,
                "renew": RENEW,
                "release": RELEASE_SCRIPT,
                "refence": REFENCE,
                "chunks_busy": CHUNKS_BUSY,
                "count_up": COUNT_UP,
                "count_down": COUNT_DOWN,
                "seed": SEED,
                "reset": RESET,
            }.items()
        }
        self.counters = RedisCounters(self)

    def __repr__(self) -> str:
        return f"RedisCoordinator({self._url!r})"

    async def start(self) -> None:
        try:
            await self._client.ping()
        except RedisError as exc:
            raise RuntimeError(f"Redis at {self._url} is not usable: {exc}") from exc
        self._tasks = [asyncio.ensure_future(self._subscribe()), asyncio.ensure_future(self._send())]

    async def check(self) -> None:
        try:
            await self._client.ping()
        except RedisError as exc:
            raise RuntimeError(f"Redis unreachable: {exc}") from exc

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with suppress(asyncio.CancelledError):
                await task
        await self._client.aclose()

    async def script(self, name: str, keys: list[str], args: list[str | int | float]) -> int:
        """Run one of the scripts; an unreachable Redis is StorageUnavailable (503)."""
        try:
            return int(await self._scripts[name](keys=keys, args=args))
        except RedisError as exc:
            raise StorageUnavailable(f"Redis unreachable: {exc}") from exc

    # -- leases ------------------------------------------------------------------

    @asynccontextmanager
    async def lock(
        self,
        upload_id: str,
        *,
        timeout: float,
        preempt: bool = True,
        chunk: int | None = None,
        on_preempt: Callable[[bool], None] | None = None,
    ) -> AsyncIterator[RedisLease]:
        lease = RedisLease(self, upload_id, chunk, on_preempt)
        await lease.acquire(timeout, preempt)
        self._held[lease.key] = lease
        try:
            yield lease
        finally:
            if self._held.get(lease.key) is lease:
                del self._held[lease.key]
            await lease.release()

    async def chunks_busy(self, upload_id: str) -> bool:
        return await self.script("chunks_busy", [_keys(upload_id, None)[2]], []) > 0

    def ask_release(self, key: str) -> None:
        self._queue(RELEASE, key)

    def released(self, key: str) -> asyncio.Future[None]:
        """A future that resolves when `key` is released (by any instance)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, set()).add(future)
        future.add_done_callback(lambda f: self._forget(key, f))
        return future

    def _forget(self, key: str, future: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(key)
        if waiters is not None:
            waiters.discard(future)
            if not waiters:
                del self._waiters[key]

    # -- events ------------------------------------------------------------------

    def publish(self, event: str, upload_id: str, data: dict[str, object]) -> None:
        message = {"from": self.instance, "event": event, "id": upload_id, "data": data}
        self._queue(EVENTS, json.dumps(message))

    def subscribe(self, listener: RemoteListener) -> None:
        self._listeners.append(listener)

    def _queue(self, channel: str, message: str) -> None:
        with suppress(asyncio.QueueFull):  # Redis is down or slow: the fallbacks take over
            self._outbox.put_nowait(channel + "\n" + message)

    async def _send(self) -> None:
        """Publish queued messages in order, one connection's round trip each."""
        while True:
            channel, _, message = (await self._outbox.get()).partition("\n")
            try:
                await self._client.publish(channel, message)
            except RedisError as exc:
                log.debug("publish failed", extra={"channel": channel, "error": str(exc)})

    async def _subscribe(self) -> None:
        """Listen on the three channels for as long as the server runs, reconnecting."""
        pause = RECONNECT_SECONDS[0]
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(RELEASE, RELEASED, EVENTS)
                pause = RECONNECT_SECONDS[0]
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is not None and message["type"] == "message":
                        self._dispatch(message["channel"].decode(), message["data"].decode())
            except (RedisError, OSError) as exc:
                log.debug("Redis subscription lost", extra={"error": str(exc)})
            finally:
                with suppress(RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(pause)
            pause = min(pause * 2, RECONNECT_SECONDS[1])

    def _dispatch(self, channel: str, data: str) -> None:
        if channel == RELEASE:
            lease = self._held.get(data)
            if lease is not None:
                lease.ask()
        elif channel == RELEASED:
            for future in list(self._waiters.get(data, ())):
                if not future.done():
                    future.set_result(None)
        elif channel == EVENTS:
            message = json.loads(data)
            if message["from"] != self.instance:
                for listener in self._listeners:
                    listener(message["event"], message["id"], message["data"])


class RedisLease:
    """One held (or wanted) lease, renewed by a timer while held."""

    def __init__(
        self,
        coordinator: RedisCoordinator,
        upload_id: str,
        chunk: int | None,
        on_preempt: Callable[[bool], None] | None,
    ) -> None:
        self._coordinator = coordinator
        self.key, self._fence_key, self._chunks_key = _keys(upload_id, chunk)
        self._chunk = "" if chunk is None else str(chunk)
        self._holder = f"{coordinator.instance}:{secrets.token_hex(4)}"
        self._on_preempt = on_preempt
        self._asked = False
        self._timer: asyncio.TimerHandle | None = None
        self._renewal: asyncio.Task[None] | None = None
        self._valid_until = 0.0
        self.fence = 0

    @property
    def _ttl_ms(self) -> int:
        return int(self._coordinator.lease_seconds * 1000)

    def preempt_requested(self) -> bool:
        return self._asked

    def valid(self) -> bool:
        """Whether the lease is surely still ours: renewed less than a TTL ago (monotonic
        clock, so a process paused for longer knows it on waking). A holder asked to let
        go still holds it while it records what it received."""
        return asyncio.get_running_loop().time() < self._valid_until

    def ask(self, lost: bool = False) -> None:
        """Another instance wants the upload, or (`lost`) the lease is lost: stop, once."""
        if not self._asked:
            self._asked = True
            if self._on_preempt is not None:
                self._on_preempt(lost)

    async def acquire(self, timeout: float, preempt: bool) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        asked_at: float | None = None
        while True:
            released = self._coordinator.released(self.key)  # before trying: no release slips by
            try:
                started = loop.time()
                result = await self._coordinator.script(
                    "acquire",
                    [self.key, self._fence_key, self._chunks_key],
                    [self._holder, self._ttl_ms, self._chunk, FENCE_KEEP_MS],
                )
                if result > 0:
                    self.fence = result
                    self._valid_until = started + self._coordinator.lease_seconds
                    self._schedule_renewal()
                    return
                if not preempt:
                    raise UploadBusy()
                now = loop.time()
                if now >= deadline:
                    raise UploadBusy("another request holds this upload; retry shortly")
                if asked_at is None or now - asked_at >= REASK_SECONDS:
                    self._coordinator.ask_release(self.key)
                    asked_at = now
                # Freed by its holder (a message), or its TTL runs out (a dead holder).
                wait = min(-result / 1000, REASK_SECONDS, deadline - now)
                await asyncio.wait({released}, timeout=wait)
            finally:
                released.cancel()

    def _schedule_renewal(self, delay: float = RENEW_SECONDS) -> None:
        """A timer, not a task: most requests end before the first renewal is due."""
        self._timer = asyncio.get_running_loop().call_later(delay, self._renew_now)

    def _renew_now(self) -> None:
        self._renewal = asyncio.ensure_future(self._renew())

    async def _renew(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            kept = await self._coordinator.script(
                "renew", [self.key, self._chunks_key], [self._holder, self._ttl_ms, self._chunk]
            )
        except StorageUnavailable:
            if loop.time() >= self._valid_until - STOP_MARGIN_SECONDS:
                self.ask(lost=True)  # soon it cannot be proven ours: stop, keep the bytes
            self._schedule_renewal(0.25)  # and try on, so the commit still finds it valid
            return
        if not kept:
            self._valid_until = 0.0
            self.ask(lost=True)
            return
        self._valid_until = started + self._coordinator.lease_seconds
        self._schedule_renewal()

    async def refence(self, floor: int) -> int:
        """A token above `floor` (a newer grant's, found in stored state) if the lease is
        still ours, which means Redis lost its counter; 0 if it is not ours any more."""
        fence = await self._coordinator.script("refence", [self.key, self._fence_key], [self._holder, floor])
        if fence:
            self.fence = fence
        return fence

    async def release(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._renewal is not None:
            self._renewal.cancel()
            with suppress(asyncio.CancelledError):
                await self._renewal
        with suppress(StorageUnavailable):  # Redis is gone: the TTL frees the lease
            await self._coordinator.script(
                "release", [self.key, self._chunks_key], [self._holder, self._chunk, RELEASED]
            )


class RedisCounters:
    """Per-owner counts (`core.quotas.Counters`) shared by every instance.

    Counts of requests in flight expire ten minutes after their last change, so an
    instance that died with requests in flight cannot hold an owner back for longer.
    Upload counts are seeded from storage by the first instance to start; after a Redis
    restart they start from zero again, which only makes the limit looser for a while.
    While Redis is down the limits are not enforced (a limit is a guard, not a lock):
    requests that need a lock answer 503 anyway, and the rest go on.
    """

    def __init__(self, coordinator: RedisCoordinator) -> None:
        self._coordinator = coordinator

    @staticmethod
    def _key(key: str) -> str:
        return f"uploadsrv:{{quota}}:{key}"  # one slot for all: the seed writes them at once

    async def acquire(self, key: str, limit: int) -> bool:
        lives = REQUEST_COUNT_MS if key.startswith("requests:") else 0
        try:
            return bool(await self._coordinator.script("count_up", [self._key(key)], [limit, lives]))
        except StorageUnavailable as exc:
            log.warning("per-owner limit not counted", extra={"key": key, "error": exc.detail})
            return True

    async def release(self, key: str) -> None:
        with suppress(StorageUnavailable):  # never below zero, so a count lost this way is harmless
            await self._coordinator.script("count_down", [self._key(key)], [])

    async def reset(self, key: str, count: int) -> None:
        with suppress(StorageUnavailable):  # the count stays as it was, a guard as above
            await self._coordinator.script("reset", [self._key(key)], [count])

    async def seed(self, counts: dict[str, int]) -> None:
        keys = [self._key(key) for key in counts]  # also when empty: later starters must not seed
        await self._coordinator.script("seed", ["uploadsrv:{quota}:seeded", *keys], list(counts.values()))
