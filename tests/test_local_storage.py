"""What is particular to the local-disk backend: flock across processes, the staging file,
a record cut short, a removal racing chunk requests. The contract every backend keeps is
in test_storage_contract.py, the core's behaviour on every backend in test_core.py."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import itertools
import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from uploadsrv.core import errors
from uploadsrv.core.model import UploadInfo, new_upload_id
from uploadsrv.storage import local
from uploadsrv.storage.local import RECORD_XATTR, XATTR_RECORD_LIMIT, LocalStorage
from uploadsrv.storage.threads import DiskThreads

from .conftest import LocalLayout

MiB = 1 << 20

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
    assert [p.name for p in LocalLayout(storage.root).stored()] == [info.id]  # no staging file left


@pytest.fixture
def writeback_starts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The (offset, count) of every writeback start, recorded as the calls are still made:
    the kernel's writeback itself cannot be watched from here."""
    started: list[tuple[int, int]] = []
    real = local._SYNC_FILE_RANGE
    assert real is not None  # glibc

    def recording(fd: int, offset: int, count: int, flags: int) -> int:
        started.append((offset, count))
        return real(fd, offset, count, flags)

    monkeypatch.setattr(local, "_SYNC_FILE_RANGE", recording)
    return started


async def test_a_body_is_handed_to_the_disks_writeback_as_it_is_written_not_only_at_commit(
    storage, writeback_starts
):
    """The kernel's writeback cannot be watched from here: the calls that start it are
    recorded (and still made), whole pages in order from the upload's offset on."""
    started = writeback_starts
    body = os.urandom(3 * local.WRITEBACK_BYTES + 1000)
    info = await _new_upload(storage, len(body) + 7)
    async with storage.writer(info, transactional=False) as writer:
        await writer.write([b"1234567"])
        await writer.commit()
    info.offset = 7
    async with storage.writer(info, transactional=False) as writer:
        for start in range(0, len(body), 300_000):
            await writer.write([body[start : start + 300_000]])
        assert started, "nothing was written back before the commit"
        await writer.commit()
    assert started[0][0] == 7
    assert all(offset + count == after for (offset, count), (after, _) in itertools.pairwise(started))
    assert all((offset + count) % local.PAGE == 0 for offset, count in started)
    assert started[-1][0] + started[-1][1] > len(body) + 7 - 2 * local.WRITEBACK_BYTES
    with open(LocalLayout(storage.root).data(info.id), "rb") as stored:
        assert hashlib.sha256(stored.read()).hexdigest() == hashlib.sha256(b"1234567" + body).hexdigest()

    started.clear()
    checked = await _new_upload(storage, len(body))
    async with storage.writer(checked, transactional=True) as writer:
        await writer.write([body])
        await writer.commit()
    assert started == []  # a staging file's bytes are copied into the data file, not written back


async def test_a_4_mib_body_read_on_a_disk_thread_is_written_back_before_its_last_mib(
    storage, writeback_starts
):
    """The commit's fsync then waits for the last stretch, not for all of a 4 MiB PATCH
    (with a start every 4 MiB the first one came with the body's last byte)."""
    started = writeback_starts
    body = os.urandom(4 << 20)
    info = await _new_upload(storage, len(body))
    async with storage.writer(info, transactional=False) as writer:
        assert await writer.receive([], _Body(body), len(body), None, 60.0) == len(body)
        assert await writer.commit() == len(body)
    assert started[0] == (0, 1 << 20)
    assert sum(count for _, count in started) >= 3 << 20
    with open(LocalLayout(storage.root).data(info.id), "rb") as stored:
        assert hashlib.sha256(stored.read()).digest() == hashlib.sha256(body).digest()


class _Body:
    """A body read on a disk thread (`Readable`), from memory."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)

    @property
    def complete(self) -> bool:
        return not self._data

    def readinto(self, view: memoryview, /) -> int:
        count = min(len(view), len(self._data))
        view[:count], self._data = self._data[:count], self._data[count:]
        return count


class _SplicedBody(_Body):
    """A body that can also be spliced (`Spliceable`), as a socket is: its bytes go into
    the pipe, a bounded piece at a time."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.spliced = 0

    def splice_to(self, pipe: int, count: int, /) -> int:
        written = os.write(pipe, self._data[: min(count, len(self._data), 200_000)])
        self._data = self._data[written:]
        self.spliced += written
        return written


class _Sha256:
    def __init__(self) -> None:
        self.digest = hashlib.sha256()

    def update(self, blocks, /) -> None:
        for block in blocks:
            self.digest.update(block)


async def test_a_body_nobody_hashes_is_spliced_into_the_file_and_written_back_as_it_goes(
    storage, writeback_starts
):
    body = os.urandom(3 * MiB + 123)
    info = await _new_upload(storage, len(body) + 5)
    async with storage.writer(info, transactional=False) as writer:
        source = _SplicedBody(body)
        assert await writer.receive([b"12345"], source, len(body), None, 60.0) == len(body)
        assert source.spliced == len(body)
        assert writer._file.durable  # complete: committed on the thread, as a read body is
        assert await writer.commit() == len(body) + 5
    assert writeback_starts[0][0] == 0 and writeback_starts[0][1] < 2 * MiB  # after a MiB, not at the end
    assert sum(count for _, count in writeback_starts) >= 2 << 20  # the last stretch goes with the fsync
    with open(LocalLayout(storage.root).data(info.id), "rb") as stored:
        assert hashlib.sha256(stored.read()).hexdigest() == hashlib.sha256(b"12345" + body).hexdigest()

    hashed = await _new_upload(storage, len(body))
    hasher, source = _Sha256(), _SplicedBody(body)
    async with storage.writer(hashed, transactional=True) as writer:
        assert await writer.receive([], source, len(body), hasher, 60.0) == len(body)
        await writer.commit()
    assert source.spliced == 0  # bytes a hasher must see go through the receive buffer
    assert hasher.digest.hexdigest() == hashlib.sha256(body).hexdigest()


async def test_a_pipe_left_holding_bytes_by_a_failed_splice_is_not_used_again(storage, monkeypatch):
    real = local._splice_all
    failures = iter([OSError(errno.ENOSPC, "full")])

    def splice_all(pipe: int, fd: int, count: int, position: int) -> int:
        if (failure := next(failures, None)) is not None:
            raise failure  # the bytes stay in the pipe
        return real(pipe, fd, count, position)

    monkeypatch.setattr(local, "_splice_all", splice_all)
    lost, body = os.urandom(MiB), os.urandom(2 * MiB)
    info = await _new_upload(storage, len(body))
    async with storage.writer(info, transactional=False) as writer:
        with pytest.raises(errors.StorageFull):
            await writer.receive([], _SplicedBody(lost), len(lost), None, 60.0)
        assert await writer.receive([], _SplicedBody(body), len(body), None, 60.0) == len(body)
        assert await writer.commit() == len(body)
    with open(LocalLayout(storage.root).data(info.id), "rb") as stored:
        assert hashlib.sha256(stored.read()).hexdigest() == hashlib.sha256(body).hexdigest()


async def test_a_body_read_to_its_end_on_a_disk_thread_is_committed_there_in_the_same_hop(
    storage, monkeypatch
):
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):  # the upload's file, not its directory's
            synced.append("fsync")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    data = os.urandom(3 * MiB + 5)
    info = await _new_upload(storage, len(data))
    async with storage.writer(info, transactional=False) as writer:
        body = _Body(data[5:])
        assert await writer.receive([data[:5]], body, 2 * MiB, None, 60) == 2 * MiB
        assert synced == []  # the body goes on: its commit is still to come
        assert await writer.receive([], body, 2 * MiB, None, 60) == MiB
        assert synced == ["fsync"]  # the body is complete: committed on the thread
        assert await writer.commit() == len(data)
        assert synced == ["fsync"]  # nothing left to do, no second hop
    assert (await storage.get(info.id)).offset == len(data)
    with open(LocalLayout(storage.root).data(info.id), "rb") as stored:
        assert hashlib.sha256(stored.read()).hexdigest() == hashlib.sha256(data).hexdigest()

    synced.clear()
    checked = await _new_upload(storage, len(data))
    async with storage.writer(checked, transactional=True) as writer:
        assert await writer.receive([], _Body(data), 4 * MiB, None, 60) == len(data)
        assert synced == []  # a checksummed body waits for its verdict
        await writer.discard()
    assert (await storage.get(checked.id)).offset == 0


async def test_a_deleted_upload_leaves_nothing_of_it_on_disk(storage):
    """(Expiry on every backend, with the core: test_storage_contract.py.)"""
    kept, deleted = await _new_upload(storage), await _new_upload(storage)
    async with storage.writer(deleted, transactional=False) as writer:
        await writer.write([b"abc"])
        await writer.commit()
    await storage.delete(deleted.id)
    assert [p.name for p in LocalLayout(storage.root).stored()] == [kept.id]


async def test_an_unreadable_record_is_an_unknown_upload_not_a_crash(storage):
    info = await _new_upload(storage)
    os.removexattr(LocalLayout(storage.root).flat(info.id), RECORD_XATTR)  # a crash right after the open
    with pytest.raises(errors.UploadNotFound):
        await storage.get(info.id)
    orphans = [orphan.name async for orphan in storage.orphans(0)]
    assert orphans == [str(LocalLayout(storage.root).flat(info.id))]  # prune can clear it


def _legacy_upload(storage: LocalStorage, content: bytes, length: int) -> UploadInfo:
    """An upload as the directory layout stores it (data directories written before the
    flat layout, chunk sessions, large records)."""
    info = UploadInfo(id=new_upload_id(), length=length)
    directory = LocalLayout(storage.root).directory(info.id)
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
    LocalLayout(storage.root).record(info.id).write_bytes(b"")
    with pytest.raises(errors.UploadNotFound):
        await storage.get(info.id)
    orphans = [orphan.name async for orphan in storage.orphans(0)]
    assert orphans == [str(LocalLayout(storage.root).directory(info.id))]  # prune can clear it


async def test_a_record_too_large_for_an_attribute_is_stored_in_a_directory(storage):
    info = UploadInfo(id=new_upload_id(), length=10, metadata={"note": "x" * XATTR_RECORD_LIMIT})
    await storage.create(info)
    assert LocalLayout(storage.root).record(info.id).exists()
    assert (await storage.get(info.id)).metadata == info.metadata


async def test_a_chunk_request_racing_the_deletion_of_its_session_leaves_nothing(storage):
    """A chunk PUT creates its lock file while the session's directory is being removed;
    the removal must still take everything, or a deleted session lives on as a directory."""
    for _ in range(100):
        info = UploadInfo(id=new_upload_id(), length=4, chunk_size=1)
        await storage.create(info)
        directory = LocalLayout(storage.root).directory(info.id)
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


# -- the disk threads ---------------------------------------------------------------


async def test_disk_threads_stay_within_their_bound_and_deliver_results_and_errors():
    pool = DiskThreads(3, "test-disk")
    running, most = 0, 0
    gate = threading.Event()
    mutex = threading.Lock()

    def work(n: int) -> int:
        nonlocal running, most
        with mutex:
            running += 1
            most = max(most, running)
        gate.wait(30)
        with mutex:
            running -= 1
        if n == 7:
            raise ValueError("seven")
        return n * n

    calls = [asyncio.ensure_future(pool.run(work, n)) for n in range(10)]
    deadline = time.monotonic() + 30
    while running < 3 and time.monotonic() < deadline:  # all the threads it may start are busy
        await asyncio.sleep(0.01)
    gate.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert most == 3
    assert [r for n, r in enumerate(results) if n != 7] == [n * n for n in range(10) if n != 7]
    assert isinstance(results[7], ValueError) and str(results[7]) == "seven"
    pool.close()


async def test_a_call_whose_caller_went_away_still_ends_before_the_disk_threads_close():
    pool = DiskThreads(1, "test-disk")
    started, release, ended = threading.Event(), threading.Event(), threading.Event()

    def slow() -> None:
        started.set()
        release.wait(30)
        ended.set()

    call = pool.run(slow)
    await asyncio.to_thread(started.wait, 30)
    call.cancel()  # the caller went away: the call cannot be stopped, and is not
    release.set()
    pool.close()
    assert ended.is_set()
