"""Benchmark: uploadsrv against the bare limit of this machine and against its peers.

    python -m uploadsrv.loadtest.bench [--single 1G] [--sequential 64 --sequential-size 4M]
        [--streams 64 --stream-size 16M] [--small 2000 --connections 32] [--rounds 3]
        [--servers NAME,...] [--only SCENARIO,...] [--no-extra] [--no-s3] [--drop-caches]
        [--json out.json]

Every server gets the same requests in the same run, taking turns, and each figure is the
median of `--rounds`: the bare sink (`loadtest/sink.py`: a socket, a thread per connection,
`recv_into`, `pwrite`, `fdatasync` before the answer), the same sink behind uvicorn, a sink
that stores nothing (what the clients reach alone), `@tus/server` with `@tus/file-store`
(Node; installed from `loadtest/peers/package-lock.json` on first use) and `tuspyserver`
(the `bench` extra), and uploadsrv, alone and as two worker processes. Large uploads are
sent by curl, one process per upload; small ones over a lean keep-alive connection
(`loadtest/lean.py`) with the tus requests of `loadtest/clients.py`. Server CPU and peak
RSS come from /proc (all of a server's processes), the clients' CPU from their own
accounting. Every upload through uploadsrv is downloaded and compared by sha256
afterwards, outside the timed part.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from rich import box
from rich.console import Console
from rich.table import Table

from uploadsrv.config import parse_size

from . import lean, servers
from .clients import TUS, tus_append_headers, tus_create, tus_in_one, tus_pair
from .options import names_of
from .servers import COMPARED, OURS, PEERS, SINK, UPLOADSRV, UPLOADSRV_WORKERS, Server

GiB = 1 << 30
CURL = ["curl", "-s", "-S", "-H", "Expect:", "-w", "%{http_code}\n"]
CHUNK = 8 << 20  #: the chunk API row's chunk size
EXTRA = ("checksum", "ietf", "chunks")  #: uploadsrv's other paths (`--no-extra` skips them)
SCENARIOS = ("single", "sequential", "streams", "pairs", "one", *EXTRA)  #: for `--only`
APPEND = ["-X", "PATCH", *(arg for k, v in tus_append_headers(0).items() for arg in ("-H", f"{k}: {v}"))]


@dataclass
class Figure:
    """One measurement of one server: how long, and what it cost."""

    seconds: float
    amount: float  #: bytes, or uploads for small requests
    server_cpu: float
    client_cpu: float
    rss_mb: float

    @property
    def rate(self) -> float:
        return self.amount / self.seconds


@dataclass
class Outcome:
    amount: float  #: bytes, or uploads
    client_cpu: float  #: seconds
    paths: list[bytes]  #: the uploads made, for verification
    chunked: bool = False  #: they hold the chunk file repeated (the chunk API row)


@dataclass
class Scenario:
    key: str  #: its name for `--only`
    name: str
    unit: str  #: "MB/s" or "/s"
    run: Callable[[Server], Awaitable[Outcome]]
    target_sink: float | None = None
    target_peer: float | None = None
    cpu_target: float | None = None  #: s/GiB or ms per upload
    only: tuple[str, ...] = ()  #: empty: every server
    figures: dict[str, Figure] = field(default_factory=dict)


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.files: dict[int, Path] = {}
        self.digests: dict[int, str] = {}  #: each input file's sha256, taken as it is written
        self.single_sha1 = ""  #: the `--single` file's sha1, base64 (by `prepare`)

    # -- inputs ------------------------------------------------------------------

    def prepare(self) -> None:
        """Every input file and the checksum row's digest, made before any timing (the
        first server measured used to pay for them), then written out to the disk."""
        for size in {self.args.single, self.args.sequential_size, self.args.stream_size, CHUNK, 1024}:
            self.file(size)
        with open(self.file(self.args.single), "rb") as f:
            self.single_sha1 = base64.b64encode(hashlib.file_digest(f, "sha1").digest()).decode()
        os.sync()

    def file(self, size: int) -> Path:
        """A file of `size` random bytes (made once, by `prepare`)."""
        if size not in self.files:
            path = self.work / f"input-{size}"
            digest = hashlib.sha256()
            with open(path, "wb") as f:
                for start in range(0, size, 1 << 20):
                    block = os.urandom(min(1 << 20, size - start))
                    digest.update(block)
                    f.write(block)
            self.files[size], self.digests[size] = path, digest.hexdigest()
        return self.files[size]

    # -- the scenarios -------------------------------------------------------------

    async def single(self, server: Server, *extra: str) -> Outcome:
        """One upload of `--single` bytes in one PATCH."""
        size = self.args.single
        paths = await _create(server, size, 1)
        return Outcome(size, (await _curl(self._appends(paths, size, server, *extra)))[0], paths)

    async def single_checksum(self, server: Server) -> Outcome:
        return await self.single(server, "-H", f"Upload-Checksum: sha1 {self.single_sha1}")

    async def single_ietf(self, server: Server) -> Outcome:
        """The whole file in one IETF draft POST, as iOS sends it; 104s report progress."""
        size = self.args.single
        headers = ["-H", "Upload-Draft-Interop-Version: 6", "-H", "Upload-Complete: ?1", "-D", "-"]
        command = [*CURL, *headers, "-X", "POST", "-T", str(self.file(size))]
        # -T appends the file's name to a URL ending in "/": name the request target instead
        command += ["-o", "/dev/null", "--request-target", "/files/", f"{server.url}/files/new"]
        cpu, out = await _curl([command], expect=("201",))
        locations = [line.split(b":", 1)[1].strip() for line in out if line.lower().startswith(b"location:")]
        return Outcome(size, cpu, [lean.path_of(locations[-1])])

    async def sequential(self, server: Server) -> Outcome:
        """`--sequential` PATCHes of `--sequential-size` one after another on one connection."""
        size, count = self.args.sequential_size, self.args.sequential
        paths = await _create(server, size, count)
        command = [*CURL, *APPEND, "-o", "/dev/null"]
        for path in paths:
            command += ["-T", str(self.file(size)), server.url + path.decode()]
        return Outcome(size * count, (await _curl([command], count=count))[0], paths)

    async def streams(self, server: Server) -> Outcome:
        """`--streams` concurrent PATCHes of `--stream-size`, a curl process each."""
        size, count = self.args.stream_size, self.args.streams
        paths = await _create(server, size, count)
        return Outcome(size * count, (await _curl(self._appends(paths, size, server)))[0], paths)

    async def chunks(self, server: Server) -> Outcome:
        """The chunk API: the `--single` file as chunks of 8 MiB, 4 at a time."""
        chunk, count = CHUNK, self._chunk_count()
        async with httpx.AsyncClient(base_url=server.url) as http:
            created = await http.post("/chunks/", json={"size": chunk * count, "chunk_size": chunk})
            session = created.raise_for_status().json()
            command = [*CURL, "--parallel", "--parallel-max", "4", "-X", "PUT"]
            for n in range(1, count + 1):
                url = session["chunk_url_template"].replace("{n}", str(n))
                command += ["-o", "/dev/null", "-T", str(self.file(chunk)), url]
            cpu, _ = await _curl([command], count=count, expect=("201",))
            done = (await http.post(session["complete_url"])).raise_for_status().json()
        return Outcome(chunk * count, cpu, [lean.path_of(done["upload_url"].encode())], chunked=True)

    async def pairs(self, server: Server) -> Outcome:
        """`--small` uploads as create + 1 KiB PATCH, over `--connections` connections."""
        return await self._small(server, tus_pair)

    async def in_one(self, server: Server) -> Outcome:
        """`--small` uploads of 1 KiB, each in its creation request."""
        return await self._small(server, tus_in_one)

    async def _small(
        self, server: Server, upload: Callable[[lean.Connection, bytes], Awaitable[bytes]]
    ) -> Outcome:
        body = self.small_body
        remaining = iter(range(self.args.small))
        paths: list[bytes] = []
        deadline = time.monotonic() + self.args.small_seconds

        async def work(connection: lean.Connection) -> None:
            for _ in remaining:
                paths.append(await upload(connection, body))
                if time.monotonic() > deadline:  # a slow server: what it did by then counts
                    return

        connections = [await lean.Connection.open(server.url) for _ in range(self.args.connections)]
        started = time.process_time()
        await asyncio.gather(*(work(c) for c in connections))
        cpu = time.process_time() - started
        for connection in connections:
            await connection.close()
        return Outcome(len(paths), cpu, paths)

    def _appends(self, paths: list[bytes], size: int, server: Server, *extra: str) -> list[list[str]]:
        source = str(self.file(size))
        return [
            [*CURL, *APPEND, *extra, "-o", "/dev/null", "-T", source, server.url + p.decode()] for p in paths
        ]

    # -- running -------------------------------------------------------------------

    @property
    def small_body(self) -> bytes:
        return self.file(1024).read_bytes()

    def settle(self) -> None:
        """The same memory for every measurement: what the run before left dirty (the
        peers do not fsync; deleted uploads) written out now, not by the disk during this
        run (the 1 GiB row swung 0.8-1.5x), and with `--drop-caches` (root) the page
        cache emptied, only the inputs read back, and free memory warmed. Once earlier
        runs had filled memory with cached pages, every page a server wrote first had to
        be reclaimed, on its own CPU: the same 1 GiB IETF POST cost 0.7-1.2 s of server
        CPU with free memory and 3.3-4.5 s without, old and new code alike."""
        os.sync()
        if not self.args.drop_caches:
            return
        try:
            with open("/proc/sys/vm/drop_caches", "w") as caches:
                caches.write("1")
        except OSError as error:
            raise SystemExit(f"--drop-caches needs root: {error}") from None
        for path in self.files.values():
            with open(path, "rb") as f:
                while f.read(1 << 20):
                    pass
        self.warm(2 * max(self.files))

    def warm(self, size: int) -> None:
        """Write `size` bytes to a file and delete it unsynced, just before a measurement,
        so that the free pages its server's writes take have been touched. This VM hands
        memory that stays free for 2 s back to its host, and the first touch after that
        costs 1.5-2.1 s of system time per GiB written, against 0.22-0.25 s for memory
        freed a moment before (`dd` of 1 GiB): charged to whichever server wrote first,
        it moved the sink's 1 GiB row from 0.61 to 2.79 s/GiB between runs. Twice the
        largest input: the checksum row writes its body twice (staging, then data)."""
        path = self.work / "warm-up"
        block = bytes(1 << 20)
        with open(path, "wb") as f:
            for _ in range(0, size, len(block)):
                f.write(block)
        path.unlink()  # its dirty pages are dropped, not written: free, and just touched

    async def measure(self, scenario: Scenario, server: Server) -> Figure:
        await asyncio.to_thread(self.settle)
        server.reset_peak_rss()
        cpu_before = server.cpu()
        started = time.perf_counter()
        outcome = await scenario.run(server)
        seconds = time.perf_counter() - started
        cpu = server.cpu() - cpu_before
        figure = Figure(seconds, outcome.amount, cpu, outcome.client_cpu, server.peak_rss_mb())
        # uploadsrv: every upload downloaded and compared, then deleted through its API;
        # the others: their data directory emptied.
        if server.name in OURS:
            await verify_uploadsrv(server, outcome.paths, self.expected_digests(outcome.chunked))
        else:
            server.clear()
        return figure

    def _chunk_count(self) -> int:
        """How many chunks the chunk API row sends: the `--single` size in 8 MiB chunks."""
        return max(1, self.args.single // CHUNK)

    def expected_digests(self, chunked: bool) -> dict[int, str]:
        """sha256 by upload size: of the input files, or (`chunked`) of the chunk file
        repeated as the chunk API row sends it, which may have the `--single` file's size."""
        if not chunked:
            return self.digests
        count = self._chunk_count()
        digest = hashlib.sha256()
        block = self.file(CHUNK).read_bytes()
        for _ in range(count):
            digest.update(block)
        return {count * CHUNK: digest.hexdigest()}


async def _create(server: Server, size: int, count: int) -> list[bytes]:
    connection = await lean.Connection.open(server.url)
    try:
        return [await tus_create(connection, size) for _ in range(count)]
    finally:
        await connection.close()


async def _curl(
    commands: list[list[str]], count: int = 1, expect: tuple[str, ...] = ("204", "200")
) -> tuple[float, list[bytes]]:
    """Run the curl commands at once; returns their CPU seconds and the last one's output
    lines. Each must answer `expect` `count` times."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    processes = [
        await asyncio.create_subprocess_exec(*c, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for c in commands
    ]
    lines: list[bytes] = []
    for process in processes:
        out, err = await process.communicate()
        lines = out.splitlines()
        codes = [line.strip() for line in lines if line.strip().isdigit()]
        if process.returncode != 0 or len([c for c in codes if c.decode() in expect]) != count:
            raise RuntimeError(f"curl: exit {process.returncode}, answers {codes[:8]}, {err.decode()[:300]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), lines


async def verify_uploadsrv(server: Server, paths: list[bytes], digests: dict[int, str]) -> None:
    """Each upload must have the sha256 of what was sent; then it is deleted."""
    async with httpx.AsyncClient(base_url=server.url, timeout=600) as http:
        for path in paths:
            digest = hashlib.sha256()
            async with http.stream("GET", path.decode()) as download:
                if download.status_code != 200:
                    raise RuntimeError(f"GET {path!r}: {download.status_code}")
                size = int(download.headers["content-length"])
                async for block in download.aiter_bytes(1 << 20):
                    digest.update(block)
            if digests.get(size) != digest.hexdigest():
                raise RuntimeError(f"uploadsrv's upload {path!r} ({size} bytes) is corrupted")
            (await http.delete(path.decode(), headers=TUS)).raise_for_status()


def scenarios(bench: Bench, args: argparse.Namespace) -> list[Scenario]:
    """The scenarios to run: all of them, or those `--only` names."""
    single = (
        f"{args.single / GiB:g} GiB in one PATCH" if args.single >= GiB else f"{args.single} B in one PATCH"
    )
    listed = [
        Scenario("single", single, "MB/s", bench.single, 0.9, 1.3, 0.6),
        Scenario(
            "sequential",
            f"{args.sequential} x {_size(args.sequential_size)} PATCHes, one connection",
            "MB/s",
            bench.sequential,
            0.8,
        ),
        Scenario(
            "streams",
            f"{args.streams} concurrent {_size(args.stream_size)} PATCHes",
            "MB/s",
            bench.streams,
            0.9,
        ),
        Scenario(
            "pairs",
            f"{args.small} x (create + 1 KiB PATCH), {args.connections} connections",
            "/s",
            bench.pairs,
            0.5,
            2.0,
            0.5,
        ),
        Scenario("one", f"{args.small} x 1 KiB creation-with-upload", "/s", bench.in_one, 0.5, 2.0, 0.5),
    ]
    if not args.no_extra:  # uploadsrv's other paths, against the sink's single upload
        only = (UPLOADSRV, COMPARED)
        listed += [
            Scenario(
                "checksum", single + " with Upload-Checksum (sha1)", "MB/s", bench.single_checksum, only=only
            ),
            Scenario(
                "ietf", single.replace("PATCH", "IETF POST, 104s"), "MB/s", bench.single_ietf, only=only
            ),
            Scenario("chunks", "chunk API, 8 MiB chunks, 4 at a time", "MB/s", bench.chunks, only=only),
        ]
    return [s for s in listed if args.only is None or s.key in args.only]


async def run_all(args: argparse.Namespace, work: Path, console: Console) -> list[Scenario]:
    started: list[Server] = []
    try:
        for name in _server_names(args):
            python = args.compare if name == COMPARED else sys.executable
            server = servers.start(name, work / "data", work / f"{name.replace('/', '_')}.log", python)
            if isinstance(server, str):
                console.print(f"[yellow]skipped {name}: {server}[/yellow]")
            else:
                started.append(server)
        bench = Bench(args, work)
        await asyncio.to_thread(bench.prepare)
        listed = scenarios(bench, args)
        for scenario in listed:
            await _run(bench, scenario, started, args.rounds)
            console.print(
                f"{scenario.name}: "
                + ", ".join(f"{n} {_rate(f, scenario.unit)}" for n, f in scenario.figures.items())
            )
        _compare_extra_with_sink(listed)
        return listed
    finally:
        for server in started:
            server.stop()


def _server_names(args: argparse.Namespace) -> list[str]:
    """The servers to run; with `--compare`, the other checkout's uploadsrv just before ours."""
    names = list(args.servers)
    if args.compare:
        names.insert(names.index(UPLOADSRV) if UPLOADSRV in names else len(names), COMPARED)
    return names


async def _run(bench: Bench, scenario: Scenario, started: list[Server], rounds: int) -> None:
    """`rounds` runs of the scenario on each server it is for; its figures are their medians."""
    runs: dict[str, list[Figure]] = {}
    for _ in range(rounds):
        for server in started:  # taking turns, so noise weighs on all alike
            if scenario.only and server.name not in scenario.only:
                continue
            runs.setdefault(server.name, []).append(await bench.measure(scenario, server))
    scenario.figures = {name: _median(figures) for name, figures in runs.items()}


def _compare_extra_with_sink(listed: list[Scenario]) -> None:
    """The extra paths (sink: none of its own) are compared with the sink's single upload."""
    single = next((s for s in listed if s.key == "single"), None)
    reference = single.figures.get(SINK) if single is not None else None
    if reference is None:
        return
    for scenario in listed:
        if scenario.key in EXTRA:
            scenario.figures.setdefault(SINK, reference)


def _size(size: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift:
            return f"{size / (1 << shift):g} {unit}"
    return f"{size} B"


def _median(figures: list[Figure]) -> Figure:
    """The run of median duration (its CPU and RSS with it), so figures stay one run's."""
    ordered = sorted(figures, key=lambda f: f.seconds)
    return ordered[(len(ordered) - 1) // 2]


def _rate(figure: Figure, unit: str) -> str:
    return f"{figure.rate / 1e6:,.0f}" if unit == "MB/s" else f"{figure.rate:,.0f}"


def _cpu(figure: Figure, unit: str, client: bool = False) -> str:
    seconds = figure.client_cpu if client else figure.server_cpu
    if unit == "MB/s":
        return f"{seconds / (figure.amount / GiB):.2f}"
    return f"{1000 * seconds / figure.amount:.2f}"


def table(listed: list[Scenario], names: list[str]) -> Table:
    result = Table(title=f"uploadsrv benchmark ({os.cpu_count()} cores, medians)", box=box.MARKDOWN)
    extra = ["vs compared"] if COMPARED in names else []
    if UPLOADSRV_WORKERS in names:
        extra += ["2 workers vs sink", "2 workers vs best peer"]
    for column in ("measure", *names, "vs sink", "vs best peer", *extra):
        result.add_column(column, justify="left" if column == "measure" else "right")
    for s in listed:
        per = "s/GiB" if s.unit == "MB/s" else "ms/upload"
        versus = _versus(s, UPLOADSRV)
        if COMPARED in names:
            versus.append(_ratio(s.figures.get(UPLOADSRV), _rate_of(s, COMPARED), None))
        if UPLOADSRV_WORKERS in names:
            versus += _versus(s, UPLOADSRV_WORKERS)
        result.add_row(f"{s.name}, {s.unit}", *_cells(s, names, _rate), *versus)
        result.add_row(f"  server CPU, {per}", *_cells(s, names, _cpu), _cpu_mark(s), "")
        result.add_row(f"  client CPU, {per}", *_cells(s, names, _client_cpu))
        result.add_row("  server peak RSS, MB", *_cells(s, names, lambda f, unit: f"{f.rss_mb:.0f}"))
    return result


def _cells(scenario: Scenario, names: list[str], show: Callable[[Figure, str], str]) -> list[str]:
    """One figure of each server, blank for one that did not run the scenario."""
    figures = scenario.figures
    return [show(figures[n], scenario.unit) if n in figures else "" for n in names]


def _versus(s: Scenario, name: str) -> list[str]:
    """Server `name`'s rate against the sink's and the best peer's."""
    ours = s.figures.get(name)
    peers = [s.figures[p].rate for p in PEERS if p in s.figures and p not in s.only]
    return [
        _ratio(ours, _rate_of(s, SINK), s.target_sink),
        _ratio(ours, max(peers) if peers else None, s.target_peer),
    ]


def _rate_of(s: Scenario, name: str) -> float | None:
    figure = s.figures.get(name)
    return figure.rate if figure else None


def _cpu_mark(s: Scenario) -> str:
    """Whether uploadsrv's server CPU is within the scenario's target, if it has one."""
    ours = s.figures.get(UPLOADSRV)
    if ours is None or s.cpu_target is None:
        return ""
    ok = float(_cpu(ours, s.unit)) <= s.cpu_target
    return f"(<= {s.cpu_target}, {'ok' if ok else 'below'})"


def _client_cpu(figure: Figure, unit: str) -> str:
    return _cpu(figure, unit, client=True)


def _ratio(ours: Figure | None, baseline: float | None, target: float | None) -> str:
    if ours is None or not baseline:
        return ""
    ratio = ours.rate / baseline
    if target is None:
        return f"{ratio:.2f}"
    return f"{ratio:.2f} (>= {target}, {'ok' if ratio >= target else 'below'})"


def _s3_missing(console: Console) -> bool:
    """The S3 row needs boto3 and moto's server (the `bench` extra): without them, a line."""
    needed = ("boto3", "moto", "flask")  # moto[server] runs on flask
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        console.print(f"S3 row skipped: {', '.join(missing)} not installed (pip install -e '.[bench]')")
    return bool(missing)


def s3_row(args: argparse.Namespace, work: Path) -> dict[str, float]:
    """S3: the same uploads to one moto endpoint, with boto3's own multipart transfer and
    through uploadsrv (httpx tus client, as `bench_s3`)."""
    import boto3

    from .bench_s3 import compare, uploadsrv_flags
    from .procs import boto3_credentials, start_moto, start_uploadsrv

    source = work / "s3.bin"
    source.write_bytes(os.urandom(args.s3_size))
    moto, endpoint = start_moto(work / "moto.log")
    server = None
    try:
        client = boto3.client("s3", endpoint_url=endpoint, **boto3_credentials())
        client.create_bucket(Bucket="bench")
        server, url = start_uploadsrv(work / "s3srv.log", *uploadsrv_flags(endpoint, work / "s3data"))
        direct, ours = compare(client, url, source, args.s3_uploads, args.rounds, moto.pid, server.pid)
    finally:
        for process in (server, moto):
            if process is not None:
                process.kill()
                process.wait()
    total = args.s3_size * args.s3_uploads
    gib = total / (1 << 30)
    return {
        "boto3_mb_s": total / direct.seconds / 1e6,
        "uploadsrv_mb_s": total / ours.seconds / 1e6,
        "ratio": direct.seconds / ours.seconds,
        "boto3_moto_cpu_s_per_gib": direct.moto_cpu / gib,
        "boto3_client_cpu_s_per_gib": direct.client_cpu / gib,
        "uploadsrv_moto_cpu_s_per_gib": ours.moto_cpu / gib,
        "uploadsrv_cpu_s_per_gib": ours.server_cpu / gib,
        "tus_client_cpu_s_per_gib": ours.client_cpu / gib,
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    size = parse_size
    parser.add_argument("--single", type=size, default=size("1G"), help="size of the one-PATCH upload")
    parser.add_argument("--sequential", type=int, default=64)
    parser.add_argument("--sequential-size", type=size, default=size("4M"))
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--stream-size", type=size, default=size("16M"))
    parser.add_argument("--small", type=int, default=2000, help="small uploads per run")
    parser.add_argument(
        "--connections", type=int, default=32, help="keep-alive connections for small uploads"
    )
    parser.add_argument(
        "--small-seconds", type=float, default=10, help="a small-upload run ends after this, done or not"
    )
    parser.add_argument("--rounds", type=int, default=3, help="runs per server; the median counts")
    parser.add_argument(
        "--servers",
        type=lambda text: [name.strip() for name in text.split(",")],
        default=list(servers.ALL),
        help=f"which to run, of: {', '.join(servers.ALL)}",
    )
    parser.add_argument(
        "--compare",
        metavar="PYTHON",
        help="also run the uploadsrv that this interpreter imports (another checkout's venv), for A/B",
    )
    parser.add_argument(
        "--only",
        type=names_of(SCENARIOS, "scenario"),
        help=f"run only these scenarios, of: {', '.join(SCENARIOS)} (all by default)",
    )
    parser.add_argument("--no-extra", action="store_true", help="skip checksum, IETF and chunk API rows")
    parser.add_argument("--no-s3", action="store_true")
    parser.add_argument(
        "--drop-caches",
        action="store_true",
        help="empty the page cache (root; the whole machine's) before every measurement, so each "
        "starts with free memory; the inputs are read back",
    )
    parser.add_argument("--s3-uploads", type=int, default=16)
    parser.add_argument("--s3-size", type=size, default=size("64M"))
    parser.add_argument("--json", type=Path)
    return parser


def main() -> None:
    args = _parser().parse_args()
    console = Console(width=250)
    with tempfile.TemporaryDirectory(prefix="bench-", dir=os.environ.get("BENCH_DIR")) as tmp:
        work = Path(tmp)
        listed = asyncio.run(run_all(args, work, console))
        s3 = None if args.no_s3 or _s3_missing(console) else s3_row(args, work)
    names = [n for n in [*args.servers, COMPARED] if any(n in s.figures for s in listed)]
    console.print(table(listed, names))
    if s3 is not None:
        mark = "ok" if s3["ratio"] >= 0.9 else "below"
        console.print(
            f"S3, {args.s3_uploads} concurrent {args.s3_size >> 20} MiB uploads to moto: "
            f"uploadsrv {s3['uploadsrv_mb_s']:.0f} MB/s, boto3 {s3['boto3_mb_s']:.0f} MB/s: "
            f"{s3['ratio']:.2f} (>= 0.9, {mark})"
        )
    if args.json:
        args.json.write_text(json.dumps(_report(args, listed, s3), indent=2))


def _report(
    args: argparse.Namespace, listed: list[Scenario], s3: dict[str, float] | None
) -> dict[str, object]:
    """The run as JSON (`--json`): its arguments and every figure."""
    return {
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "scenarios": [
            {
                "name": s.name,
                "unit": s.unit,
                "figures": {n: asdict(f) | {"rate": f.rate} for n, f in s.figures.items()},
            }
            for s in listed
        ],
        "s3": s3,
    }


if __name__ == "__main__":
    main()
