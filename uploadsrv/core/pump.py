"""Moving a request body into a storage writer: batched, bounded, and loss-free."""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import AsyncIterable, Awaitable, Callable, Sequence
from typing import Any, Protocol, cast, runtime_checkable

from .. import memory
from .checksums import Digester
from .errors import ClientDisconnected, TooLarge
from .storage import Receiving

#: Bytes collected before one hand-off to the writer. At most two batches per request
#: are in memory: one being written while the next one fills, so disk and network overlap.
BATCH_BYTES = 512 << 10
#: A body read on the writer's thread comes back to the event loop after this many bytes
#: or seconds, whichever first: for progress reports and preemption.
SEGMENT_BYTES = 4 << 20
SEGMENT_SECONDS = 1.0
#: A batch that has waited this long for more bytes is written as it is: a stalled body
#: (a phone that lost its network) then holds no batch while it waits, however long.
STALL_SECONDS = 1.0
#: Bytes the batches of all requests of this process hold together, at most. A request
#: past it waits before it takes more of its body (its client waits in TCP's flow
#: control), so 200 concurrent uploads take no more memory than 64 at full overlap.
BUDGET_BYTES = 64 << 20


class _Budget:
    """A process-wide count of batched bytes; requests over it wait their turn (FIFO)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    def fits(self, size: int) -> bool:
        """Take `size` now if it fits (or nothing is held), without waiting."""
        if self._waiting or (self.held and self.held + size > self.limit):
            return False
        self.held += size
        return True

    async def take(self, size: int) -> None:
        """Wait until `size` fits. Cancelled, it is taken anyway: the caller holds the
        bytes already and gives them back when they are written."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append((size, waiter))
        try:
            await waiter
        except asyncio.CancelledError:
            if not waiter.done() or waiter.cancelled():
                self._waiting.remove((size, waiter))
                self.held += size
                self._wake()
            raise

    def give(self, size: int) -> None:
        self.held -= size
        self._wake()

    def _wake(self) -> None:
        while self._waiting and (not self.held or self.held + self._waiting[0][0] <= self.limit):
            size, waiter = self._waiting.popleft()
            if not waiter.done():
                self.held += size
                waiter.set_result(None)


BUDGET = _Budget(BUDGET_BYTES)


class Sink(Protocol):
    """Where pumped bytes go: a storage writer, or nowhere when only the digest counts."""

    async def write(self, blocks: Sequence[bytes]) -> None: ...


class BodyReader(Protocol):
    """The unread rest of a body, read on a storage thread (see `Readable`)."""

    gone: bool  #: the client went away before the end
    complete: bool  #: every byte of the body was read

    def readinto(self, view: memoryview, /) -> int: ...
    def stop(self) -> None: ...
    async def wait_readable(self) -> None: ...


@runtime_checkable
class DirectBody(Protocol):
    """A body whose bytes can be taken straight from the connection by a storage thread,
    without a hop through the event loop per block (see `uploadsrv.socket_body`)."""

    def start_direct(self) -> tuple[bytes, BodyReader] | None:
        """What the HTTP server buffered, and a reader for the rest; None: iterate instead."""

    def finish_direct(self) -> None:
        """The copy is over, however it ended: the HTTP server takes the connection back."""


async def pump(
    body: AsyncIterable[bytes],
    writer: Sink,
    *,
    limit: int,
    digester: Digester | None,
    after_write: Callable[[int], Awaitable[None]] | None = None,
) -> int:
    """Copy `body` into `writer` and return the number of bytes copied.

    However the copy ends (end of body, a disconnect, cancellation by a newer request,
    a body longer than `limit`), every byte that arrived up to `limit` has been handed
    to the writer before this returns or raises, so the caller can commit it.
    `after_write` runs with the batch's size after each batch is written (progress).
    """
    if _direct_capable(type(body), type(writer)):
        direct = cast(DirectBody, body)
        started = direct.start_direct()
        if started is not None:
            try:
                return await _pump_directly(*started, cast(Receiving, writer), limit, digester, after_write)
            finally:
                direct.finish_direct()
    copied = 0
    batch: list[bytes] = []
    batch_size = 0
    writing: asyncio.Future[None] | None = None
    stall_timer: asyncio.TimerHandle | None = None
    loop = asyncio.get_running_loop()

    async def write(blocks: list[bytes]) -> None:
        size = sum(map(len, blocks))
        try:
            if digester is not None:
                await asyncio.to_thread(digester.update, blocks)
            await writer.write(blocks)
        finally:
            BUDGET.give(size)
        if after_write is not None:
            await after_write(size)

    def hand_over() -> None:
        nonlocal batch, batch_size, copied, writing, stall_timer
        if stall_timer is not None:
            stall_timer.cancel()
            stall_timer = None
        writing = asyncio.ensure_future(write(batch))
        copied += batch_size
        batch, batch_size = [], 0

    def write_stalled_batch() -> None:
        """The body paused: write what the batch holds, once the write before it is done."""
        nonlocal stall_timer
        stall_timer = None
        if writing is None or (writing.done() and not writing.cancelled() and writing.exception() is None):
            hand_over()
            memory.trim_soon(loop)  # what the stalled request held goes back to the system
        elif not writing.done():
            stall_timer = loop.call_later(STALL_SECONDS, write_stalled_batch)
        # else the failed write is raised by the loop below, before any further write

    try:
        async for chunk in body:
            room = limit - copied - batch_size
            too_long = len(chunk) > room
            if too_long:
                chunk = chunk[:room]
            if not batch_size:  # one timer per batch, not per chunk
                stall_timer = loop.call_later(STALL_SECONDS, write_stalled_batch)
            batch.append(chunk)
            batch_size += len(chunk)
            if not BUDGET.fits(len(chunk)):
                await BUDGET.take(len(chunk))  # the next chunk waits; this one is kept
            if too_long:
                raise TooLarge(f"body goes past the end of the upload ({limit} more bytes allowed)")
            if batch_size >= BATCH_BYTES:
                if writing is not None:
                    await asyncio.shield(writing)
                hand_over()
    finally:
        # Runs on every exit, cancellation included: wait for the write in flight, then
        # hand over what is left, so nothing that arrived is dropped.
        if stall_timer is not None:
            stall_timer.cancel()
        if writing is not None:
            try:
                await _settle(writing)
            except BaseException:
                BUDGET.give(batch_size)  # never written after a failed write
                raise
        if batch_size:
            await _settle(asyncio.ensure_future(write(batch)))
            copied += batch_size
    return copied


@functools.cache
def _direct_capable(body: type, writer: type) -> bool:
    """Once per pair of classes: a runtime protocol check walks the class every time."""
    return issubclass(body, DirectBody) and issubclass(writer, Receiving)


async def _pump_directly(
    buffered: bytes,
    reader: BodyReader,
    writer: Receiving,
    limit: int,
    digester: Digester | None,
    after_write: Callable[[int], Awaitable[None]] | None,
) -> int:
    """`pump` for a body the writer's thread reads itself, a segment per hop."""
    if len(buffered) > limit:
        raise TooLarge(f"body goes past the end of the upload ({limit} more bytes allowed)")
    if buffered and digester is not None:
        digester.update([buffered])
    held = [buffered] if buffered else []
    copied = len(buffered)
    while True:
        count = min(SEGMENT_BYTES, limit - copied)
        received = asyncio.ensure_future(writer.receive(held, reader, count, digester, SEGMENT_SECONDS))
        held = []
        try:
            got = await asyncio.shield(received)
        except asyncio.CancelledError:
            reader.stop()  # the thread returns within WAIT_SECONDS; its bytes are kept
            await _settle(received)
            raise
        copied += got
        if after_write is not None and got:
            await after_write(got)
        if reader.gone:
            raise ClientDisconnected()
        if reader.complete:
            return copied
        if copied >= limit:
            raise TooLarge(f"body goes past the end of the upload ({limit} more bytes allowed)")
        if not got:  # nothing for now: wait here, not on the writer's thread
            await reader.wait_readable()


async def _settle(write: asyncio.Future[Any]) -> None:
    """Wait for `write` to end even if this task is cancelled meanwhile.

    Its bytes are on their way to a disk thread that cannot be stopped; returning early
    would let the caller close the file (and release the upload) under it. A cancellation
    that arrives here is raised once the write is done.
    """
    cancelled = False
    while not write.done():
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError()
    write.result()
