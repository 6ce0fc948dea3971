"""Memory that stalled uploads hold: N PATCHes that send M bytes each, then stall.

    python -m uploadsrv.loadtest.stalled [--uploads 200] [--sent 4M]

Starts a server on local disk and reads its RSS from /proc: before, at its peak, once
every byte sent is on disk while the requests stall (a stalled body is written out, not
held), and after the clients went away and the server committed their bytes; prints them
as JSON.
The target (issue 14): peak under 150 MB, and within 30 MB of the start afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import httpx

from uploadsrv.config import parse_size

from .clients import TUS, tus_create_headers
from .procs import spawned_server


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def on_disk(data_dir: Path) -> int:
    """Bytes in the uploads' files, in either local layout (see `storage/local.py`)."""
    flat = (path for path in data_dir.glob("files/*") if "." not in path.name)
    return sum(path.stat().st_size for path in (*flat, *data_dir.glob("uploads/*/*/data")))


async def stall(url: str, pid: int, data_dir: Path, uploads: int, sent: int) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=60) as client:
        before = rss_mb(pid)
        locations = [await _create(client, url, 2 * sent) for _ in range(uploads)]
        port = int(url.rsplit(":", 1)[1])
        connections = await _send_half(port, locations, sent)
        peak = await _peak_until_on_disk(pid, data_dir, uploads * sent, before)
        await asyncio.sleep(2)
        stalled = rss_mb(pid)
        peak = max(peak, stalled)
        for _reader, writer in connections:
            writer.close()
        # Gone: the server has kept every byte that arrived and let go of the requests.
        kept = await _offsets_reach(client, locations, sent)
        await asyncio.sleep(2)
        return {
            "uploads": uploads,
            "sent_each_mb": sent / (1 << 20),
            "kept_every_byte": kept,
            "rss_before_mb": round(before, 1),
            "rss_peak_mb": round(peak, 1),
            "rss_stalled_mb": round(stalled, 1),
            "rss_after_mb": round(rss_mb(pid), 1),
        }


async def _create(client: httpx.AsyncClient, url: str, length: int) -> str:
    response = await client.post(url + "/files/", headers=tus_create_headers(length))
    return response.headers["location"]


async def _send_half(
    port: int, locations: list[str], sent: int
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """One PATCH per upload announcing twice `sent` bytes and sending `sent`: then it stalls."""
    connections = [await asyncio.open_connection("127.0.0.1", port) for _ in locations]
    body = b"\0" * sent
    for location, (_reader, writer) in zip(locations, connections, strict=True):
        path = location.split(str(port), 1)[1]
        head = (
            f"PATCH {path} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\n"
            f"Content-Type: application/offset+octet-stream\r\nContent-Length: {2 * sent}\r\n\r\n"
        )
        writer.write(head.encode() + body)
    await asyncio.gather(*(writer.drain() for _reader, writer in connections))
    return connections


async def _peak_until_on_disk(pid: int, data_dir: Path, total: int, peak: float) -> float:
    """The highest RSS seen until `total` bytes are on disk (the server reads what the
    sockets hold meanwhile), or two minutes passed."""
    deadline = time.monotonic() + 120
    while on_disk(data_dir) < total and time.monotonic() < deadline:
        peak = max(peak, rss_mb(pid))
        await asyncio.sleep(0.05)
    return peak


async def _offsets_reach(client: httpx.AsyncClient, locations: list[str], sent: int) -> bool:
    """Whether every upload's offset reaches `sent` within a minute."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        offsets = [int((await client.head(loc, headers=TUS)).headers["upload-offset"]) for loc in locations]
        if all(offset == sent for offset in offsets):
            return True
        await asyncio.sleep(0.5)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uploadsrv.loadtest.stalled", description=__doc__)
    parser.add_argument("--uploads", type=int, default=200)
    parser.add_argument("--sent", type=parse_size, default=4 << 20, help="bytes each request sends, e.g. 4M")
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory() as work,
        spawned_server("local", Path(work), "--idle-timeout", "10m") as (url, pid),
    ):
        figures = asyncio.run(stall(url, pid, Path(work) / "data", args.uploads, args.sent))
    print(json.dumps(figures))
    return 0 if figures["kept_every_byte"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
