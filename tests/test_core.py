"""The upload core on every backend (the `storage` fixture), without HTTP: behaviour that
belongs to the core, not to one backend."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from uploadsrv.core import UploadService, errors
from uploadsrv.core.events import LockEvent
from uploadsrv.core.locks import UploadLocks
from uploadsrv.core.model import UploadInfo, new_upload_id
from uploadsrv.core.pump import pump


async def test_a_newer_append_preempts_a_stalled_one_in_the_same_process(storage):
    service = UploadService(storage, max_size=1 << 20, expiry=None, lock_timeout=5)
    info = await service.create(length=10)
    stalled = asyncio.Event()

    async def stalled_body():
        yield b"1234"
        stalled.set()
        await asyncio.Event().wait()  # a client that never sends the rest

    async def body():
        yield b"567890"

    first = asyncio.create_task(service.append(info.id, 0, stalled_body()))
    await stalled.wait()
    state = await service.append(info.id, 4, body())
    assert state.offset == 10 and state.is_complete
    with pytest.raises(errors.Superseded):
        await first
    assert b"".join([b async for b in service.read(state, 0, 10)]) == b"1234567890"


async def test_a_request_arriving_as_the_lock_changes_hands_still_gives_up_in_time(storage):
    """Right after a holder lets go, the lock looks free while the woken waiter has not run
    yet. A newcomer in that moment queues behind it; if that waiter then stalls (a client
    that stopped sending), the newcomer must still give up after the timeout."""
    info = UploadInfo(id=new_upload_id(), length=10)
    await storage.create(info)
    locks = UploadLocks(storage, timeout=0.5)
    release = asyncio.Event()
    queued = asyncio.Event()  # the waiter asks the holder to stop, then queues for the lock
    locks.subscribe(lambda event, _: event is LockEvent.PREEMPTED and queued.set())

    held = asyncio.Event()

    async def first() -> None:
        async with locks.hold(info.id):
            held.set()
            await release.wait()
        with pytest.raises(errors.UploadBusy):  # the moment the lock changes hands
            async with locks.hold(info.id):
                pass

    async def stalled() -> None:
        async with locks.hold(info.id) as hold:
            await hold.run(asyncio.Event().wait())

    holder = asyncio.create_task(first())
    await held.wait()
    waiter = asyncio.create_task(stalled())
    await queued.wait()
    release.set()
    try:
        await asyncio.wait_for(holder, 5)
    finally:
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError, errors.Superseded):
            await waiter


async def test_a_cancelled_pump_still_waits_for_the_write_in_flight():
    """The disk thread cannot be stopped: the file must stay open until its write is done."""
    entered, release = asyncio.Event(), asyncio.Event()
    written: list[bytes] = []

    class SlowWriter:
        async def write(self, blocks):
            entered.set()
            await release.wait()
            written.extend(blocks)

    async def body():
        yield b"abc"

    task = asyncio.create_task(pump(body(), SlowWriter(), limit=10, digester=None))
    await entered.wait()  # the pump hands over its last batch, in its `finally`
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=0.2)
    assert not done  # cancelled, and still waiting for the write
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert written == [b"abc"]
