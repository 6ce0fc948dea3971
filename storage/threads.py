"""A bounded pool of threads for a backend's blocking calls, with a lean hop.

`loop.run_in_executor` on a `ThreadPoolExecutor` costs some sixty Python calls per hop
(a work item, a concurrent future chained to an asyncio one, a condition-variable queue,
the thread-count check), a twentieth of a small upload's calls. Here a hop is an asyncio
future, a put on a `SimpleQueue` and one `call_soon_threadsafe` back: the same bound on
threads, started as work arrives, and the same results, exceptions and cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Work = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[object, ...]]


class DiskThreads:
    """At most `count` threads running blocking calls for coroutines; `close` waits for them."""

    def __init__(self, count: int, name: str) -> None:
        self._count = count
        self._name = name
        self._work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._pending = 0  #: calls queued or running
        self._mutex = threading.Lock()

    def run(self, fn: Callable[..., T], *args: object) -> asyncio.Future[T]:
        """`fn(*args)` on a thread; its result (or exception) arrives in the future. A
        cancelled future leaves the call running: it cannot be stopped."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._mutex:
            self._pending += 1
            start = len(self._threads) < min(self._pending, self._count)  # else a thread is free
        self._work.put((loop, future, fn, args))
        if start:
            self._start()
        return future

    def _start(self) -> None:
        thread = threading.Thread(target=self._serve, name=f"{self._name}-{len(self._threads)}", daemon=True)
        with self._mutex:
            self._threads.append(thread)
        thread.start()

    def _serve(self) -> None:
        while True:
            work = self._work.get()
            if work is None:
                return
            loop, future, fn, args = work
            try:
                result = fn(*args)
            except BaseException as exc:  # delivered to the awaiting coroutine, whatever it is
                _deliver(loop, future, _set_exception, exc)
            else:
                _deliver(loop, future, _set_result, result)
            with self._mutex:
                self._pending -= 1
            del work, future, fn, args

    def close(self) -> None:
        """Let queued calls finish, then stop every thread and wait for them."""
        for _ in self._threads:
            self._work.put(None)
        for thread in self._threads:
            thread.join()
        self._threads.clear()


def _deliver(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], settle: Callable[..., None], value: object
) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(settle, future, value)


def _set_result(future: asyncio.Future[Any], result: object) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
