"""The info object: an upload's record plus where its bytes are in S3.

It is the commit point of every write: parts and tail are uploaded first, then the info
object names them, so the offset a client is told is always bytes S3 has confirmed.

Mid-request it need not be rewritten after every part. A streaming writer marks it
`open` once, before its first part above `high_part` (the highest part number any
writer may have left in S3): every part above `high_part` is then this writer's, and a
reader (any instance, after a crash too) adopts the confirmed parts that continue the
named ones straight from ListParts (`adopt`). Below `high_part` S3 may hold stale parts
(a failed or discarded request's), which only the info object can tell from new ones:
there a writer names each part as S3 confirms it, as before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

from botocore.exceptions import ClientError

from uploadsrv.core.errors import StorageUnavailable, Superseded, UploadNotFound
from uploadsrv.core.model import UploadInfo

from .client import S3Client


@dataclass(frozen=True)
class Part:
    """One part of a multipart upload, as S3 confirmed it."""

    number: int
    etag: str
    size: int
    #: The part's checksum in the multipart upload's algorithm, when it has one.
    checksum: str | None = None

    @classmethod
    def confirmed(cls, number: int, size: int, response: dict[str, Any], algorithm: str | None) -> Part:
        """From S3's answer to UploadPart, UploadPartCopy or ListParts."""
        checksum = response.get(f"Checksum{algorithm}") if algorithm else None
        return cls(number, response["ETag"], size, checksum)

    def completed(self, algorithm: str | None) -> dict[str, Any]:
        """The entry CompleteMultipartUpload wants; with the part's checksum when the
        upload was created with an algorithm."""
        entry: dict[str, Any] = {"PartNumber": self.number, "ETag": self.etag}
        if algorithm and self.checksum is not None:
            entry[f"Checksum{algorithm}"] = self.checksum
        return entry

    def to_json(self) -> dict[str, Any]:
        stored: dict[str, Any] = {"n": self.number, "etag": self.etag, "size": self.size}
        if self.checksum is not None:
            stored["checksum"] = self.checksum
        return stored

    @classmethod
    def from_json(cls, stored: dict[str, Any]) -> Part:
        return cls(stored["n"], stored["etag"], stored["size"], stored.get("checksum"))


@dataclass
class State:
    """What the info object holds."""

    record: dict[str, Any]
    multipart_id: str
    part_size: int
    parts: list[Part] = field(default_factory=list)
    tail_key: str | None = None
    tail_size: int = 0
    completed: bool = False
    #: The multipart upload's checksum algorithm; None for uploads begun without one.
    checksum: str | None = None
    #: The fencing token of the Redis lease it was last written under (0: none).
    fence: int = 0
    #: The highest part number any writer may have uploaded, named or not; None when not
    #: known (an info object written before this field): then nothing is ever adopted.
    high_part: int | None = None
    #: A streaming writer names its parts above `high_part` only when it commits: a
    #: reader adopts the confirmed parts that continue the named ones (`adopt`).
    open: bool = False
    #: The info object's ETag as read or last written: the next write's If-Match. Not stored.
    etag: str | None = field(default=None, compare=False)
    #: A tail whose bytes adopted parts hold: the stored object still names it. Not stored.
    dropped_tail: str | None = field(default=None, compare=False)

    @property
    def offset(self) -> int:
        return sum(p.size for p in self.parts) + self.tail_size

    def info(self) -> UploadInfo:
        return UploadInfo.from_record(self.record, offset=self.offset)

    def adoptable(self) -> bool:
        """Whether S3 may hold confirmed parts after the named ones that a reader adopts:
        the object is open and every part number a stale part could have is named."""
        return (
            self.open
            and not self.completed
            and self.high_part is not None
            and len(self.parts) >= self.high_part
        )

    def adopt(self, listed: list[dict[str, Any]]) -> None:
        """Name the parts of ListParts' entries (`listed`, any order) that continue the named
        ones: full parts, and a shorter one only if it ends the upload. Their first holds the
        tail's bytes (a writer starts its first part with them), so the tail goes."""
        if not self.adoptable():
            return
        by_number = {entry["PartNumber"]: entry for entry in listed}
        length = self.info().length
        size = sum(p.size for p in self.parts)
        adopted: list[Part] = []
        while (entry := by_number.get(len(self.parts) + len(adopted) + 1)) is not None:
            ends = length is not None and size + entry["Size"] == length
            if entry["Size"] != self.part_size and not ends:
                break
            adopted.append(Part.confirmed(entry["PartNumber"], entry["Size"], entry, self.checksum))
            size += entry["Size"]
            if ends:
                break
        if adopted:
            self.parts = [*self.parts, *adopted]
            if self.tail_key is not None:
                self.dropped_tail = self.tail_key
            self.tail_key, self.tail_size = None, 0

    def to_json(self) -> bytes:
        # Without a fence the object reads as before, also by instances not yet upgraded.
        stored = {k: v for k, v in self.__dict__.items() if k not in _UNSTORED and (k != "fence" or v)}
        return json.dumps({**stored, "parts": [p.to_json() for p in self.parts]}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> State:
        stored = json.loads(data)
        parts = [Part.from_json(p) for p in stored.pop("parts", None) or ()]
        return cls(**{k: v for k, v in stored.items() if k in _STORED}, parts=parts)


_UNSTORED = {"etag", "dropped_tail"}
_STORED = {f.name for f in fields(State)} - _UNSTORED - {"parts"}


async def load(s3: S3Client, upload_id: str) -> State:
    """The info object, with the confirmed parts an open one does not name yet (`adopt`)."""
    body, etag = await s3.read_object(s3.key(upload_id, ".info"))
    state = State.from_json(body)
    state.etag = etag
    if state.adoptable():
        state.adopt(await listed_parts(s3, upload_id, state))
    return state


async def listed_parts(s3: S3Client, upload_id: str, state: State) -> list[dict[str, Any]]:
    """ListParts' entries after the named parts; none if the multipart upload is gone
    (completed meanwhile: the completer's write of this object follows)."""
    found: list[dict[str, Any]] = []
    marker = len(state.parts)
    while True:
        try:
            page = await s3.call(
                "list_parts", Key=s3.key(upload_id), UploadId=state.multipart_id, PartNumberMarker=marker
            )
        except UploadNotFound:
            return []
        found += page.get("Parts", [])
        if not page.get("IsTruncated"):
            return found
        marker = int(page["NextPartNumberMarker"])


async def save(s3: S3Client, upload_id: str, state: State) -> None:
    """Write the info object over the version this request read (or last wrote), never
    over a newer one: a holder that lost its lease while paused finds another instance's
    write there and stops (Superseded) instead of undoing it. Under a Redis lease the
    state also carries the lease's fencing token, which catches such a holder even
    before anyone wrote."""
    lease = s3.fences.get(upload_id)
    if lease is not None:
        if not lease.valid():
            raise StorageUnavailable("this server's lease on the upload ran out; retry")
        if state.fence > lease.fence and not await lease.refence(state.fence):
            raise Superseded("a newer request holds this upload")
        state.fence = lease.fence
    condition = {"IfMatch": state.etag} if state.etag else {}
    try:
        response = await s3.put(s3.key(upload_id, ".info"), state.to_json(), **condition)
    except ClientError as exc:  # the condition failed: someone wrote it since
        raise Superseded("another request changed this upload meanwhile") from exc
    state.etag = response["ETag"]
