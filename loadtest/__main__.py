"""python -m uploadsrv.loadtest: many concurrent clients against an uploadsrv, every upload verified.

    python -m uploadsrv.loadtest --spawn local                 # start a server on local disk and load it
    python -m uploadsrv.loadtest --spawn s3                    # ... on a moto S3 endpoint
    python -m uploadsrv.loadtest --url http://host:1080/files/ --clients 32 --uploads 10 --interrupt 0.2

Exits 1 if a single upload is corrupted or lost, whatever the throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from uploadsrv.config import parse_duration, parse_size

from .clients import PROTOCOLS, Trouble
from .procs import spawned_server
from .report import Report
from .run import Workload, run


def _mix(text: str) -> dict[str, float]:
    """'tus' or 'tus=3,ietf=1,chunks=1'."""
    mix = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name.strip() not in PROTOCOLS:
            raise argparse.ArgumentTypeError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}")
        mix[name.strip()] = float(weight or 1)
    return mix


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m uploadsrv.loadtest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="the server's upload endpoint, e.g. http://127.0.0.1:1080/files/")
    target.add_argument(
        "--spawn", choices=("local", "s3"), help="start a server (and moto for s3) for this run"
    )
    parser.add_argument("--server-pid", type=int, help="PID of the server, to report its peak RSS and CPU")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--uploads", type=int, default=4, help="uploads per client")
    parser.add_argument(
        "--duration", type=parse_duration, help="stop starting uploads after this long, e.g. 60s"
    )
    parser.add_argument("--min-size", type=parse_size, default=parse_size("256K"))
    parser.add_argument("--max-size", type=parse_size, default=parse_size("4M"))
    parser.add_argument("--chunk-size", type=parse_size, default=parse_size("1M"))
    parser.add_argument(
        "--protocols", type=_mix, default=_mix("tus,ietf,chunks"), help="mix, e.g. tus=3,ietf=1,chunks=1"
    )
    parser.add_argument("--ramp-up", type=float, default=0.0, help="seconds over which clients start")
    parser.add_argument("--interrupt", type=float, default=0.1, help="fraction of bodies cut off midway")
    parser.add_argument("--pause", type=float, default=0.05, help="fraction of bodies stalled midway")
    parser.add_argument("--pause-seconds", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the report to this file")
    return parser.parse_args(argv)


def print_report(report: dict[str, Any], console: Console) -> None:
    summary = Table(title="load test", box=None, show_header=False)
    for key in (
        "ok",
        "seconds",
        "uploads",
        "verified",
        "corrupted",
        "failed",
        "resumes",
        "mb_per_s",
        "uploads_per_s",
    ):
        summary.add_row(key, str(report[key]))
    summary.add_row("server peak RSS MB", str(report["server_peak_rss_mb"]))
    summary.add_row("server CPU s", str(report["server_cpu_seconds"]))
    console.print(summary)
    latency = Table(title="latency (ms)", box=None)
    for column in ("request", "count", "p50", "p95", "p99"):
        latency.add_column(column, justify="left" if column == "request" else "right")
    for kind, stats in report["latency_ms"].items():
        latency.add_row(kind, *(str(stats[k]) for k in ("count", "p50", "p95", "p99")))
    console.print(latency)
    if report["errors"]:
        console.print("errors: " + ", ".join(f"{k} x{v}" for k, v in sorted(report["errors"].items())))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workload = Workload(
        clients=args.clients,
        uploads_per_client=args.uploads,
        duration=args.duration,
        min_size=args.min_size,
        max_size=max(args.max_size, args.min_size),
        chunk_size=args.chunk_size,
        protocols=args.protocols,
        ramp_up=args.ramp_up,
        trouble=Trouble(args.interrupt, args.pause, args.pause_seconds),
        seed=args.seed,
    )
    console = Console(stderr=True)
    with ExitStack() as stack:
        url, pid = args.url, args.server_pid
        if args.spawn:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="loadtest-")))
            url, pid = stack.enter_context(spawned_server(args.spawn, work))
            url += "/files/"
        total = workload.clients * workload.uploads_per_client
        columns = (
            TextColumn("uploads"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
        )
        with Progress(*columns, TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task("uploads", total=total, status="")

            def update(report: Report) -> None:
                seconds = max(time.monotonic() - report.started, 1e-9)
                progress.update(
                    task,
                    completed=report.verified + report.corrupted + report.failed,
                    status=f"{report.bytes_sent / seconds / 1e6:6.1f} MB/s  resumes {report.resumes}  "
                    f"errors {report.failed + report.corrupted}",
                )

            report = asyncio.run(run(url, workload, server_pid=pid, on_progress=update))
    result = report.to_json()
    print_report(result, Console())
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if not report.ok:
        console.print(f"[red]FAILED[/red]: {report.corrupted} corrupted, {report.failed} lost or failed")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
