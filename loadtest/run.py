"""Driving many simulated clients against a server, verifying every upload."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from uploadsrv.client import ChunkUploadFailed

from .clients import PROTOCOLS, Client, Trouble
from .procs import cpu_seconds, peak_rss_mb
from .report import Report


@dataclass
class Workload:
    clients: int = 8
    uploads_per_client: int = 4
    duration: float | None = None  #: stop starting uploads after this many seconds
    min_size: int = 256 * 1024
    max_size: int = 4 * 1024 * 1024
    chunk_size: int = 1024 * 1024
    protocols: dict[str, float] = field(default_factory=lambda: {"tus": 1.0, "ietf": 1.0, "chunks": 1.0})
    ramp_up: float = 0.0  #: seconds over which clients start
    trouble: Trouble = field(default_factory=Trouble)
    seed: int = 1


class ServerProbe:
    """Peak RSS and CPU time of the server process, read from /proc."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self._cpu_start = cpu_seconds(pid) if pid else None

    def finish(self, report: Report) -> None:
        if not self.pid or self._cpu_start is None:
            return
        report.server_cpu_seconds = round(cpu_seconds(self.pid) - self._cpu_start, 2)
        report.server_peak_rss_mb = round(peak_rss_mb(self.pid), 1)


async def run(
    endpoint: str,
    workload: Workload,
    *,
    server_pid: int | None = None,
    on_progress: Callable[[Report], None] = lambda report: None,
) -> Report:
    report = Report()
    probe = ServerProbe(server_pid)
    limits = httpx.Limits(max_connections=workload.clients * 2, max_keepalive_connections=workload.clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=10), limits=limits) as http:
        report.started = time.monotonic()
        deadline = None if workload.duration is None else report.started + workload.duration
        await asyncio.gather(
            *(
                _client(http, endpoint, workload, i, report, deadline, on_progress)
                for i in range(workload.clients)
            )
        )
        report.finished = time.monotonic()
    probe.finish(report)
    return report


async def _client(
    http: httpx.AsyncClient,
    endpoint: str,
    workload: Workload,
    index: int,
    report: Report,
    deadline: float | None,
    on_progress: Callable[[Report], None],
) -> None:
    rng = random.Random(workload.seed * 1000 + index)
    if workload.ramp_up and workload.clients > 1:
        await asyncio.sleep(workload.ramp_up * index / (workload.clients - 1))
    names, weights = zip(*workload.protocols.items(), strict=True)
    for _ in range(workload.uploads_per_client):
        if deadline is not None and time.monotonic() > deadline:
            return
        protocol = PROTOCOLS[rng.choices(names, weights)[0]](http, endpoint, report, workload.trouble)
        data = rng.randbytes(rng.randint(workload.min_size, workload.max_size))
        report.uploads += 1
        try:
            url = await protocol.upload(data, workload.chunk_size, rng)
            report.bytes_sent += len(data)
            await _verify(protocol, url, data, report)
        except (httpx.HTTPError, RuntimeError, ChunkUploadFailed) as error:
            report.failed += 1
            report.errors[f"upload {type(error).__name__}"] += 1
        on_progress(report)


async def _verify(protocol: Client, url: str, data: bytes, report: Report) -> None:
    """Download what was stored and compare sha256 with what was sent."""
    response = await protocol.timed("download", "GET", url)
    if response.status_code != 200:
        report.failed += 1
    elif hashlib.sha256(response.content).digest() != hashlib.sha256(data).digest():
        report.corrupted += 1
    else:
        report.verified += 1
