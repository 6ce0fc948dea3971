"""The upload path's disk writes, batched pwritev against aiofiles (pip install aiofiles).

A body arrives as 64 KiB blocks, handed to the disk in 512 KiB batches (core/pump.py):

  pwritev        one thread hop per batch: os.pwritev of its blocks (what storage/local.py does)
  aiofiles       aiofiles' write per block, as its API invites: one thread hop each
  aiofiles+join  one aiofiles write per batch, the blocks joined first (a copy of every byte)

Each ends with an fsync on the same executor, as a PATCH does before it answers. Prints
the best of 3 rounds: CPU seconds per GiB (the process, all threads), wall seconds per
GiB and thread hops per GiB.

    python -m uploadsrv.loadtest.bench_aiofiles [MiB, default 256]
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import aiofiles

BLOCK, BATCH = 64 << 10, 512 << 10
BLOCKS = [os.urandom(BLOCK) for _ in range(BATCH // BLOCK)]
POOL = ThreadPoolExecutor(16)


def _pwrite_all(fd: int, views: list[memoryview], position: int) -> int:
    while views:
        written = os.pwritev(fd, views, position)
        position += written
        rest = []
        for view in views:
            if written >= len(view):
                written -= len(view)
                continue
            rest.append(view[written:])
            written = 0
        views = rest
    return position


async def with_pwritev(path: str, total: int) -> int:
    loop = asyncio.get_running_loop()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    position = 0
    for _ in range(total // BATCH):
        views = [memoryview(b) for b in BLOCKS]
        position = await loop.run_in_executor(POOL, _pwrite_all, fd, views, position)
    await loop.run_in_executor(POOL, os.fsync, fd)
    os.close(fd)
    return total // BATCH + 1


async def with_aiofiles(path: str, total: int) -> int:
    async with aiofiles.open(path, "wb", executor=POOL) as f:
        for _ in range(total // BATCH):
            for block in BLOCKS:
                await f.write(block)
        await f.flush()
        await asyncio.get_running_loop().run_in_executor(POOL, os.fsync, f.fileno())
    return total // BLOCK + 3


async def with_aiofiles_joined(path: str, total: int) -> int:
    async with aiofiles.open(path, "wb", executor=POOL) as f:
        for _ in range(total // BATCH):
            await f.write(b"".join(BLOCKS))
        await f.flush()
        await asyncio.get_running_loop().run_in_executor(POOL, os.fsync, f.fileno())
    return total // BATCH + 3


async def main(total: int) -> None:
    variants: dict[str, Callable[[str, int], Awaitable[int]]] = {
        "pwritev": with_pwritev,
        "aiofiles": with_aiofiles,
        "aiofiles+join": with_aiofiles_joined,
    }
    gib = total / (1 << 30)
    best: dict[str, tuple[float, float, float]] = {}
    with tempfile.TemporaryDirectory(dir=os.path.expanduser("~")) as where:
        for _ in range(3):
            for name, write in variants.items():
                path = f"{where}/{name}"
                cpu_started, wall_started = time.process_time(), time.perf_counter()
                hops = await write(path, total)
                cpu = time.process_time() - cpu_started
                wall = time.perf_counter() - wall_started
                os.unlink(path)
                if name not in best or cpu / gib < best[name][0]:
                    best[name] = (cpu / gib, wall / gib, hops / gib)
    for name, (cpu_per_gib, wall_per_gib, hops_per_gib) in best.items():
        print(f"{name:14} {cpu_per_gib:6.2f} CPU-s/GiB  {wall_per_gib:6.2f} s/GiB wall", end="")
        print(f"  {hops_per_gib:7.0f} thread hops/GiB")


if __name__ == "__main__":
    asyncio.run(main((int(sys.argv[1]) if len(sys.argv) > 1 else 256) << 20))
