"""Prometheus metrics: requests, errors, bytes, upload lifecycle, connections, 1xx, locks, storage.

The metric objects live at module level, as prometheus-client's multiprocess mode wants:
with `--workers N`, `serve` points PROMETHEUS_MULTIPROC_DIR at a fresh directory before
the workers start, every worker writes its values to its own files there, and a scrape,
whichever worker answers it, sums them all. With one worker the values stay in memory.

Label children are looked up once and kept (`_child`): prometheus-client's `labels()`
validates and locks on every call, which the hot path does not need to pay for. The
counts and times taken for every request are not even added to the children's values
as they happen (a locked `inc`, two for a histogram: the metrics were an eighth of a
small upload's CPU): `TALLY` collects them on the event loop in plain dicts and lists,
and adds them up before every scrape and every `FLUSH_SECONDS` (a scrape answered by
another worker reads this one's files, which are then at most that much behind).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import os
import time
from bisect import bisect_left
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics import MetricWrapperBase
from starlette.requests import Request
from starlette.responses import Response

from .core import UploadEvent, UploadInfo
from .core.events import LockEvent
from .core.hooks import Hooks

if TYPE_CHECKING:  # the HTTP protocols count connections here, and the exchange imports them
    from .exchange import Exchange

REGISTRY = CollectorRegistry()
MULTIPROCESS = "PROMETHEUS_MULTIPROC_DIR" in os.environ
if not MULTIPROCESS:
    ProcessCollector(registry=REGISTRY)  # CPU, memory and fds of this process

#: Methods labelled as they are; any other is counted as "other" (labels must stay few).
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
REQUEST_BUCKETS = (0.005, 0.02, 0.1, 0.5, 2, 10, 60, 600)
FLUSH_SECONDS = 1.0
STORAGE_BUCKETS = (0.001, 0.005, 0.02, 0.1, 0.5, 2, 10, 60)


def _counter(name: str, help_text: str, labels: tuple[str, ...] = ()) -> Counter:
    return Counter(name, help_text, labels, registry=REGISTRY)


REQUESTS = _counter("uploadsrv_requests", "HTTP requests answered", ("method", "route", "status"))
REQUEST_SECONDS = Histogram(
    "uploadsrv_request_duration_seconds",
    "Time from a request's arrival to the end of its response",
    ("method", "route"),
    buckets=REQUEST_BUCKETS,
    registry=REGISTRY,
)
ERRORS = _counter("uploadsrv_errors", "Error responses (4xx, 5xx) by problem type", ("status", "problem"))
BYTES_RECEIVED = _counter("uploadsrv_bytes_received", "Request body bytes received", ("protocol",))
BYTES_SENT = _counter("uploadsrv_bytes_sent", "Response body bytes sent", ("protocol",))
INFORMATIONAL = _counter(
    "uploadsrv_informational_responses", "1xx interim responses sent (104 for the IETF draft)", ("status",)
)
UPLOADS = {
    UploadEvent.CREATED: _counter("uploadsrv_uploads_created", "Uploads created", ("protocol",)),
    UploadEvent.CHUNK: _counter("uploadsrv_chunks_stored", "Chunks of chunk sessions stored", ("protocol",)),
    UploadEvent.COMPLETED: _counter("uploadsrv_uploads_finished", "Uploads completed", ("protocol",)),
    UploadEvent.TERMINATED: _counter("uploadsrv_uploads_terminated", "Uploads deleted", ("protocol",)),
    UploadEvent.EXPIRED: _counter("uploadsrv_uploads_expired", "Uploads removed by expiry", ("protocol",)),
}
OPEN_CONNECTIONS = Gauge(
    "uploadsrv_open_connections", "Open HTTP connections", multiprocess_mode="livesum", registry=REGISTRY
)
IN_FLIGHT = Gauge(
    "uploadsrv_requests_in_flight",
    "Requests being handled",
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
LOCK_WAIT_SECONDS = Histogram(
    "uploadsrv_lock_wait_seconds",
    "Waits for an upload held by another request in the same process",
    buckets=(0.001, 0.01, 0.1, 1, 3, 10, 30),
    registry=REGISTRY,
)
LOCK_PREEMPTIONS = _counter("uploadsrv_lock_preemptions", "Requests stopped for a newer one on their upload")
LOCK_TIMEOUTS = _counter("uploadsrv_lock_timeouts", "Requests that gave up on a busy upload (423)")
STORAGE_SECONDS = Histogram(
    "uploadsrv_storage_operation_seconds",
    "Storage backend calls, by operation",
    ("operation",),
    buckets=STORAGE_BUCKETS,
    registry=REGISTRY,
)
HOOK_DELIVERIES = _counter(
    "uploadsrv_hook_deliveries",
    "Hook deliveries by event and outcome (delivered, failed, given-up)",
    ("event", "outcome"),
)
# Every process scans the whole outbox, so the processes' largest figure is the outbox's.
HOOK_PENDING = Gauge(
    "uploadsrv_hook_outbox_pending",
    "Durable hook events not delivered yet (as of the last outbox scan)",
    multiprocess_mode="livemax",
    registry=REGISTRY,
)
HOOK_OLDEST = Gauge(
    "uploadsrv_hook_outbox_oldest_seconds",
    "Age of the oldest durable hook event not delivered yet (as of the last outbox scan)",
    multiprocess_mode="livemax",
    registry=REGISTRY,
)

#: Storage calls timed by `instrument`; writers are timed per write and commit.
STORAGE_OPERATIONS = (
    "create",
    "get",
    "update",
    "finish",
    "delete",
    "concatenate",
    "stored_chunks",
    "assemble",
    "download_url",
)


@functools.cache
def _child(metric: MetricWrapperBase, *labels: str) -> Any:
    return metric.labels(*labels)


Labels = tuple[str, ...]


class _Tally:
    """Counts and times taken on the event loop, not yet added to their metrics."""

    def __init__(self) -> None:
        self.counts: dict[tuple[MetricWrapperBase, Labels], float] = {}
        self.times: dict[tuple[Histogram, Labels], list[float]] = {}
        self._timer: asyncio.TimerHandle | None = None

    def count(self, metric: MetricWrapperBase, labels: Labels, amount: float = 1) -> None:
        key = (metric, labels)
        self.counts[key] = self.counts.get(key, 0) + amount
        if self._timer is None:
            self._arm()

    def time(self, histogram: Histogram, labels: Labels, seconds: float) -> None:
        times = self.times.get((histogram, labels))
        if times is None:
            self.times[(histogram, labels)] = times = []
            if self._timer is None:
                self._arm()
        times.append(seconds)

    def _arm(self) -> None:
        with contextlib.suppress(RuntimeError):  # no loop (a test, the CLI): the next scrape adds them
            self._timer = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        """Add everything collected to the metrics' values."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        counts, self.counts = self.counts, {}
        times, self.times = self.times, {}
        for (metric, labels), amount in counts.items():
            target: Any = _child(metric, *labels) if labels else metric
            target._value.inc(amount)  # the value itself: `inc` checks what is known here
        for (histogram, labels), seconds in times.items():
            _observe_all(_child(histogram, *labels) if labels else histogram, seconds)


def _observe_all(child: Any, seconds: list[float]) -> None:
    """`observe` each of `seconds`: one addition to the sum, one to each bucket hit."""
    bounds = child._upper_bounds
    hits = [0] * len(bounds)
    for amount in seconds:
        hits[bisect_left(bounds, amount)] += 1  # the first bound >= amount; the last is +Inf
    child._sum.inc(sum(seconds))
    for bucket, hit in zip(child._buckets, hits, strict=True):
        if hit:
            bucket.inc(hit)


TALLY = _Tally()


#: Requests in flight are counted as they start and end, not tallied: a scrape must see them now.
_in_flight = IN_FLIGHT._value.inc


def exchange_started(exchange: Exchange) -> None:
    _in_flight(1)


def observe_exchange(exchange: Exchange) -> None:
    """Count one finished request (an `ExchangeMiddleware` observer)."""
    method = exchange.method if exchange.method in METHODS else "other"
    status = str(exchange.status)
    route = exchange.route
    _in_flight(-1)
    tally = TALLY
    tally.count(REQUESTS, (method, route, status))
    tally.time(REQUEST_SECONDS, (method, route), exchange.seconds)
    if exchange.received:
        tally.count(BYTES_RECEIVED, (exchange.protocol,), exchange.received)
    if exchange.sent:
        tally.count(BYTES_SENT, (exchange.protocol,), exchange.sent)
    if exchange.informational:
        tally.count(INFORMATIONAL, ("104",), exchange.informational)
    if exchange.status >= 400:
        tally.count(ERRORS, (status, exchange.problem or "none"))


def on_event(event: UploadEvent, info: UploadInfo) -> None:
    """Count an upload's lifecycle (a core event listener)."""
    counter = UPLOADS.get(event)
    if counter is not None:
        TALLY.count(counter, (info.protocol,))


def watch_hooks(hooks: Hooks) -> None:
    """Count hook deliveries, and follow the outbox after each of its scans."""

    def delivered(event: str, outcome: str) -> None:
        _child(HOOK_DELIVERIES, event, outcome).inc()

    def scanned(pending: int, oldest: float) -> None:
        HOOK_PENDING.set(pending)
        HOOK_OLDEST.set(oldest)

    hooks.listeners.append(delivered)
    if hooks.sender is not None:
        hooks.sender.listeners.append(delivered)
        hooks.sender.scanned.append(scanned)


def on_lock(event: LockEvent, seconds: float) -> None:
    """Count lock waits, preemptions and timeouts (a core lock listener)."""
    if event is LockEvent.WAITED:
        LOCK_WAIT_SECONDS.observe(seconds)
    elif event is LockEvent.PREEMPTED:
        LOCK_PREEMPTIONS.inc()
    else:
        LOCK_TIMEOUTS.inc()


def instrument(storage: object) -> None:
    """Time the backend's calls by operation, on this instance only (its class and the
    capability checks made on it stay as they are)."""
    for name in STORAGE_OPERATIONS:
        method = getattr(storage, name, None)
        if method is not None:
            setattr(storage, name, _timed(method, name))
    for name, prefix in (("writer", ""), ("chunk_writer", "chunk_")):
        opener = getattr(storage, name, None)
        if opener is not None:
            setattr(storage, name, _timed_writer(opener, prefix))


def _timed(call: Callable[..., Coroutine[Any, Any, Any]], operation: str) -> Callable[..., Any]:
    return functools.wraps(call)(_observed(call, (operation,)))


def _observed(call: Callable[..., Coroutine[Any, Any, Any]], operation: Labels) -> Callable[..., Any]:
    """`call`, its time tallied as `operation`. Without functools.wraps: a writer's
    calls are wrapped for every request, and copying their names was a tenth of that."""

    async def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await call(*args, **kwargs)
        finally:
            TALLY.time(STORAGE_SECONDS, operation, time.perf_counter() - started)

    return timed


def _timed_writer(
    opener: Callable[..., AbstractAsyncContextManager[Any]], prefix: str
) -> Callable[..., AbstractAsyncContextManager[Any]]:
    writes, commits = (prefix + "write",), (prefix + "commit",)

    def writer(*args: Any, **kwargs: Any) -> AbstractAsyncContextManager[Any]:
        return _TimedWriter(opener(*args, **kwargs), writes, commits)

    return writer


class _TimedWriter:
    """An opened writer whose writes and commits are timed; a class, not a generator,
    as every request with a body opens one."""

    __slots__ = ("_commits", "_opening", "_writes")

    def __init__(self, opening: AbstractAsyncContextManager[Any], writes: Labels, commits: Labels) -> None:
        self._opening, self._writes, self._commits = opening, writes, commits

    async def __aenter__(self) -> Any:
        opened = await self._opening.__aenter__()
        opened.write = _observed(opened.write, self._writes)
        opened.commit = _observed(opened.commit, self._commits)
        return opened

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        return await self._opening.__aexit__(*exc_info)


def endpoint(token: str | None) -> Callable[[Request], Coroutine[Any, Any, Response]]:
    """The scrape endpoint; with `token`, only for `Authorization: Bearer <token>`."""
    from .protocols.common import problem  # not at the top: the protocols import this module

    expected = f"Bearer {token}".encode() if token else None

    async def metrics(request: Request) -> Response:
        if expected is not None:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return problem(401, "metrics need the bearer token", headers={"WWW-Authenticate": "Bearer"})
        TALLY.flush()  # this worker's; the others' are at most FLUSH_SECONDS behind
        if MULTIPROCESS:
            _forget_dead_workers(os.environ["PROMETHEUS_MULTIPROC_DIR"])
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = REGISTRY
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return metrics


def _forget_dead_workers(path: str) -> None:
    """Drop the live gauges (connections, requests in flight) of workers that died: a
    worker uvicorn restarted after a crash never decremented them."""
    for live in Path(path).glob("gauge_live*_*.db"):
        pid = int(live.stem.rsplit("_", 1)[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, path)
        except PermissionError:
            continue
