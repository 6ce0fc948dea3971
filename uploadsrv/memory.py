"""Handing memory back to the system after large request bodies (glibc's malloc).

Request bodies arrive as blocks of up to 256 KiB. glibc maps blocks of 128 KiB and more
on their own, but raises that threshold whenever such a block is freed, after which the
blocks come from the heap: 200 stalled 4 MiB uploads left the heap at its peak (318 MB)
after they had gone. A fixed threshold keeps body blocks out of the heap, and a trim a
second after connections close (or a request's body ends) returns the free pages the heap
still holds, and the receive buffers the disk threads kept for the next body.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util

from .core.storage import RECEIVE_BUFFERS

M_MMAP_THRESHOLD = -3  #: mallopt parameter (malloc.h)
MMAP_THRESHOLD = 128 << 10
TRIM_DELAY = 1.0  #: seconds after a connection closes: its request has let go of its buffers by then


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018  (glibc only: musl and macOS have none)
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()
_trim_pending = False
_trim_again = False


def tune() -> None:
    """Fix the mmap threshold (it also stops glibc from raising the trim threshold)."""
    if _LIBC is not None:
        _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def trim_soon(loop: asyncio.AbstractEventLoop) -> None:
    """Return free heap pages and idle receive buffers a second from now. At most one
    trim is pending; asked for meanwhile, another follows it, so that what a request let
    go of just after a trim goes back too (at most one trim a second, however busy)."""
    global _trim_pending, _trim_again
    if _trim_pending:
        _trim_again = True
        return
    _trim_pending = True
    loop.call_later(TRIM_DELAY, _trim, loop)


def _trim(loop: asyncio.AbstractEventLoop) -> None:
    global _trim_pending, _trim_again
    RECEIVE_BUFFERS.release()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    _trim_pending = False
    if _trim_again:
        _trim_again = False
        trim_soon(loop)
