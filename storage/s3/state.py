"""The info object: an upload's record plus where its bytes are in S3.

It is the commit point of every write: parts and tail are uploaded first, then the info
object names them, so the offset a client is told is always bytes S3 has confirmed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

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

    @property
    def offset(self) -> int:
        return sum(p.size for p in self.parts) + self.tail_size

    def info(self) -> UploadInfo:
        return UploadInfo.from_record(self.record, offset=self.offset)

    def to_json(self) -> bytes:
        return json.dumps({**self.__dict__, "parts": [p.to_json() for p in self.parts]}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> State:
        stored = json.loads(data)
        parts = [Part.from_json(p) for p in stored.pop("parts", None) or ()]
        return cls(**stored, parts=parts)


async def load(s3: S3Client, upload_id: str) -> State:
    body, _ = await s3.read_object(s3.key(upload_id, ".info"))
    return State.from_json(body)


async def save(s3: S3Client, upload_id: str, state: State) -> None:
    await s3.put(s3.key(upload_id, ".info"), state.to_json())
