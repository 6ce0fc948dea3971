"""The contract between the upload core and a storage backend.

It lives in the core, beside the model and the errors, as tusd's `DataStore` lives in
its handler package: a backend imports this vocabulary (`model`, `errors`, `storage`)
and nothing else of the core, and the core imports no backend. A backend stores bytes
and upload records and knows nothing of HTTP or tus. The core contract is `Storage`;
optional powers are separate protocols a backend opts into, and the core checks them
once at start-up (`isinstance`), so what a server advertises is always what its backend
really implements.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from .model import UploadInfo

#: Seconds since the epoch. The app gives the core and its backend the same one, so expiry,
#: activity stamps and lease times agree (tests can give both a fake one).
Clock = Callable[[], float]


class Writer(Protocol):
    """Appends to one upload for the length of one request.

    Bytes given to `write` are not durable until `commit`. A backend may buffer them
    (S3 collects parts), but must keep its buffer bounded.
    """

    async def write(self, blocks: Sequence[bytes]) -> None:
        """Store `blocks` after what was written so far; raises StorageFull when out of space."""

    async def commit(self) -> int:
        """Make everything written durable and return the upload's new offset."""

    async def checkpoint(self) -> int:
        """Make durable what can be made durable cheaply, mid-request; return that offset.

        For progress reports: never more than was written, never less than last time.
        Not called on transactional writers.
        """

    async def discard(self) -> None:
        """Forget everything written since the writer opened (a failed checksum)."""


class Readable(Protocol):
    """A source of bytes read on a storage thread: `readinto` returns 0 at the end, and
    raises BlockingIOError when nothing arrived for a moment (the caller waits elsewhere).

    `complete` turns true once every byte of the body was read: a writer may then make
    it durable on the same thread at once, so that `commit` finds nothing left to do.
    """

    complete: bool

    def readinto(self, view: memoryview, /) -> int: ...


@runtime_checkable
class Spliceable(Readable, Protocol):
    """A `Readable` that can also move its bytes into a pipe inside the kernel (a socket):
    a writer that needs no hasher can then `splice` them on to its file, no copy through
    user space. `splice_to` behaves as `readinto` does (0 at the end, BlockingIOError)."""

    def splice_to(self, pipe: int, count: int, /) -> int: ...


class Hasher(Protocol):
    def update(self, blocks: Sequence[bytes | memoryview], /) -> None: ...


@runtime_checkable
class Receiving(Protocol):
    """A writer (`Writer` or `ChunkWriter`) that can read the bytes itself, on its thread.

    The core uses it for a body it can hand over as a `Readable` (a socket): one hop to
    the writer's thread per segment instead of one per block.
    """

    async def receive(
        self, held: list[bytes], source: Readable, count: int, hasher: Hasher | None, seconds: float
    ) -> int:
        """Write `held`, then read up to `count` bytes from `source` and write them, each
        also given to `hasher`; stop early when `source` ends or has nothing for now, or
        after `seconds`. Returns the bytes read from `source` (durable only after `commit`)."""


class ReceiveBuffers:
    """Buffers a `Receiving` writer reads its source into, reused while bodies stream in:
    one allocated per segment would cost a page fault every 4 KiB. Shared by the process,
    so that the server can let go of them all once a burst of uploads is over
    (`uploadsrv.memory`), instead of each disk thread keeping one for good.

    Taken and given back on storage threads, emptied on the event loop: `list.pop` and
    `append` are atomic, and a buffer in use is not in the list.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._idle: list[memoryview] = []

    @contextmanager
    def buffer(self) -> Iterator[memoryview]:
        try:
            view = self._idle.pop()
        except IndexError:
            view = memoryview(bytearray(self.size))
        try:
            yield view
        finally:
            self._idle.append(view)

    def release(self) -> None:
        """Let go of the idle buffers (glibc unmaps a block this size when it is freed)."""
        self._idle.clear()

    @property
    def idle(self) -> int:
        return len(self._idle)


RECEIVE_BUFFERS = ReceiveBuffers(1 << 20)


def receive_into(
    store: Callable[[memoryview], None], source: Readable, count: int, hasher: Hasher | None, deadline: float
) -> int:
    """A `Receiving` writer's loop, on its thread: up to `count` bytes of `source` through
    a receive buffer, each block given to `hasher`, then to `store`; it stops early when
    `source` ends or has nothing for now, or once `deadline` (monotonic) has passed.
    Returns the bytes read."""
    with RECEIVE_BUFFERS.buffer() as buffer:

        def step(wanted: int) -> int:
            got = source.readinto(buffer[: min(len(buffer), wanted)])
            if got:
                block = buffer[:got]
                if hasher is not None:
                    hasher.update([block])
                store(block)
            return got

        return receive_steps(step, count, deadline)


def receive_steps(step: Callable[[int], int], count: int, deadline: float) -> int:
    """`step(wanted)` (read at most `wanted` body bytes and store them; 0 at the body's
    end, BlockingIOError when nothing has come for now) until `count` bytes, the end, a
    pause, or `deadline` (monotonic), whichever is first: the loop every way of receiving
    a body on a disk thread shares. Returns the bytes received."""
    received = 0
    while received < count:
        try:
            got = step(count - received)
        except BlockingIOError:
            break
        if not got:
            break
        received += got
        if time.monotonic() >= deadline:
            break
    return received


class UploadLock(Protocol):
    """A held lock on one upload, exclusive across processes."""

    def preempt_requested(self) -> bool:
        """True when a request in another process asked for this upload."""


class Lease(UploadLock, Protocol):
    """A coordinator's lease (Redis), as a backend that fences its writes with it sees it."""

    #: Grows with every grant of the upload's lease: state written under an older grant
    #: can be told from state written under a newer one.
    fence: int

    def valid(self) -> bool:
        """Whether the lease is surely still held (renewed less than its TTL ago)."""

    async def refence(self, floor: int) -> int:
        """A token above `floor` if the lease is still held (the coordinator lost its
        counter), else 0: a newer grant exists, and this holder must not write."""


@runtime_checkable
class Fenced(Protocol):
    """A backend whose state writes check a coordinator's lease, so that the lease can
    stand in for the backend's own cross-process lock (S3: no lease objects, no polling).
    Backends whose lock is a kernel's (flock) keep it: no fence is needed there."""

    def fenced_lock(
        self, upload_id: str, lease: Lease, *, chunk: int | None = None
    ) -> AbstractAsyncContextManager[UploadLock]:
        """Write the upload (or chunk) under `lease`: each state write checks its fence."""


@runtime_checkable
class Storage(Protocol):
    async def create(self, info: UploadInfo) -> None:
        """Persist a new upload record with no bytes."""

    async def get(self, upload_id: str) -> UploadInfo:
        """The upload's record with `offset` and `updated_at` read from the stored bytes.

        Raises UploadNotFound. `upload_id` is already validated by the core.
        """

    async def update(self, info: UploadInfo) -> None:
        """Persist a changed record (a deferred length declared)."""

    def writer(self, info: UploadInfo, *, transactional: bool) -> AbstractAsyncContextManager[Writer]:
        """Open a writer at `info.offset`.

        With `transactional`, nothing written may become visible before `commit`, so the
        core can `discard` a body whose checksum fails.
        """

    async def finish(self, info: UploadInfo) -> None:
        """Called once when the upload reaches its length."""

    async def delete(self, upload_id: str) -> None:
        """Remove the upload and everything it stored. Missing uploads are not an error."""

    def read(self, info: UploadInfo, start: int, end: int) -> AsyncIterator[bytes]:
        """Stream bytes [start, end) of a stored upload."""

    def lock(
        self, upload_id: str, *, timeout: float, preempt: bool = True, chunk: int | None = None
    ) -> AbstractAsyncContextManager[UploadLock]:
        """Lock the upload, or with `chunk` one chunk of a chunk session, across processes.

        If another process holds it: with `preempt`, ask that holder to let go (its
        `preempt_requested` turns true) and wait up to `timeout` seconds; without, fail at
        once. Raises UploadBusy when not acquired, UploadNotFound for unknown uploads.
        """

    def upload_ids(self) -> AsyncIterator[str]:
        """Every upload id the backend holds, for expiry and the operator CLI."""

    async def check(self) -> None:
        """Raise at start-up if the storage cannot be used (missing bucket, bad credentials)."""

    async def close(self) -> None:
        """Release resources (threads, clients)."""


@dataclass
class Orphan:
    """Something in storage that no upload owns (a crash mid-create, an aborted request)."""

    kind: str  #: "multipart-upload", "object", "directory" or "file"
    name: str  #: key, path or multipart upload id
    size: int  #: bytes it occupies, where known
    age: float  #: seconds since it was last written
    detail: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class Housekeeping(Protocol):
    """What the operator CLI needs beyond the core contract."""

    async def describe(self, upload_id: str) -> dict[str, object]:
        """Backend details of one upload (paths; S3 multipart id, parts, tail)."""

    def orphans(self, older_than: float) -> AsyncIterator[Orphan]:
        """Leftovers no upload owns, untouched for `older_than` seconds."""

    async def remove_orphan(self, orphan: Orphan) -> None:
        """Delete (or abort) one leftover."""


@dataclass(frozen=True)
class StoredChunk:
    """One chunk of a chunk session that the backend has stored durably."""

    number: int  #: 1-based, like S3 part numbers
    size: int
    sha256: str  #: hex
    #: When it was stored (seconds since the epoch): activity that keeps a session alive.
    stored_at: float = field(default=0.0, compare=False)


class ChunkWriter(Protocol):
    """Stores one chunk; nothing of it counts until `commit` returns."""

    async def write(self, blocks: Sequence[bytes]) -> None:
        """Store `blocks` after what was written so far; raises StorageFull when out of space."""

    async def commit(self, chunk: StoredChunk) -> None:
        """Make the bytes durable, then record `chunk` as stored."""


@runtime_checkable
class Chunked(Protocol):
    """A backend that takes an upload's bytes as numbered chunks, in any order, at once.

    The core holds the chunk's lock around `chunk_writer`, and the upload's lock around
    `assemble`.
    """

    #: The smallest chunk but the last the backend can assemble without copying.
    min_chunk_size: int
    max_chunk_size: int

    async def stored_chunks(self, info: UploadInfo, number: int | None = None) -> list[StoredChunk]:
        """Every stored chunk (or only chunk `number`, if stored), by number."""

    async def chunks_busy(self, info: UploadInfo) -> bool:
        """Whether a chunk of the session is being written right now, by any process."""

    def chunk_writer(self, info: UploadInfo, number: int) -> AbstractAsyncContextManager[ChunkWriter]:
        """A writer for chunk `number`; leaving it without `commit` stores nothing."""

    async def assemble(
        self, info: UploadInfo, chunks: Sequence[StoredChunk], sha256: str | None = None
    ) -> None:
        """Make the upload's bytes the chunks in order, without moving them through here.

        With `sha256`, the result is checked first and ChecksumMismatch raised if it
        differs. Afterwards `get` reports the upload complete (never before the check,
        also across a crash); `finish` follows as for any upload. Safe to repeat.
        """


@runtime_checkable
class Presigning(Protocol):
    """A backend whose finished uploads can be fetched from elsewhere by URL."""

    async def download_url(self, info: UploadInfo) -> str | None:
        """A URL a client can GET the finished upload from, or None to stream it here."""


@runtime_checkable
class Concatenating(Protocol):
    """A backend that can join finished uploads into a new one without a client round trip."""

    async def concatenate(self, info: UploadInfo, parts: Sequence[UploadInfo]) -> None:
        """Fill the new upload `info` with the bytes of `parts`, in order."""


@runtime_checkable
class Locating(Protocol):
    """A backend that can say where an upload's bytes are, for hooks (tusd's `Storage`)."""

    def location(self, info: UploadInfo) -> dict[str, str]:
        """`{"Type": "filestore", "Path": ..., "InfoPath": ...}` on disk,
        `{"Type": "s3store", "Bucket": ..., "Key": ...}` on S3."""


@runtime_checkable
class Outbox(Protocol):
    """A durable queue of hook events, kept with the uploads whose changes they report.

    An event is a small JSON record under an id. Several server processes may share the
    outbox; a claim gives one of them an event for a while, so no two send it at once.
    """

    async def put_event(self, event_id: str, record: dict[str, Any], *, lease: float | None = None) -> None:
        """Store the event durably before returning (the client is answered after); the
        same id again replaces it. With `lease` it is stored claimed by this process
        (as `claim_event` does, with no moment in between when another could claim it)."""

    def event_ids(self) -> AsyncIterator[str]:
        """Every stored event's id."""

    async def read_event(self, event_id: str) -> dict[str, Any] | None:
        """The event's record without claiming it; None if there is none."""

    async def claim_event(self, event_id: str, lease: float) -> dict[str, Any] | None:
        """Take the event for up to `lease` seconds; None if it is gone or another process has it."""

    async def renew_event(self, event_id: str, lease: float) -> bool:
        """Extend this process's claim by `lease` seconds from now; False if it holds it no
        longer (released, or lost)."""

    async def release_event(self, event_id: str, record: dict[str, Any] | None) -> None:
        """Give a claimed event back: None removes it (delivered, dropped), a record replaces it."""
