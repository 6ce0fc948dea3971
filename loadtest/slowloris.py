"""Slow-header clients against the header timeout: how many connections stay open.

    python -m uploadsrv.loadtest.slowloris [--connections 500] [--seconds 45] [-- serve flags]

Starts a server on local disk, opens the connections, and has each send its request head
a byte a second, never finishing it. Prints, every 5 s, how many the server still keeps
open and its open descriptors (from /proc), then the figures as JSON. With the default
`--header-timeout 30s` every one of them is closed about 30 s after it began.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

from .procs import spawned_server

HEAD = b"POST /files/ HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n" + b"X-Slow: " + b"a" * 10_000


async def dribble(port: int, started: float, closed_at: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for byte in HEAD:
            writer.write(bytes([byte]))
            try:
                if await asyncio.wait_for(reader.read(1), 1.0) == b"":
                    break  # the server closed it
            except TimeoutError:
                continue
            except ConnectionError:
                break
    finally:
        closed_at.append(time.monotonic() - started)
        writer.close()


async def run(port: int, pid: int, connections: int, seconds: float) -> dict[str, object]:
    started = time.monotonic()
    closed_at: list[float] = []
    tasks = [asyncio.create_task(dribble(port, started, closed_at)) for _ in range(connections)]
    timeline = []
    while time.monotonic() - started < seconds:
        await asyncio.sleep(5)
        sample = {
            "at_s": round(time.monotonic() - started),
            "open": connections - len(closed_at),
            "server_fds": len(os.listdir(f"/proc/{pid}/fd")),
        }
        timeline.append(sample)
        print(json.dumps(sample), flush=True)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "connections": connections,
        "closed_by_server": sum(1 for at in closed_at if at < seconds),
        "last_closed_s": round(max((at for at in closed_at if at < seconds), default=0), 1),
        "timeline": timeline,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uploadsrv.loadtest.slowloris", description=__doc__)
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=45)
    parser.add_argument("flags", nargs="*", help="flags for uploadsrv serve, after --")
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory() as work,
        spawned_server("local", Path(work), *args.flags) as (url, pid),
    ):
        figures = asyncio.run(run(int(url.rsplit(":", 1)[1]), pid, args.connections, args.seconds))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
