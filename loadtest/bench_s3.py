"""S3 benchmark: the same file to the same moto endpoint, directly with boto3 and through uploadsrv.

    python -m uploadsrv.loadtest.bench_s3 [--size 256M] [--concurrency 16]

Prints aggregate MB/s of (a) boto3's managed multipart upload and (b) tus uploads
through uploadsrv's S3 backend (one PATCH per file, as background clients send it),
the ratio b/a, and the server's peak RSS. Both use 8 MiB parts, 4 in parallel per file;
each side's figure is the best of `--rounds` runs, the sides taking turns. Beside each,
the CPU per GiB (user + system, from /proc) of moto, uploadsrv and the clients (this
process's threads) in that run: on shared cores, where moto is CPU-bound, the total is
what sets the rate. And the requests moto served per GiB, by kind (from its log): each
costs moto some 4 ms of CPU, and unlike CPU time their count does not depend on the load.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import boto3
import httpx
from boto3.s3.transfer import TransferConfig

from uploadsrv.config import parse_size

from .clients import tus_upload_in_one
from .procs import boto3_credentials, cpu_seconds, peak_rss_mb, start_moto, start_uploadsrv

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


#: A request line in moto's (werkzeug's) log: method and target.
REQUEST_LINE = re.compile(r'"([A-Z]+) (\S+) HTTP/1\.1"')
#: Werkzeug colours the request line of any status but 200 (a DELETE's 204, a 404, a 412).
COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def request_kind(method: str, target: str) -> str:
    """What a logged request was, by the S3 call and, for objects, uploadsrv's key suffix."""
    path, _, query = target.partition("?")
    if "partNumber=" in query:
        return "part"
    if "uploads" in query.split("&"):
        return "create"
    if "uploadId=" in query:
        return {"POST": "complete", "GET": "list-parts", "DELETE": "abort"}.get(method, method)
    if "list-type=2" in query or "prefix=" in query:
        return "listing"
    name = path.rsplit("/", 1)[-1]
    for suffix in (".info", ".lock", ".tail-"):
        if suffix in name:
            return f"{method} {suffix.strip('.-')}"
    for folder, kind in (("/_preempt/", "marker"), ("/_heartbeats/", "heartbeat")):
        if folder in path:
            return f"{method} {kind}"
    return f"{method} object"


def requests_since(log: Path, offset: int) -> Counter[str]:
    """The requests moto logged after byte `offset` of its log, by kind."""
    with open(log, "rb") as f:
        f.seek(offset)
        text = COLOUR.sub("", f.read().decode(errors="replace"))
    return Counter(request_kind(*m.groups()) for m in REQUEST_LINE.finditer(text))


@dataclass(frozen=True)
class Run:
    """One side's run: its seconds, the CPU seconds each process spent meanwhile and the
    requests moto served."""

    seconds: float
    moto_cpu: float
    server_cpu: float
    client_cpu: float
    requests: Counter[str] = field(default_factory=Counter)

    def per_gib(self, total: int) -> str:
        gib = total / (1 << 30)
        server = f", uploadsrv {self.server_cpu / gib:.2f}" if self.server_cpu else ""
        return f"CPU s/GiB: moto {self.moto_cpu / gib:.2f}{server}, client {self.client_cpu / gib:.2f}"

    def requests_per_gib(self, total: int) -> str:
        gib = total / (1 << 30)
        kinds = ", ".join(f"{kind} {n / gib:.1f}" for kind, n in sorted(self.requests.items()))
        return f"moto requests/GiB: {self.requests.total() / gib:.1f} ({kinds})"


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process: the clients
    return usage.ru_utime + usage.ru_stime


def measured(
    fn: Callable[[], object], moto: int, server: int, *, server_counts: bool, moto_log: Path | None = None
) -> Run:
    logged = moto_log.stat().st_size if moto_log else 0
    before = (time.perf_counter(), cpu_seconds(moto), cpu_seconds(server), _own_cpu())
    fn()
    after = (time.perf_counter(), cpu_seconds(moto), cpu_seconds(server), _own_cpu())
    seconds, moto_cpu, server_cpu, client_cpu = (b - a for a, b in zip(before, after, strict=True))
    requests = requests_since(moto_log, logged) if moto_log else Counter()
    return Run(seconds, moto_cpu, server_cpu if server_counts else 0.0, client_cpu, requests)


def compare(
    client,
    url: str,
    source: Path,
    count: int,
    rounds: int,
    moto: int,
    server: int,
    moto_log: Path | None = None,
) -> tuple[Run, Run]:
    """`count` uploads of `source` with boto3 directly and as tus through uploadsrv at
    `url` (moto and uploadsrv: their PIDs; moto's log, to count its requests): the fastest
    of `rounds` runs of each, taking turns, so a noisy machine (it only ever slows a run
    down) weighs on both alike."""
    runs: tuple[list[Run], list[Run]] = ([], [])
    for _ in range(rounds):
        for side, (upload, server_counts) in enumerate(
            (
                (lambda: upload_with_boto3(client, "bench", source, count), False),
                (lambda: upload_with_tus(url, source, count), True),
            )
        ):
            runs[side].append(measured(upload, moto, server, server_counts=server_counts, moto_log=moto_log))
            empty_bucket(client, "bench")
    return min(runs[0], key=lambda r: r.seconds), min(runs[1], key=lambda r: r.seconds)


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
        moto_log = work / "moto.log"
        moto, endpoint = start_moto(moto_log)
        server = None
        try:
            client = boto3.client("s3", endpoint_url=endpoint, **boto3_credentials())
            client.create_bucket(Bucket="bench")
            total_mb = args.size * args.concurrency / 1e6
            server, url = start_uploadsrv(work / "uploadsrv.log", *uploadsrv_flags(endpoint, work / "data"))
            direct, through = compare(
                client, url, source, args.concurrency, args.rounds, moto.pid, server.pid, moto_log
            )
            rss = peak_rss_mb(server.pid)
        finally:
            for process in (server, moto):
                if process is not None:
                    process.kill()
                    process.wait()

    print(f"{args.concurrency} concurrent uploads of {args.size / (1 << 20):.0f} MiB to one moto endpoint")
    total = args.size * args.concurrency
    for label, run in (("(a) boto3 multipart, direct", direct), ("(b) tus through uploadsrv  ", through)):
        print(f"  {label} : {total_mb / run.seconds:8.1f} MB/s   {run.per_gib(total)}")
        print(f"  {'':27}   {run.requests_per_gib(total)}")
    print(f"  ratio b/a                   : {direct.seconds / through.seconds:8.2f}   (target >= 0.9)")
    print(f"  uploadsrv peak RSS          : {rss:8.1f} MB  (target < 200 MB)")


if __name__ == "__main__":
    main()
