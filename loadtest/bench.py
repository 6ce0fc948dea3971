"""Benchmark: uploadsrv against the limits of this machine, as ratios to a bare sink.

    python -m uploadsrv.loadtest.bench [--single 1G] [--streams 64] [--stream-size 16M]
        [--small 1000] [--no-s3]

In one run, on one machine: (1) one upload in a single request, (2) many concurrent uploads,
(3) create + 1 KiB append pairs per second, each against a bare sink (loadtest/sink.py:
reads the body, writes and fsyncs it, on the same uvicorn stack and disk); (4) S3 against
boto3 directly on the same moto endpoint. Every upload through uploadsrv is verified.
Small requests are also sent to a tus responder that stores nothing (the client shares
the cores, so that rate is the most any tus server can show here), and to uploadsrv as
one request each (creation-with-upload), the way most clients send a small file.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from uploadsrv.config import parse_size

from .bench_s3 import compare, uploadsrv_flags
from .procs import (
    boto3_credentials,
    cpu_seconds,
    free_port,
    peak_rss_mb,
    spawned_server,
    start_moto,
    start_uploadsrv,
    wait_until_up,
)

TUS = {"Tus-Resumable": "1.0.0"}
Body = bytes | AsyncIterable[bytes]  #: a request body as httpx takes it
ROUNDS = 2  #: runs per side for single stream, small requests and S3; the best of each counts
SMALL_IN_FLIGHT = 8  #: small uploads in flight at a time


def start_sink(directory: Path | None) -> tuple[subprocess.Popen[bytes], str]:
    """The bare sink writing into `directory`; without one, the tus responder that stores nothing."""
    port = free_port()
    env = dict(os.environ)
    if directory is None:
        env.pop("SINK_DIR", None)
    else:
        directory.mkdir(parents=True, exist_ok=True)
        env["SINK_DIR"] = str(directory)
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "uploadsrv.loadtest.sink:app",
        "--port",
        str(port),
        "--http",
        "httptools",
    ]
    command += ["--loop", "uvloop", "--no-access-log", "--log-level", "warning"]
    process = subprocess.Popen(command, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(url + "/", process)
    return process, url


async def file_body(path: Path) -> AsyncIterator[bytes]:
    with open(path, "rb") as f:
        while block := await asyncio.to_thread(f.read, 1 << 20):
            yield block


async def sink_upload(http: httpx.AsyncClient, url: str, body: Body) -> None:
    response = await http.put(url + "/", content=body)
    response.raise_for_status()


async def tus_upload(http: httpx.AsyncClient, url: str, length: int, body: Body, done: list[str]) -> None:
    """Create + one PATCH with the whole body; the upload's URL goes to `done` for verification."""
    created = await http.post(url + "/files/", headers={**TUS, "Upload-Length": str(length)})
    created.raise_for_status()
    location = created.headers["location"]
    headers = {**TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}
    response = await http.patch(location, content=body, headers=headers)
    if response.status_code != 204:
        raise RuntimeError(f"PATCH {response.status_code}: {response.text}")
    done.append(location)


async def tus_upload_in_one(http: httpx.AsyncClient, url: str, body: bytes, done: list[str]) -> None:
    """The whole upload in its creation request (tus creation-with-upload), as tus-js-client
    with `uploadDataDuringCreation` and iOS 17's URLSession (the IETF draft) send small files."""
    headers = {
        **TUS,
        "Upload-Length": str(len(body)),
        "Content-Type": "application/offset+octet-stream",
    }
    created = await http.post(url + "/files/", headers=headers, content=body)
    if created.status_code != 201 or created.headers["upload-offset"] != str(len(body)):
        raise RuntimeError(f"POST {created.status_code}: {created.text}")
    done.append(created.headers["location"])


async def verify(http: httpx.AsyncClient, locations: list[str], expect: str) -> None:
    """Outside the timed part: every stored upload must have the sha256 of what was sent.

    Verified uploads are deleted, so each measurement starts from the same disk, as the
    sink's does (this VM's disk writes a new file slower while earlier ones remain).
    """
    for location in locations:
        digest = hashlib.sha256()
        async with http.stream("GET", location) as download:
            async for block in download.aiter_bytes(1 << 20):
                digest.update(block)
        if digest.hexdigest() != expect:
            raise RuntimeError(f"{location} is corrupted")
        (await http.delete(location, headers=TUS)).raise_for_status()
    locations.clear()


async def timed(coroutine_factory: Callable[[int], Awaitable[object]], count: int, concurrency: int) -> float:
    """Seconds to run `count` operations with at most `concurrency` at a time."""
    semaphore = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with semaphore:
            await coroutine_factory(i)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    return time.perf_counter() - started


async def best_of_rounds(*runs: Callable[[], Awaitable[float]]) -> list[float]:
    """The fastest of ROUNDS runs of each, the runs taking turns, so a noisy machine (it
    only ever slows a run down) weighs on all alike."""
    best = [float("inf")] * len(runs)
    for _ in range(ROUNDS):
        for i, run in enumerate(runs):
            best[i] = min(best[i], await run())
    return best


def client(connections: int) -> httpx.AsyncClient:
    """A client whose pool holds at most `connections`, so connections left over from one
    measurement never weigh on another: httpx checks every pooled connection on every
    request (a socket poll each), which costs it more CPU than many servers do."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(timeout=600, limits=limits)


async def local_figures(args: argparse.Namespace, work: Path) -> list[tuple[str, str, str, str]]:
    sink, sink_url = start_sink(work / "sink")
    echo, echo_url = start_sink(None)
    try:
        with spawned_server("local", work / "srv") as (url, pid):
            servers = Servers(sink.pid, sink_url, echo_url, pid, url)
            return [
                *await single_stream(args, work, servers),
                *await many_streams(args, work, servers),
                *await small_uploads(args, work, servers),
            ]
    finally:
        for process in (sink, echo):
            process.kill()
            process.wait()


@dataclass
class Servers:
    """The processes one local benchmark run measures."""

    sink_pid: int
    sink_url: str
    echo_url: str  #: the tus responder that stores nothing
    pid: int
    url: str


async def single_stream(args: argparse.Namespace, work: Path, at: Servers) -> list[tuple[str, str, str, str]]:
    big = work / "single.bin"
    with open(big, "wb") as f:
        for _ in range(0, args.single, 1 << 20):
            f.write(os.urandom(1 << 20))
        f.truncate(args.single)
    with open(big, "rb") as source:
        big_sha = hashlib.file_digest(source, "sha256").hexdigest()
    done: list[str] = []
    async with client(2) as http:

        async def sink_single() -> float:
            seconds = await timed(lambda i: sink_upload(http, at.sink_url, file_body(big)), 1, 1)
            _clear(work / "sink")
            return seconds

        async def ours_single() -> float:
            seconds = await timed(lambda i: tus_upload(http, at.url, args.single, file_body(big), done), 1, 1)
            await verify(http, done, big_sha)
            return seconds

        sink_s, ours_s = await best_of_rounds(sink_single, ours_single)
    big.unlink()
    return [_row("single stream", args.single / sink_s, args.single / ours_s, 0.9, "MB/s")]


async def many_streams(args: argparse.Namespace, work: Path, at: Servers) -> list[tuple[str, str, str, str]]:
    stream = os.urandom(args.stream_size)
    stream_sha = hashlib.sha256(stream).hexdigest()
    total = args.streams * args.stream_size
    done: list[str] = []
    async with client(args.streams) as http:
        sink_s = await timed(lambda i: sink_upload(http, at.sink_url, stream), args.streams, args.streams)
    _clear(work / "sink")
    rss_before = peak_rss_mb(at.pid)
    async with client(args.streams) as http:
        ours_s = await timed(
            lambda i: tus_upload(http, at.url, args.stream_size, stream, done), args.streams, args.streams
        )
        await verify(http, done, stream_sha)
    return [
        _row(f"{args.streams} streams", total / sink_s, total / ours_s, 0.8, "MB/s"),
        ("  server peak RSS", f"{max(rss_before, peak_rss_mb(at.pid)):.0f} MB", "", "< 100 MB"),
    ]


async def small_uploads(args: argparse.Namespace, work: Path, at: Servers) -> list[tuple[str, str, str, str]]:
    """Create + 1 KiB append pairs, `SMALL_IN_FLIGHT` at a time, each server with a client of its own."""
    small = os.urandom(1024)
    small_sha = hashlib.sha256(small).hexdigest()
    cpu = {at.sink_pid: 0.0, at.pid: 0.0}  #: server CPU seconds over every small run
    done: list[str] = []
    async with (
        client(SMALL_IN_FLIGHT) as to_sink,
        client(SMALL_IN_FLIGHT) as to_ours,
        client(SMALL_IN_FLIGHT) as to_echo,
    ):

        async def sink_small() -> float:
            started = cpu_seconds(at.sink_pid)
            seconds = await timed(
                lambda i: sink_upload(to_sink, at.sink_url, small), args.small, SMALL_IN_FLIGHT
            )
            cpu[at.sink_pid] += cpu_seconds(at.sink_pid) - started
            _clear(work / "sink")
            return seconds

        async def ours_small() -> float:
            started = cpu_seconds(at.pid)
            seconds = await timed(
                lambda i: tus_upload(to_ours, at.url, 1024, small, done), args.small, SMALL_IN_FLIGHT
            )
            cpu[at.pid] += cpu_seconds(at.pid) - started
            await verify(to_ours, done, small_sha)
            return seconds

        async def nothing_stored() -> float:
            return await timed(
                lambda i: tus_upload(to_echo, at.echo_url, 1024, small, []), args.small, SMALL_IN_FLIGHT
            )

        async def ours_in_one() -> float:
            seconds = await timed(
                lambda i: tus_upload_in_one(to_ours, at.url, small, done), args.small, SMALL_IN_FLIGHT
            )
            await verify(to_ours, done, small_sha)
            return seconds

        sink_s, ours_s, echo_s, one_s = await best_of_rounds(
            sink_small, ours_small, nothing_stored, ours_in_one
        )
    per_upload = {p: 1000 * seconds / (ROUNDS * args.small) for p, seconds in cpu.items()}
    return [
        _row("small uploads", args.small / sink_s, args.small / ours_s, 0.5, "/s", scale=1),
        (
            "  tus, nothing stored",
            f"{args.small / echo_s:,.1f} /s",
            "",
            f"{sink_s / echo_s:.2f} (this client's ceiling)",
        ),
        (
            "  each in one request",
            f"{args.small / one_s:,.1f} /s",
            "",
            f"{sink_s / one_s:.2f} (creation-with-upload)",
        ),
        (
            "  server CPU per pair",
            f"{per_upload[at.pid]:.2f} ms",
            f"{per_upload[at.sink_pid]:.2f} ms (sink)",
            "",
        ),
    ]


def s3_figures(args: argparse.Namespace, work: Path) -> list[tuple[str, str, str, str]]:
    import boto3

    source = work / "s3.bin"
    source.write_bytes(os.urandom(args.s3_size))
    moto, endpoint = start_moto(work / "moto.log")
    server = None
    try:
        client = boto3.client("s3", endpoint_url=endpoint, **boto3_credentials())
        client.create_bucket(Bucket="bench")
        server, url = start_uploadsrv(work / "s3srv.log", *uploadsrv_flags(endpoint, work / "s3data"))
        direct_s, ours_s = compare(client, url, source, args.s3_uploads, ROUNDS)
        total = args.s3_size * args.s3_uploads
        return [
            _row(
                f"S3 ({args.s3_uploads} uploads)",
                total / direct_s,
                total / ours_s,
                0.8,
                "MB/s",
                against="boto3",
            )
        ]
    finally:
        for process in (server, moto):
            if process is not None:
                process.kill()
                process.wait()


def _row(
    name: str,
    baseline: float,
    ours: float,
    target: float,
    unit: str,
    scale: float = 1e6,
    against: str = "sink",
) -> tuple[str, str, str, str]:
    ratio = ours / baseline
    mark = "ok" if ratio >= target else "below"
    return (
        name,
        f"{ours / scale:,.1f} {unit}",
        f"{baseline / scale:,.1f} {unit} ({against})",
        f"{ratio:.2f} (>= {target}, {mark})",
    )


def _clear(directory: Path) -> None:
    for path in directory.iterdir():
        path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--single", type=parse_size, default=parse_size("1G"), help="size of the single-stream upload"
    )
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--stream-size", type=parse_size, default=parse_size("16M"))
    parser.add_argument("--small", type=int, default=1000, help="how many 1 KiB uploads per run")
    parser.add_argument("--s3-uploads", type=int, default=16)
    parser.add_argument("--s3-size", type=parse_size, default=parse_size("64M"))
    parser.add_argument("--no-s3", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-", dir=os.environ.get("BENCH_DIR")) as tmp:
        work = Path(tmp)
        rows = asyncio.run(local_figures(args, work))
        if not args.no_s3:
            rows += s3_figures(args, work)
    table = Table(title=f"uploadsrv benchmark ({os.cpu_count()} cores)", box=None)
    for column in ("measure", "uploadsrv", "baseline", "ratio (target)"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    if args.json:
        args.json.write_text(
            json.dumps(
                [dict(zip(("measure", "uploadsrv", "baseline", "ratio"), r, strict=True)) for r in rows],
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
