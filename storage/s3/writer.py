"""Appends: bytes spooled into parts, uploaded a few at a time, committed in the info object.

A tail (bytes that do not fill a part yet; S3 parts but the last need 5 MiB) is written
under a new key each time and the old one deleted after the commit, so a crash at any
point leaves the previous state whole.

A streaming request writes the info object once before its first part above
`State.high_part` (marking it open) and once when it commits: the parts between are
adopted from ListParts by whoever reads it (`State.adopt`), so a crash loses only the
parts still in flight without a write per part. Below `high_part` (parts a failed or
discarded request may have left) each part is named as S3 confirms it. A transactional
request's parts must never be adopted: it raises `high_part` over them first.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Sequence
from pathlib import Path

from uploadsrv.core.errors import StorageUnavailable, UploadError
from uploadsrv.core.storage import Hasher, Readable

from . import state as records
from .client import MAX_PARTS, READ_BLOCK
from .multipart import Multipart
from .spool import Spool
from .state import Part


def split(blocks: Sequence[bytes], count: int) -> tuple[list[bytes], list[bytes]]:
    """The first `count` bytes of `blocks`, and the rest."""
    head: list[bytes] = []
    rest = list(blocks)
    while rest and count > 0:
        block = rest.pop(0)
        if len(block) > count:
            view = memoryview(block)
            # Slices of a memoryview, not copies; everything downstream takes any buffer.
            head.append(view[:count])  # type: ignore[arg-type]
            rest.insert(0, view[count:])  # type: ignore[arg-type]
            break
        head.append(block)
        count -= len(block)
    return head, rest


def unbroken(parts: Sequence[Part], after: int) -> int:
    """How many of `parts` (sorted by number) continue part `after` without a gap."""
    run = 0
    while run < len(parts) and parts[run].number == after + run + 1:
        run += 1
    return run


class PartWriter:
    """Collects appended bytes into parts and uploads up to `concurrency` of them at once.

    The part being filled and the parts in flight live in spool files, so memory per
    upload stays at the core's batch size however large the parts are.
    """

    def __init__(
        self,
        multipart: Multipart,
        length: int | None,
        *,
        concurrency: int,
        spool_dir: Path,
        record_progress: bool,
    ) -> None:
        self._multipart = multipart
        #: Name each part in the info object as soon as S3 confirms it, so a crash loses
        #: only the parts still in flight.
        self._record_progress = record_progress
        self._saving = asyncio.Lock()  #: one info write at a time, in order
        self._progress: asyncio.Task[None] | None = None
        self._s3 = multipart.s3
        self._length = length
        self._concurrency = concurrency
        self._spool_dir = spool_dir
        self._state = state = multipart.state
        self._committed_parts = list(state.parts)
        self._new_parts: list[Part] = []
        self._spool: Spool | None = None
        self._tail_pending = state.tail_size > 0  # the tail moves into the spool on first write
        #: Deleted by commit once no longer named (or a tail adopted parts replaced).
        self._original_tail = state.tail_key or state.dropped_tail
        #: `high_part` as this request found it, and the highest part number it started:
        #: the commit's `high_part` (a transactional request raises it meanwhile).
        self._found_high_part = state.high_part
        self._highest = len(state.parts)
        self._opened = False  #: this request marked the info object open
        self._in_flight: set[asyncio.Task[Part]] = set()
        self._failure: BaseException | None = None

    async def _filling(self) -> Spool:
        if self._spool is None:
            self._spool = await self._s3.scratch(self._multipart.spool, self._spool_dir)
            if self._tail_pending:
                assert self._state.tail_key is not None
                await self._copy_object_into(self._state.tail_key, self._spool)
                self._tail_pending = False
        return self._spool

    async def _copy_object_into(self, key: str, spool: Spool) -> None:
        """Stream a (tail) object into a spool file, a block at a time."""
        response = await self._s3.call("get_object", Key=key)
        body = response["Body"]
        try:
            while block := await self._s3.run(body.read, READ_BLOCK):
                await self._s3.scratch(spool.write, [block])
        finally:
            body.close()

    async def write(self, blocks: Sequence[bytes]) -> None:
        rest = list(blocks)
        while rest:
            spool = await self._filling()
            head, rest = split(rest, self._state.part_size - spool.size)
            await self._s3.scratch(spool.write, head)
            if spool.size == self._state.part_size:
                self._spool = None
                await self._start_part(spool)

    async def receive(
        self, held: list[bytes], source: Readable, count: int, hasher: Hasher | None, seconds: float
    ) -> int:
        """The storage `Receiving`: the body read from the socket by a spool thread, straight
        into the part being filled; each full part starts its upload at once."""
        await self.write(held)
        deadline = time.monotonic() + seconds
        received = 0
        while received < count:
            spool = await self._filling()
            room = min(count - received, self._state.part_size - spool.size)
            got = await self._s3.scratch(spool.receive, source, room, hasher, deadline)
            received += got
            if spool.size == self._state.part_size:
                self._spool = None
                await self._start_part(spool)
            if got < room:  # the body ended, paused or ran out of time
                break
        return received

    async def _start_part(self, spool: Spool) -> None:
        while len(self._in_flight) >= self._concurrency:
            await asyncio.wait(set(self._in_flight), return_when=asyncio.FIRST_COMPLETED)
            self._collect_done()
        if self._failure is not None:
            spool.close()
            raise self._failure
        number = len(self._committed_parts) + len(self._new_parts) + len(self._in_flight) + 1
        try:
            await self._cover(number)
        except BaseException:
            spool.close()
            raise
        task = asyncio.ensure_future(self._upload(number, spool))
        if self._record_progress:
            task.add_done_callback(self._part_done)
        self._in_flight.add(task)

    async def _cover(self, number: int) -> None:
        """Before part `number` is uploaded: make the info object say what it may be.
        A streaming request's part above `high_part` needs the object marked open by this
        request (once); a transactional request's part must not be adoptable, so it
        raises `high_part` over every part the upload can have (once)."""
        self._highest = max(self._highest, number)
        state = self._state
        if state.high_part is None:  # an info object from before `high_part`: named part by part
            return
        if self._record_progress:
            if self._opened or number <= state.high_part:
                return
            state.open = True
            self._opened = True
        else:
            if number <= state.high_part and not state.open:
                return
            last = MAX_PARTS if self._length is None else -(-self._length // state.part_size)
            state.open, state.high_part = False, max(state.high_part, last, number)
        async with self._saving:
            await records.save(self._s3, self._multipart.upload_id, state)

    def _adopted_by_readers(self) -> bool:
        """Whether a reader of the info object adopts this request's confirmed parts."""
        high_part = self._state.high_part
        return self._opened and high_part is not None and len(self._committed_parts) >= high_part

    def _part_done(self, task: asyncio.Task[Part]) -> None:
        if not task.cancelled() and task.exception() is None and self._progress is None:
            self._progress = asyncio.ensure_future(self._save_progress())

    async def _save_progress(self) -> None:
        """Record the parts confirmed so far; an outage here is left to the commit."""
        try:
            await self.checkpoint()
        except StorageUnavailable:
            pass  # an outage: the commit tries again
        except UploadError as exc:  # superseded (a newer holder wrote), gone: stop at the next part
            self._failure = self._failure or exc
        finally:
            self._progress = None
        if any(task.done() for task in self._in_flight):  # confirmed while this one was saving
            self._progress = asyncio.ensure_future(self._save_progress())

    async def settle(self) -> None:
        """Wait for a progress write still running: the request is over and its lease is
        released next. A cancellation arriving meanwhile is raised once it is done."""
        cancelled = False
        while self._progress is not None:
            try:
                await asyncio.shield(self._progress)
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError()

    async def _upload(self, number: int, spool: Spool) -> Part:
        try:
            return await self._multipart.upload_spool(number, spool)
        finally:
            spool.close()

    def _collect_done(self) -> None:
        """Move finished uploads out of `_in_flight`, each exactly once: a progress write
        may collect some while the request waits for others."""
        done = {task for task in self._in_flight if task.done()}
        self._in_flight -= done
        for task in done:
            if task.exception() is not None:
                self._failure = self._failure or task.exception()
            else:
                self._new_parts.append(task.result())

    async def _drain(self) -> None:
        while self._in_flight:
            await asyncio.wait(set(self._in_flight))
            self._collect_done()

    async def commit(self) -> int:
        """Wait for the parts in flight, store the unfilled rest as the tail, then the info object."""
        await self._drain()
        async with self._saving:
            return await self._commit()

    async def _commit(self) -> int:
        parts = sorted(self._new_parts, key=lambda p: p.number)
        run = unbroken(parts, len(self._committed_parts))  # only an unbroken run of parts counts
        state = self._state
        state.record["updated_at"] = self._s3.clock()
        state.parts = self._committed_parts + parts[:run]
        spool, self._spool = self._spool, None
        try:
            await self._store_rest(spool, broken=self._failure is not None or run < len(parts))
        finally:
            if spool is not None:
                spool.close()
        # The upload is complete and a reader of the open info object finds just these
        # parts: its completion, which follows, is the write that names them.
        complete_as_stored = (
            self._adopted_by_readers()
            and self._failure is None
            and run == len(parts)
            and state.tail_key is None
            and state.offset == self._length
        )
        if self._found_high_part is not None:  # every part is named or below `high_part`
            state.open, state.high_part = False, max(self._found_high_part, self._highest)
        if not complete_as_stored:
            await records.save(self._s3, self._multipart.upload_id, state)
        self._committed_parts, self._new_parts = list(state.parts), []
        self._found_high_part, self._opened = state.high_part, False
        self._tail_pending = state.tail_size > 0
        if self._original_tail and self._original_tail != state.tail_key:
            await self._s3.delete_quietly(self._original_tail)
        self._original_tail = state.tail_key
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
        return state.offset

    async def _store_rest(self, spool: Spool | None, *, broken: bool) -> None:
        """Bytes that do not fill a part: the last part if they end the upload, else a new tail."""
        state = self._state
        if self._tail_pending:
            return  # nothing was written: the tail stays as it is
        if broken or spool is None or not spool.size:  # bytes after a failed part are not confirmed
            state.tail_key, state.tail_size = None, 0
        elif self._length is not None and sum(p.size for p in state.parts) + spool.size == self._length:
            # Not covered first: named by the write that follows, and if that never comes,
            # these are the upload's last bytes as sent (a transactional request's, checked).
            self._highest = max(self._highest, len(state.parts) + 1)
            last = await self._multipart.upload_spool(len(state.parts) + 1, spool)
            state.parts.append(last)
            state.tail_key, state.tail_size = None, 0
        else:
            state.tail_key = self._s3.key(self._multipart.upload_id, f".tail-{secrets.token_hex(4)}")
            await self._s3.put(state.tail_key, spool.body())
            state.tail_size = spool.size

    async def checkpoint(self) -> int:
        """Name the parts S3 has confirmed so far in the info object, without waiting."""
        async with self._saving:
            return await self._checkpoint()

    async def _checkpoint(self) -> int:
        self._collect_done()
        self._new_parts.sort(key=lambda p: p.number)
        run = unbroken(self._new_parts, len(self._committed_parts))
        if run and self._adopted_by_readers():  # durable as they are: nothing to write
            return sum(p.size for p in self._committed_parts + self._new_parts[:run])
        if run:
            state = self._state
            state.parts = self._committed_parts + self._new_parts[:run]
            state.tail_key, state.tail_size = None, 0  # its bytes are in the first new part
            state.record["updated_at"] = self._s3.clock()
            state.open = self._opened  # an open mark this request did not make goes
            await records.save(self._s3, self._multipart.upload_id, state)
            self._committed_parts, self._new_parts = list(state.parts), self._new_parts[run:]
        return self._state.offset

    async def discard(self) -> None:
        """Forget this request's bytes: parts it uploaded are never named by the info object."""
        await self._drain()
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        self._new_parts, self._failure = [], None
        self._tail_pending = self._state.tail_size > 0
