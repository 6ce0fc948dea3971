"""The bucket: boto3 clients, the thread pool their calls run on, keys and listing pages.

Every S3 call of the backend goes through `S3Client.call`, so outages become
StorageUnavailable and missing keys UploadNotFound in one place.
"""

from __future__ import annotations

import asyncio
import math
import secrets
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from uploadsrv.core.errors import StorageUnavailable, UploadNotFound
from uploadsrv.core.storage import Clock
from uploadsrv.core.storage import Lease as CoordinatorLease

T = TypeVar("T")

MIN_PART = 5 << 20  #: S3's minimum size of every part but the last
MAX_PART = 5 << 30
MAX_PARTS = 10_000
READ_BLOCK = 1 << 20
NOT_FOUND = {"NoSuchKey", "404", "NotFound", "NoSuchUpload"}
#: Conditional writes that lost a race: the caller decides (leases), so they stay ClientError.
CONDITION_FAILED = ("PreconditionFailed", "ConditionalRequestConflict")
SLOW_OPERATIONS = {"complete_multipart_upload", "upload_part_copy"}
#: Calls that move parts' bytes, on threads of their own: a lease's renewal, a preempt
#: marker's poll or an info write never waits behind a burst of parts.
TRANSFER_OPERATIONS = {"upload_part", *SLOW_OPERATIONS}
SLOW_READ_SECONDS = 600
CHECKSUM = "CRC32"  #: what S3 checks every part with, as boto3's own transfers do


def part_size_for(length: int | None, preferred: int, max_size: int) -> int:
    """The smallest part size >= `preferred` that fits the upload in 10,000 parts."""
    needed = math.ceil((length if length is not None else max_size) / MAX_PARTS)
    size = max(preferred, MIN_PART, needed)
    return min(MAX_PART, -(-size // (1 << 20)) * (1 << 20))  # whole MiB


def error_code(exc: ClientError) -> str:
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


class S3Client:
    """One bucket and prefix, reached through boto3 on a bounded thread pool."""

    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None,
        region: str | None,
        path_style: bool,
        io_threads: int,
        clock: Clock,
    ) -> None:
        location = S3Location.parse(url)
        self.bucket, self.prefix = location.bucket, location.prefix
        config = Config(
            region_name=region,
            s3={"addressing_style": "path" if path_style else "auto"},
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=3,
            read_timeout=30,  # a hung request must not outlive a lease (lease.LEASE_SECONDS)
            max_pool_connections=2 * io_threads,  # the transfers' threads and the others'
            # For bodies without an algorithm of their own (info, tail and lease objects):
            # over plain HTTP SigV4 signs the body's sha256, which S3 checks, so no CRC32
            # on top; over HTTPS botocore sends a CRC32 instead of signing the body. Parts
            # always carry the multipart upload's algorithm.
            request_checksum_calculation=(
                "when_required" if (endpoint_url or "").startswith("http://") else "when_supported"
            ),
        )
        self.boto = boto3.client("s3", endpoint_url=endpoint_url, config=config)
        #: For calls S3 may take minutes to answer (it keeps the connection alive meanwhile):
        #: with the short timeout, botocore would retry them while they still run.
        self._slow = boto3.client(
            "s3", endpoint_url=endpoint_url, config=config.merge(Config(read_timeout=SLOW_READ_SECONDS))
        )
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="uploadsrv-s3")
        self._transfers = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="uploadsrv-s3-parts")
        #: Spool files' reads and writes, apart from the S3 calls: a request's next bytes
        #: go to scratch disk while its earlier parts are still on their way to S3.
        self._scratch = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="uploadsrv-spool")
        #: Names this process in leases; see `Lease._take_over_stale`.
        self.instance = secrets.token_hex(8)
        #: Uploads held here under a coordinator's lease: their info writes check it.
        self.fences: dict[str, CoordinatorLease] = {}
        #: Stamps activity, lease expiry and ages: the core's clock.
        self.clock = clock

    def key(self, upload_id: str, suffix: str = "") -> str:
        return f"{self.prefix}{upload_id}{suffix}"

    async def call(self, operation: str, **params: Any) -> Any:
        """One boto3 call on this bucket, on a bounded pool; outages become StorageUnavailable."""
        client = self._slow if operation in SLOW_OPERATIONS else self.boto
        method: Callable[..., Any] = getattr(client, operation)
        pool = self._transfers if operation in TRANSFER_OPERATIONS else self._pool
        try:
            return await asyncio.get_running_loop().run_in_executor(
                pool, lambda: method(Bucket=self.bucket, **params)
            )
        except ClientError as exc:
            if error_code(exc) in NOT_FOUND:
                raise UploadNotFound() from exc
            if error_code(exc) in CONDITION_FAILED:
                raise
            raise StorageUnavailable(f"S3 {operation} failed: {error_code(exc)}") from exc
        except BotoCoreError as exc:
            raise StorageUnavailable(f"S3 unreachable: {exc}") from exc

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """A blocking call (boto3, a response body's read) on the pool, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def scratch(self, fn: Callable[..., T], *args: Any) -> T:
        """A spool file's blocking I/O, on threads that never wait behind S3 calls."""
        return await asyncio.get_running_loop().run_in_executor(self._scratch, fn, *args)

    async def read_object(self, key: str, **params: Any) -> tuple[bytes, str]:
        """A small object's bytes and ETag (info, tail, lease, or a range of up to one part)."""
        response = await self.call("get_object", Key=key, **params)
        return await self.run(response["Body"].read), response["ETag"]

    async def read_range(self, key: str, start: int, end: int) -> bytes:
        body, _ = await self.read_object(key, Range=f"bytes={start}-{end - 1}")
        return body

    async def put(self, key: str, body: Any = b"", **params: Any) -> Any:
        return await self.call("put_object", Key=key, Body=body, **params)

    async def delete_quietly(self, key: str) -> None:
        """Delete an object whose loss is harmless if this fails (an old tail, a marker)."""
        with suppress(StorageUnavailable, UploadNotFound):
            await self.call("delete_object", Key=key)

    async def objects(self, prefix: str) -> AsyncIterator[dict[str, Any]]:
        """Every object under `prefix`, a listing page at a time."""
        token: dict[str, str] = {}
        while True:
            page = await self.call("list_objects_v2", Prefix=prefix, **token)
            for obj in page.get("Contents", []):
                yield obj
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def presigned_get(self, key: str, expires_in: int) -> str:
        return self.boto.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_in
        )

    def close(self) -> None:
        for pool in (self._pool, self._transfers, self._scratch):
            pool.shutdown(wait=True)
