"""The hook outbox on S3: one object per event under ``<prefix>_outbox/``, so every
instance on the bucket sees what any of them left.

No upload id starts with ``_``, so no upload's listing or deletion (by key prefix) ever
reaches these keys. A claim is written into the event's object with a conditional PUT
(If-Match on the ETag just read): of two instances claiming at once one wins, and a
claim whose holder died runs out after its lease. The claim's ETag is then the condition
of the holder's release, so an event replaced meanwhile (recorded again) is not lost.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from botocore.exceptions import ClientError

from uploadsrv.core.errors import UploadNotFound
from uploadsrv.core.model import is_upload_id

from .client import S3Client

OUTBOX = "_outbox/"


class S3Outbox:
    def __init__(self, s3: S3Client) -> None:
        self.s3 = s3
        self.prefix = s3.prefix + OUTBOX
        self._claims: dict[str, str] = {}  #: event id -> the ETag of this process's claim
        #: A renewal and a release of one claim must not cross: each changes its ETag.
        self._claiming = asyncio.Lock()

    def _key(self, event_id: str) -> str:
        if not is_upload_id(event_id):
            raise ValueError(f"not an event id: {event_id!r}")
        return f"{self.prefix}{event_id}.json"

    async def put_event(self, event_id: str, record: dict[str, Any], *, lease: float | None = None) -> None:
        if lease is None:
            await self.s3.put(self._key(event_id), json.dumps(record).encode())
            return
        response = await self.s3.put(self._key(event_id), json.dumps(self._claimed(record, lease)).encode())
        self._claims[event_id] = response["ETag"]

    def _claimed(self, record: dict[str, Any], lease: float) -> dict[str, Any]:
        return {**record, "claim": {"by": self.s3.instance, "until": time.time() + lease}}

    async def event_ids(self) -> AsyncIterator[str]:
        async for obj in self.s3.objects(self.prefix):
            name = obj["Key"][len(self.prefix) :]
            if name.endswith(".json"):
                yield name[: -len(".json")]

    async def read_event(self, event_id: str) -> dict[str, Any] | None:
        try:
            body, _ = await self.s3.read_object(self._key(event_id))
        except UploadNotFound:
            return None
        return json.loads(body)

    async def claim_event(self, event_id: str, lease: float) -> dict[str, Any] | None:
        try:
            body, etag = await self.s3.read_object(self._key(event_id))
        except UploadNotFound:
            return None
        record = json.loads(body)
        claim = record.pop("claim", None)
        if claim and claim["until"] > time.time():
            return None
        claimed = self._claimed(record, lease)
        try:
            response = await self.s3.put(self._key(event_id), json.dumps(claimed).encode(), IfMatch=etag)
        except ClientError:  # another instance claimed (or recorded) it first
            return None
        self._claims[event_id] = response["ETag"]
        return record

    async def renew_event(self, event_id: str, lease: float) -> bool:
        async with self._claiming:
            return await self._renew(event_id, lease)

    async def _renew(self, event_id: str, lease: float) -> bool:
        etag = self._claims.get(event_id)
        if etag is None:  # released
            return False
        try:
            body, current = await self.s3.read_object(self._key(event_id))
            if current != etag:
                return False  # recorded again, or claimed by another after the lease ran out
            renewed = self._claimed(json.loads(body), lease)
            response = await self.s3.put(self._key(event_id), json.dumps(renewed).encode(), IfMatch=etag)
        except (ClientError, UploadNotFound):
            return False
        self._claims[event_id] = response["ETag"]
        return True

    async def release_event(self, event_id: str, record: dict[str, Any] | None) -> None:
        async with self._claiming:
            await self._release(event_id, record)

    async def _release(self, event_id: str, record: dict[str, Any] | None) -> None:
        etag = self._claims.pop(event_id)
        try:
            if record is None:
                await self.s3.call("delete_object", Key=self._key(event_id), IfMatch=etag)
            else:
                await self.s3.put(self._key(event_id), json.dumps(record).encode(), IfMatch=etag)
        except ClientError:
            pass  # recorded again meanwhile: the newer version stays, to be sent
