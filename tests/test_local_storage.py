"""The local-disk backend and the core's locks, without HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from uploadsrv.core import UploadService, errors
from uploadsrv.core.events import LockEvent
from uploadsrv.core.locks import UploadLocks
from uploadsrv.core.model import UploadInfo, new_upload_id
from uploadsrv.core.pump import pump
from uploadsrv.storage.local import RECORD_XATTR, XATTR_RECORD_LIMIT, LocalStorage

HOLDER = textwrap.dedent(
    """
    import asyncio, sys
    from uploadsrv.storage.local import LocalStorage

    async def main():
        storage = LocalStorage(sys.argv[1])
        async with storage.lock(sys.argv[2], timeout=1) as lock:
            print("held", flush=True)
            while not lock.preempt_requested():
                await asyncio.sleep(0.01)
            print("asked to let go", flush=True)

    asyncio.run(main())
    """
)


@pytest.fixture
async def storage(tmp_path):
    backend = LocalStorage(tmp_path / "data", io_threads=4)
    yield backend
    await backend.close()


async def _new_upload(storage: LocalStorage, length: int | None = 10) -> UploadInfo:
    info = UploadInfo(id=new_upload_id(), length=length)
    await storage.create(info)
    return info


async def test_a_lock_held_by_another_process_is_handed_over_on_request(storage):
    info = await _new_upload(storage)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(storage.root), info.id], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(errors.UploadBusy):
            async with storage.lock(info.id, timeout=5, preempt=False):
                pass
        async with storage.lock(info.id, timeout=5):
            assert holder.stdout.readline().strip() == "asked to let go"
    finally:
        holder.kill()
        holder.wait()


async def test_transactional_writes_are_invisible_until_commit_and_discard_forgets_them(storage):
    info = await _new_upload(storage)
    async with storage.writer(info, transactional=True) as writer:
        await writer.write([b"abc", b"de"])
        assert (await storage.get(info.id)).offset == 0
        await writer.discard()
        await writer.write([b"xy"])
        assert await writer.commit() == 2
    assert (await storage.get(info.id)).offset == 2
    assert os.listdir(storage.root / "files") == [info.id]  # no staging file left


async def test_writes_go_at_the_offset_and_commit_returns_it(storage):
    info = await _new_upload(storage)
    async with storage.writer(info, transactional=False) as writer:
        await writer.write([b"12", memoryview(b"345")])
        assert await writer.commit() == 5
    info.offset = 5
    async with storage.writer(info, transactional=False) as writer:
        await writer.write([b"67890"])
        assert await writer.commit() == 10
    info.offset = 10
    assert b"".join([b async for b in storage.read(info, 0, 10)]) == b"1234567890"


async def test_unknown_and_malformed_ids_are_not_found(storage):
    for upload_id in ("0" * 32, "../../etc", ""):
        with pytest.raises(errors.UploadNotFound):
            await storage.get(upload_id)


async def test_upload_ids_lists_every_upload(storage):
    made = {(await _new_upload(storage)).id for _ in range(5)}
    assert {upload_id async for upload_id in storage.upload_ids()} == made


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
    info = await _new_upload(storage)
    locks = UploadLocks(storage, timeout=0.5)
    release = asyncio.Event()
    queued = asyncio.Event()  # the waiter asks the holder to stop, then queues for the lock
    locks.subscribe(lambda event, _: event is LockEvent.PREEMPTED and queued.set())

    async def first() -> None:
        async with locks.hold(info.id):
            await release.wait()
        with pytest.raises(errors.UploadBusy):  # the moment the lock changes hands
            async with locks.hold(info.id):
                pass

    async def stalled() -> None:
        async with locks.hold(info.id) as hold:
            await hold.run(asyncio.Event().wait())

    holder = asyncio.create_task(first())
    await asyncio.sleep(0)
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


async def test_expiry_removes_idle_unfinished_uploads_only(storage):
    now = [time.time()]
    service = UploadService(storage, max_size=1 << 20, expiry=60, clock=lambda: now[0])
    idle = await service.create(length=10)
    done = await service.create(length=0)
    now[0] += 61
    with pytest.raises(errors.UploadGone):
        await service.get(idle.id)
    assert await service.expire() == [idle.id]
    assert (await service.get(done.id)).is_complete
    with pytest.raises(errors.UploadNotFound):
        await storage.get(idle.id)
    assert os.listdir(storage.root / "files") == [done.id]


async def test_an_unreadable_record_is_an_unknown_upload_not_a_crash(storage):
    info = await _new_upload(storage)
    os.removexattr(storage.root / "files" / info.id, RECORD_XATTR)  # a crash right after the open
    with pytest.raises(errors.UploadNotFound):
        await storage.get(info.id)
    orphans = [orphan.name async for orphan in storage.orphans(0)]
    assert orphans == [str(storage.root / "files" / info.id)]  # prune can clear it


def _legacy_upload(storage: LocalStorage, content: bytes, length: int) -> UploadInfo:
    """An upload as the directory layout stores it (data directories written before the
    flat layout, chunk sessions, large records)."""
    info = UploadInfo(id=new_upload_id(), length=length)
    directory = storage.root / "uploads" / info.id[:2] / info.id
    directory.mkdir(parents=True)
    (directory / "data").write_bytes(content)
    (directory / "info.json").write_text(json.dumps(info.to_record()))
    return info


async def test_uploads_in_the_directory_layout_are_read_resumed_and_deleted(storage):
    info = _legacy_upload(storage, b"abc", 6)
    assert [i async for i in storage.upload_ids()] == [info.id]
    info = await storage.get(info.id)
    assert info.offset == 3
    async with storage.lock(info.id, timeout=5), storage.writer(info, transactional=False) as writer:
        await writer.write([b"def"])
        assert await writer.commit() == 6
    assert b"".join([b async for b in storage.read(info, 0, 6)]) == b"abcdef"
    assert storage.location(info)["InfoPath"].endswith(f"{info.id}/info.json")
    await storage.delete(info.id)
    with pytest.raises(errors.UploadNotFound):
        await storage.get(info.id)


async def test_an_unreadable_record_in_the_directory_layout_is_an_unknown_upload(storage):
    info = _legacy_upload(storage, b"", 10)
    (storage.root / "uploads" / info.id[:2] / info.id / "info.json").write_bytes(b"")
    with pytest.raises(errors.UploadNotFound):
        await storage.get(info.id)
    orphans = [orphan.name async for orphan in storage.orphans(0)]
    assert orphans == [str(storage.root / "uploads" / info.id[:2] / info.id)]  # prune can clear it


async def test_a_record_too_large_for_an_attribute_is_stored_in_a_directory(storage):
    info = UploadInfo(id=new_upload_id(), length=10, metadata={"note": "x" * XATTR_RECORD_LIMIT})
    await storage.create(info)
    assert (storage.root / "uploads" / info.id[:2] / info.id / "info.json").exists()
    assert (await storage.get(info.id)).metadata == info.metadata


async def test_a_chunk_request_racing_the_deletion_of_its_session_leaves_nothing(storage):
    """A chunk PUT creates its lock file while the session's directory is being removed;
    the removal must still take everything, or a deleted session lives on as a directory."""
    for _ in range(100):
        info = UploadInfo(id=new_upload_id(), length=4, chunk_size=1)
        await storage.create(info)
        directory = storage.root / "uploads" / info.id[:2] / info.id
        for number in range(2, 30):  # the lock files of earlier chunks, for the removal to walk
            (directory / "chunks" / f"{number}.lock").touch()
        deleted = asyncio.ensure_future(storage.delete(info.id))
        while not deleted.done():
            with contextlib.suppress(errors.UploadNotFound):
                async with storage.lock(info.id, timeout=1, chunk=1):
                    pass
            await asyncio.sleep(0)
        await deleted
        assert not directory.exists(), sorted(p.name for p in directory.rglob("*"))
