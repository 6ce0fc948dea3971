"""Operator commands: list, inspect, prune and stats, on any backend, through the core.

They take the same per-upload locks as the server, so they are safe to run while
servers are serving.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn
from rich.table import Table

from uploadsrv.core.storage import Chunked, Housekeeping

from .core import UploadInfo, UploadService
from .core.errors import UploadError

STATES = ("incomplete", "complete", "expired")


def describe(service: UploadService, info: UploadInfo) -> dict[str, Any]:
    """One upload as the CLI shows it (and as --json prints it)."""
    return {
        "id": info.id,
        "protocol": info.protocol,
        "state": service.state_of(info),
        "length": info.length,
        "offset": info.offset,
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
) -> list[dict[str, Any]]:
    now = time.time()
    rows = []
    async for info in service.uploads():
        row = describe(service, info)
        if state and row["state"] != state:
            continue
        if older_than is not None and info.updated_at > now - older_than:
            continue
        if owner is not None and info.owner != owner:
            continue
        rows.append(row)
    rows.sort(key=lambda r: (r[sort] is None, r[sort]), reverse=sort in ("offset", "length"))
    return rows


def print_uploads(rows: list[dict[str, Any]], console: Console) -> None:
    table = Table(box=None, header_style="bold")
    for column in ("id", "protocol", "state", "offset", "length", "last activity", "owner", "filename"):
        table.add_column(column, justify="right" if column in ("offset", "length") else "left", no_wrap=True)
    for r in rows:
        table.add_row(
            r["id"],
            r["protocol"],
            r["state"],
            f"{r['offset']:,}",
            "deferred" if r["length"] is None else f"{r['length']:,}",
            r["last_activity"],
            r["owner"] or "",
            r["filename"] or "",
        )
    console.print(table)
    console.print(f"{len(rows)} upload(s)")


async def inspect(service: UploadService, upload_id: str) -> dict[str, Any]:
    info = await service.peek_any(upload_id)
    details = describe(service, info)
    if info.chunk_size is not None and isinstance(service.storage, Chunked):
        stored = await service.storage.stored_chunks(info)
        details["chunks"] = {
            "count": info.chunk_count,
            "stored": len(stored),
            "bytes_stored": sum(chunk.size for chunk in stored),
        }
    if isinstance(service.storage, Housekeeping):
        details["storage"] = await service.storage.describe(upload_id)
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
        return sum(r["offset"] for r in self.removed) + sum(o["size"] for o in self.orphans)

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
        async for upload, _removed in service.prune(
            idle_for, include_complete=include_complete, dry_run=dry_run
        ):
            if isinstance(upload, str):
                report.busy.append(upload)
            else:
                report.removed.append(describe(service, upload))
            progress(upload if isinstance(upload, str) else upload.id)
    except UploadError as error:
        report.errors.append(f"stopped: {error.detail}")
        return report
    if isinstance(service.storage, Housekeeping):
        async for orphan in service.storage.orphans(orphan_age):
            entry = {
                "kind": orphan.kind,
                "name": orphan.name,
                "size": orphan.size,
                "age_seconds": int(orphan.age),
            }
            try:
                if not dry_run:
                    await service.storage.remove_orphan(orphan)
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
            f"{verb} {row['id']}  {row['state']}  {row['offset']:,} bytes  idle since {row['last_activity']}"
        )
    for orphan in report.orphans:
        console.print(f"{verb} orphaned {orphan['kind']} {orphan['name']}  {orphan['size']:,} bytes")
    for upload_id in report.busy:
        console.print(f"skipped {upload_id}: being written right now")
    for error in report.errors:
        console.print(f"[red]error[/red] {error}")
    console.print(
        f"{len(report.removed)} session(s) and {len(report.orphans)} orphan(s) {passive}, "
        f"{report.bytes_reclaimed:,} bytes {'to reclaim' if report.dry_run else 'reclaimed'}"
    )


async def stats(service: UploadService) -> dict[str, dict[str, int]]:
    totals = {state: {"count": 0, "bytes": 0} for state in STATES}
    async for info in service.uploads():
        entry = totals[service.state_of(info)]
        entry["count"] += 1
        entry["bytes"] += info.offset
    return totals


def console() -> Console:
    """Standard output, wide enough for full ids when it is not a terminal."""
    return Console(width=None if sys.stdout.isatty() else 200)


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
