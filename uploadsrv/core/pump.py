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
#: (only when its progress is followed: 104s, post-receive hooks) or seconds, whichever
#: first, so that the disk threads take turns among more bodies than there are threads.
#: Preemption does not wait for either: it stops the reader (`BodyReader.stop`).
SEGMENT_BYTES = 4 << 20
SEGMENT_SECONDS = 1.0
#: A batch that has waited this long for more bytes is written as it is: a stalled body
#: (a phone that lost its network) then holds no batch while it waits, however long.
STALL_SECONDS = 1.0
#: Bytes the batches of all requests of this process hold together, at most. A request
#: past it waits before it takes more of its body (its client waits in TCP's flow
#: control), so 200 concurrent uploads take no more memory than 32 at full overlap:
#: still twice what the 16 disk threads write at once, and 200 stalled 400 KiB bodies
#: peaked at 117 MB instead of 131-137 MB with 64 MiB.
BUDGET_BYTES = 32 << 20


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

#: Called with the size of each batch written: returns None, or what must be awaited
#: before the copy goes on (a durable checkpoint). Synchronous, so a callback with
#: nothing to do costs no coroutine per write.
AfterWrite = Callable[[int], Awaitable[None] | None]


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

    def start_direct(self) -> tuple[list[bytes], BodyReader] | None:
        """What the HTTP server buffered, as blocks (a list the pump empties once they
        are written, so that no frame keeps them while the body stalls), and a reader
        for the rest; None: iterate instead."""

    def finish_direct(self) -> None:
        """The copy is over, however it ended: the HTTP server takes the connection back."""


async def pump(
    body: AsyncIterable[bytes],
    writer: Sink,
    *,
    limit: int,
    digester: Digester | None,
    after_write: AfterWrite | None = None,
) -> int:
    """Copy `body` into `writer` and return the number of bytes copied.

    However the copy ends (end of body, a disconnect, cancellation by a newer request,
    a body longer than `limit`), every byte that arrived up to `limit` has been handed
    to the writer before this returns or raises, so the caller can commit it.
    `after_write` runs with the batch's size after each batch is written (progress).
    """
    started = _start_direct(body, writer)
    if started is None:
        return await _pump_batches(body, _Batches(writer, limit, digester, after_write))
    try:
        return await _pump_directly(*started, cast(Receiving, writer), limit, digester, after_write)
    finally:
        cast(DirectBody, body).finish_direct()
        memory.trim_soon(asyncio.get_running_loop())  # the receive buffers it used go back


def _start_direct(body: AsyncIterable[bytes], writer: Sink) -> tuple[list[bytes], BodyReader] | None:
    """Take the body past the HTTP server if both ends can (`DirectBody`, `Receiving`)."""
    if not _direct_capable(type(body), type(writer)):
        return None
    return cast(DirectBody, body).start_direct()


@functools.cache
def _direct_capable(body: type, writer: type) -> bool:
    """Once per pair of classes: a runtime protocol check walks the class every time."""
    return issubclass(body, DirectBody) and issubclass(writer, Receiving)


def _too_long(limit: int) -> TooLarge:
    return TooLarge(f"body goes past the end of the upload ({limit} more bytes allowed)")


# -- a body iterated on the event loop, in batches -------------------------------------


async def _pump_batches(body: AsyncIterable[bytes], batches: _Batches) -> int:
    """`pump` for a body that arrives as ASGI messages: blocks collected into batches."""
    try:
        async for chunk in body:
            size = batches.add(chunk)
            if not BUDGET.fits(size):
                await BUDGET.take(size)  # the next chunk waits; this one is kept
            if batches.overflowed:
                raise _too_long(batches.limit)
            if batches.full:
                await batches.hand_over()
            del chunk  # the batch holds it until written; not this frame while the body stalls
    finally:
        # Runs on every exit, cancellation included: nothing that arrived is dropped.
        await batches.flush()
    return batches.copied


class _Batches:
    """The batches of one body: one being written while the next one fills, so disk and
    network overlap, and a batch that waits `STALL_SECONDS` for more is written as it is."""

    def __init__(
        self,
        writer: Sink,
        limit: int,
        digester: Digester | None,
        after_write: AfterWrite | None,
    ) -> None:
        self.limit = limit
        self.copied = 0  #: bytes handed to the writer
        self.overflowed = False  #: the body went past `limit` (the rest was cut off)
        self._writer, self._digester, self._after_write = writer, digester, after_write
        self._batch: list[bytes] = []
        self._size = 0
        self._writing: asyncio.Future[None] | None = None
        self._stall_timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    @property
    def full(self) -> bool:
        return self._size >= BATCH_BYTES

    def add(self, chunk: bytes) -> int:
        """Add a chunk, cut at `limit`; returns its size as added (the caller budgets it)."""
        room = self.limit - self.copied - self._size
        if len(chunk) > room:
            chunk, self.overflowed = chunk[:room], True
        if not self._size:  # one timer per batch, not per chunk
            self._stall_timer = self._loop.call_later(STALL_SECONDS, self._write_stalled)
        self._batch.append(chunk)
        self._size += len(chunk)
        return len(chunk)

    async def hand_over(self) -> None:
        """Start writing the batch once the write before it is done."""
        if self._writing is not None:
            await asyncio.shield(self._writing)
        self._start_write()

    async def flush(self) -> None:
        """Wait for the write in flight, then write what is left."""
        if self._stall_timer is not None:
            self._stall_timer.cancel()
        if self._writing is not None:
            try:
                await _settle(self._writing)
            except BaseException:
                BUDGET.give(self._size)  # never written after a failed write
                raise
        if self._size:
            size = self._size
            await _settle(asyncio.ensure_future(self._write(self._batch)))
            self.copied += size

    def _start_write(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        self._writing = asyncio.ensure_future(self._write(self._batch))
        self.copied += self._size
        self._batch, self._size = [], 0

    def _write_stalled(self) -> None:
        """The body paused: write what the batch holds, once the write before it is done."""
        self._stall_timer = None
        writing = self._writing
        if writing is None or (writing.done() and not writing.cancelled() and writing.exception() is None):
            self._start_write()
            memory.trim_soon(self._loop)  # what the stalled request held goes back to the system
        elif not writing.done():
            self._stall_timer = self._loop.call_later(STALL_SECONDS, self._write_stalled)
        # else the failed write is raised by the loop, before any further write

    async def _write(self, blocks: list[bytes]) -> None:
        size = sum(map(len, blocks))
        try:
            if self._digester is not None:
                await asyncio.to_thread(self._digester.update, blocks)
            await self._writer.write(blocks)
        finally:
            BUDGET.give(size)
        if self._after_write is not None and (pending := self._after_write(size)) is not None:
            await pending


# -- a body read by the writer's thread straight from the socket ------------------------


async def _pump_directly(
    held: list[bytes],
    reader: BodyReader,
    writer: Receiving,
    limit: int,
    digester: Digester | None,
    after_write: AfterWrite | None,
) -> int:
    """`pump` for a body the writer's thread reads itself, a segment per hop; `held`
    (what the HTTP server buffered) goes first."""
    copied = _held_first(held, limit, digester)
    segment = limit if after_write is None else SEGMENT_BYTES  # a hop back costs 0.1-0.3 ms of the loop
    while True:
        got = await _receive_segment(writer, held, reader, min(segment, limit - copied), digester)
        held.clear()
        copied += got
        if (pending := _written(after_write, got)) is not None:
            await pending
        if _direct_done(reader, copied, limit):
            return copied
        if not got:  # nothing for now: wait here, not on the writer's thread
            await reader.wait_readable()


def _held_first(held: list[bytes], limit: int, digester: Digester | None) -> int:
    """The size of what the HTTP server buffered, checked against `limit`; digested."""
    size = sum(map(len, held))
    if size > limit:
        raise _too_long(limit)
    if held and digester is not None:
        digester.update(held)
    return size


def _written(after_write: AfterWrite | None, got: int) -> Awaitable[None] | None:
    """What `after_write` wants awaited after a segment of `got` bytes, if anything."""
    return after_write(got) if after_write is not None and got else None


async def _receive_segment(
    writer: Receiving, held: list[bytes], reader: BodyReader, count: int, digester: Digester | None
) -> int:
    """One hop to the writer's thread: `held`, then up to `count` bytes of the body."""
    received = asyncio.ensure_future(writer.receive(held, reader, count, digester, SEGMENT_SECONDS))
    try:
        return await asyncio.shield(received)
    except asyncio.CancelledError:
        reader.stop()  # the thread returns within WAIT_SECONDS; its bytes are kept
        await _settle(received)
        raise


def _direct_done(reader: BodyReader, copied: int, limit: int) -> bool:
    """True once the body is complete; raises if it cannot go on."""
    if reader.gone:
        raise ClientDisconnected()
    if reader.complete:
        return True
    if copied >= limit:
        raise _too_long(limit)
    return False


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
