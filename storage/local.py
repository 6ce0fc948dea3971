"""Local-disk storage: one file per upload, its record beside the bytes in the same inode.

Two layouts under the data directory, both read and written:
- ``files/<id>``: the bytes, with the record (JSON) in the file's extended attribute
  ``user.uploadsrv.record``, and briefly ``files/<id>.staging`` (a checksummed body
  awaiting verification) and ``files/<id>.preempt`` (another process wants the lock). The
  file is the upload's flock target. A new upload's first commit costs one fsync of the
  file (bytes, size and record alike) and a share of one fsync of ``files/``: the
  directory syncs of the uploads committing at the same moment are one (group commit,
  `_DirectorySync`). Every tus and IETF draft upload whose record fits (`XATTR_RECORD_LIMIT`)
  is stored so.
- ``uploads/<id[:2]>/<id>/``: a directory holding ``info.json`` (the record), ``data``,
  ``staging`` and ``preempt``, the directory itself the flock target. Chunk sessions (they
  need a directory of chunks), records too large for an attribute, filesystems without
  user xattrs, and every upload stored before the flat layout existed (data directories
  need no migration: each id is looked up in ``files/`` first, then here). Its first
  commit costs four fsyncs: data, record, directory, shard.

The offset of an upload is the size of ``data``: bytes reach the file only in order,
so the offset can never run ahead of what is stored and never goes down, also after a
crash. Bulk writes, fsyncs, byte reads, deletes and directory walks run on a bounded
thread pool owned by the backend. The metadata calls of a request on one upload (open,
stat, flock, mkdir, reading its record of a few hundred bytes, writing a new one without
a sync) run on the event loop, as nginx runs its opens: they take microseconds (up to
~0.2 ms while the disk threads' fsyncs hold the ext4 journal), while a hop to a thread and
back costs 0.2-0.3 ms of CPU under the GIL, which was most of the cost of a small upload.
A slow or remote filesystem (NFS) would stall every request of the worker on them; use a
local disk. A body smaller than `SMALL_WRITE` reaches the disk in the same hop as its fsync.

A chunk session writes each chunk at its place in ``assembly`` and then records it as
``chunks/<n>``, a symlink whose target is ``<size>.<sha256>``: one readlink looks a
chunk up, one directory listing lists them all. ``chunks/<n>.lock`` and
``chunks/<n>.preempt`` lock one chunk. Assembling renames ``assembly`` to ``data``.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import fcntl
import functools
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from uploadsrv.core.errors import (
    ChecksumMismatch,
    StorageFull,
    StorageUnavailable,
    UploadBusy,
    UploadExists,
    UploadNotFound,
)
from uploadsrv.core.model import UploadInfo, is_upload_id
from uploadsrv.core.storage import (
    Clock,
    Hasher,
    Orphan,
    Readable,
    Spliceable,
    StoredChunk,
    receive_into,
    receive_steps,
)

from .threads import DiskThreads

T = TypeVar("T")

READ_BLOCK = 1 << 20  #: bytes per read when streaming a download
MIN_CHUNK = 64 << 10
MAX_CHUNK = 5 << 30
LOCK_POLL_SECONDS = 0.02  #: how often a waiter retries a lock held by another process
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
SMALL_WRITE = 64 << 10  #: a write smaller than this waits for the next one or the commit
#: Bytes written between two starts of the disk's writeback: a receive buffer's worth, so
#: that a 4 MiB PATCH's fsync waits for its last MiB, not the whole body (at 4 MiB the
#: first start came with the body's last byte: 64 x 4 MiB sequential 498-584 MB/s, at
#: 1 MiB 681-793, server CPU per GiB the same within /proc's resolution).
WRITEBACK_BYTES = 1 << 20
#: The capacity asked for the pipes a body is spliced through (F_SETPIPE_SZ; the default
#: 64 KiB stays if the system refuses): at most this much moves per pair of splices.
PIPE_BYTES = 1 << 20
PAGE = 4096
RECORD_XATTR = "user.uploadsrv.record"
#: Larger records go to a directory: ext4 holds at most one block (4 KiB) of attributes
#: per file, and an update must still fit after the record grows by a few fields.
XATTR_RECORD_LIMIT = 3 << 10
ENTRY_TICKETS = 1 << 16  #: new uploads whose directory sync ticket is kept until their first commit
NO_XATTR = (errno.ENOTSUP, errno.E2BIG, errno.ENOSPC)  #: setxattr: use the directory layout


def _storage_error(exc: OSError) -> Exception:
    if exc.errno in NO_SPACE:
        return StorageFull("no space left on the data volume")
    return StorageUnavailable(f"disk error: {exc.strerror}")


@dataclass(frozen=True, slots=True)
class _Place:
    """Where one upload's files are, in either layout."""

    data: str
    staging: str
    preempt: str
    directory: str | None = None  #: the directory layout's; None: the record is an xattr of `data`

    @property
    def lock_target(self) -> str:
        return self.data if self.directory is None else self.directory


class LocalStorage:
    """Uploads stored as files under `root`."""

    min_chunk_size = MIN_CHUNK
    max_chunk_size = MAX_CHUNK

    def __init__(
        self, root: str | os.PathLike[str], *, io_threads: int = 16, clock: Clock = time.time
    ) -> None:
        self.root = Path(root).resolve()
        #: The core's clock, for activity and ages. Activity is the data file's mtime (and a
        #: chunk's link's), stamped from this clock by each commit that stored bytes: one
        #: futimens on an inode the write dirtied anyway, made durable by the same fsync.
        self._clock = clock
        # Paths inside are plain strings: pathlib's joins and conversions took a fifth of
        # the event loop's time for a small upload.
        self._uploads = str(self.root / "uploads")
        self._files = str(self.root / "files")
        self._outbox = str(self.root / "outbox")
        os.makedirs(self._uploads, exist_ok=True)
        if not os.path.isdir(self._files):
            os.makedirs(self._files, exist_ok=True)
            _sync(str(self.root))
        self._files_synced = _DirectorySync(self._files)
        self._entries: dict[str, int] = {}  #: new flat uploads' directory sync tickets
        self._xattrs = True  #: False once the filesystem refused a user xattr
        self._closed = False
        os.makedirs(self._outbox, exist_ok=True)
        self._claims: dict[str, int] = {}  # event id -> descriptor holding its flock
        self._pool = DiskThreads(io_threads, "uploadsrv-disk")

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        """`fn` on a disk thread; once the pool is closed (the server is stopping while a
        cancelled request still commits what arrived), on the caller's thread."""
        with _disk_errors:
            if self._closed:
                return fn(*args)
            return await self._pool.run(fn, *args)

    async def _run_owned(self, fn: Callable[..., T], close: Callable[[T], object], *args: object) -> T:
        """`fn` on a disk thread, for a result holding a descriptor. If the request is
        cancelled meanwhile (its client went away), the result is closed when the thread
        delivers it; a plain descriptor number would otherwise stay open for good."""
        future = self._pool.run(fn, *args)
        try:
            with _disk_errors:
                return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(lambda done: _close_result(done, close))
            raise

    def _dir(self, upload_id: str) -> str:
        # Ids are validated by the core; checked again because a path is built from them.
        if not is_upload_id(upload_id):
            raise UploadNotFound()
        return f"{self._uploads}/{upload_id[:2]}/{upload_id}"

    def _flat(self, upload_id: str) -> _Place:
        if not is_upload_id(upload_id):
            raise UploadNotFound()
        path = f"{self._files}/{upload_id}"
        return _Place(path, f"{path}.staging", f"{path}.preempt")

    def _in_directory(self, upload_id: str) -> _Place:
        path = self._dir(upload_id)
        return _Place(f"{path}/data", f"{path}/staging", f"{path}/preempt", path)

    def _opened(self, upload_id: str, open_at: Callable[[_Place], T]) -> T:
        """`open_at` the upload's flat place, else in its directory: no stat first."""
        try:
            return open_at(self._flat(upload_id))
        except FileNotFoundError:
            return open_at(self._in_directory(upload_id))

    def _entry_sync(self, place: _Place, upload_id: str) -> Callable[[], None] | None:
        """What makes a flat upload's new entry durable (a directory upload syncs its own):
        nothing more if ``files/`` was synced since this process created it."""
        if place.directory is not None:
            return None
        ticket = self._entries.pop(upload_id, None)
        return functools.partial(self._files_synced.sync, ticket)

    def _remember_entry(self, upload_id: str, ticket: int) -> None:
        if len(self._entries) >= ENTRY_TICKETS:  # uploads created and never written: forget
            self._entries.clear()  # them; their first commit then syncs the directory anew
        self._entries[upload_id] = ticket

    def _place(self, upload_id: str) -> _Place:
        """The upload's files: in its directory if it has one, else flat (also once deleted)."""
        flat = self._flat(upload_id)
        if os.path.exists(flat.data) or not os.path.exists(self._dir(upload_id)):
            return flat
        return self._in_directory(upload_id)

    # -- records -----------------------------------------------------------------

    async def create(self, info: UploadInfo) -> None:
        record = json.dumps(info.to_record()).encode()
        flat = self._flat(info.id)
        directory = self._dir(info.id)
        with _disk_errors:
            if os.path.lexists(directory):  # a flat upload of this id fails O_EXCL
                raise UploadExists(f"an upload with id {info.id} already exists")
            try:
                if self._flat_record_fits(info, record) and self._create_flat(
                    flat.data, record, info.updated_at
                ):
                    self._remember_entry(info.id, self._files_synced.entry_made())
                    return
                if os.path.lexists(flat.data):
                    raise FileExistsError(flat.data)
                new_shard = _make_directory(directory)
            except FileExistsError:  # only an id a hook chose can be taken
                raise UploadExists(f"an upload with id {info.id} already exists") from None
        if new_shard:  # one of 256, so syncing its entry is rare
            await self._run(_sync, self._uploads)
        with _disk_errors:
            _fill_new_upload(directory, info, record)

    def _flat_record_fits(self, info: UploadInfo, record: bytes) -> bool:
        return self._xattrs and info.chunk_size is None and len(record) <= XATTR_RECORD_LIMIT

    def _create_flat(self, path: str, record: bytes, updated_at: float) -> bool:
        """A new upload's empty file with its record, its mtime the record's activity
        (`updated_at`); False if the filesystem refused the
        record (then nothing is left behind). Neither is synced: the first commit of bytes
        syncs both. Until then a crash can lose the empty upload or leave its file without
        a record (`get` says: create it again; prune removes it), never a stored byte."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _stamp(fd, updated_at)
            os.setxattr(fd, RECORD_XATTR, record)
        except OSError as exc:
            os.unlink(path)
            if exc.errno not in NO_XATTR:
                raise
            self._xattrs = exc.errno != errno.ENOTSUP
            return False
        finally:
            os.close(fd)
        return True

    async def get(self, upload_id: str) -> UploadInfo:
        try:
            with _disk_errors:
                return self._get(upload_id)
        except FileNotFoundError:
            raise UploadNotFound() from None
        except ValueError:  # a record cut short by a power loss before its first bytes were synced
            raise UploadNotFound("the upload's record is unreadable; create it again") from None

    def _get(self, upload_id: str) -> UploadInfo:
        path = self._flat(upload_id).data
        try:
            record = _read_xattr_record(path)
            stat = os.stat(path)
        except FileNotFoundError:
            path = self._dir(upload_id)
            with open(f"{path}/info.json", "rb") as f:
                record = f.read()
            stat = os.stat(f"{path}/data")
        info = UploadInfo.from_record(json.loads(record), offset=stat.st_size)
        info.updated_at = max(info.updated_at, stat.st_mtime)
        return info

    async def update(self, info: UploadInfo) -> None:
        place = self._place(info.id)
        record = json.dumps(info.to_record()).encode()
        if place.directory is None:
            await self._run(_replace_xattr_record, place.data, record)
        else:
            await self._run(_write_atomically, f"{place.directory}/info.json", record)

    async def finish(self, info: UploadInfo) -> None:
        """Nothing to do: the bytes are already in place and durable."""

    def location(self, info: UploadInfo) -> dict[str, str]:
        place = self._in_directory(info.id) if info.chunk_size is not None else self._place(info.id)
        if place.directory is None:  # the record is in the file
            return {"Type": "filestore", "Path": place.data}
        return {"Type": "filestore", "Path": place.data, "InfoPath": f"{place.directory}/info.json"}

    async def delete(self, upload_id: str) -> None:
        place = self._place(upload_id)
        if place.directory is None:
            await self._run(_remove_flat, place)
        else:
            await self._run(_remove_upload, place.directory)

    async def upload_ids(self) -> AsyncIterator[str]:
        for name in await self._run(_list_dir, self._files):
            if is_upload_id(name):  # not a .staging or .preempt file
                yield name
        shards = await self._run(_list_dir, self._uploads)
        for shard in shards:
            for name in await self._run(_list_dir, f"{self._uploads}/{shard}"):
                if is_upload_id(name):
                    yield name

    async def check(self) -> None:
        for directory in (self._files, self._uploads):
            if not os.access(directory, os.W_OK):
                raise RuntimeError(f"data directory {directory} is not writable")

    async def close(self) -> None:
        self._closed = True
        self._pool.close()

    # -- bytes -------------------------------------------------------------------

    @asynccontextmanager
    async def writer(self, info: UploadInfo, *, transactional: bool) -> AsyncIterator[_Writer]:
        try:
            if transactional:  # truncates a staging file a crash may have left, however large
                place = self._place(info.id)
                file = await self._run_owned(self._file_writer, _FileWriter.close, place, info, True)
            else:
                with _disk_errors:
                    file = self._opened(info.id, lambda place: self._file_writer(place, info, False))
        except FileNotFoundError:
            raise UploadNotFound() from None
        try:
            yield _Writer(self, file)
        finally:
            if transactional:
                await self._run(file.close)  # also removes the staging file
            else:
                file.close()  # closing a regular file's descriptor does not block

    def _file_writer(self, place: _Place, info: UploadInfo, transactional: bool) -> _FileWriter:
        return _FileWriter(place, info.offset, transactional, self._entry_sync(place, info.id), self._clock)

    async def read(self, info: UploadInfo, start: int, end: int) -> AsyncIterator[bytes]:
        try:
            fd = await self._run_owned(os.open, os.close, self._place(info.id).data, os.O_RDONLY)
        except FileNotFoundError:
            raise UploadNotFound() from None
        try:
            while start < end:
                block = await self._run(os.pread, fd, min(READ_BLOCK, end - start), start)
                if not block:
                    raise StorageUnavailable("stored file is shorter than its record")
                start += len(block)
                yield block
        finally:
            os.close(fd)

    # -- chunk sessions ----------------------------------------------------------

    async def stored_chunks(self, info: UploadInfo, number: int | None = None) -> list[StoredChunk]:
        try:
            return await self._run(_stored_chunks, f"{self._dir(info.id)}/chunks", number)
        except FileNotFoundError:
            raise UploadNotFound() from None

    async def chunks_busy(self, info: UploadInfo) -> bool:
        return await self._run(_chunks_busy, f"{self._dir(info.id)}/chunks")

    @asynccontextmanager
    async def chunk_writer(self, info: UploadInfo, number: int) -> AsyncIterator[_ChunkWriter]:
        assert info.chunk_size is not None
        offset = (number - 1) * info.chunk_size
        try:
            file = await self._run_owned(
                _ChunkFile, _ChunkFile.close, self._dir(info.id), offset, self._clock
            )
        except FileNotFoundError:
            raise UploadNotFound() from None
        try:
            yield _ChunkWriter(self, file)
        finally:
            file.close()

    async def assemble(
        self, info: UploadInfo, chunks: Sequence[StoredChunk], sha256: str | None = None
    ) -> None:
        assert info.length is not None
        try:
            await self._run(_assemble, self._dir(info.id), info.length, sha256, self._clock)
        except FileNotFoundError:
            raise StorageUnavailable("the stored chunks are missing from disk") from None

    async def concatenate(self, info: UploadInfo, parts: Sequence[UploadInfo]) -> None:
        sources = [self._place(part.id).data for part in parts]
        await self._run(_concatenate, self._place(info.id).data, sources, self._clock)

    # -- housekeeping ------------------------------------------------------------

    async def describe(self, upload_id: str) -> dict[str, object]:
        place = self._place(upload_id)
        if place.directory is None:  # the roles of the files, as the directory layout names them
            roles = {"data": place.data, "staging": place.staging, "preempt": place.preempt}
            files = [role for role, path in roles.items() if os.path.exists(path)]
            path = place.data
        else:
            path = place.directory
            files = await self._run(_list_dir, path)
        if not files:
            raise UploadNotFound()
        return {"path": path, "files": files}

    async def orphans(self, older_than: float) -> AsyncIterator[Orphan]:
        for found in await self._run(self._find_orphans, older_than):
            yield found

    def _find_orphans(self, older_than: float) -> list[Orphan]:
        """Uploads without a record (a crash mid-create) and stale staging files."""
        now = self._clock()
        found = [*_flat_orphans(self._files, now, older_than)]
        for shard in _list_dir(self._uploads):
            for name in _list_dir(f"{self._uploads}/{shard}"):
                with suppress(FileNotFoundError):
                    found += _directory_orphans(f"{self._uploads}/{shard}/{name}", now, older_than)
        return found

    async def remove_orphan(self, orphan: Orphan) -> None:
        if not any(Path(orphan.name).is_relative_to(d) for d in (self._uploads, self._files)):
            raise ValueError(f"{orphan.name} is not under {self._uploads} or {self._files}")
        if orphan.kind == "directory":
            await self._run(shutil.rmtree, orphan.name, True)
        else:
            await self._run(_remove_file, orphan.name)

    # -- hook outbox -------------------------------------------------------------
    # One file per event, ``outbox/<id>.json``, written and fsynced (with its directory
    # entry) before `put_event` returns. A claim is a flock on the file, so it ends with
    # the process that holds it, also when that process is killed.

    def _event_path(self, event_id: str) -> str:
        if not is_upload_id(event_id):
            raise ValueError(f"not an event id: {event_id!r}")
        return f"{self._outbox}/{event_id}.json"

    async def put_event(self, event_id: str, record: dict[str, Any], *, lease: float | None = None) -> None:
        path, content = self._event_path(event_id), json.dumps(record).encode()
        if lease is None:
            await self._run(_write_durably, path, content)
        else:  # a flock has no end but the holder's: the lease does not matter here
            self._claims[event_id] = await self._run_owned(_write_claimed, os.close, path, content)

    async def event_ids(self) -> AsyncIterator[str]:
        for name in sorted(await self._run(_list_dir, self._outbox)):
            if name.endswith(".json"):
                yield name[: -len(".json")]

    async def read_event(self, event_id: str) -> dict[str, Any] | None:
        try:
            with open(self._event_path(event_id), "rb") as f:
                return json.loads(f.read())
        except (FileNotFoundError, ValueError):
            return None

    async def claim_event(self, event_id: str, lease: float) -> dict[str, Any] | None:
        path = self._event_path(event_id)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        if not _try_flock(fd) or os.fstat(fd).st_ino != _inode(path):  # taken, or replaced meanwhile
            os.close(fd)
            return None
        try:
            record = json.loads(os.pread(fd, 1 << 20, 0))
        except ValueError:
            os.close(fd)
            return None
        self._claims[event_id] = fd
        return record

    async def renew_event(self, event_id: str, lease: float) -> bool:
        return event_id in self._claims

    async def release_event(self, event_id: str, record: dict[str, Any] | None) -> None:
        fd = self._claims.pop(event_id)
        try:
            path = self._event_path(event_id)
            if record is None:
                await self._run(_remove_file, path)
            else:
                await self._run(_write_durably, path, json.dumps(record).encode())
        finally:
            os.close(fd)

    # -- locks -------------------------------------------------------------------

    @asynccontextmanager
    async def lock(
        self, upload_id: str, *, timeout: float, preempt: bool = True, chunk: int | None = None
    ) -> AsyncIterator[_FileLock]:
        """flock on the upload's file or directory (or the chunk's lock file); a waiter
        leaves a ``preempt`` marker for the holder.

        Non-blocking flock and small opens are done on the event loop: they never wait.
        """
        try:
            if chunk is None:
                fd, marker = self._opened(upload_id, _open_lock)
            else:
                path = self._dir(upload_id)
                fd = os.open(f"{path}/chunks/{chunk}.lock", os.O_RDWR | os.O_CREAT, 0o644)
                marker = f"{path}/chunks/{chunk}.preempt"
        except FileNotFoundError:
            raise UploadNotFound() from None
        try:
            await _acquire(fd, marker if preempt else None, timeout)
            yield _FileLock(marker)
        finally:
            os.close(fd)  # closing releases the flock


class _Writing:
    """Writes to a file on the disk threads, one hop per call; writes smaller than
    `SMALL_WRITE` are held (bounded) and go with the next write or the commit."""

    def __init__(self, storage: LocalStorage, file: _FileWriter | _ChunkFile) -> None:
        self._run = storage._run
        self._file = file
        self._held: list[bytes] = []
        self._held_size = 0

    async def write(self, blocks: Sequence[bytes]) -> None:
        self._held.extend(blocks)
        self._held_size += sum(map(len, blocks))
        if self._held_size >= SMALL_WRITE:
            await self._run(self._file.write, self._take_held())

    async def receive(
        self, held: list[bytes], source: Readable, count: int, hasher: Hasher | None, seconds: float
    ) -> int:
        """The storage `Receiving`: the body read on the disk thread, as the bare sink does."""
        self._held.extend(held)
        return await self._run(self._file.receive, self._take_held(), source, count, hasher, seconds)

    def _take_held(self) -> list[bytes]:
        held, self._held, self._held_size = self._held, [], 0
        return held


class _Writer(_Writing):
    """The storage `Writer`."""

    _file: _FileWriter

    async def commit(self) -> int:
        if not self._held and self._file.durable:  # the body's last hop made it so
            return self._file.committed
        return await self._run(self._file.commit, self._take_held())

    async def checkpoint(self) -> int:
        return await self.commit()

    async def discard(self) -> None:
        self._take_held()
        await self._run(self._file.discard)


class _ChunkWriter(_Writing):
    """The storage `ChunkWriter`."""

    _file: _ChunkFile

    async def commit(self, chunk: StoredChunk) -> None:
        try:
            await self._run(self._file.commit, chunk, self._take_held())
        except FileNotFoundError:  # the session was aborted while this chunk arrived
            raise UploadNotFound() from None


class _FileLock:
    def __init__(self, marker: str) -> None:
        self._marker = marker

    def preempt_requested(self) -> bool:
        return os.path.exists(self._marker)


async def _acquire(fd: int, marker: str | None, timeout: float) -> None:
    if _try_flock(fd):
        return
    if marker is None:
        raise UploadBusy()
    os.close(os.open(marker, os.O_WRONLY | os.O_CREAT, 0o644))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not _try_flock(fd):
        if loop.time() > deadline:
            raise UploadBusy("another request holds this upload; retry shortly")
        await asyncio.sleep(LOCK_POLL_SECONDS)
    _remove_file(marker)


class _DiskErrors:
    """OSErrors as the core's storage errors; FileNotFoundError is left to the caller.
    A class, not a generator: it wraps every metadata call of every request."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            raise _storage_error(exc) from exc


_disk_errors = _DiskErrors()


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _close_result(done: asyncio.Future[T], close: Callable[[T], object]) -> None:
    if not done.cancelled() and done.exception() is None:
        with suppress(OSError):
            close(done.result())


class _Positioned:
    """A file written at a moving position, from blocks or straight from a `Readable`.

    Every `WRITEBACK_BYTES` written, the disk is told to start writing them out
    (`_start_writeback`), so the commit's fsync waits for the last stretch only instead
    of the whole body: on the build machine a 4 MiB PATCH's fsync took 3-6 ms after the
    body, most of the request's time past the network's. A staging file (whose bytes
    are copied elsewhere, or dropped) is not written back early.
    """

    _fd: int
    _position: int
    _written_back = 0  #: bytes before this were handed to the disk's writeback
    _write_back = True

    def write(self, blocks: Sequence[bytes]) -> None:
        self._position = _pwrite_all(self._fd, blocks, self._position)
        self._write_back_some()

    def _write_back_some(self) -> None:
        if self._write_back and self._position - self._written_back >= WRITEBACK_BYTES:
            end = self._position & -PAGE  # a partial page is dirtied again by the next write
            _start_writeback(self._fd, self._written_back, end - self._written_back)
            self._written_back = end

    def receive(
        self, held: list[bytes], source: Readable, count: int, hasher: Hasher | None, seconds: float
    ) -> int:
        """`held`, then up to `count` bytes of `source`. Bytes no hasher needs to see, from
        a source that can splice (a socket), go socket -> pipe -> file inside the kernel."""
        self.write(held)
        deadline = time.monotonic() + seconds
        if hasher is None and isinstance(source, Spliceable):
            return self._splice_from(source, count, deadline)
        return receive_into(self._write_block, source, count, hasher, deadline)

    def _splice_from(self, source: Spliceable, count: int, deadline: float) -> int:
        """`receive_into`'s steps through one of `_PIPES` instead of a receive buffer."""
        with _PIPES.pipe() as (out, into):

            def step(wanted: int) -> int:
                got = source.splice_to(into, wanted)
                if got:
                    self._position = _splice_all(out, self._fd, got, self._position)
                    self._write_back_some()
                return got

            return receive_steps(step, count, deadline)

    def _write_block(self, block: memoryview) -> None:
        self._position = _pwrite_all(self._fd, (block,), self._position)
        self._write_back_some()


class _FileWriter(_Positioned):
    """Writes blocks with pwritev at the upload's offset, or to its staging file when transactional."""

    def __init__(
        self,
        place: _Place,
        offset: int,
        transactional: bool,
        synced: Callable[[], None] | None,
        clock: Clock,
    ) -> None:
        self._place = place
        self._clock = clock
        #: Makes the new file's entry durable (flat layout; the record is in the file).
        self._sync_entry = synced
        self._data = place.data
        self._staging = place.staging if transactional else None
        self._committed = offset
        #: The record and directory entries were synced with the upload's first bytes.
        self._synced = offset > 0
        self._durable_at = -1  #: the position `receive` last committed at
        if self._staging is None:
            self._fd = os.open(self._data, os.O_WRONLY)
            self._position = self._written_back = offset
        else:
            self._fd = os.open(self._staging, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._position = 0
            self._write_back = False

    @property
    def committed(self) -> int:
        return self._committed

    @property
    def durable(self) -> bool:
        """Everything written is durable already (`receive` committed a complete body)."""
        return self._durable_at == self._position

    def receive(
        self, held: list[bytes], source: Readable, count: int, hasher: Hasher | None, seconds: float
    ) -> int:
        """As `_Positioned.receive`; once the body is complete, it is also committed on this
        thread before the hop back, so `commit` needs no second hop (nor a free thread).
        A staging file waits for its checksum's verdict."""
        received = super().receive(held, source, count, hasher, seconds)
        if source.complete and self._staging is None:
            self.commit()
            self._durable_at = self._position
        return received

    def commit(self, blocks: Sequence[bytes] = ()) -> int:
        """Write `blocks` (the held small writes), then make everything written durable."""
        if self._staging is None:
            try:
                self.write(blocks)
            finally:  # even if they fail (a full disk): what reached the file is made durable
                if self._position > self._committed:
                    _stamp(self._fd, self._clock())
                os.fsync(self._fd)
                self._sync_upload_once()
            self._committed = self._position
            return self._committed
        self.write(blocks)
        with open(self._data, "r+b") as data:
            _copy_range(self._fd, data.fileno(), 0, self._committed, self._position)
            if self._position:
                _stamp(data.fileno(), self._clock())
            os.fsync(data.fileno())
        self._sync_upload_once()
        self._committed += self._position
        self.discard()
        return self._committed

    def _sync_upload_once(self) -> None:
        if self._synced:
            return
        if self._sync_entry is not None:
            self._sync_entry()
        else:
            assert self._place.directory is not None
            _sync_upload(self._place.directory)
        self._synced = True

    def discard(self) -> None:
        if self._staging is not None:
            os.ftruncate(self._fd, 0)
            self._position = 0

    def close(self) -> None:
        os.close(self._fd)
        if self._staging is not None:
            _remove_file(self._staging)


class _ChunkFile(_Positioned):
    """Writes one chunk at its place in ``assembly``; `commit` records it."""

    def __init__(self, path: str, offset: int, clock: Clock) -> None:
        self._path = path
        self._clock = clock
        self._fd = os.open(f"{path}/assembly", os.O_WRONLY | os.O_CREAT, 0o644)
        self._position = self._written_back = offset

    def commit(self, chunk: StoredChunk, blocks: Sequence[bytes] = ()) -> None:
        """Bytes first (with `blocks`, the held small writes), then every name that leads
        to them, then the record of the chunk."""
        self.write(blocks)
        os.fsync(self._fd)
        _sync_upload(self._path)
        link = f"{self._path}/chunks/{chunk.number}"
        os.symlink(f"{chunk.size}.{chunk.sha256}", link)
        now = self._clock()
        os.utime(link, (now, now), follow_symlinks=False)  # when it was stored, as `stored_at`
        _sync(f"{self._path}/chunks")

    def close(self) -> None:
        os.close(self._fd)


def _stored_chunks(directory: str, number: int | None) -> list[StoredChunk]:
    names = [str(number)] if number is not None else [n for n in os.listdir(directory) if n.isdigit()]
    chunks = []
    for name in names:
        try:
            size, _, sha256 = os.readlink(f"{directory}/{name}").partition(".")
            stored_at = os.lstat(f"{directory}/{name}").st_mtime
        except FileNotFoundError:
            continue
        chunks.append(StoredChunk(int(name), int(size), sha256, stored_at))
    return sorted(chunks, key=lambda c: c.number)


def _chunks_busy(directory: str) -> bool:
    """Whether another open file holds the flock of any chunk's lock file."""
    for name in _list_dir(directory):
        if name.endswith(".lock"):
            with suppress(FileNotFoundError):
                fd = os.open(f"{directory}/{name}", os.O_RDONLY)
                try:
                    if not _try_flock(fd):
                        return True
                finally:
                    os.close(fd)
    return False


def _assemble(path: str, length: int, sha256: str | None, clock: Clock) -> None:
    """The chunks are in place and durable: check the declared digest, then rename in one
    atomic step, so the upload is complete only once it is verified."""
    with open(f"{path}/assembly", "r+b") as assembly:
        os.ftruncate(assembly.fileno(), length)
        _stamp(assembly.fileno(), clock())
        os.fsync(assembly.fileno())
        if sha256 is not None and hashlib.file_digest(assembly, "sha256").hexdigest() != sha256:
            raise ChecksumMismatch("the assembled file does not match the declared sha256")
    os.replace(f"{path}/assembly", f"{path}/data")
    _sync(path)


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """glibc's sync_file_range(2), which Python's os module lacks; None elsewhere."""
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], function)


_SYNC_FILE_RANGE = _libc_sync_file_range()
SYNC_FILE_RANGE_WRITE = 2  #: start writing dirty pages out; wait for nothing (fs.h)


def _start_writeback(fd: int, offset: int, count: int) -> None:
    """Start writing `count` bytes at `offset` to the disk, without waiting: only a hint
    (the fsync at commit is what makes them durable), so a failure here is ignored."""
    if _SYNC_FILE_RANGE is not None and count > 0:
        _SYNC_FILE_RANGE(fd, offset, count, SYNC_FILE_RANGE_WRITE)  # ctypes lets the GIL go


class _Pipes:
    """Empty pipes (read end, write end) that bodies are spliced through, reused across
    segments and disk threads; one that fails while holding bytes is closed instead."""

    def __init__(self) -> None:
        self._idle: list[tuple[int, int]] = []

    @contextmanager
    def pipe(self) -> Iterator[tuple[int, int]]:
        try:
            pipe = self._idle.pop()
        except IndexError:
            pipe = _new_pipe()
        try:
            yield pipe
        except BaseException:
            for fd in pipe:
                os.close(fd)
            raise
        self._idle.append(pipe)


def _new_pipe() -> tuple[int, int]:
    out, into = os.pipe2(os.O_CLOEXEC)
    with suppress(OSError):  # EPERM past the user's pipe quota: the default size works too
        fcntl.fcntl(into, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    return out, into


_PIPES = _Pipes()


def _splice_all(pipe: int, fd: int, count: int, position: int) -> int:
    """Move the `count` bytes waiting in `pipe` into `fd` at `position` on; returns the
    position after them."""
    while count:
        moved = os.splice(pipe, fd, count, offset_dst=position, flags=os.SPLICE_F_MOVE)
        if not moved:  # cannot happen while the bytes are in the pipe; never spin on it
            raise OSError(errno.EIO, "splice moved nothing")
        position += moved
        count -= moved
    return position


def _pwrite_all(fd: int, blocks: Sequence[bytes | memoryview], position: int) -> int:
    """Write every block at `position` on; returns the position after them."""
    views = [memoryview(b) for b in blocks]
    while views:
        written = os.pwritev(fd, views, position)
        position += written
        views = list(_skip(views, written))
    return position


def _skip(views: list[memoryview], count: int) -> Iterator[memoryview]:
    """The views left after `count` bytes were written (pwritev may write less than asked)."""
    for view in views:
        if count >= len(view):
            count -= len(view)
            continue
        yield view[count:]
        count = 0


def _copy_range(src: int, dst: int, src_offset: int, dst_offset: int, count: int) -> None:
    """Copy inside the kernel; no bytes pass through Python."""
    while count > 0:
        copied = os.copy_file_range(src, dst, count, src_offset, dst_offset)
        if copied == 0:
            raise StorageUnavailable("source file ended early")
        src_offset += copied
        dst_offset += copied
        count -= copied


def _concatenate(target: str, sources: list[str], clock: Clock) -> None:
    with open(target, "r+b") as out:
        offset = 0
        for source in sources:
            with open(source, "rb") as part:
                size = os.fstat(part.fileno()).st_size
                _copy_range(part.fileno(), out.fileno(), 0, offset, size)
                offset += size
        _stamp(out.fileno(), clock())
        os.fsync(out.fileno())


def _remove_upload(path: str) -> None:
    """Rename the upload's directory away, then remove it. A chunk request of the session
    may be creating its lock file right now; in the directory as it is removed, that file
    would keep it (and the deleted upload) alive. Under the new name, which is not an
    upload id, nothing is added, and a removal a crash cut short is an orphan for prune."""
    doomed = f"{path}.deleted"
    try:
        os.rename(path, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def _make_directory(path: str) -> bool:
    """Make an upload's directory; True if its shard directory was new."""
    try:
        os.mkdir(path)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.mkdir(path)
        return True
    return False


def _fill_new_upload(path: str, info: UploadInfo, record: bytes) -> None:
    """A new upload's empty data file, its mtime the record's activity, and its record, in
    its directory."""
    fd = os.open(f"{path}/data", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _stamp(fd, info.updated_at)
    finally:
        os.close(fd)
    if info.chunk_size is not None:
        os.mkdir(f"{path}/chunks")
    # Written in place (nothing older can be torn) and not fsynced: the first commit of
    # bytes syncs the record with them. Until then a crash can lose or cut short an empty
    # upload's record (`get` says: create it again), never a stored byte.
    with open(f"{path}/info.json", "xb") as f:
        f.write(record)


def _open_lock(place: _Place) -> tuple[int, str]:
    """The descriptor to flock for the upload, and its preempt marker."""
    return os.open(place.lock_target, os.O_RDONLY), place.preempt


def _read_xattr_record(path: str) -> bytes:
    """The record in a flat upload's file; ValueError if it has none (a crash mid-create)."""
    try:
        return os.getxattr(path, RECORD_XATTR)
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            raise ValueError("no record") from None
        raise


def _replace_xattr_record(path: str, record: bytes) -> None:
    """One attribute replaced in one call (the kernel never shows half of it), then synced."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.setxattr(fd, RECORD_XATTR, record)
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_flat(place: _Place) -> None:
    for path in (place.data, place.staging, place.preempt):
        _remove_file(path)


def _flat_orphans(directory: str, now: float, older_than: float) -> Iterator[Orphan]:
    """Files without a record, and staging files nobody wrote to for `older_than`."""
    for name in _list_dir(directory):
        path = f"{directory}/{name}"
        with suppress(FileNotFoundError):
            stat = os.stat(path)
            age = now - stat.st_mtime
            if age < older_than:
                continue
            if name.endswith(".staging") or (is_upload_id(name) and not _has_xattr_record(path)):
                yield Orphan("file", path, stat.st_size, age)


def _has_xattr_record(path: str) -> bool:
    try:
        json.loads(_read_xattr_record(path))
    except ValueError:
        return False
    return True


def _directory_orphans(path: str, now: float, older_than: float) -> list[Orphan]:
    """An upload directory without a record, or its staging file if that is stale."""
    age = now - os.stat(path).st_mtime
    if age < older_than:
        return []
    if not _readable_record(f"{path}/info.json"):
        size = sum(os.stat(f"{path}/{file}").st_size for file in os.listdir(path))
        return [Orphan("directory", path, size, age)]
    if os.path.exists(f"{path}/staging"):
        staging = os.stat(f"{path}/staging")
        if now - staging.st_mtime >= older_than:
            return [Orphan("file", f"{path}/staging", staging.st_size, now - staging.st_mtime)]
    return []


class _DirectorySync:
    """Group commit: one fsync of a directory for every entry made before it started.

    An entry made in the directory takes a ticket (`entry_made`); `sync(ticket)` returns
    once an fsync that started after the ticket was taken has finished, so the entry is
    durable: at once if one already has (the uploads created while another commit synced
    the directory), else with the next fsync, which every thread waiting meanwhile shares.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._changed = threading.Condition()
        self._asked = 0  #: tickets handed out
        self._covered = 0  #: every ticket up to this one is synced
        self._syncing = False

    def entry_made(self) -> int:
        """A ticket for an entry just made (or about to be synced)."""
        with self._changed:
            self._asked += 1
            return self._asked

    def sync(self, ticket: int | None = None) -> None:
        """Return once the entry of `ticket` (None: any made so far) is durable."""
        with self._changed:
            if ticket is None:
                self._asked += 1
                ticket = self._asked
            while self._covered < ticket:
                if self._syncing:
                    self._changed.wait()
                    continue
                self._syncing = True
                covers = self._asked
                try:
                    self._changed.release()
                    try:
                        _sync(self._path)
                    finally:
                        self._changed.acquire()
                    self._covered = max(self._covered, covers)
                finally:
                    self._syncing = False
                    self._changed.notify_all()


def _stamp(fd: int, now: float) -> None:
    """The file's activity as the core's clock tells it: its mtime (and atime)."""
    os.utime(fd, (now, now))


def _write_durably(path: str, content: bytes) -> None:
    """Replace `path` with `content` and make both the file and its entry durable."""
    _write_atomically(path, content)
    _sync(os.path.dirname(path))


def _inode(path: str) -> int:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return -1


def _write_claimed(path: str, content: bytes) -> int:
    """`_write_durably`, the file flocked before it appears under its name: returns the
    descriptor holding the lock (another process's claim finds it taken)."""
    tmp = os.path.splitext(path)[0] + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, content)
        os.fsync(fd)
        os.replace(tmp, path)
        _sync(os.path.dirname(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_atomically(path: str, content: bytes) -> None:
    tmp = os.path.splitext(path)[0] + ".tmp"
    with open(tmp, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _readable_record(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            json.loads(f.read())
    except (FileNotFoundError, ValueError):
        return False
    return True


def _sync_upload(path: str) -> None:
    """Make an upload's record and the directory entries leading to it durable.

    Creation writes them without a flush; the first commit of bytes makes them durable
    with the bytes. (A new shard's own entry is synced when the shard is made.)
    """
    _sync(f"{path}/info.json")
    _sync(path)
    _sync(os.path.dirname(path))


def _sync(path: str) -> None:
    """fsync a file by name; nearly free when it has nothing unwritten."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _list_dir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def _remove_file(path: str) -> None:
    with suppress(FileNotFoundError):
        os.unlink(path)
