"""What the operator CLI sees of S3: one upload's objects and parts, and leftovers no upload owns."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import suppress
from typing import Any

from uploadsrv.core.errors import UploadNotFound
from uploadsrv.core.model import is_upload_id
from uploadsrv.core.storage import Orphan

from . import state as records
from .client import S3Client
from .lease import HEARTBEATS, LEASE_SECONDS, PREEMPT
from .outbox import OUTBOX
from .state import State


async def describe(s3: S3Client, upload_id: str) -> dict[str, object]:
    state = await records.load(s3, upload_id)
    listing = await s3.call("list_objects_v2", Prefix=s3.key(upload_id))
    details: dict[str, object] = {
        "bucket": s3.bucket,
        "key": s3.key(upload_id),
        "multipart_upload_id": state.multipart_id,
        "part_size": state.part_size,
        "tail": {"key": state.tail_key, "size": state.tail_size} if state.tail_key else None,
        "completed": state.completed,
        "objects": {o["Key"]: o["Size"] for o in listing.get("Contents", [])},
    }
    if not state.completed:
        with suppress(UploadNotFound):
            parts = await s3.call("list_parts", Key=s3.key(upload_id), UploadId=state.multipart_id)
            details["parts"] = [
                {"number": p["PartNumber"], "size": p["Size"], "etag": p["ETag"]}
                for p in parts.get("Parts", [])
            ]
    return details


async def orphans(s3: S3Client, older_than: float) -> AsyncIterator[Orphan]:
    """Multipart uploads and objects under the prefix that no upload's info object names.

    An abandoned multipart upload is billed storage that no object listing shows.
    """
    now = s3.clock()
    objects = await _objects_by_upload(s3)
    states = {upload_id: await _state_or_none(s3, upload_id) for upload_id in objects}
    for upload_id, found in objects.items():
        for obj in found:
            age = now - obj["LastModified"].timestamp()
            if obj["Key"].startswith(s3.prefix + HEARTBEATS) and age < LEASE_SECONDS:
                continue  # a live process's; one whose process is gone is a leftover
            if not _owned(s3, upload_id, states[upload_id], obj["Key"]) and age >= older_than:
                yield Orphan("object", obj["Key"], obj["Size"], age)
    async for upload in _multipart_uploads(s3):
        state = states.get(upload["Key"][len(s3.prefix) :])
        age = now - upload["Initiated"].timestamp()
        if (state is None or state.multipart_id != upload["UploadId"]) and age >= older_than:
            yield Orphan("multipart-upload", upload["UploadId"], 0, age, {"key": upload["Key"]})


async def remove_orphan(s3: S3Client, orphan: Orphan) -> None:
    if orphan.kind == "multipart-upload":
        with suppress(UploadNotFound):
            await s3.call("abort_multipart_upload", Key=orphan.detail["key"], UploadId=orphan.name)
    else:
        await s3.call("delete_object", Key=orphan.name)


async def _objects_by_upload(s3: S3Client) -> dict[str, list[dict[str, Any]]]:
    """Every object under the prefix, by the upload id its key starts with."""
    objects: dict[str, list[dict[str, Any]]] = {}
    async for obj in s3.objects(s3.prefix):
        if obj["Key"].startswith(s3.prefix + OUTBOX):
            continue  # hook events, not an upload's
        upload_id = obj["Key"][len(s3.prefix) :].removeprefix(PREEMPT).partition(".")[0]
        objects.setdefault(upload_id, []).append(obj)
    return objects


async def _state_or_none(s3: S3Client, upload_id: str) -> State | None:
    if not is_upload_id(upload_id):
        return None
    try:
        return await records.load(s3, upload_id)
    except UploadNotFound:
        return None


async def _multipart_uploads(s3: S3Client) -> AsyncIterator[dict[str, Any]]:
    """Every multipart upload in progress under the prefix, a listing page at a time."""
    markers: dict[str, str] = {}
    while True:
        page = await s3.call("list_multipart_uploads", Prefix=s3.prefix, **markers)
        for upload in page.get("Uploads", []):
            yield upload
        if not page.get("IsTruncated"):
            return
        markers = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}


def _owned(s3: S3Client, upload_id: str, state: State | None, key: str) -> bool:
    """Whether `key` belongs to the live upload whose state is `state`."""
    if state is None:
        return False
    if key in (s3.key(upload_id), state.tail_key) or key.startswith(s3.prefix + PREEMPT):
        return True
    suffix = key[len(s3.key(upload_id)) :]
    return suffix in (".info", ".lock") or suffix.startswith((".chunk-", ".chunks/"))
