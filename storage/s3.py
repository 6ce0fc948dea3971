"""S3 storage: one multipart upload per upload, state and unfilled bytes kept in S3 too.

Keys under ``s3://bucket/prefix/``:

``<id>``             the finished object (the multipart upload's key)
``<id>.info``        the record plus S3 state: multipart upload id, part size, parts, tail
``<id>.tail-<n>``    bytes that do not fill a part yet (S3 parts but the last need 5 MiB)
``<id>.lock``        a lease, taken with a conditional write, so one instance writes at a time
``<id>.preempt``     left by an instance that wants the lease; its holder lets go
``<id>.chunks/<n>.<size>.<sha256>``
                     chunk n of a chunk session is stored (as part n); one listing finds all
``<id>.chunk-<n>.lock``, ``<id>.chunk-<n>.preempt``
                     the lease on one chunk, so only one instance uploads part n at a time

The info object is the commit point: parts and tail are uploaded first, then the info
object names them, so the offset a client is told is always bytes S3 has confirmed. A
tail is written under a new key each time and the old one deleted after the commit, so a
crash at any point leaves the previous state whole. Any instance can serve any upload.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from uploadsrv.core.errors import ChecksumMismatch, StorageUnavailable, UploadBusy, UploadNotFound
from uploadsrv.core.model import UploadInfo, is_upload_id
from uploadsrv.core.storage import Orphan, StoredChunk

T = TypeVar("T")
log = logging.getLogger("uploadsrv.s3")

MIN_PART = 5 << 20  #: S3's minimum size of every part but the last
MAX_PART = 5 << 30
MAX_PARTS = 10_000
READ_BLOCK = 1 << 20
LEASE_SECONDS = 30.0  #: a lock whose holder died frees itself after this long
LEASE_POLL_SECONDS = 0.1
PREEMPT_POLL_SECONDS = 3.0  #: how often a lease holder looks for a waiter's marker
NOT_FOUND = {"NoSuchKey", "404", "NotFound", "NoSuchUpload"}
SLOW_OPERATIONS = {"complete_multipart_upload", "upload_part_copy"}
SLOW_READ_SECONDS = 600
CHECKSUM = "CRC32"  #: what S3 checks every part with, as boto3's own transfers do


def part_size_for(length: int | None, preferred: int, max_size: int) -> int:
    """The smallest part size >= `preferred` that fits the upload in 10,000 parts."""
    needed = math.ceil((length if length is not None else max_size) / MAX_PARTS)
    size = max(preferred, MIN_PART, needed)
    return min(MAX_PART, -(-size // (1 << 20)) * (1 << 20))  # whole MiB


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


@dataclass
class S3Location:
    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> S3Location:
        if not url.startswith("s3://"):
            raise ValueError(f"not an s3:// URL: {url!r}")
        bucket, _, prefix = url[5:].partition("/")
        if not bucket:
            raise ValueError(f"no bucket in {url!r}")
        prefix = prefix.strip("/")
        return cls(bucket, prefix + "/" if prefix else "")


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
    ) -> None:
        location = S3Location.parse(url)
        self.bucket, self.prefix = location.bucket, location.prefix
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
        config = Config(
            region_name=region,
            s3={"addressing_style": "path" if path_style else "auto"},
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=3,
            read_timeout=30,  # a hung request must not outlive a lease (LEASE_SECONDS)
            max_pool_connections=io_threads,
            # For bodies without an algorithm of their own (info, tail and lease objects):
            # over plain HTTP SigV4 signs the body's sha256, which S3 checks, so no CRC32
            # on top; over HTTPS botocore sends a CRC32 instead of signing the body. Parts
            # always carry the multipart upload's algorithm (`checksum`).
            request_checksum_calculation=(
                "when_required" if (endpoint_url or "").startswith("http://") else "when_supported"
            ),
        )
        self.client = boto3.client("s3", endpoint_url=endpoint_url, config=config)
        #: For calls S3 may take minutes to answer (it keeps the connection alive meanwhile):
        #: with the short timeout, botocore would retry them while they still run.
        self._slow_client = boto3.client(
            "s3", endpoint_url=endpoint_url, config=config.merge(Config(read_timeout=SLOW_READ_SECONDS))
        )
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="uploadsrv-s3")
        #: Names this process in leases; see `_Lease._take_over_stale`.
        self.instance = secrets.token_hex(8)

    def __repr__(self) -> str:
        return f"S3Storage('s3://{self.bucket}/{self.prefix}')"

    async def _call(self, operation: str, **params: Any) -> Any:
        """One boto3 call on the bounded pool; outages become StorageUnavailable."""
        client = self._slow_client if operation in SLOW_OPERATIONS else self.client
        method: Callable[..., Any] = getattr(client, operation)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: method(**params))
        except ClientError as exc:
            if _code(exc) in NOT_FOUND:
                raise UploadNotFound() from exc
            if _code(exc) in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise
            raise StorageUnavailable(f"S3 {operation} failed: {_code(exc)}") from exc
        except BotoCoreError as exc:
            raise StorageUnavailable(f"S3 unreachable: {exc}") from exc

    def _key(self, upload_id: str, suffix: str = "") -> str:
        return f"{self.prefix}{upload_id}{suffix}"

    async def check(self) -> None:
        """Fail at start-up, not on the first upload, if the bucket is missing or forbidden."""
        try:
            await self._call("head_bucket", Bucket=self.bucket)
        except (UploadNotFound, StorageUnavailable) as exc:
            raise RuntimeError(f"S3 bucket {self.bucket!r} is not usable: {exc.__cause__ or exc}") from exc

    # -- records -----------------------------------------------------------------

    async def create(self, info: UploadInfo) -> None:
        multipart = await self._call(
            "create_multipart_upload",
            Bucket=self.bucket,
            Key=self._key(info.id),
            **_object_headers(info),
            **_algorithm(self.checksum),
        )
        state = _State(
            record=info.to_record(),
            multipart_id=multipart["UploadId"],
            part_size=part_size_for(info.length, self.part_size, self.max_size),
            checksum=self.checksum,
        )
        await self._save(info.id, state)

    async def _read_object(self, key: str, **params: Any) -> tuple[bytes, str]:
        """A small object's bytes and ETag (info, tail, lease, or a range of up to one part)."""
        response = await self._call("get_object", Bucket=self.bucket, Key=key, **params)
        body = await asyncio.get_running_loop().run_in_executor(self._pool, response["Body"].read)
        return body, response["ETag"]

    async def _load(self, upload_id: str) -> _State:
        body, _ = await self._read_object(self._key(upload_id, ".info"))
        return _State.from_json(body)

    async def _save(self, upload_id: str, state: _State) -> None:
        await self._call(
            "put_object", Bucket=self.bucket, Key=self._key(upload_id, ".info"), Body=state.to_json()
        )

    async def get(self, upload_id: str) -> UploadInfo:
        state = await self._load(upload_id)
        info = state.info()
        info.stored_state = state
        return info

    async def _state_of(self, info: UploadInfo) -> _State:
        """The S3 state read with `info` (by `get`, under the caller's lock), or a fresh read.

        It travels with the UploadInfo object from `get` to the writer, `update` and
        `finish` of the same request, never through shared state, so a read by another
        request can never hand a writer an older state.
        """
        if not isinstance(info.stored_state, _State):
            info.stored_state = await self._load(info.id)
        return info.stored_state

    async def update(self, info: UploadInfo) -> None:
        state = await self._state_of(info)
        state.record = info.to_record()
        await self._save(info.id, state)

    async def finish(self, info: UploadInfo) -> None:
        await self._complete(info.id, await self._state_of(info))

    async def _complete(self, upload_id: str, state: _State) -> None:
        """CompleteMultipartUpload (idempotent): the upload becomes one ordinary object.

        Bytes still in the tail (a length declared only after they arrived) become the
        last part, copied inside S3. An earlier attempt may have completed the multipart
        upload and died before saying so: the finished object then answers for it.
        """
        if state.completed:
            return
        key = self._key(upload_id)
        tail = state.tail_key
        try:
            if tail is not None:
                last = await self._copy_part(upload_id, state, tail, 0, state.tail_size)
                state.parts = [*(state.parts or []), last]
                state.tail_key, state.tail_size = None, 0
            if state.parts:
                await self._call(
                    "complete_multipart_upload",
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=state.multipart_id,
                    MultipartUpload={"Parts": _completed_parts(state.parts, state.checksum)},
                )
            elif state.info().length:
                raise StorageUnavailable(f"upload {upload_id} has no parts to complete")
            else:  # zero bytes: S3 wants at least one part, so store an empty object instead
                await self._call(
                    "put_object", Bucket=self.bucket, Key=key, Body=b"", **_object_headers(state.info())
                )
                with suppress(UploadNotFound):
                    await self._call(
                        "abort_multipart_upload", Bucket=self.bucket, Key=key, UploadId=state.multipart_id
                    )
        except UploadNotFound:
            await self._call("head_object", Bucket=self.bucket, Key=key)  # UploadNotFound if truly gone
        state.completed = True
        await self._save(upload_id, state)
        if tail is not None:
            with suppress(StorageUnavailable, UploadNotFound):
                await self._call("delete_object", Bucket=self.bucket, Key=tail)

    async def _copy_part(
        self, upload_id: str, state: _State, source: str, start: int, end: int
    ) -> dict[str, Any]:
        """Bytes [start, end) of the object `source` as the next part, copied inside S3."""
        number = len(state.parts or []) + 1
        response = await self._call(
            "upload_part_copy",
            Bucket=self.bucket,
            Key=self._key(upload_id),
            UploadId=state.multipart_id,
            PartNumber=number,
            CopySource={"Bucket": self.bucket, "Key": source},
            CopySourceRange=f"bytes={start}-{end - 1}",
        )
        return _part(number, end - start, response["CopyPartResult"], state.checksum)

    async def delete(self, upload_id: str) -> None:
        with suppress(UploadNotFound):
            state = await self._load(upload_id)
            if not state.completed:
                with suppress(UploadNotFound):
                    await self._call(
                        "abort_multipart_upload",
                        Bucket=self.bucket,
                        Key=self._key(upload_id),
                        UploadId=state.multipart_id,
                    )
        keys = [{"Key": obj["Key"]} async for obj in self._objects(self._key(upload_id))]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes 1,000 keys at most
            batch = keys[start : start + 1000]
            await self._call("delete_objects", Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    async def _objects(self, prefix: str) -> AsyncIterator[dict[str, Any]]:
        """Every object under `prefix`, a listing page at a time."""
        token: dict[str, str] = {}
        while True:
            page = await self._call("list_objects_v2", Bucket=self.bucket, Prefix=prefix, **token)
            for obj in page.get("Contents", []):
                yield obj
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}

    async def upload_ids(self) -> AsyncIterator[str]:
        async for obj in self._objects(self.prefix):
            upload_id, _, suffix = obj["Key"][len(self.prefix) :].partition(".")
            if suffix == "info" and is_upload_id(upload_id):
                yield upload_id

    async def close(self) -> None:
        self._pool.shutdown(wait=True)

    # -- bytes -------------------------------------------------------------------

    @asynccontextmanager
    async def writer(self, info: UploadInfo, *, transactional: bool) -> AsyncIterator[_PartWriter]:
        yield _PartWriter(self, info, await self._state_of(info))

    async def read(self, info: UploadInfo, start: int, end: int) -> AsyncIterator[bytes]:
        state = await self._load(info.id)
        await self._complete(info.id, state)  # a crash may have come between last byte and completion
        if start >= end:
            return
        response = await self._call(
            "get_object", Bucket=self.bucket, Key=self._key(info.id), Range=f"bytes={start}-{end - 1}"
        )
        body = response["Body"]
        loop = asyncio.get_running_loop()
        try:
            while block := await loop.run_in_executor(self._pool, body.read, READ_BLOCK):
                yield block
        finally:
            body.close()

    async def download_url(self, info: UploadInfo) -> str | None:
        """A presigned GET URL when configured, so downloads bypass this server."""
        if not self.presign_downloads:
            return None
        await self._complete(info.id, await self._load(info.id))
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(info.id)}, ExpiresIn=3600
        )

    # -- chunk sessions ----------------------------------------------------------

    async def _chunk_listing(
        self, upload_id: str, number: int | None = None
    ) -> list[tuple[StoredChunk, str]]:
        """The chunk markers (all, or chunk `number`'s), oldest first for each number, with
        the ETag of the part each chunk's bytes became."""
        prefix = self._key(upload_id, ".chunks/" + ("" if number is None else f"{number}."))
        found = []
        async for obj in self._objects(prefix):
            n, size, sha256, etag = obj["Key"].rpartition("/")[2].split(".")
            found.append((StoredChunk(int(n), int(size), sha256, obj["LastModified"].timestamp()), etag))
        return sorted(found, key=lambda item: (item[0].number, item[0].stored_at))

    async def stored_chunks(self, info: UploadInfo, number: int | None = None) -> list[StoredChunk]:
        # Two markers for one chunk need two instances writing it at once after a lease
        # expired; the newer one is shown, and `assemble` goes by the part S3 holds.
        newest = {chunk.number: chunk for chunk, _ in await self._chunk_listing(info.id, number)}
        return list(newest.values())

    async def chunks_busy(self, info: UploadInfo) -> bool:
        """A chunk lease renewed within its lifetime belongs to a request still writing."""
        fresh = time.time() - LEASE_SECONDS
        async for obj in self._objects(self._key(info.id, ".chunk-")):
            if obj["Key"].endswith(".lock") and obj["LastModified"].timestamp() > fresh:
                return True
        return False

    @asynccontextmanager
    async def chunk_writer(self, info: UploadInfo, number: int) -> AsyncIterator[_ChunkWriter]:
        state = await self._state_of(info)
        spool = await self._run(_Spool, self.spool_dir)
        try:
            yield _ChunkWriter(self, info.id, state, number, spool)
        finally:
            spool.close()

    async def assemble(
        self, info: UploadInfo, chunks: Sequence[StoredChunk], sha256: str | None = None
    ) -> None:
        """CompleteMultipartUpload over the parts S3 holds for the recorded chunks, then the
        declared digest checked on the result, then the info object marked complete.

        A crash after CompleteMultipartUpload leaves the object in place and the info
        object incomplete; assembling again finds the object and finishes the job.
        """
        state = await self._state_of(info)
        if state.completed:
            return
        key = self._key(info.id)
        uploaded = await self._uploaded_parts(info.id, state)
        recorded: dict[int, dict[str, StoredChunk]] = {}
        for chunk, etag in await self._chunk_listing(info.id):
            recorded.setdefault(chunk.number, {})[etag] = chunk
        parts = []
        for number in (chunk.number for chunk in chunks):
            markers = recorded.get(number, {})
            if uploaded is None:  # completed already: the marker names the bytes
                listed = {"ETag": next(iter(markers), "")}
            else:
                listed = uploaded.get(number, {"ETag": ""})
            etag = listed["ETag"].strip('"')
            if etag not in markers:  # only bytes whose upload was recorded count
                raise StorageUnavailable(f"S3 does not hold chunk {number} as recorded")
            parts.append(_part(number, markers[etag].size, listed, state.checksum))
        if uploaded is not None:
            try:
                await self._call(
                    "complete_multipart_upload",
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=state.multipart_id,
                    MultipartUpload={"Parts": _completed_parts(parts, state.checksum)},
                )
            except UploadNotFound:  # a retry of a completion that went through
                await self._call("head_object", Bucket=self.bucket, Key=key)
        if sha256 is not None and await self._sha256(key) != sha256:
            raise ChecksumMismatch("the assembled file does not match the declared sha256")
        state.parts, state.completed = parts, True
        await self._save(info.id, state)

    async def _uploaded_parts(self, upload_id: str, state: _State) -> dict[int, dict[str, Any]] | None:
        """Part number -> ListParts' entry (ETag, checksum) of the multipart upload; None if
        it was completed already."""
        uploaded: dict[int, dict[str, Any]] = {}
        marker: dict[str, int] = {}
        while True:
            try:
                page = await self._call(
                    "list_parts",
                    Bucket=self.bucket,
                    Key=self._key(upload_id),
                    UploadId=state.multipart_id,
                    **marker,
                )
            except UploadNotFound:
                await self._call("head_object", Bucket=self.bucket, Key=self._key(upload_id))  # else: gone
                return None
            uploaded.update({p["PartNumber"]: p for p in page.get("Parts", [])})
            if not page.get("IsTruncated"):
                return uploaded
            marker = {"PartNumberMarker": page["NextPartNumberMarker"]}

    async def _sha256(self, key: str) -> str:
        response = await self._call("get_object", Bucket=self.bucket, Key=key)
        return await self._run(_sha256_of, response["Body"])

    async def concatenate(self, info: UploadInfo, parts: Sequence[UploadInfo]) -> None:
        """Join finished uploads with UploadPartCopy. Only pieces too small to be an S3 part
        on their own (under 5 MiB) pass through this server, at most 5 MiB at a time."""
        state = await self._load(info.id)
        joiner = _Joiner(self, info.id, state)
        for index, part in enumerate(parts):
            await joiner.add(self._key(part.id), part.offset, last=index == len(parts) - 1)
        await joiner.flush()
        await self._save(info.id, state)
        await self._complete(info.id, state)

    async def _upload_part(
        self, upload_id: str, state: _State, number: int, body: bytes | BinaryIO, size: int
    ) -> dict[str, Any]:
        response = await self._call(
            "upload_part",
            Bucket=self.bucket,
            Key=self._key(upload_id),
            UploadId=state.multipart_id,
            PartNumber=number,
            Body=body,
            ContentLength=size,
            **_algorithm(state.checksum),
        )
        return _part(number, size, response, state.checksum)

    async def _copy_object_into(self, key: str, spool: _Spool) -> None:
        """Stream a (tail) object into a spool file, a block at a time."""
        response = await self._call("get_object", Bucket=self.bucket, Key=key)
        body = response["Body"]
        try:
            while block := await self._run(body.read, READ_BLOCK):
                await self._run(spool.write, [block])
        finally:
            body.close()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _get_range(self, key: str, start: int, end: int) -> bytes:
        response = await self._call(
            "get_object", Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end - 1}"
        )
        return await asyncio.get_running_loop().run_in_executor(self._pool, response["Body"].read)

    # -- housekeeping ------------------------------------------------------------

    async def describe(self, upload_id: str) -> dict[str, object]:
        state = await self._load(upload_id)
        listing = await self._call("list_objects_v2", Bucket=self.bucket, Prefix=self._key(upload_id))
        details: dict[str, object] = {
            "bucket": self.bucket,
            "key": self._key(upload_id),
            "multipart_upload_id": state.multipart_id,
            "part_size": state.part_size,
            "tail": {"key": state.tail_key, "size": state.tail_size} if state.tail_key else None,
            "completed": state.completed,
            "objects": {o["Key"]: o["Size"] for o in listing.get("Contents", [])},
        }
        if not state.completed:
            with suppress(UploadNotFound):
                parts = await self._call(
                    "list_parts", Bucket=self.bucket, Key=self._key(upload_id), UploadId=state.multipart_id
                )
                details["parts"] = [
                    {"number": p["PartNumber"], "size": p["Size"], "etag": p["ETag"]}
                    for p in parts.get("Parts", [])
                ]
        return details

    async def orphans(self, older_than: float) -> AsyncIterator[Orphan]:
        """Multipart uploads and objects under the prefix that no upload's info object names.

        An abandoned multipart upload is billed storage that no object listing shows.
        """
        now = time.time()
        objects: dict[str, list[dict[str, Any]]] = {}
        async for obj in self._objects(self.prefix):
            upload_id = obj["Key"][len(self.prefix) :].partition(".")[0]
            objects.setdefault(upload_id, []).append(obj)
        states: dict[str, _State | None] = {}
        for upload_id in objects:
            try:
                states[upload_id] = await self._load(upload_id) if is_upload_id(upload_id) else None
            except UploadNotFound:
                states[upload_id] = None
        for upload_id, found in objects.items():
            state = states[upload_id]
            for obj in found:
                age = now - obj["LastModified"].timestamp()
                if not (state and self._owned(upload_id, state, obj["Key"])) and age >= older_than:
                    yield Orphan("object", obj["Key"], obj["Size"], age)
        markers: dict[str, str] = {}
        while True:
            page = await self._call(
                "list_multipart_uploads", Bucket=self.bucket, Prefix=self.prefix, **markers
            )
            for upload in page.get("Uploads", []):
                upload_id = upload["Key"][len(self.prefix) :]
                state = states.get(upload_id)
                age = now - upload["Initiated"].timestamp()
                if (state is None or state.multipart_id != upload["UploadId"]) and age >= older_than:
                    yield Orphan("multipart-upload", upload["UploadId"], 0, age, {"key": upload["Key"]})
            if not page.get("IsTruncated"):
                break
            markers = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}

    def _owned(self, upload_id: str, state: _State, key: str) -> bool:
        """Whether `key` belongs to the live upload whose state is `state`."""
        if key in (self._key(upload_id), state.tail_key):
            return True
        suffix = key[len(self._key(upload_id)) :]
        return suffix in (".info", ".lock", ".preempt") or suffix.startswith((".chunk-", ".chunks/"))

    async def remove_orphan(self, orphan: Orphan) -> None:
        if orphan.kind == "multipart-upload":
            with suppress(UploadNotFound):
                await self._call(
                    "abort_multipart_upload",
                    Bucket=self.bucket,
                    Key=orphan.detail["key"],
                    UploadId=orphan.name,
                )
        else:
            await self._call("delete_object", Bucket=self.bucket, Key=orphan.name)

    # -- locks -------------------------------------------------------------------

    @asynccontextmanager
    async def lock(
        self, upload_id: str, *, timeout: float, preempt: bool = True, chunk: int | None = None
    ) -> AsyncIterator[_Lease]:
        lease = _Lease(self, upload_id, "" if chunk is None else f".chunk-{chunk}")
        await lease.acquire(timeout, preempt)
        try:
            yield lease
        finally:
            await lease.release()


def _object_headers(info: UploadInfo) -> dict[str, str]:
    """Content type and file name from metadata, stored on the finished object."""
    headers = {"ContentType": info.content_type} if info.content_type else {}
    if info.filename:
        headers["ContentDisposition"] = f"attachment; filename*=UTF-8''{info.quoted_filename}"
    return headers


def _algorithm(checksum: str | None) -> dict[str, str]:
    """The ChecksumAlgorithm parameter of CreateMultipartUpload and UploadPart, if any."""
    return {"ChecksumAlgorithm": checksum} if checksum else {}


def _part(number: int, size: int, response: dict[str, Any], checksum: str | None) -> dict[str, Any]:
    """A part as the state records it, from S3's answer (UploadPart, UploadPartCopy, ListParts)."""
    part = {"n": number, "etag": response["ETag"], "size": size}
    if checksum and f"Checksum{checksum}" in response:
        part["checksum"] = response[f"Checksum{checksum}"]
    return part


def _completed_parts(parts: Sequence[dict[str, Any]], checksum: str | None) -> list[dict[str, Any]]:
    """CompleteMultipartUpload's part list; S3 wants each part's checksum when the upload
    was created with an algorithm."""
    completed = []
    for part in parts:
        entry = {"PartNumber": part["n"], "ETag": part["etag"]}
        if checksum and "checksum" in part:
            entry[f"Checksum{checksum}"] = part["checksum"]
        completed.append(entry)
    return completed


@dataclass
class _State:
    """What the info object holds: the upload record plus where its bytes are in S3."""

    record: dict[str, Any]
    multipart_id: str
    part_size: int
    parts: list[dict[str, Any]] | None = None
    tail_key: str | None = None
    tail_size: int = 0
    completed: bool = False
    #: The multipart upload's checksum algorithm; None for uploads begun without one.
    checksum: str | None = None

    def __post_init__(self) -> None:
        self.parts = self.parts or []

    @property
    def offset(self) -> int:
        return sum(p["size"] for p in self.parts or ()) + self.tail_size

    def info(self) -> UploadInfo:
        return UploadInfo.from_record(self.record, offset=self.offset)

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__).encode()

    @classmethod
    def from_json(cls, data: bytes) -> _State:
        return cls(**json.loads(data))


class _Spool:
    """One part's bytes on local scratch disk until S3 has them.

    Parts are several MiB and many uploads run at once; spooling keeps the server's
    memory flat (only the page cache grows) and gives boto3 a seekable body to retry.
    """

    def __init__(self, directory: Path) -> None:
        self.file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115  (closed by close())
        self.size = 0

    def write(self, blocks: Sequence[bytes]) -> None:
        for block in blocks:
            view = memoryview(block)
            while view:  # a short write (a disk filling up) must not leave a gap
                written = os.write(self.file.fileno(), view)
                self.size += written  # counts what is in the file, even if the next write fails
                view = view[written:]

    def body(self) -> BinaryIO:
        self.file.seek(0)
        return self.file

    def close(self) -> None:
        self.file.close()


def _sha256_of(body: Any) -> str:
    """Read a streaming S3 body to its end and hash it (runs on the pool: one hop)."""
    digest = hashlib.sha256()
    try:
        while block := body.read(READ_BLOCK):
            digest.update(block)
    finally:
        body.close()
    return digest.hexdigest()


def _split(blocks: Sequence[bytes], count: int) -> tuple[list[bytes], list[bytes]]:
    """The first `count` bytes of `blocks`, and the rest."""
    head: list[bytes] = []
    rest = list(blocks)
    while rest and count > 0:
        block = rest.pop(0)
        if len(block) > count:
            view = memoryview(block)
            head.append(view[:count])  # type: ignore[arg-type]
            rest.insert(0, view[count:])  # type: ignore[arg-type]
            break
        head.append(block)
        count -= len(block)
    return head, rest


class _PartWriter:
    """Collects appended bytes into parts and uploads up to `concurrency` of them at once.

    The part being filled and the parts in flight live in spool files, so memory per
    upload stays at the core's batch size however large the parts are.
    """

    def __init__(self, storage: S3Storage, info: UploadInfo, state: _State) -> None:
        self._s3 = storage
        self._id = info.id
        self._length = info.length
        self._state = state
        self._committed_parts = list(state.parts or [])
        self._new_parts: list[dict[str, Any]] = []
        self._spool: _Spool | None = None
        self._tail_pending = state.tail_size > 0  # the tail moves into the spool on first write
        self._original_tail = state.tail_key  # deleted by commit once no longer named
        self._in_flight: set[asyncio.Task[dict[str, Any]]] = set()
        self._failure: Exception | None = None

    async def _filling(self) -> _Spool:
        if self._spool is None:
            self._spool = await self._s3._run(_Spool, self._s3.spool_dir)
            if self._tail_pending:
                assert self._state.tail_key is not None
                await self._s3._copy_object_into(self._state.tail_key, self._spool)
                self._tail_pending = False
        return self._spool

    async def write(self, blocks: Sequence[bytes]) -> None:
        rest = list(blocks)
        while rest:
            spool = await self._filling()
            head, rest = _split(rest, self._state.part_size - spool.size)
            await self._s3._run(spool.write, head)
            if spool.size == self._state.part_size:
                self._spool = None
                await self._start_part(spool)

    async def _start_part(self, spool: _Spool) -> None:
        while len(self._in_flight) >= self._s3.concurrency:
            done, self._in_flight = await asyncio.wait(self._in_flight, return_when=asyncio.FIRST_COMPLETED)
            self._collect(done)
        if self._failure is not None:
            spool.close()
            raise self._failure
        number = len(self._committed_parts) + len(self._new_parts) + len(self._in_flight) + 1
        self._in_flight.add(asyncio.ensure_future(self._upload(number, spool)))

    async def _upload(self, number: int, spool: _Spool) -> dict[str, Any]:
        try:
            return await self._s3._upload_part(self._id, self._state, number, spool.body(), spool.size)
        finally:
            spool.close()

    def _collect(self, done: set[asyncio.Task[dict[str, Any]]]) -> None:
        for task in done:
            if task.exception() is not None:
                self._failure = self._failure or task.exception()  # type: ignore[assignment]
            else:
                self._new_parts.append(task.result())

    async def _drain(self) -> None:
        if self._in_flight:
            done, _ = await asyncio.wait(self._in_flight)
            self._in_flight = set()
            self._collect(done)

    async def commit(self) -> int:
        """Wait for the parts in flight, store the unfilled rest as the tail, then the info object."""
        await self._drain()
        parts = sorted(self._new_parts, key=lambda p: p["n"])
        expected = len(self._committed_parts) + 1
        confirmed = []
        for part in parts:  # only an unbroken run of parts counts
            if part["n"] != expected:
                break
            confirmed.append(part)
            expected += 1
        state = self._state
        state.record["updated_at"] = time.time()
        state.parts = self._committed_parts + confirmed
        spool, self._spool = self._spool, None
        if self._tail_pending:
            pass  # nothing was written: the tail stays as it is
        elif self._failure is not None or len(confirmed) < len(parts):
            state.tail_key, state.tail_size = None, 0  # bytes after a failed part are not confirmed
        elif spool is not None and spool.size:
            offset = sum(p["size"] for p in state.parts)
            if self._length is not None and offset + spool.size == self._length:  # the last part
                state.parts.append(
                    await self._s3._upload_part(self._id, state, expected, spool.body(), spool.size)
                )
                state.tail_key, state.tail_size = None, 0
            else:
                state.tail_key = self._s3._key(self._id, f".tail-{secrets.token_hex(4)}")
                await self._s3._call(
                    "put_object", Bucket=self._s3.bucket, Key=state.tail_key, Body=spool.body()
                )
                state.tail_size = spool.size
        else:
            state.tail_key, state.tail_size = None, 0
        if spool is not None:
            spool.close()
        await self._s3._save(self._id, state)
        self._committed_parts, self._new_parts = list(state.parts), []
        self._tail_pending = state.tail_size > 0
        if self._original_tail and self._original_tail != state.tail_key:
            with suppress(StorageUnavailable, UploadNotFound):
                await self._s3._call("delete_object", Bucket=self._s3.bucket, Key=self._original_tail)
        self._original_tail = state.tail_key
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
        return state.offset

    async def checkpoint(self) -> int:
        """Name the parts S3 has confirmed so far in the info object, without waiting."""
        done = {task for task in self._in_flight if task.done()}
        self._in_flight -= done
        self._collect(done)
        self._new_parts.sort(key=lambda p: p["n"])
        run = 0
        while (
            run < len(self._new_parts) and self._new_parts[run]["n"] == len(self._committed_parts) + run + 1
        ):
            run += 1
        if run:
            state = self._state
            state.parts = self._committed_parts + self._new_parts[:run]
            state.tail_key, state.tail_size = None, 0  # its bytes are in the first new part
            state.record["updated_at"] = time.time()
            await self._s3._save(self._id, state)
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


class _ChunkWriter:
    """Spools one chunk to scratch disk; `commit` uploads it as its part, then marks it stored."""

    def __init__(self, storage: S3Storage, upload_id: str, state: _State, number: int, spool: _Spool) -> None:
        self._s3, self._id, self._state, self._number, self._spool = storage, upload_id, state, number, spool

    async def write(self, blocks: Sequence[bytes]) -> None:
        await self._s3._run(self._spool.write, blocks)

    async def commit(self, chunk: StoredChunk) -> None:
        try:
            part = await self._s3._upload_part(
                self._id, self._state, self._number, self._spool.body(), self._spool.size
            )
        except StorageUnavailable:
            await self._s3._load(self._id)  # UploadNotFound if the session was aborted meanwhile
            raise
        etag = part["etag"].strip('"')  # names these bytes: `assemble` completes only with them
        marker = self._s3._key(self._id, f".chunks/{chunk.number}.{chunk.size}.{chunk.sha256}.{etag}")
        await self._s3._call("put_object", Bucket=self._s3.bucket, Key=marker, Body=b"")


class _Joiner:
    """Builds a multipart upload from existing objects, copying inside S3 where it can."""

    def __init__(self, storage: S3Storage, upload_id: str, state: _State) -> None:
        self._s3, self._id, self._state = storage, upload_id, state
        self._buffer = bytearray()

    async def add(self, key: str, size: int, *, last: bool) -> None:
        position = 0
        if self._buffer:  # top up the pending small piece from this object's start
            take = min(MIN_PART - len(self._buffer), size)
            self._buffer += await self._s3._get_range(key, 0, take)
            position = take
            if len(self._buffer) >= MIN_PART:
                await self.flush()
        remaining = size - position
        if remaining >= MIN_PART or (last and remaining and not self._buffer):
            for start, end in _copy_ranges(position, size):
                await self._copy(key, start, end)
        elif remaining:
            self._buffer += await self._s3._get_range(key, position, size)

    async def _copy(self, key: str, start: int, end: int) -> None:
        assert self._state.parts is not None
        self._state.parts.append(await self._s3._copy_part(self._id, self._state, key, start, end))

    async def flush(self) -> None:
        if self._buffer:
            assert self._state.parts is not None
            number = len(self._state.parts) + 1
            data = bytes(self._buffer)
            self._state.parts.append(
                await self._s3._upload_part(self._id, self._state, number, data, len(data))
            )
            self._buffer = bytearray()


def _copy_ranges(start: int, end: int) -> list[tuple[int, int]]:
    """Split [start, end) into copy ranges of at most 5 GiB, none (but a lone one) under 5 MiB."""
    count = max(1, math.ceil((end - start) / MAX_PART))
    step = math.ceil((end - start) / count)
    return [(s, min(s + step, end)) for s in range(start, end, step)]


class _Lease:
    """A lock shared by every instance: a lease object created with If-None-Match.

    The holder renews it while it holds it; a holder that died frees it after
    LEASE_SECONDS. A waiter leaves a preempt marker that the holder polls for.
    """

    def __init__(self, storage: S3Storage, upload_id: str, name: str) -> None:
        self._s3 = storage
        self._key = storage._key(upload_id, name + ".lock")
        self._marker = storage._key(upload_id, name + ".preempt")
        self._etag: str | None = None
        self._asked = False
        self._keeper: asyncio.Task[None] | None = None

    def preempt_requested(self) -> bool:
        return self._asked

    async def acquire(self, timeout: float, preempt: bool) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        asked = False
        while not await self._try_take():
            if not preempt:
                raise UploadBusy()
            if not asked:
                await self._s3._call("put_object", Bucket=self._s3.bucket, Key=self._marker, Body=b"")
                asked = True
            if loop.time() > deadline:
                raise UploadBusy("another request holds this upload; retry shortly")
            await asyncio.sleep(LEASE_POLL_SECONDS)
        if asked:
            with suppress(StorageUnavailable, UploadNotFound):
                await self._s3._call("delete_object", Bucket=self._s3.bucket, Key=self._marker)
        self._keeper = asyncio.ensure_future(self._keep())

    def _body(self) -> bytes:
        return json.dumps({"expires": time.time() + LEASE_SECONDS, "owner": self._s3.instance}).encode()

    async def _try_take(self) -> bool:
        try:
            response = await self._s3._call(
                "put_object", Bucket=self._s3.bucket, Key=self._key, Body=self._body(), IfNoneMatch="*"
            )
        except ClientError:
            return await self._take_over_stale(self._body())
        self._etag = response["ETag"]
        return True

    async def _take_over_stale(self, body: bytes) -> bool:
        """Take a lease whose holder died (expired), or one this process failed to release
        (an S3 outage during release): this process's own per-upload lock is held here, so
        a lease it owns cannot belong to a live request."""
        try:
            current, etag = await self._s3._read_object(self._key)
        except UploadNotFound:
            return False  # released meanwhile; the next attempt takes it
        lease = json.loads(current)
        if lease.get("owner") != self._s3.instance and lease.get("expires", 0) > time.time():
            return False
        try:
            response = await self._s3._call(
                "put_object", Bucket=self._s3.bucket, Key=self._key, Body=body, IfMatch=etag
            )
        except ClientError:
            return False
        self._etag = response["ETag"]
        return True

    async def _keep(self) -> None:
        """Renew the lease and watch for a preempt marker while held."""
        renew_at = time.monotonic() + LEASE_SECONDS / 3
        while True:
            await asyncio.sleep(PREEMPT_POLL_SECONDS)
            with suppress(StorageUnavailable):
                try:
                    await self._s3._call("head_object", Bucket=self._s3.bucket, Key=self._marker)
                    self._asked = True
                except UploadNotFound:
                    pass
                if time.monotonic() >= renew_at:
                    try:
                        response = await self._s3._call(
                            "put_object",
                            Bucket=self._s3.bucket,
                            Key=self._key,
                            Body=self._body(),
                            IfMatch=self._etag,
                        )
                    except ClientError:
                        self._asked = True  # the lease was lost: stop writing
                        return
                    self._etag = response["ETag"]
                    renew_at = time.monotonic() + LEASE_SECONDS / 3

    async def release(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            with suppress(asyncio.CancelledError):
                await self._keeper
        with suppress(StorageUnavailable, UploadNotFound, ClientError):
            await self._s3._call("delete_object", Bucket=self._s3.bucket, Key=self._key, IfMatch=self._etag)
