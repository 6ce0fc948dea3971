"""The storage contract (`uploadsrv.core.storage`), the same cases against every backend.

Straight to the backends, without the service: what the core relies on a backend for.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable

import pytest

from uploadsrv.core import UploadService, errors
from uploadsrv.core.model import UploadInfo, new_upload_id
from uploadsrv.core.storage import Chunked, Storage, StoredChunk
from uploadsrv.storage.s3 import MIN_PART, S3Storage

from .conftest import NOW, FakeClock


async def new_upload(storage: Storage, length: int | None, **kind: object) -> UploadInfo:
    info = UploadInfo(id=new_upload_id(), length=length, created_at=NOW - 60, updated_at=NOW - 60, **kind)  # type: ignore[arg-type]
    await storage.create(info)
    return await storage.get(info.id)


async def append(storage: Storage, info: UploadInfo, data: bytes, *, transactional: bool = False) -> int:
    async with storage.writer(info, transactional=transactional) as writer:
        await writer.write([data[: len(data) // 2], data[len(data) // 2 :]])
        return await writer.commit()


async def read_all(storage: Storage, info: UploadInfo, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([b async for b in storage.read(info, start, info.offset if end is None else end)])


async def test_a_new_upload_has_its_record_and_no_bytes(storage: Storage) -> None:
    info = await new_upload(storage, 10, metadata={"filename": "a.txt"}, owner="alice")
    assert (info.offset, info.length, info.metadata, info.owner) == (0, 10, {"filename": "a.txt"}, "alice")
    assert info.id in [upload_id async for upload_id in storage.upload_ids()]


async def test_an_unknown_upload_is_not_found(storage: Storage) -> None:
    with pytest.raises(errors.UploadNotFound):
        await storage.get(new_upload_id())
    await storage.delete(new_upload_id())  # missing uploads are not an error


async def test_committed_bytes_are_the_offset_and_read_back(storage: Storage) -> None:
    info = await new_upload(storage, None)
    assert await append(storage, info, b"hello ") == 6
    info = await storage.get(info.id)
    assert await append(storage, info, b"world") == 11
    info = await storage.get(info.id)
    info.length = 11
    await storage.update(info)
    await storage.finish(info)
    info = await storage.get(info.id)
    assert (info.offset, info.length, info.is_complete) == (11, 11, True)
    assert await read_all(storage, info) == b"hello world"
    assert await read_all(storage, info, 3, 8) == b"lo wo"


async def test_writes_go_at_the_offset_and_commit_returns_it(storage: Storage) -> None:
    info = await new_upload(storage, 10)
    async with storage.writer(info, transactional=False) as writer:
        await writer.write([b"12", memoryview(b"345")])
        assert await writer.commit() == 5
    info.offset = 5
    async with storage.writer(info, transactional=False) as writer:
        await writer.write([b"67890"])
        assert await writer.commit() == 10
    info.offset = 10
    assert b"".join([b async for b in storage.read(info, 0, 10)]) == b"1234567890"


async def test_unknown_and_malformed_ids_are_not_found(storage: Storage) -> None:
    for upload_id in ("0" * 32, "../../etc", ""):
        with pytest.raises(errors.UploadNotFound):
            await storage.get(upload_id)


async def test_upload_ids_lists_every_upload(storage: Storage) -> None:
    made = {(await new_upload(storage, 10)).id for _ in range(5)}
    assert {upload_id async for upload_id in storage.upload_ids()} == made


async def test_a_discarded_transactional_write_leaves_nothing(storage: Storage) -> None:
    info = await new_upload(storage, 10)
    async with storage.writer(info, transactional=True) as writer:
        await writer.write([b"12345"])
        await writer.discard()
    assert (await storage.get(info.id)).offset == 0


async def test_activity_is_stamped_with_the_clock_the_backend_was_given(storage: Storage) -> None:
    info = await new_upload(storage, 10)
    assert info.updated_at == NOW - 60  # the record's, as created
    await append(storage, info, b"12345")
    assert (await storage.get(info.id)).updated_at == NOW
    info = await storage.get(info.id)
    await append(storage, info, b"678", transactional=True)
    assert (await storage.get(info.id)).updated_at == NOW


async def test_expiry_follows_the_clock_the_core_and_the_backend_share(
    storage: Storage, clock: FakeClock
) -> None:
    service = UploadService(storage, max_size=1 << 20, expiry=60, clock=clock)
    idle = await service.create(length=10)
    done = await service.create(length=0)
    clock.now += 30
    assert (await service.append(idle.id, 0, _body(b"12345"))).offset == 5  # activity: expiry slides
    clock.now += 59
    assert (await service.get(idle.id)).offset == 5
    clock.now += 2
    with pytest.raises(errors.UploadGone):
        await service.get(idle.id)
    assert await service.expire() == [idle.id]
    assert (await service.get(done.id)).is_complete
    with pytest.raises(errors.UploadNotFound):
        await storage.get(idle.id)
    assert [upload_id async for upload_id in storage.upload_ids()] == [done.id]


async def _body(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_a_lock_held_by_another_instance_is_busy_for_a_request_that_will_not_wait(
    storage: Storage, open_backend: Callable[[], Storage]
) -> None:
    info = await new_upload(storage, 10)
    other = open_backend()
    async with storage.lock(info.id, timeout=5.0):
        with pytest.raises(errors.UploadBusy):
            async with other.lock(info.id, timeout=5.0, preempt=False):
                pass
    async with other.lock(info.id, timeout=5.0, preempt=False):
        pass  # released: free again


async def test_delete_removes_the_upload(storage: Storage) -> None:
    info = await new_upload(storage, 10)
    await append(storage, info, b"12345")
    await storage.delete(info.id)
    with pytest.raises(errors.UploadNotFound):
        await storage.get(info.id)
    assert info.id not in [upload_id async for upload_id in storage.upload_ids()]


async def test_chunks_are_stored_once_and_assembled_in_order(storage: Storage) -> None:
    assert isinstance(storage, Chunked)
    size = max(storage.min_chunk_size, 1)
    data = [bytes([n]) * size for n in range(3)]
    data[2] = data[2][: size // 2]
    info = await new_upload(storage, sum(map(len, data)), chunk_size=size)
    for number in (3, 1, 2):  # any order
        block = data[number - 1]
        chunk = StoredChunk(number, len(block), hashlib.sha256(block).hexdigest())
        async with storage.chunk_writer(info, number) as writer:
            await writer.write([block])
            await writer.commit(chunk)
    stored = await storage.stored_chunks(info)
    assert [(c.number, c.size) for c in stored] == [(1, size), (2, size), (3, size // 2)]
    assert [c.number for c in await storage.stored_chunks(info, 2)] == [2]
    whole = b"".join(data)
    await storage.assemble(info, stored, hashlib.sha256(whole).hexdigest())
    info = await storage.get(info.id)
    assert info.is_complete
    assert hashlib.sha256(await read_all(storage, info)).hexdigest() == hashlib.sha256(whole).hexdigest()


async def test_assembling_against_the_wrong_sha256_is_a_mismatch(storage: Storage) -> None:
    assert isinstance(storage, Chunked)
    info = await new_upload(storage, 5, chunk_size=max(storage.min_chunk_size, 5))
    chunk = StoredChunk(1, 5, hashlib.sha256(b"12345").hexdigest())
    async with storage.chunk_writer(info, 1) as writer:
        await writer.write([b"12345"])
        await writer.commit(chunk)
    with pytest.raises(errors.ChecksumMismatch):
        await storage.assemble(info, [chunk], "0" * 64)
    assert not (await storage.get(info.id)).is_complete


def test_s3_chunks_are_parts_so_at_least_5_mib() -> None:
    assert S3Storage.min_chunk_size == MIN_PART
