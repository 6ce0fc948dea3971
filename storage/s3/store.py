"""`S3Storage`: the storage contract on S3, each job handed to the room that does it."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from uploadsrv.core.errors import StorageUnavailable, Superseded, UploadExists, UploadNotFound
from uploadsrv.core.model import UploadInfo, is_upload_id
from uploadsrv.core.storage import Clock, Orphan, StoredChunk
from uploadsrv.core.storage import Lease as CoordinatorLease

from . import chunks as chunk_store
from . import housekeeping
from . import state as records
from .client import CHECKSUM, MAX_PART, MIN_PART, READ_BLOCK, S3Client, part_size_for
from .lease import PREEMPT, Heartbeat, Lease, Markers
from .multipart import Joiner, Multipart, algorithm, object_headers
from .outbox import S3Outbox
from .state import State
from .writer import PartWriter


class S3Storage:
    """Uploads stored in an S3 bucket (AWS or any S3-compatible store)."""

    min_chunk_size = MIN_PART  # chunk n is part n, and S3 wants 5 MiB parts but the last
    max_chunk_size = MAX_PART

    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        path_style: bool = False,
        part_size: int = 8 << 20,
        concurrency: int = 4,
        max_size: int = 5 << 40,
        presign_downloads: bool = False,
        checksums: bool = True,
        io_threads: int = 32,
        spool_dir: str | os.PathLike[str] | None = None,
        clock: Clock = time.time,
    ) -> None:
        self.s3 = S3Client(
            url,
            endpoint_url=endpoint_url,
            region=region,
            path_style=path_style,
            io_threads=io_threads,
            clock=clock,
        )
        self.bucket, self.prefix = self.s3.bucket, self.s3.prefix
        self.part_size = part_size
        self.concurrency = concurrency
        self.max_size = max_size
        self.presign_downloads = presign_downloads
        #: New multipart uploads carry a CRC32 of every part (S3 checks each, and keeps
        #: a composite CRC32 on the object); uploads begun without keep going without.
        self.checksum = CHECKSUM if checksums else None
        #: Scratch space for parts on their way to S3 (never state: that lives in S3).
        self.spool_dir = Path(spool_dir or tempfile.gettempdir())
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.outbox = S3Outbox(self.s3)
        self.markers = Markers(self.s3)
        self.heartbeat = Heartbeat(self.s3)

    def __repr__(self) -> str:
        return f"S3Storage('s3://{self.bucket}/{self.prefix}')"

    async def check(self) -> None:
        """Fail at start-up, not on the first upload, if the bucket is missing or forbidden."""
        try:
            await self.s3.call("head_bucket")
        except (UploadNotFound, StorageUnavailable) as exc:
            raise RuntimeError(f"S3 bucket {self.bucket!r} is not usable: {exc.__cause__ or exc}") from exc

    async def close(self) -> None:
        await self.markers.close()
        await self.heartbeat.close()
        self.s3.close()

    # -- records -----------------------------------------------------------------

    async def create(self, info: UploadInfo) -> None:
        multipart = await self.s3.call(
            "create_multipart_upload",
            Key=self.s3.key(info.id),
            **object_headers(info),
            **algorithm(self.checksum),
        )
        state = State(
            record=info.to_record(),
            multipart_id=multipart["UploadId"],
            part_size=part_size_for(info.length, self.part_size, self.max_size),
            checksum=self.checksum,
            high_part=0,
        )
        try:  # only an id a hook chose can be taken
            await self.s3.put(self.s3.key(info.id, ".info"), state.to_json(), IfNoneMatch="*")
        except ClientError:
            await Multipart(self.s3, info.id, state).abort()
            raise UploadExists(f"an upload with id {info.id} already exists") from None

    async def get(self, upload_id: str) -> UploadInfo:
        state = await records.load(self.s3, upload_id)
        info = state.info()
        info.stored_state = state
        return info

    async def _multipart(self, info: UploadInfo) -> Multipart:
        """The upload's multipart upload, with the S3 state read with `info` (by `get`, under
        the caller's lock) or a fresh read.

        The state travels with the UploadInfo object from `get` to the writer, `update`
        and `finish` of the same request, never through shared state, so a read by another
        request can never hand a writer an older state.
        """
        if not isinstance(info.stored_state, State):
            info.stored_state = await records.load(self.s3, info.id)
        return Multipart(self.s3, info.id, info.stored_state)

    async def _fresh(self, upload_id: str) -> Multipart:
        return Multipart(self.s3, upload_id, await records.load(self.s3, upload_id))

    async def update(self, info: UploadInfo) -> None:
        multipart = await self._multipart(info)
        multipart.state.record = info.to_record()
        await records.save(self.s3, info.id, multipart.state)

    async def finish(self, info: UploadInfo) -> None:
        await (await self._multipart(info)).complete()

    def location(self, info: UploadInfo) -> dict[str, str]:
        return {"Type": "s3store", "Bucket": self.bucket, "Key": self.s3.key(info.id)}

    # -- hook outbox (the `outbox` room) -------------------------------------------

    async def put_event(self, event_id: str, record: dict[str, Any], *, lease: float | None = None) -> None:
        await self.outbox.put_event(event_id, record, lease=lease)

    def event_ids(self) -> AsyncIterator[str]:
        return self.outbox.event_ids()

    async def read_event(self, event_id: str) -> dict[str, Any] | None:
        return await self.outbox.read_event(event_id)

    async def claim_event(self, event_id: str, lease: float) -> dict[str, Any] | None:
        return await self.outbox.claim_event(event_id, lease)

    async def renew_event(self, event_id: str, lease: float) -> bool:
        return await self.outbox.renew_event(event_id, lease)

    async def release_event(self, event_id: str, record: dict[str, Any] | None) -> None:
        await self.outbox.release_event(event_id, record)

    async def delete(self, upload_id: str) -> None:
        try:
            multipart = await self._fresh(upload_id)
        except UploadNotFound:
            pass
        else:
            if not multipart.state.completed:
                await multipart.abort()
        # `<id>` and `<id>.*` only: ids differ in length, so a bare prefix would reach others.
        markers = f"{self.prefix}{PREEMPT}{upload_id}"
        keys = [{"Key": self.s3.key(upload_id)}, {"Key": markers}]
        for prefix in (self.s3.key(upload_id, "."), markers + "."):
            keys += [{"Key": obj["Key"]} async for obj in self.s3.objects(prefix)]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes 1,000 keys at most
            batch = keys[start : start + 1000]
            await self.s3.call("delete_objects", Delete={"Objects": batch, "Quiet": True})

    async def upload_ids(self) -> AsyncIterator[str]:
        async for obj in self.s3.objects(self.prefix):
            upload_id, _, suffix = obj["Key"][len(self.prefix) :].partition(".")
            if suffix == "info" and is_upload_id(upload_id):
                yield upload_id

    # -- bytes -------------------------------------------------------------------

    @asynccontextmanager
    async def writer(self, info: UploadInfo, *, transactional: bool) -> AsyncIterator[PartWriter]:
        multipart = await self._multipart(info)
        writer = PartWriter(
            multipart,
            info.length,
            concurrency=self.concurrency,
            spool_dir=self.spool_dir,
            record_progress=not transactional,  # a checksummed body may yet be discarded
        )
        try:
            yield writer
        finally:
            await writer.settle()

    async def read(self, info: UploadInfo, start: int, end: int) -> AsyncIterator[bytes]:
        await self._complete_unlocked(info.id)  # a crash may have come between last byte and completion
        if start >= end:
            return
        response = await self.s3.call(
            "get_object", Key=self.s3.key(info.id), Range=f"bytes={start}-{end - 1}"
        )
        body = response["Body"]
        try:
            while block := await self.s3.run(body.read, READ_BLOCK):
                yield block
        finally:
            body.close()

    async def download_url(self, info: UploadInfo) -> str | None:
        """A presigned GET URL when configured, so downloads bypass this server."""
        if not self.presign_downloads:
            return None
        await self._complete_unlocked(info.id)
        return self.s3.presigned_get(self.s3.key(info.id), expires_in=3600)

    async def _complete_unlocked(self, upload_id: str) -> None:
        """Complete for a download, which holds no lock: should another request complete
        the upload at the same moment, its write of the info object wins, as good as ours."""
        try:
            await (await self._fresh(upload_id)).complete()
        except Superseded:
            if not (await self._fresh(upload_id)).state.completed:
                raise StorageUnavailable("the upload is being completed; retry") from None

    async def concatenate(self, info: UploadInfo, parts: Sequence[UploadInfo]) -> None:
        """Join finished uploads with UploadPartCopy (see `Joiner`)."""
        multipart = await self._fresh(info.id)
        joiner = Joiner(multipart)
        for index, part in enumerate(parts):
            await joiner.add(self.s3.key(part.id), part.offset, last=index == len(parts) - 1)
        await joiner.flush()
        await records.save(self.s3, info.id, multipart.state)
        await multipart.complete()

    # -- chunk sessions ----------------------------------------------------------

    async def stored_chunks(self, info: UploadInfo, number: int | None = None) -> list[StoredChunk]:
        return await chunk_store.stored(self.s3, info.id, number)

    async def chunks_busy(self, info: UploadInfo) -> bool:
        return await chunk_store.busy(self.s3, info.id)

    @asynccontextmanager
    async def chunk_writer(self, info: UploadInfo, number: int) -> AsyncIterator[chunk_store.ChunkWriter]:
        multipart = await self._multipart(info)
        spool = await self.s3.scratch(multipart.spool, self.spool_dir)
        try:
            yield chunk_store.ChunkWriter(multipart, number, spool)
        finally:
            spool.close()

    async def assemble(
        self, info: UploadInfo, chunks: Sequence[StoredChunk], sha256: str | None = None
    ) -> None:
        await chunk_store.assemble(await self._multipart(info), chunks, sha256)

    # -- housekeeping ------------------------------------------------------------

    async def describe(self, upload_id: str) -> dict[str, object]:
        return await housekeeping.describe(self.s3, upload_id)

    def orphans(self, older_than: float) -> AsyncIterator[Orphan]:
        return housekeeping.orphans(self.s3, older_than)

    async def remove_orphan(self, orphan: Orphan) -> None:
        await housekeeping.remove_orphan(self.s3, orphan)

    # -- locks -------------------------------------------------------------------

    @asynccontextmanager
    async def lock(
        self, upload_id: str, *, timeout: float, preempt: bool = True, chunk: int | None = None
    ) -> AsyncIterator[Lease]:
        # A chunk's lease object is renewed itself: `chunks.busy` goes by its LastModified.
        name, heartbeat = ("", self.heartbeat) if chunk is None else (f".chunk-{chunk}", None)
        lease = Lease(self.s3, upload_id, name, self.markers, heartbeat)
        await lease.acquire(timeout, preempt)
        try:
            yield lease
        finally:
            await lease.release()

    @asynccontextmanager
    async def fenced_lock(
        self, upload_id: str, lease: CoordinatorLease, *, chunk: int | None = None
    ) -> AsyncIterator[CoordinatorLease]:
        """Under a coordinator's lease no lease object is needed: the info object's writes
        check the lease instead (a chunk writes no shared state, only its own marker)."""
        if chunk is not None:
            yield lease
            return
        self.s3.fences[upload_id] = lease
        try:
            yield lease
        finally:
            if self.s3.fences.get(upload_id) is lease:
                del self.s3.fences[upload_id]
