"""One upload's multipart upload: its parts, its completion, joins of existing objects."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any, BinaryIO

from uploadsrv.core.errors import StorageUnavailable, UploadNotFound
from uploadsrv.core.model import UploadInfo

from . import state as records
from .client import CHECKSUM, MAX_PART, MIN_PART, READ_BLOCK, S3Client
from .spool import Spool
from .state import Part, State


def object_headers(info: UploadInfo) -> dict[str, str]:
    """Content type and disposition from metadata, stored on the finished object, so a
    presigned download is shown as this server's own would be."""
    headers = {"ContentType": info.content_type} if info.content_type else {}
    headers["ContentDisposition"] = info.content_disposition
    return headers


def algorithm(checksum: str | None) -> dict[str, str]:
    """The ChecksumAlgorithm parameter of CreateMultipartUpload and UploadPart, if any."""
    return {"ChecksumAlgorithm": checksum} if checksum else {}


class Multipart:
    """The multipart upload of one upload, named by its `state`."""

    def __init__(self, s3: S3Client, upload_id: str, state: State) -> None:
        self.s3, self.upload_id, self.state = s3, upload_id, state
        self.key = s3.key(upload_id)

    def _params(self) -> dict[str, Any]:
        return {"Key": self.key, "UploadId": self.state.multipart_id}

    async def upload_part(
        self, number: int, body: bytes | BinaryIO, size: int, checksum: Mapping[str, str] | None = None
    ) -> Part:
        """UploadPart; `checksum` is the part's checksum parameter if known, else botocore
        computes it from the body."""
        response = await self.s3.call(
            "upload_part",
            **self._params(),
            PartNumber=number,
            Body=body,
            ContentLength=size,
            **algorithm(self.state.checksum),
            **(checksum or {}),
        )
        return Part.confirmed(number, size, response, self.state.checksum)

    def spool(self, directory: Path) -> Spool:
        """A scratch file for one of this upload's parts (blocking: run it on a thread)."""
        return Spool(directory, crc32=self.state.checksum == CHECKSUM)

    async def upload_spool(self, number: int, spool: Spool) -> Part:
        return await self.upload_part(number, spool.body(), spool.size, spool.checksum())

    async def copy_part(self, source: str, start: int, end: int) -> Part:
        """Bytes [start, end) of the object `source` as the next part, copied inside S3."""
        number = len(self.state.parts) + 1
        response = await self.s3.call(
            "upload_part_copy",
            **self._params(),
            PartNumber=number,
            CopySource={"Bucket": self.s3.bucket, "Key": source},
            CopySourceRange=f"bytes={start}-{end - 1}",
        )
        return Part.confirmed(number, end - start, response["CopyPartResult"], self.state.checksum)

    async def complete_parts(self, parts: list[Part]) -> None:
        """CompleteMultipartUpload over `parts`; a retry of one that went through finds the object."""
        checksum = self.state.checksum
        try:
            await self.s3.call(
                "complete_multipart_upload",
                **self._params(),
                MultipartUpload={"Parts": [part.completed(checksum) for part in parts]},
            )
        except UploadNotFound:
            await self.s3.call("head_object", Key=self.key)  # UploadNotFound if truly gone

    async def abort(self) -> None:
        with suppress(UploadNotFound):
            await self.s3.call("abort_multipart_upload", **self._params())

    async def complete(self) -> None:
        """CompleteMultipartUpload (idempotent): the upload becomes one ordinary object.

        Bytes still in the tail (a length declared only after they arrived) become the
        last part, copied inside S3. An earlier attempt may have completed the multipart
        upload and died before saying so: the finished object then answers for it.
        """
        state = self.state
        if state.completed:
            return
        tail = state.tail_key
        try:
            if tail is not None:
                state.parts = [*state.parts, await self.copy_part(tail, 0, state.tail_size)]
                state.tail_key, state.tail_size = None, 0
            await self._complete_bytes()
        except UploadNotFound:
            await self.s3.call("head_object", Key=self.key)  # UploadNotFound if truly gone
        state.completed = True
        await records.save(self.s3, self.upload_id, state)
        for replaced in (tail, state.dropped_tail):  # copied into the last part; in adopted parts
            if replaced is not None:
                await self.s3.delete_quietly(replaced)

    async def _complete_bytes(self) -> None:
        state = self.state
        if state.parts:
            await self.complete_parts(state.parts)
        elif state.info().length:
            raise StorageUnavailable(f"upload {self.upload_id} has no parts to complete")
        else:  # zero bytes: S3 wants at least one part, so store an empty object instead
            await self.s3.put(self.key, b"", **object_headers(state.info()))
            await self.abort()

    async def uploaded_parts(self) -> dict[int, dict[str, Any]] | None:
        """Part number -> ListParts' entry (ETag, checksum); None if completed already."""
        uploaded: dict[int, dict[str, Any]] = {}
        marker: dict[str, int] = {}
        while True:
            try:
                page = await self.s3.call("list_parts", **self._params(), **marker)
            except UploadNotFound:
                await self.s3.call("head_object", Key=self.key)  # else: gone
                return None
            uploaded.update({p["PartNumber"]: p for p in page.get("Parts", [])})
            if not page.get("IsTruncated"):
                return uploaded
            marker = {"PartNumberMarker": page["NextPartNumberMarker"]}

    async def sha256(self) -> str:
        """The finished object's sha256, read through this server."""
        response = await self.s3.call("get_object", Key=self.key)
        return await self.s3.run(_sha256_of, response["Body"])


def _sha256_of(body: Any) -> str:
    """Read a streaming S3 body to its end and hash it (runs on the pool: one hop)."""
    digest = hashlib.sha256()
    try:
        while block := body.read(READ_BLOCK):
            digest.update(block)
    finally:
        body.close()
    return digest.hexdigest()


class Joiner:
    """Builds a multipart upload from existing objects, copying inside S3 where it can.

    Only pieces too small to be an S3 part on their own (under 5 MiB) pass through this
    server, at most 5 MiB at a time.
    """

    def __init__(self, multipart: Multipart) -> None:
        self._multipart = multipart
        self._parts = multipart.state.parts
        self._buffer = bytearray()

    async def add(self, key: str, size: int, *, last: bool) -> None:
        position = 0
        if self._buffer:  # top up the pending small piece from this object's start
            take = min(MIN_PART - len(self._buffer), size)
            self._buffer += await self._multipart.s3.read_range(key, 0, take)
            position = take
            if len(self._buffer) >= MIN_PART:
                await self.flush()
        remaining = size - position
        if remaining >= MIN_PART or (last and remaining and not self._buffer):
            for start, end in _copy_ranges(position, size):
                self._parts.append(await self._multipart.copy_part(key, start, end))
        elif remaining:
            self._buffer += await self._multipart.s3.read_range(key, position, size)

    async def flush(self) -> None:
        if self._buffer:
            data = bytes(self._buffer)
            self._parts.append(await self._multipart.upload_part(len(self._parts) + 1, data, len(data)))
            self._buffer = bytearray()


def _copy_ranges(start: int, end: int) -> list[tuple[int, int]]:
    """Split [start, end) into copy ranges of at most 5 GiB, none (but a lone one) under 5 MiB."""
    count = max(1, math.ceil((end - start) / MAX_PART))
    step = math.ceil((end - start) / count)
    return [(s, min(s + step, end)) for s in range(start, end, step)]
