"""Several uploadsrv instances on one S3 endpoint: aggregate throughput and the lock's cost.

    python -m uploadsrv.loadtest.bench_instances [--size 32M --uploads 12 --redis true]

1. Aggregate MB/s with 1, 2 and 3 instances on one moto endpoint: `--uploads` tus uploads
   at once, each created on one instance and sent to the next (a load balancer without
   stickiness), every byte checked by the upload's final offset.
2. The lock's round trip per request: sequential HEADs (each takes the upload's lock) on
   one instance, with the S3 lease object and with Redis; their difference is the price
   of the lock.

Everything runs on this machine: client, instances, moto and Redis share its cores, and
moto is CPU-bound, so more instances add no CPU; what the rows show is that the aggregate
holds, not how it scales on separate machines.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import boto3
import httpx

from uploadsrv.config import parse_bool, parse_size

from .clients import TUS, tus_create_headers, tus_upload_in_one
from .procs import boto3_credentials, free_port, start_moto, start_uploadsrv

BLOCK = 1 << 20


@contextmanager
def redis_server(work: Path) -> Iterator[str]:
    """A throwaway redis-server (no persistence); yields its URL."""
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        cwd=work,
    )
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).stdout != b"PONG\n":
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.kill()
        process.wait()


@contextmanager
def instances(
    count: int, work: Path, endpoint: str, bucket: str, redis_url: str | None
) -> Iterator[list[str]]:
    """`count` uploadsrv processes on one bucket; yields their URLs."""
    flags = ["--storage", f"s3://{bucket}/uploads", "--s3-endpoint-url", endpoint]
    if redis_url:
        flags += ["--redis-url", redis_url]
    processes = []
    try:
        urls = []
        for n in range(count):
            process, url = start_uploadsrv(
                work / f"uploadsrv-{n}.log", "--data-dir", str(work / f"d{n}"), *flags
            )
            processes.append(process)
            urls.append(url)
        yield urls
    finally:
        for process in processes:
            process.kill()
            process.wait()


def upload_rotating(urls: list[str], index: int, data: bytes) -> None:
    """Create on instance `index`, send the bytes through the next one."""
    create_on, send_to = urls[index % len(urls)], urls[(index + 1) % len(urls)]
    blocks = (data[i : i + BLOCK] for i in range(0, len(data), BLOCK))
    with httpx.Client(timeout=600) as http:
        tus_upload_in_one(http, create_on, blocks, len(data), via=send_to, content_length=False)


def aggregate_mb_s(urls: list[str], uploads: int, data: bytes) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(uploads) as pool:
        list(pool.map(lambda i: upload_rotating(urls, i, data), range(uploads)))
    return uploads * len(data) / 1e6 / (time.perf_counter() - started)


def head_ms(url: str, count: int) -> float:
    """Mean milliseconds of a HEAD (which takes and releases the upload's lock)."""
    with httpx.Client(timeout=60) as http:
        created = http.post(url + "/files/", headers=tus_create_headers(10))
        upload = created.headers["location"]
        for _ in range(20):  # warm up the connection and the server's S3 pool
            http.head(upload, headers=TUS)
        started = time.perf_counter()
        for _ in range(count):
            if http.head(upload, headers=TUS).status_code != 200:
                raise RuntimeError("HEAD failed")
        return (time.perf_counter() - started) * 1000 / count


def redis_lock_ms(url: str, count: int) -> float:
    """Mean milliseconds of one Redis lease taken and released, measured in this process
    (the part of a request's lock that is Redis, without HTTP or S3 around it)."""
    from uploadsrv.coordination.redis import RedisCoordinator

    async def run() -> float:
        coordinator = RedisCoordinator(url)
        await coordinator.start()
        try:
            started = time.perf_counter()
            for _ in range(count):
                async with coordinator.lock("0" * 32, timeout=5):
                    pass
            return (time.perf_counter() - started) * 1000 / count
        finally:
            await coordinator.close()

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=parse_size, default=parse_size("32M"), help="bytes per upload")
    parser.add_argument("--uploads", type=int, default=12, help="uploads at once")
    parser.add_argument("--heads", type=int, default=300, help="HEADs for the lock's round trip")
    parser.add_argument("--redis", type=parse_bool, default=True, help="throughput rows with Redis")
    args = parser.parse_args()
    data = os.urandom(args.size)
    with tempfile.TemporaryDirectory(prefix="bench-instances-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        moto, endpoint = start_moto(work / "moto.log")
        stack.callback(moto.wait)
        stack.callback(moto.kill)  # callbacks run last first: kill, then wait
        s3 = boto3.client("s3", endpoint_url=endpoint, **boto3_credentials())
        redis_url = stack.enter_context(redis_server(work))
        rows = []
        for count in (1, 2, 3):
            bucket = f"bench-{count}"
            s3.create_bucket(Bucket=bucket)
            with instances(count, work, endpoint, bucket, redis_url if args.redis else None) as urls:
                rows.append((count, aggregate_mb_s(urls, args.uploads, data)))
        lock = {}
        for name, url_of_redis in (("S3 lease", None), ("Redis", redis_url)):
            bucket = "bench-heads-" + ("redis" if url_of_redis else "s3")
            s3.create_bucket(Bucket=bucket)
            with instances(1, work, endpoint, bucket, url_of_redis) as urls:
                lock[name] = head_ms(urls[0], args.heads)
        bare = redis_lock_ms(redis_url, args.heads * 10)
    mib = args.size / (1 << 20)
    print(
        f"{args.uploads} concurrent tus uploads of {mib:.0f} MiB, created on one instance, sent via the next"
    )
    for count, rate in rows:
        print(f"  {count} instance{'s' if count > 1 else ' '} on one moto endpoint : {rate:7.1f} MB/s")
    print(f"HEAD (takes and releases the upload's lock), mean of {args.heads} sequential")
    for name, ms in lock.items():
        print(f"  lock in {name:<8}: {ms:6.2f} ms per request")
    print(f"  the Redis lease alone (acquire + release, in-process): {bare:.3f} ms")


if __name__ == "__main__":
    main()
