"""Operator commands: list, inspect, prune and stats, on any backend, through the core.

They take the same per-upload locks as the server, so they are safe to run while
servers are serving.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, JustifyMethod
from rich.progress import Progress, SpinnerColumn, TextColumn
from rich.table import Table

from uploadsrv.core.outbox import pending_events
from uploadsrv.core.storage import Outbox

from .core import UploadInfo, UploadService
from .core.errors import UploadError

STATES = ("incomplete", "complete", "expired")


def describe(service: UploadService, info: UploadInfo, stored: int | None = None) -> dict[str, Any]:
    """One upload as the CLI shows it (and as --json prints it); `stored` is what it holds
    (`UploadService.stored_bytes`: a chunk session's offset stays 0 until it is assembled),
    its offset when not given."""
    stored = info.offset if stored is None else stored
    return {
        "id": info.id,
        "protocol": info.protocol,
        "state": service.state_of(info),
        "length": info.length,
        "offset": info.offset,
        "stored": stored,
        "progress": None if not info.length else round(stored / info.length, 4),
        "created": _iso(info.created_at),
        "last_activity": _iso(info.updated_at),
        "expires": _iso(service.expires_at(info)),
        "owner": info.owner,
        "filename": info.filename,
        "metadata": info.metadata,
        "partial": info.partial,
        "parts": info.parts,
        "chunk_size": info.chunk_size,
    }


def human_size(size: int) -> str:
    """1023 B, 6.0 MiB, 1.5 GiB: binary units, as the size flags take them."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _idle(seconds: float) -> str:
    """How long ago, in the largest whole unit: 40s, 12m, 5h, 3d."""
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{int(seconds // length)}{unit}"
    return f"{max(int(seconds), 0)}s"


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


async def list_uploads(
    service: UploadService,
    *,
    state: str | None,
    older_than: float | None,
    owner: str | None,
    sort: str,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    now = time.time()
    rows = []
    async for info in service.uploads():
        if older_than is not None and info.updated_at > now - older_than:
            continue
        if owner is not None and info.owner != owner:
            continue
        if state and service.state_of(info) != state:
            continue
        row = describe(service, info, await service.stored_bytes(info))
        row["idle_seconds"] = max(now - info.updated_at, 0.0)
        rows.append(row)
    rows.sort(key=lambda r: (r[sort] is None, r[sort]), reverse=sort in ("offset", "stored", "length"))
    return rows[:limit] if limit is not None else rows


#: The list's columns, the first ones always (75 characters: full ids fit 80 columns),
#: the others while the terminal is wide enough: (title, width, justify, cell).
_COLUMNS: list[tuple[str, int, JustifyMethod, Callable[[dict[str, Any]], str]]] = [
    ("id", 32, "left", lambda r: r["id"]),
    ("state", 10, "left", lambda r: r["state"]),
    ("done", 4, "right", lambda r: "" if r["progress"] is None else f"{int(r['progress'] * 100)}%"),
    ("stored", 10, "right", lambda r: human_size(r["stored"])),
    ("length", 10, "right", lambda r: "deferred" if r["length"] is None else human_size(r["length"])),
    ("idle", 4, "right", lambda r: _idle(r["idle_seconds"])),
    ("protocol", 8, "left", lambda r: r["protocol"]),
    ("owner", 16, "left", lambda r: r["owner"] or ""),
    ("filename", 24, "left", lambda r: r["filename"] or ""),
]
_ALWAYS = 6


def print_uploads(rows: list[dict[str, Any]], console: Console) -> None:
    """A table with full ids at any width from 80 columns; sizes in binary units (bytes
    are in --json)."""
    columns, used = [], -1
    for i, column in enumerate(_COLUMNS):
        if i >= _ALWAYS and used + 1 + column[1] > console.width:
            break
        columns.append(column)
        used += 1 + column[1]
    table = Table(box=None, header_style="bold", pad_edge=False, padding=(0, 1, 0, 0))
    for title, width, justify, _ in columns:
        table.add_column(title, justify=justify, no_wrap=True, min_width=width, max_width=width)
    for r in rows:
        table.add_row(*(cell(r) for _, _, _, cell in columns))
    console.print(table)
    console.print(f"{len(rows)} upload(s)")


async def inspect(service: UploadService, upload_id: str) -> dict[str, Any]:
    info = await service.peek_any(upload_id)
    details = describe(service, info, await service.stored_bytes(info))
    if info.chunk_size is not None and service.capabilities.chunks is not None:
        stored = await service.stored_chunks(info)
        details["chunks"] = {
            "count": info.chunk_count,
            "stored": len(stored),
            "bytes_stored": sum(chunk.size for chunk in stored),
        }
    storage = await service.storage_details(upload_id)
    if storage is not None:
        details["storage"] = storage
    return details


@dataclass
class PruneReport:
    removed: list[dict[str, Any]] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    orphans: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    dry_run: bool = False

    @property
    def bytes_reclaimed(self) -> int:
        return sum(r["stored"] for r in self.removed) + sum(o["size"] for o in self.orphans)

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "removed": self.removed,
            "busy": self.busy,
            "orphans": self.orphans,
            "errors": self.errors,
            "sessions_removed": len(self.removed),
            "bytes_reclaimed": self.bytes_reclaimed,
        }


async def prune(
    service: UploadService,
    *,
    idle_for: float,
    include_complete: bool,
    orphan_age: float,
    dry_run: bool,
    progress: Callable[[str], None] = lambda _: None,
) -> PruneReport:
    report = PruneReport(dry_run=dry_run)
    try:
        async for upload, _removed, stored in service.prune(
            idle_for, include_complete=include_complete, dry_run=dry_run
        ):
            if isinstance(upload, str):
                report.busy.append(upload)
            else:
                report.removed.append(describe(service, upload, stored))
            progress(upload if isinstance(upload, str) else upload.id)
    except UploadError as error:
        report.errors.append(f"stopped: {error.detail}")
        return report
    async for orphan in service.orphans(orphan_age):
        entry = {
            "kind": orphan.kind,
            "name": orphan.name,
            "size": orphan.size,
            "age_seconds": int(orphan.age),
        }
        try:
            if not dry_run:
                await service.remove_orphan(orphan)
        except UploadError as error:
            report.errors.append(f"{orphan.kind} {orphan.name}: {error.detail}")
            continue
        report.orphans.append(entry)
        progress(orphan.name)
    return report


def print_prune(report: PruneReport, console: Console) -> None:
    verb = "would remove" if report.dry_run else "removed"
    passive = "would be removed" if report.dry_run else "removed"
    for row in report.removed:
        console.print(
            f"{verb} {row['id']}  {row['state']}  {_bytes(row['stored'])}  idle since {row['last_activity']}"
        )
    for orphan in report.orphans:
        console.print(f"{verb} orphaned {orphan['kind']} {orphan['name']}  {_bytes(orphan['size'])}")
    for upload_id in report.busy:
        console.print(f"skipped {upload_id}: being written right now")
    for error in report.errors:
        console.print(f"[red]error[/red] {error}")
    console.print(
        f"{len(report.removed)} session(s) and {len(report.orphans)} orphan(s) {passive}, "
        f"{_bytes(report.bytes_reclaimed)} {'to reclaim' if report.dry_run else 'reclaimed'}"
    )


def _bytes(size: int) -> str:
    return f"{size:,} bytes ({human_size(size)})"


async def stats(service: UploadService) -> dict[str, dict[str, int]]:
    totals = {state: {"count": 0, "bytes": 0} for state in STATES}
    async for info in service.uploads():
        entry = totals[service.state_of(info)]
        entry["count"] += 1
        entry["bytes"] += await service.stored_bytes(info)
    return totals


def print_stats(totals: dict[str, dict[str, int]], console: Console) -> None:
    for state, entry in totals.items():
        console.print(f"{state:<11} {entry['count']:>8} uploads  {_bytes(entry['bytes'])}")


def console() -> Console:
    """Standard output without rich's number colouring; 200 columns when it is not a
    terminal (COLUMNS, if set, wins)."""
    wide = sys.stdout.isatty() or "COLUMNS" in os.environ
    return Console(width=None if wide else 200, highlight=False)


def progress_bar(console: Console) -> Progress:
    """A spinner on stderr while a long prune runs; silent when stderr is not a terminal."""
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        console=console,
        transient=True,
        disable=not sys.stderr.isatty(),
    )


def emit_json(value: object) -> None:
    json.dump(value, sys.stdout, indent=2)
    sys.stdout.write("\n")


async def hook_events(outbox: Outbox) -> list[dict[str, Any]]:
    """The hook outbox: every durable event not delivered yet, oldest first."""
    rows = [
        {
            "id": event.id,
            "hook": event.hook,
            "upload_id": event.upload_id,
            "state": event.state,
            "created": _iso(event.created_at),
            "attempts": event.attempts,
            "next_attempt": _iso(event.next_at) if event.state == "pending" else None,
            "last_error": event.last_error,
        }
        async for event in pending_events(outbox)
    ]
    return sorted(rows, key=lambda row: row["created"] or "")


def print_hook_events(rows: list[dict[str, Any]], console: Console) -> None:
    table = Table(box=None, header_style="bold")
    for column in ("id", "hook", "upload", "state", "created", "attempts", "next attempt", "last error"):
        table.add_column(
            column, justify="right" if column == "attempts" else "left", no_wrap=column != "last error"
        )
    for r in rows:
        table.add_row(
            r["id"],
            r["hook"],
            r["upload_id"],
            r["state"],
            r["created"],
            str(r["attempts"]),
            r["next_attempt"] or "",
            r["last_error"] or "",
        )
    console.print(table)
    console.print(f"{len(rows)} event(s)")
