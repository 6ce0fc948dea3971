"""S3 benchmark: the same file to the same moto endpoint, directly with boto3 and through uploadsrv.

    python -m uploadsrv.loadtest.bench_s3 [--size 256M] [--concurrency 16]

Prints aggregate MB/s of (a) boto3's managed multipart upload and (b) tus uploads
through uploadsrv's S3 backend (one PATCH per file, as background clients send it),
the ratio b/a, and the server's peak RSS. Both use 8 MiB parts, 4 in parallel per file;
each side's figure is the best of `--rounds` runs, the sides taking turns.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import boto3
import httpx
from boto3.s3.transfer import TransferConfig

from uploadsrv.config import parse_size

from .clients import tus_upload_in_one
from .procs import boto3_credentials, peak_rss_mb, start_moto, start_uploadsrv, timed

PART = 8 << 20
PARALLEL_PARTS = 4
READ_BLOCK = 1 << 20


def upload_with_boto3(client, bucket: str, path: Path, count: int) -> None:
    config = TransferConfig(
        multipart_threshold=PART, multipart_chunksize=PART, max_concurrency=PARALLEL_PARTS
    )
    with ThreadPoolExecutor(count) as pool:
        list(
            pool.map(
                lambda i: client.upload_file(str(path), bucket, f"direct/{i}", Config=config), range(count)
            )
        )


def upload_with_tus(url: str, path: Path, count: int) -> None:
    """One tus upload per file, read in 1 MiB blocks: httpx reads a file object in 64 KiB
    ones, and this client shares the cores with the server (1 MiB: 1.2 -> 1.0 CPU-s/GiB)."""
    size = path.stat().st_size

    def blocks(f: BinaryIO) -> Iterator[bytes]:
        while block := f.read(READ_BLOCK):
            yield block

    def one(_: int) -> None:
        with httpx.Client(timeout=600) as http, open(path, "rb") as f:
            tus_upload_in_one(http, url, blocks(f), size)

    with ThreadPoolExecutor(count) as pool:
        list(pool.map(one, range(count)))


def uploadsrv_flags(endpoint: str, data_dir: Path) -> list[str]:
    """uploadsrv on the bucket `bench` of `endpoint`, with the direct upload's part size and
    parallelism."""
    return [
        *("--storage", "s3://bench/uploads", "--s3-endpoint-url", endpoint, "--data-dir", str(data_dir)),
        *("--s3-part-size", str(PART), "--s3-concurrency", str(PARALLEL_PARTS)),
    ]


def compare(client, url: str, source: Path, count: int, rounds: int) -> tuple[float, float]:
    """Seconds for `count` uploads of `source` with boto3 directly and as tus through
    uploadsrv at `url`: the best of `rounds` runs of each, taking turns, so a noisy
    machine (it only ever slows a run down) weighs on both alike."""
    direct = through = float("inf")
    for _ in range(rounds):
        direct = min(direct, timed(lambda: upload_with_boto3(client, "bench", source, count)))
        empty_bucket(client, "bench")
        through = min(through, timed(lambda: upload_with_tus(url, source, count)))
        empty_bucket(client, "bench")
    return direct, through


def empty_bucket(client, bucket: str) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=parse_size, default=parse_size("256M"), help="bytes per file")
    parser.add_argument("--concurrency", type=int, default=16, help="files uploaded at once")
    parser.add_argument("--rounds", type=int, default=2, help="runs per side; the best of each counts")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp:
        work = Path(tmp)
        source = work / "source.bin"
        with open(source, "wb") as f:
            for _ in range(0, args.size, 1 << 20):
                f.write(os.urandom(min(1 << 20, args.size)))
            f.truncate(args.size)
        moto, endpoint = start_moto(work / "moto.log")
        server = None
        try:
            client = boto3.client("s3", endpoint_url=endpoint, **boto3_credentials())
            client.create_bucket(Bucket="bench")
            total_mb = args.size * args.concurrency / 1e6
            server, url = start_uploadsrv(work / "uploadsrv.log", *uploadsrv_flags(endpoint, work / "data"))
            direct, through = compare(client, url, source, args.concurrency, args.rounds)
            rss = peak_rss_mb(server.pid)
        finally:
            for process in (server, moto):
                if process is not None:
                    process.kill()
                    process.wait()

    print(f"{args.concurrency} concurrent uploads of {args.size / (1 << 20):.0f} MiB to one moto endpoint")
    print(f"  (a) boto3 multipart, direct : {total_mb / direct:8.1f} MB/s")
    print(f"  (b) tus through uploadsrv   : {total_mb / through:8.1f} MB/s")
    print(f"  ratio b/a                   : {direct / through:8.2f}   (target >= 0.8)")
    print(f"  uploadsrv peak RSS          : {rss:8.1f} MB  (target < 200 MB)")


if __name__ == "__main__":
    main()
