"""Moving a request body into a storage writer: batched, bounded, and loss-free."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Awaitable, Callable, Sequence
from typing import Protocol

from .checksums import Digester
from .errors import TooLarge

#: Bytes collected before one hand-off to the writer. At most two batches per request
#: are in memory: one being written while the next one fills, so disk and network overlap.
BATCH_BYTES = 512 << 10


class Sink(Protocol):
    """Where pumped bytes go: a storage writer, or nowhere when only the digest counts."""

    async def write(self, blocks: Sequence[bytes]) -> None: ...


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


async def _settle(write: asyncio.Future[None]) -> None:
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
