"""Chunk sessions: an upload whose bytes arrive as numbered chunks, in any order, at once.

For clients that split a file into chunk files: an iOS background URLSession uploads only
from files, one task per chunk, each retried by the system on its own. Every chunk is
verified and stored exactly once; completing assembles them inside the backend (disk:
they were written at their offsets; S3: chunk n is part n) without moving bytes through
this server. The result is an ordinary upload: downloadable, listed, expired like any.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

from .caller import Caller
from .checksums import Checksum, Digester
from .errors import (
    ChecksumMismatch,
    ChunkConflict,
    ChunksMissing,
    InvalidRequest,
    NotAppendable,
    TooLarge,
    UploadComplete,
    UploadError,
    UploadGone,
)
from .events import UploadEvent
from .model import UploadInfo
from .pump import pump
from .service import UploadService
from .storage import Chunked, StoredChunk

MAX_CHUNKS = 10_000  #: S3's limit on parts, kept on every backend so sessions can move
#: How often a session's follower looks for chunks stored through other server instances
#: (those a coordinator does not report at once).
POLL_SECONDS = 5.0
SHA256_HEX = re.compile(r"[0-9a-f]{64}")

#: The events that end a chunk session.
SESSION_ENDINGS = frozenset({UploadEvent.COMPLETED, UploadEvent.EXPIRED, UploadEvent.TERMINATED})
#: What a session's watchers receive: (CHUNK, StoredChunk) or (one of SESSION_ENDINGS, UploadInfo).
ChunkEvent = tuple[UploadEvent, StoredChunk | UploadInfo]


@dataclass(frozen=True)
class ChunkStored:
    """News for a session's followers: a chunk was stored, and where the session stands."""

    chunk: StoredChunk
    chunks_stored: int
    chunk_count: int
    bytes_stored: int
    fraction: float


@dataclass(frozen=True)
class SessionEnded:
    """News for a session's followers: it ended (COMPLETED, EXPIRED or TERMINATED).

    `info` is the session as it ended, or None when it was found gone."""

    event: UploadEvent
    info: UploadInfo | None


@dataclass(frozen=True)
class StillHere:
    """News for a session's followers: nothing new since the last look."""


@dataclass
class ChunkStatus:
    """A session's progress, as the status endpoint reports it."""

    info: UploadInfo
    chunks: list[StoredChunk]

    @property
    def stored_bytes(self) -> int:
        if self.info.is_complete:
            return self.info.offset
        return sum(c.size for c in self.chunks)

    @property
    def fraction(self) -> float:
        return 1.0 if not self.info.length else self.stored_bytes / self.info.length

    @property
    def missing(self) -> list[tuple[int, int]]:
        """The numbers of the chunks not stored yet, as inclusive ranges."""
        if self.info.is_complete:
            return []
        return _ranges(sorted(set(range(1, self.info.chunk_count + 1)) - {c.number for c in self.chunks}))


class ChunkSessions:
    """Create, fill, inspect, complete and abort chunk sessions on the upload core."""

    def __init__(self, service: UploadService, *, chunk_size: int) -> None:
        storage = service.capabilities.chunks
        if storage is None:  # the app serves no chunk API then
            raise TypeError(f"{service.storage!r} cannot store chunk sessions")
        self._service = service
        self._storage: Chunked = storage
        self.default_chunk_size = chunk_size
        self._watchers: dict[str, set[asyncio.Queue[ChunkEvent]]] = {}
        service.subscribe(self._on_event)
        self._coordinator = service.coordinator
        if self._coordinator is not None:
            self._coordinator.subscribe(self._on_remote_event)

    def chunk_size_for(self, length: int, requested: int | None) -> int:
        """The chunk size to use: the client's wish (or the default) within what the backend
        can assemble, and large enough that the file fits in MAX_CHUNKS chunks."""
        size = max(
            requested or self.default_chunk_size, self._storage.min_chunk_size, -(-length // MAX_CHUNKS)
        )
        return min(size, self._storage.max_chunk_size)

    async def create(
        self,
        *,
        length: int,
        chunk_size: int | None = None,
        metadata: dict[str, str | None] | None = None,
        caller: Caller | None = None,
        sha256: str | None = None,
    ) -> UploadInfo:
        if chunk_size is not None and chunk_size < 1:
            raise InvalidRequest("chunk size must be positive")
        if sha256 is not None and not SHA256_HEX.fullmatch(sha256):
            raise InvalidRequest("sha256 must be 64 lowercase hex digits")
        size = self.chunk_size_for(max(length, 0), chunk_size)
        if -(-length // size) > MAX_CHUNKS:
            raise TooLarge(f"{length} bytes do not fit in {MAX_CHUNKS} chunks of at most {size} bytes")
        return await self._service.create(
            length=length,
            metadata=metadata,
            caller=caller,
            chunk_size=size,
            sha256=sha256,
        )

    async def put(
        self,
        session_id: str,
        number: int,
        body: AsyncIterable[bytes],
        *,
        caller: Caller | None = None,
        content_length: int | None = None,
        checksum: Checksum | None = None,
    ) -> tuple[StoredChunk, bool]:
        """Store chunk `number` and return it, and whether it is new.

        The same bytes again are a success that changes nothing; other bytes for a stored
        chunk raise ChunkConflict. A body that breaks off, or does not match `checksum`
        or the chunk's size, stores nothing. A newer request for the same chunk (a retry
        after a lost connection) preempts an older one still waiting for its bytes.
        """
        info = await self._session(session_id, caller)
        if info.is_complete:
            raise UploadComplete("the session is complete; its chunks can no longer change")
        if not 1 <= number <= info.chunk_count:
            raise InvalidRequest(f"no chunk {number}: this session has chunks 1 to {info.chunk_count}")
        expected = info.chunk_length(number)
        if content_length is not None and content_length != expected:
            raise InvalidRequest(
                f"chunk {number} has {expected} bytes, not {content_length}", expected_size=expected
            )
        digester = Digester({"sha256"} | ({checksum.algorithm} if checksum else set()))
        async with self._service.hold(session_id, caller, chunk=number) as hold:
            stored = await self._storage.stored_chunks(info, number)
            if stored:
                size = await hold.run(pump(body, _NOWHERE, limit=expected, digester=digester))
                chunk = _verified(number, size, expected, digester, checksum)
                if chunk != stored[0]:
                    raise ChunkConflict(f"chunk {number} is already stored with other bytes")
                return chunk, False
            async with self._storage.chunk_writer(info, number) as writer:
                size = await hold.run(pump(body, writer, limit=expected, digester=digester))
                chunk = _verified(number, size, expected, digester, checksum)
                await writer.commit(chunk)
        self._service.emit(UploadEvent.CHUNK, info)
        self._notify(session_id, (UploadEvent.CHUNK, chunk))
        self._share(
            UploadEvent.CHUNK,
            session_id,
            {"number": chunk.number, "size": chunk.size, "sha256": chunk.sha256},
        )
        hooks = self._service.hooks
        if hooks is not None and hooks.progress_due(session_id):
            hooks.progress_later(session_id, self._progress_of(info), caller)
        return chunk, True

    async def _progress_of(self, info: UploadInfo) -> tuple[UploadInfo, dict[str, object]]:
        """The session as a post-receive reports it: the bytes and chunks stored so far."""
        chunks = await self._storage.stored_chunks(info)
        snapshot = replace(info, offset=sum(c.size for c in chunks), stored_state=None)
        return snapshot, {
            "Chunks": {"Size": info.chunk_size, "Count": info.chunk_count, "Stored": len(chunks)}
        }

    async def status(self, session_id: str, caller: Caller | None = None) -> ChunkStatus:
        info = await self._session(session_id, caller)
        chunks = await self._storage.stored_chunks(info)
        info.updated_at = max([info.updated_at, *(c.stored_at for c in chunks)])  # for the expiry
        return ChunkStatus(info, chunks)

    async def complete(self, session_id: str, caller: Caller | None = None) -> UploadInfo:
        """Assemble a session whose chunks are all stored; again, the same answer.

        A declared whole-file sha256 that does not match means no single chunk can be
        blamed or replaced: the session is removed and the client starts over.
        """
        async with self._service.hold(session_id, caller):
            info = await self._session(session_id, caller)
            if info.finish_pending:  # assembled, but the pre-finish hook was down
                await self._service.finish(info, caller)
            if info.is_complete:
                return info
            status = ChunkStatus(info, await self._storage.stored_chunks(info))
            if status.missing:
                raise ChunksMissing(
                    f"{info.chunk_count - len(status.chunks)} of {info.chunk_count} chunks are missing",
                    missing=status.missing,
                )
            intent = await self._service.intend_finish(info, caller)
            try:
                await self._storage.assemble(info, status.chunks, info.sha256)
            except ChecksumMismatch:
                intact = False
                if intent is not None:
                    await intent.not_made()
            except BaseException:
                if intent is not None:
                    await intent.undecided()
                raise
            else:
                intact = True
                info.offset = status.stored_bytes
                await self._service.finish(info, caller, intent=intent)
        if not intact:
            await self._service.terminate(session_id)
            raise ChecksumMismatch(
                "the assembled file does not match the declared sha256; the session was removed"
            )
        return info

    def writing(self, session_id: str) -> list[int]:
        """The chunks being written through this process right now (for the console)."""
        return self._service.locks.chunks_held(session_id)

    def expires_at(self, info: UploadInfo) -> float | None:
        return self._service.expires_at(info)

    def is_expired(self, info: UploadInfo) -> bool:
        return self._service.is_expired(info)

    async def abort(self, session_id: str, caller: Caller | None = None) -> None:
        await self._session(session_id, caller)
        await self._service.terminate(session_id, caller)

    @asynccontextmanager
    async def watch(self, session_id: str) -> AsyncIterator[asyncio.Queue[ChunkEvent]]:
        """Events of one session in this process, in the order they happened."""
        queue: asyncio.Queue[ChunkEvent] = asyncio.Queue()
        self._watchers.setdefault(session_id, set()).add(queue)
        try:
            yield queue
        finally:
            watchers = self._watchers[session_id]
            watchers.discard(queue)
            if not watchers:
                del self._watchers[session_id]

    async def follow(
        self, session_id: str, caller: Caller | None = None
    ) -> AsyncIterator[ChunkStatus | ChunkStored | SessionEnded | StillHere]:
        """A status snapshot, then every change in the order it happened, until the session ends.

        Changes made in this process (or shared by the coordinator) arrive at once; chunks
        stored through another instance are found by polling the status every POLL_SECONDS,
        each poll yielding StillHere after what it found.
        """
        async with self.watch(session_id) as queue:
            try:
                status = await self.status(session_id, caller)
            except UploadError as error:
                yield SessionEnded(_ended_by(error), None)
                return
            yield ChunkStatus(status.info, list(status.chunks))
            tracker = _Tracker(status)
            loop = asyncio.get_running_loop()
            poll_at = loop.time() + POLL_SECONDS
            while not tracker.status.info.is_complete:
                try:
                    kind, subject = await asyncio.wait_for(queue.get(), max(0.0, poll_at - loop.time()))
                except TimeoutError:
                    poll_at = loop.time() + POLL_SECONDS
                    for news in await self._poll(session_id, caller, tracker):
                        yield news
                        if isinstance(news, SessionEnded):
                            return
                    continue
                if isinstance(subject, StoredChunk):
                    if (stored := tracker.add(subject)) is not None:
                        yield stored
                    continue
                yield SessionEnded(kind, subject)
                return
            yield SessionEnded(UploadEvent.COMPLETED, tracker.status.info)

    async def _poll(
        self, session_id: str, caller: Caller | None, tracker: _Tracker
    ) -> list[ChunkStored | SessionEnded | StillHere]:
        """What a look at the stored status finds that the follower has not heard of."""
        try:
            status = await self.status(session_id, caller)
        except UploadError as error:
            # Gone past its expiry: another instance expired it between two polls.
            expired = self.is_expired(tracker.status.info)
            return [SessionEnded(UploadEvent.EXPIRED if expired else _ended_by(error), None)]
        found: list[ChunkStored | SessionEnded | StillHere] = []
        for chunk in status.chunks:
            if (stored := tracker.add(chunk)) is not None:
                found.append(stored)
        tracker.status.info = status.info
        return [*found, StillHere()]

    # -- internals ---------------------------------------------------------------

    async def _session(self, session_id: str, caller: Caller | None) -> UploadInfo:
        info = await self._service.peek(session_id, caller)
        if info.chunk_size is None:
            raise NotAppendable("this upload is not a chunk session")
        return info

    def _on_event(self, event: UploadEvent, info: UploadInfo) -> None:
        if info.chunk_size is not None and event in SESSION_ENDINGS:
            self._notify(info.id, (event, info))
            self._share(event, info.id, {"record": info.to_record(), "offset": info.offset})

    def _share(self, event: UploadEvent, session_id: str, data: dict[str, object]) -> None:
        """Event streams on other instances hear of it too (through the coordinator)."""
        if self._coordinator is not None:
            self._coordinator.publish(event, session_id, data)

    def _on_remote_event(self, event: str, session_id: str, data: dict[str, Any]) -> None:
        """What another instance shared, for this instance's watchers of the session."""
        if session_id not in self._watchers:
            return
        kind = UploadEvent(event)
        if kind is UploadEvent.CHUNK:
            self._notify(session_id, (kind, StoredChunk(data["number"], data["size"], data["sha256"])))
        elif kind in SESSION_ENDINGS:
            self._notify(session_id, (kind, UploadInfo.from_record(data["record"], data["offset"])))

    def _notify(self, session_id: str, event: ChunkEvent) -> None:
        for queue in self._watchers.get(session_id, ()):
            queue.put_nowait(event)


class _Tracker:
    """The session as a follower knows it: each chunk counted once, however it was heard of."""

    def __init__(self, status: ChunkStatus) -> None:
        self.status = ChunkStatus(status.info, list(status.chunks))
        self._numbers = {c.number for c in status.chunks}

    def add(self, chunk: StoredChunk) -> ChunkStored | None:
        if chunk.number in self._numbers:
            return None
        self._numbers.add(chunk.number)
        self.status.chunks.append(chunk)
        status = self.status
        return ChunkStored(
            chunk, len(status.chunks), status.info.chunk_count, status.stored_bytes, status.fraction
        )


def _ended_by(error: UploadError) -> UploadEvent:
    """How a session a follower finds gone ended: expired, or removed."""
    return UploadEvent.EXPIRED if isinstance(error, UploadGone) else UploadEvent.TERMINATED


class _Nowhere:
    """A sink for a repeated chunk: only its digest matters."""

    async def write(self, blocks: Sequence[bytes]) -> None:
        return None


_NOWHERE = _Nowhere()


def _verified(
    number: int, size: int, expected: int, digester: Digester, checksum: Checksum | None
) -> StoredChunk:
    """The chunk that arrived, if it is whole and matches the client's checksum."""
    if size != expected:
        raise InvalidRequest(
            f"chunk {number} has {expected} bytes, only {size} arrived", expected_size=expected
        )
    if checksum is not None and not digester.matches(checksum):
        raise ChecksumMismatch(f"chunk {number} does not match its digest; nothing was stored")
    return StoredChunk(number, size, digester.hexdigest("sha256"))


def _ranges(numbers: list[int]) -> list[tuple[int, int]]:
    """[1, 2, 3, 7, 9, 10] -> [(1, 3), (7, 7), (9, 10)]"""
    ranges: list[tuple[int, int]] = []
    for n in numbers:
        if ranges and ranges[-1][1] == n - 1:
            ranges[-1] = (ranges[-1][0], n)
        else:
            ranges.append((n, n))
    return ranges
