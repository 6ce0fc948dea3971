"""Chunk sessions on S3: chunk n is part n, recorded by an empty marker object once stored.

``<id>.chunks/<n>.<size>.<sha256>.<etag>`` says chunk n is stored and names the part's
bytes, so one listing finds every chunk and `assemble` completes only with those bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from uploadsrv.core.errors import ChecksumMismatch, StorageUnavailable
from uploadsrv.core.storage import StoredChunk

from . import state as records
from .client import S3Client
from .lease import LEASE_SECONDS
from .multipart import Multipart
from .spool import Spool
from .state import Part

#: For each chunk number, the chunks recorded under it by the ETag of their part.
Markers = dict[int, dict[str, StoredChunk]]


async def listing(s3: S3Client, upload_id: str, number: int | None = None) -> list[tuple[StoredChunk, str]]:
    """The chunk markers (all, or chunk `number`'s), oldest first for each number, with
    the ETag of the part each chunk's bytes became."""
    prefix = s3.key(upload_id, ".chunks/" + ("" if number is None else f"{number}."))
    found = []
    async for obj in s3.objects(prefix):
        n, size, sha256, etag = obj["Key"].rpartition("/")[2].split(".")
        found.append((StoredChunk(int(n), int(size), sha256, obj["LastModified"].timestamp()), etag))
    return sorted(found, key=lambda item: (item[0].number, item[0].stored_at))


async def stored(s3: S3Client, upload_id: str, number: int | None = None) -> list[StoredChunk]:
    # Two markers for one chunk need two instances writing it at once after a lease
    # expired; the newer one is shown, and `assemble` goes by the part S3 holds.
    newest = {chunk.number: chunk for chunk, _ in await listing(s3, upload_id, number)}
    return list(newest.values())


async def busy(s3: S3Client, upload_id: str) -> bool:
    """A chunk lease renewed within its lifetime belongs to a request still writing."""
    fresh = s3.clock() - LEASE_SECONDS
    async for obj in s3.objects(s3.key(upload_id, ".chunk-")):
        if obj["Key"].endswith(".lock") and obj["LastModified"].timestamp() > fresh:
            return True
    return False


class ChunkWriter:
    """Spools one chunk to scratch disk; `commit` uploads it as its part, then marks it stored."""

    def __init__(self, multipart: Multipart, number: int, spool: Spool) -> None:
        self._multipart, self._number, self._spool = multipart, number, spool

    async def write(self, blocks: Sequence[bytes]) -> None:
        await self._multipart.s3.scratch(self._spool.write, blocks)

    async def commit(self, chunk: StoredChunk) -> None:
        s3, upload_id = self._multipart.s3, self._multipart.upload_id
        try:
            part = await self._multipart.upload_spool(self._number, self._spool)
        except StorageUnavailable:
            await records.load(s3, upload_id)  # UploadNotFound if the session was aborted meanwhile
            raise
        etag = part.etag.strip('"')  # names these bytes: `assemble` completes only with them
        await s3.put(s3.key(upload_id, f".chunks/{chunk.number}.{chunk.size}.{chunk.sha256}.{etag}"))


async def assemble(multipart: Multipart, chunks: Sequence[StoredChunk], sha256: str | None) -> None:
    """CompleteMultipartUpload over the parts S3 holds for the recorded chunks, then the
    declared digest checked on the result, then the info object marked complete.

    A crash after CompleteMultipartUpload leaves the object in place and the info
    object incomplete; assembling again finds the object and finishes the job.
    """
    state = multipart.state
    if state.completed:
        return
    uploaded = await multipart.uploaded_parts()
    markers: Markers = {}
    for chunk, etag in await listing(multipart.s3, multipart.upload_id):
        markers.setdefault(chunk.number, {})[etag] = chunk
    parts = [_recorded_part(c.number, markers.get(c.number, {}), uploaded, state.checksum) for c in chunks]
    if uploaded is not None:
        await multipart.complete_parts(parts)
    if sha256 is not None and await multipart.sha256() != sha256:
        raise ChecksumMismatch("the assembled file does not match the declared sha256")
    state.parts, state.completed = parts, True
    await records.save(multipart.s3, multipart.upload_id, state)


def _recorded_part(
    number: int,
    markers: dict[str, StoredChunk],
    uploaded: dict[int, dict[str, Any]] | None,
    algorithm: str | None,
) -> Part:
    """Chunk `number` as a part, if the bytes S3 holds for it are the ones its marker recorded.

    `uploaded` is None once the multipart upload is complete: the marker names the bytes.
    """
    listed = {"ETag": next(iter(markers), "")} if uploaded is None else uploaded.get(number, {"ETag": ""})
    etag = listed["ETag"].strip('"')
    if etag not in markers:  # only bytes whose upload was recorded count
        raise StorageUnavailable(f"S3 does not hold chunk {number} as recorded")
    return Part.confirmed(number, markers[etag].size, listed, algorithm)
