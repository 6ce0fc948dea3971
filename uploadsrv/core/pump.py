"""Moving a request body into a storage writer: batched, bounded, and loss-free."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterable, Awaitable, Callable, Sequence
from typing import Any, Protocol, cast, runtime_checkable

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

    async def write(blocks: list[bytes]) -> None:
        if digester is not None:
            await asyncio.to_thread(digester.update, blocks)
        await writer.write(blocks)
        if after_write is not None:
            await after_write(sum(map(len, blocks)))

    try:
        async for chunk in body:
            room = limit - copied - batch_size
            if len(chunk) > room:
                batch.append(chunk[:room])
                batch_size += room
                raise TooLarge(f"body goes past the end of the upload ({limit} more bytes allowed)")
            batch.append(chunk)
            batch_size += len(chunk)
            if batch_size >= BATCH_BYTES:
                if writing is not None:
                    await asyncio.shield(writing)
                writing = asyncio.ensure_future(write(batch))
                copied += batch_size
                batch, batch_size = [], 0
    finally:
        # Runs on every exit, cancellation included: wait for the write in flight, then
        # hand over what is left, so nothing that arrived is dropped.
        if writing is not None:
            await _settle(writing)
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
