"""One writer per upload, and a newer request always wins.

A phone that changed networks reconnects while its old request still sits in the
server waiting for bytes that will never come. The new request must not wait behind
it: it preempts the holder, whose body copy is cancelled (the bytes it received are
kept by the core), and takes over. Across worker processes the backend's lock carries
the same request, which the holder polls for while it copies; with a coordinator
(Redis), its lease comes first and pushes the request to the holder at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .coordination import Coordinator
from .errors import StorageUnavailable, Superseded, UploadBusy, UploadError
from .events import LockEvent, LockListener
from .storage import Fenced, Storage, UploadLock

T = TypeVar("T")

CROSS_PROCESS_POLL_SECONDS = 0.2  #: how often a copy checks whether another process wants its upload


class Hold:
    """An exclusive hold on one upload; `run` makes a long body copy preemptible."""

    def __init__(self, on_preempt: Callable[[], None]) -> None:
        self._on_preempt = on_preempt
        self._locks: list[UploadLock] = []
        self._task: asyncio.Task[object] | None = None
        self._poll: asyncio.TimerHandle | None = None
        self._preempted = False
        self._lost = False

    def watch(self, lock: UploadLock) -> None:
        """Stop when `lock` reports a request from another process (polled while copying)."""
        self._locks.append(lock)

    def preempt(self, lost: bool = False) -> None:
        """Ask the holder to stop; once only, so a copy finishing its last writes is not
        interrupted again by a second newcomer. `lost`: not a newer request, but the
        coordinator's lease could not be kept (Redis down), so the client should retry."""
        if self._preempted:
            return
        self._preempted, self._lost = True, lost
        if not lost:
            self._on_preempt()
        if self._task is not None:
            self._task.cancel()

    async def run(self, work: Coroutine[object, object, T]) -> T:
        """Run `work` until it ends or a newer request preempts it (raises Superseded).

        `work` runs in the caller's task, which a preemption cancels (no task per body:
        its creation and the wait on it were a twentieth of a small upload's calls);
        `work` must itself finish what it started when cancelled, as `pump` does.
        """
        if self._preempted:
            work.close()
            raise self._stopped()
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        cancelling = task.cancelling()
        self._poll_later()
        try:
            result = await work
        except asyncio.CancelledError:
            # A preemption's cancellation is this hold's own: taken back, and answered as
            # Superseded. Any other (the server stopping) goes on as it came.
            if self._preempted and task.uncancel() <= cancelling:
                raise self._stopped() from None
            raise
        finally:
            if self._poll is not None:
                self._poll.cancel()
            self._task = None
        if self._preempted and task.cancelling() > cancelling:
            # Preempted from within the work as it ended: the cancellation is still due,
            # and is taken here rather than by the caller's next await.
            with suppress(asyncio.CancelledError):
                await asyncio.sleep(0)
            task.uncancel()
            raise self._stopped()
        return result

    def _stopped(self) -> UploadError:
        if self._lost:
            return StorageUnavailable("this server lost its lease on the upload; the bytes received are kept")
        return Superseded()

    def _poll_later(self) -> None:
        """Check for another process's request every CROSS_PROCESS_POLL_SECONDS while
        `run` copies; a timer, not a task, as most copies (small bodies) end before it fires."""
        self._poll = asyncio.get_running_loop().call_later(CROSS_PROCESS_POLL_SECONDS, self._check_others)

    def _check_others(self) -> None:
        if any(lock.preempt_requested() for lock in self._locks):
            self.preempt()
        else:
            self._poll_later()


@dataclass
class _Slot:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    holder: Hold | None = None
    users: int = 0


class UploadLocks:
    """Per-upload holds for one process, backed by the coordinator's lease (if any) and
    the storage's cross-process lock."""

    def __init__(
        self,
        storage: Storage,
        *,
        timeout: float,
        coordinator: Coordinator | None = None,
        fenced: Fenced | None = None,
    ) -> None:
        """`fenced`: the backend, if it fences its writes with the coordinator's lease
        (`Capabilities.fenced`); it then takes no lock of its own under a lease."""
        self._storage = storage
        self._fenced = fenced
        self._timeout = timeout
        self._coordinator = coordinator
        self._slots: dict[tuple[str, int | None], _Slot] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._listeners: list[LockListener] = []

    async def idle(self) -> None:
        """Return once no upload is held or waited for: a stopping server waits for this
        before closing the storage, so an append it cancelled can still commit its bytes."""
        await self._idle.wait()

    def subscribe(self, listener: LockListener) -> None:
        """Tell `listener` about waits, preemptions and timeouts (metrics)."""
        self._listeners.append(listener)

    def _emit(self, event: LockEvent, seconds: float = 0.0) -> None:
        for listener in self._listeners:
            listener(event, seconds)

    def chunks_held(self, upload_id: str) -> list[int]:
        """The chunks of a session that requests in this process are writing now."""
        return sorted(
            chunk
            for (held_id, chunk), slot in self._slots.items()
            if held_id == upload_id and chunk is not None and slot.holder is not None
        )

    def hold(self, upload_id: str, *, preempt: bool = True, chunk: int | None = None) -> _Holding:
        """Hold `upload_id` (or with `chunk`, one chunk of it) exclusively; with `preempt`,
        a current holder is asked to stop.

        Without `preempt` (background expiry) a busy upload raises UploadBusy at once.
        """
        return _Holding(self, (upload_id, chunk), preempt)

    def _enter(self, key: tuple[str, int | None]) -> _Slot:
        slot = self._slots.get(key)
        if slot is None:
            self._slots[key] = slot = _Slot()
        self._idle.clear()
        slot.users += 1
        return slot

    def _leave(self, key: tuple[str, int | None], slot: _Slot) -> None:
        slot.users -= 1
        if slot.users == 0:
            with suppress(KeyError):
                del self._slots[key]
            if not self._slots:
                self._idle.set()

    async def _take(self, slot: _Slot) -> None:
        """The slot's lock: at once, without arming a timer, when no other request holds
        or waits for it (most requests); else within the timeout."""
        if slot.users == 1:
            await slot.lock.acquire()
            return
        busy = slot.lock.locked()
        started = time.monotonic() if busy else 0.0
        try:
            async with asyncio.timeout(self._timeout):  # no task per request, as wait_for has
                await slot.lock.acquire()
        except TimeoutError:
            self._emit(LockEvent.TIMED_OUT, time.monotonic() - started)
            raise UploadBusy("another request holds this upload; retry shortly") from None
        if busy:
            self._emit(LockEvent.WAITED, time.monotonic() - started)

    def _cross_process(
        self, upload_id: str, preempt: bool, chunk: int | None
    ) -> AbstractAsyncContextManager[Hold]:
        """The coordinator's lease first, if there is one, then the backend's lock."""
        if self._coordinator is None:
            return self._backend_locked(upload_id, preempt, chunk)
        return self._leased(self._coordinator, upload_id, preempt, chunk)

    @asynccontextmanager
    async def _backend_locked(self, upload_id: str, preempt: bool, chunk: int | None) -> AsyncIterator[Hold]:
        """The backend's lock alone (one process, or processes sharing a disk)."""
        hold = Hold(on_preempt=self._on_preempt)
        acquired = False
        try:
            async with self._storage.lock(
                upload_id, timeout=self._timeout, preempt=preempt, chunk=chunk
            ) as backend_lock:
                acquired = True
                hold.watch(backend_lock)
                yield hold
        except UploadBusy:
            if not acquired:
                self._timed_out(preempt)
            raise

    @asynccontextmanager
    async def _leased(
        self, coordinator: Coordinator, upload_id: str, preempt: bool, chunk: int | None
    ) -> AsyncIterator[Hold]:
        """The coordinator's lease first (its release requests reach the holder at once),
        then the backend's lock within the same timeout; a backend that fences its writes
        with the lease takes no lock of its own."""
        hold = Hold(on_preempt=self._on_preempt)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        async with AsyncExitStack() as held:
            try:
                lease = await held.enter_async_context(
                    coordinator.lock(
                        upload_id,
                        timeout=self._timeout,
                        preempt=preempt,
                        chunk=chunk,
                        on_preempt=hold.preempt,
                    )
                )
                hold.watch(lease)
                if self._fenced is not None:
                    await held.enter_async_context(self._fenced.fenced_lock(upload_id, lease, chunk=chunk))
                else:
                    backend_lock = await held.enter_async_context(
                        self._storage.lock(
                            upload_id, timeout=max(0.0, deadline - loop.time()), preempt=preempt, chunk=chunk
                        )
                    )
                    hold.watch(backend_lock)
            except UploadBusy:
                self._timed_out(preempt)
                raise
            yield hold

    def _on_preempt(self) -> None:
        self._emit(LockEvent.PREEMPTED)

    def _timed_out(self, preempt: bool) -> None:
        if preempt:  # without, busy is an answer, not a timeout
            self._emit(LockEvent.TIMED_OUT, self._timeout)


class _Holding:
    """`UploadLocks.hold` as a class, not a generator: every request on an upload takes one."""

    __slots__ = ("_inner", "_key", "_locks", "_preempt", "_slot")

    def __init__(self, locks: UploadLocks, key: tuple[str, int | None], preempt: bool) -> None:
        self._locks, self._key, self._preempt = locks, key, preempt

    async def __aenter__(self) -> Hold:
        locks, (upload_id, chunk) = self._locks, self._key
        slot = self._slot = locks._enter(self._key)
        try:
            if slot.holder is not None and self._preempt:
                slot.holder.preempt()
            elif slot.lock.locked() and not self._preempt:
                raise UploadBusy()
            await locks._take(slot)
            try:
                self._inner = locks._cross_process(upload_id, self._preempt, chunk)
                slot.holder = await self._inner.__aenter__()
            except BaseException:
                slot.lock.release()
                raise
        except BaseException:
            locks._leave(self._key, slot)
            raise
        return slot.holder

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        slot = self._slot
        slot.holder = None
        try:
            try:
                return await self._inner.__aexit__(*exc_info)
            finally:
                slot.lock.release()
        finally:
            self._locks._leave(self._key, slot)
