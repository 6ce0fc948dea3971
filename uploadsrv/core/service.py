"""The upload service: every protocol's uploads live and die here.

It owns offsets, limits, checksums, per-upload locks, completion and expiry; the
protocols translate HTTP into these calls and the backend stores the bytes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import Any

from .caller import Caller
from .capabilities import Capabilities
from .checksums import ALGORITHMS, Checksum, Digester
from .coordination import Coordinator
from .errors import (
    HookInvalid,
    HookUnavailable,
    InvalidRequest,
    NotReady,
    Superseded,
    TooLarge,
    UploadBusy,
    UploadExists,
    UploadGone,
    UploadNotFound,
)
from .events import Listener, UploadEvent
from .hooks import EventIntent, Hook, HookAnswer, Hooks, Progress
from .locks import Hold, UploadLocks
from .model import UploadInfo, is_upload_id, new_upload_id
from .pump import AfterWrite, pump
from .quotas import OwnerQuotas
from .rules import AppendRequest, check_digest, check_length, declared_length, may_finish, plan_append
from .storage import Orphan, Storage, StoredChunk, Writer

log = logging.getLogger("uploadsrv.core")

PROGRESS_BYTES = 4 << 20  #: report durable progress at least every this many bytes...
PROGRESS_SECONDS = 1.0  #: ...or this often, whichever comes first
OWNED_CACHE = 16384  #: (owner, upload id) pairs remembered, so an owner's requests skip a record read


class UploadService:
    def __init__(
        self,
        storage: Storage,
        *,
        max_size: int,
        expiry: float | None,
        lock_timeout: float = 10.0,
        enforce_owners: bool = False,
        quotas: OwnerQuotas | None = None,
        hooks: Hooks | None = None,
        max_metadata_size: int = 4 << 10,
        clock: Callable[[], float] = time.time,
        coordinator: Coordinator | None = None,
        capabilities: Capabilities | None = None,
    ) -> None:
        """With `enforce_owners` (auth is on), an upload is visible only to its owner;
        `quotas` limits each owner's unfinished uploads;
        `hooks` tells the application what happens and asks it where it decides;
        `capabilities` is the backend's record, if the caller took it already."""
        self.storage = storage
        #: Shared with other instances (Redis), if configured: leases and events.
        self.coordinator = coordinator
        self.max_size = max_size
        self.max_metadata_size = max_metadata_size
        self.expiry = expiry
        #: What the backend can do beyond the core contract, checked once.
        self.capabilities = capabilities or Capabilities.of(storage)
        self.locks = UploadLocks(
            storage, timeout=lock_timeout, coordinator=coordinator, fenced=self.capabilities.fenced
        )
        self.enforce_owners = enforce_owners
        self.quotas = quotas
        self.hooks = hooks
        if hooks is not None and hooks.sender is not None:
            hooks.sender.resolve = self._change_made
        self._clock = clock
        self._listeners: list[Listener] = []
        self._owned: OrderedDict[tuple[str | None, str], None] = OrderedDict()

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def emit(self, event: UploadEvent, info: UploadInfo) -> None:
        """Tell the listeners (metrics, event streams) what happened to an upload."""
        for listener in self._listeners:
            listener(event, info)

    # -- lifecycle ---------------------------------------------------------------

    async def create(
        self,
        *,
        length: int | None,
        metadata: dict[str, str | None] | None = None,
        caller: Caller | None = None,
        partial: bool = False,
        chunk_size: int | None = None,
        sha256: str | None = None,
    ) -> UploadInfo:
        """Register a new, empty upload owned by the caller; `length=None` defers the length.

        With `chunk_size` it is a chunk session (see `ChunkSessions`), whose declared
        `sha256` is checked on completion.
        """
        info = self._new(length, metadata, caller, partial=partial, chunk_size=chunk_size, sha256=sha256)
        if self.quotas is not None and info.owner is not None:
            await self.quotas.reserve_upload(info.owner, self._unfinished_of)
        try:
            await self._create_record(info, caller)
        except BaseException:
            await self._upload_ended(info)
            raise
        if info.owner is not None:
            self._remember((info.owner, info.id))
        self.emit(UploadEvent.CREATED, info)
        log.debug("upload created", extra={"upload_id": info.id, "length": length, "protocol": info.protocol})
        if info.is_complete:  # a zero-byte upload is done at once
            await self.finish(info, caller)
        return info

    async def concatenate(
        self,
        part_ids: Sequence[str],
        *,
        metadata: dict[str, str | None] | None = None,
        caller: Caller | None = None,
    ) -> UploadInfo:
        """A new, complete upload made of finished partial uploads, joined by the backend.

        A part the caller may not see is reported exactly as one that does not exist."""
        joiner = self.capabilities.concatenation
        if joiner is None:
            raise InvalidRequest("this storage cannot concatenate uploads")
        if not part_ids:
            raise InvalidRequest("a concatenation needs at least one part")
        parts = []
        for part_id in part_ids:
            try:
                part = await self._live(part_id, caller)
            except (UploadNotFound, UploadGone):
                raise InvalidRequest(f"part {part_id} does not exist") from None
            if not (part.partial and part.is_complete):
                raise InvalidRequest(f"part {part_id} is not a finished partial upload")
            parts.append(part)
        total = sum(part.offset for part in parts)
        info = self._new(total, metadata, caller, parts=list(part_ids))

        async def join() -> None:
            try:
                await joiner.concatenate(info, parts)
            except BaseException:
                await self.storage.delete(info.id)
                raise

        await self._create_record(info, caller, then=join)
        info.offset = total
        self.emit(UploadEvent.CREATED, info)
        await self.finish(info, caller)
        return info

    async def get(self, upload_id: str, caller: Caller | None = None) -> UploadInfo:
        """The upload's state; a stale request still holding it is stopped first. An upload
        whose pre-finish hook was down is finished now, if the hook answers this time."""
        async with self.hold(upload_id, caller):
            info = await self._live(upload_id, caller)
            if info.finish_pending:
                await self.finish(info, caller)
            return info

    async def peek_any(self, upload_id: str) -> UploadInfo:
        """The upload's state, expired or not (for operators)."""
        return await self.storage.get(self._known(upload_id))

    async def peek(self, upload_id: str, caller: Caller | None = None) -> UploadInfo:
        """The upload's state without taking its lock (downloads, listings)."""
        return await self._live(upload_id, caller)

    def hold(
        self, upload_id: str, caller: Caller | None, *, chunk: int | None = None
    ) -> AbstractAsyncContextManager[Hold]:
        """The upload's lock, for a caller allowed to act on it: taking the lock stops the
        request holding it, which only the upload's owner may do."""
        return _Authorized(self, upload_id, caller, chunk)

    async def append(
        self,
        upload_id: str,
        offset: int,
        body: AsyncIterable[bytes],
        *,
        caller: Caller | None = None,
        content_length: int | None = None,
        length: int | None = None,
        checksum: Checksum | None = None,
        trailer_checksum: Callable[[], Checksum | None] | None = None,
        progress: Callable[[int], Awaitable[None]] | None = None,
        complete: bool = False,
        replay_finished: bool = False,
    ) -> UploadInfo:
        """Append `body` at `offset` and return the upload's new state.

        `length` declares a deferred length. With `checksum` (or `trailer_checksum`, read
        after the body) the body is verified and stored only if it matches; without,
        every byte that arrived is kept even if the request breaks off, so the client
        resumes from there, and `progress` is called with the durable offset every few
        MiB or second while the body streams in. `complete` says this body ends the
        upload: a deferred length becomes the final offset, and a known one must match.
        An upload already complete at `offset` takes a repeated final request as a replay
        and answers its final state; with `replay_finished` (the IETF draft), so does any
        request to a finished upload that would otherwise conflict with it. The rules are
        `plan_append`; this method does the I/O.
        """
        ask = AppendRequest(offset, content_length, length, complete, replay_finished)
        async with self._settling() as finishing:
            async with self.hold(upload_id, caller) as hold:
                info = await self._appendable(upload_id, caller)
                plan = plan_append(info, ask, self.max_size)
                if plan.replay:
                    return info  # a repeated final request: nothing to store
                was_complete = info.is_complete
                await self._apply_length(info, plan.length)
                finishing.intent = await self._finish_intent(info, ask, caller)
                body_checksum = _BodyChecksum(checksum, trailer_checksum)
                await self._store(info, body, hold, plan.limit, caller, body_checksum, progress)
                if complete and info.length is None:  # a chunked body ended the upload
                    await self._declare_length(info, info.offset)
            await self._stored(info, caller, was_complete, finishing)
        return info

    @asynccontextmanager
    async def _settling(self) -> AsyncIterator[_Finishing]:
        """The request's post-finish intent, if it wrote one, settled however it ends:
        `finish` takes it; left over, the body ended short (not made) or an error left
        the bytes in doubt (the outbox finds out)."""
        finishing = _Finishing()
        try:
            yield finishing
        except BaseException:
            if finishing.intent is not None:
                await finishing.intent.undecided()
            raise
        if finishing.intent is not None:
            await finishing.intent.not_made()

    async def _appendable(self, upload_id: str, caller: Caller | None) -> UploadInfo:
        """The live upload, its pending finish asked again first (its pre-finish hook was down)."""
        info = await self._live(upload_id, caller)
        if info.finish_pending:
            await self.finish(info, caller)
        return info

    async def _apply_length(self, info: UploadInfo, length: int | None) -> None:
        """Record a length the request declared, before any byte of it is stored."""
        if length != info.length:
            info.length = length
            await self.storage.update(info)

    async def _store(
        self,
        info: UploadInfo,
        body: AsyncIterable[bytes],
        hold: Hold,
        limit: int,
        caller: Caller | None,
        checksum: _BodyChecksum,
        progress: Callable[[int], Awaitable[None]] | None,
    ) -> None:
        """The body into the backend: all or nothing when a checksum decides, else every
        byte that arrives; a post-receive hook follows it and may stop it."""
        receiving = self._receiving(info, caller, hold)
        try:
            if checksum.announced:
                await self._store_verified(info, body, hold, limit, checksum, receiving)
            else:
                await self._store_streaming(info, body, hold, limit, progress, receiving)
        except Superseded:
            if receiving is not None and receiving.stopped is not None:
                await self._stop(info, receiving.stopped)
            raise
        if receiving is not None:
            receiving.ended(info.offset)

    async def _stored(
        self, info: UploadInfo, caller: Caller | None, was_complete: bool, finishing: _Finishing
    ) -> None:
        """After the lock: finish an upload this request completed."""
        if info.is_complete and not was_complete:
            intent, finishing.intent = finishing.intent, None  # finish settles it
            await self.finish(info, caller, intent=intent)
        elif was_complete:  # an empty request to a finished upload: the backend's step is safe to repeat
            await self.storage.finish(info)

    async def _store_verified(
        self,
        info: UploadInfo,
        body: AsyncIterable[bytes],
        hold: Hold,
        limit: int,
        checksum: _BodyChecksum,
        receiving: Progress | None,
    ) -> None:
        """Store `body` only if it matches its checksum; otherwise nothing of it. A
        post-receive hook (`receiving`) reports the bytes that arrived meanwhile."""
        digester = checksum.digester()
        async with self.storage.writer(info, transactional=True) as writer:
            try:
                await hold.run(pump(body, writer, limit=limit, digester=digester, after_write=receiving))
                check_digest(digester, checksum.expected())
            except BaseException:
                await writer.discard()
                raise
            info.offset = await writer.commit()
        self._after_append(info)

    async def _store_streaming(
        self,
        info: UploadInfo,
        body: AsyncIterable[bytes],
        hold: Hold,
        limit: int,
        progress: Callable[[int], Awaitable[None]] | None,
        receiving: Progress | None,
    ) -> None:
        """Store `body`, keeping every byte that arrived even if the request breaks off;
        `progress` and a post-receive hook (`receiving`) follow the bytes as they arrive."""
        async with self.storage.writer(info, transactional=False) as writer:
            reporter = None if progress is None else _ProgressReporter(writer, progress, info.offset)
            after_write = _both(reporter, receiving)
            try:
                await hold.run(pump(body, writer, limit=limit, digester=None, after_write=after_write))
            except BaseException:
                info.offset = await writer.commit()
                self._after_append(info)
                raise
            info.offset = await writer.commit()
        self._after_append(info)

    async def terminate(self, upload_id: str, caller: Caller | None = None) -> None:
        """Delete the upload and its bytes, expired or not; a request writing to it is stopped first."""
        async with self.hold(upload_id, caller):
            info = await self.storage.get(upload_id)
            if not self._permits(caller, info):
                raise UploadNotFound()
            if self.hooks is not None and caller is not None:  # the server's own cleanup asks no one
                await self.hooks.pre_terminate(info, caller)
            await self._remove(info, caller)

    async def _remove(self, info: UploadInfo, caller: Caller | None) -> None:
        """Delete the upload (its lock is held) and report it as terminated."""
        async with self._recording(Hook.POST_TERMINATE, info, caller):
            await self.storage.delete(info.id)
        if not info.is_complete:
            await self._upload_ended(info)
        self.emit(UploadEvent.TERMINATED, info)
        log.info("upload terminated", extra={"upload_id": info.id})

    def read(self, info: UploadInfo, start: int, end: int) -> AsyncIterator[bytes]:
        """Stream bytes [start, end) of a finished upload."""
        if not info.is_complete:
            raise NotReady("the upload is not complete yet")
        return self.storage.read(info, start, end)

    async def download_url(self, info: UploadInfo) -> str | None:
        """Where else the finished upload can be fetched (a presigned URL), if anywhere."""
        presigning = self.capabilities.presigning
        if not info.is_complete or presigning is None:
            return None
        return await presigning.download_url(info)

    async def stored_chunks(self, info: UploadInfo) -> list[StoredChunk]:
        """A chunk session's stored chunks (none for other uploads)."""
        chunks = self.capabilities.chunks
        if info.chunk_size is None or chunks is None:
            return []
        return await chunks.stored_chunks(info)

    # -- housekeeping (the operator CLI) -----------------------------------------

    async def storage_details(self, upload_id: str) -> dict[str, object] | None:
        """What the backend can tell about one upload (paths, S3 parts), if it can."""
        housekeeping = self.capabilities.housekeeping
        return None if housekeeping is None else await housekeeping.describe(self._known(upload_id))

    async def orphans(self, older_than: float) -> AsyncIterator[Orphan]:
        """Leftovers in storage that no upload owns, untouched for `older_than` seconds."""
        if self.capabilities.housekeeping is not None:
            async for orphan in self.capabilities.housekeeping.orphans(older_than):
                yield orphan

    async def remove_orphan(self, orphan: Orphan) -> None:
        if self.capabilities.housekeeping is not None:
            await self.capabilities.housekeeping.remove_orphan(orphan)

    # -- expiry ------------------------------------------------------------------

    def expires_at(self, info: UploadInfo) -> float | None:
        """When an unfinished upload expires (it slides with activity); finished ones do not."""
        if self.expiry is None or info.is_complete:
            return None
        return info.updated_at + self.expiry

    def is_expired(self, info: UploadInfo) -> bool:
        expires = self.expires_at(info)
        return expires is not None and expires <= self._clock()

    def state_of(self, info: UploadInfo) -> str:
        """'complete', 'expired' or 'incomplete'."""
        if info.is_complete:
            return "complete"
        return "expired" if self.is_expired(info) else "incomplete"

    async def uploads(self) -> AsyncIterator[UploadInfo]:
        """Every upload the storage holds, for listings."""
        async for upload_id in self.storage.upload_ids():
            try:
                info = await self.storage.get(upload_id)
                if self.is_expired(info):
                    await self._note_chunk_activity(info)
            except UploadNotFound:
                continue  # removed while listing
            yield info

    async def _unfinished_of(self, owner: str) -> int:
        """How many unfinished uploads of `owner` storage holds (per-owner limits)."""
        return sum([1 async for info in self.uploads() if info.owner == owner and not info.is_complete])

    async def prune(
        self, idle_for: float, *, include_complete: bool = False, dry_run: bool = False
    ) -> AsyncIterator[tuple[UploadInfo | str, bool, int]]:
        """Remove uploads with no activity for `idle_for` seconds, unfinished ones only
        unless `include_complete`. Yields `(upload, removed, bytes it stored)`; an upload
        being written right now is never touched and is yielded as `(id, False, 0)`.

        Each upload is checked and removed under its lock, so an interrupted prune leaves
        every remaining upload intact and can simply run again.
        """
        cutoff = self._clock() - idle_for
        async for upload_id in self.storage.upload_ids():
            await asyncio.sleep(0)  # a backend may answer without yielding; requests go first
            try:
                async with self.locks.hold(upload_id, preempt=False):
                    pruned = await self._prune_one(upload_id, cutoff, include_complete, dry_run)
            except UploadBusy:
                yield upload_id, False, 0
                continue
            except UploadNotFound:
                continue
            if pruned is not None:
                yield pruned

    async def _prune_one(
        self, upload_id: str, cutoff: float, include_complete: bool, dry_run: bool
    ) -> tuple[UploadInfo, bool, int] | None:
        """Remove one upload (its lock is held) if it is idle since `cutoff`; None if it stays."""
        info = await self.storage.get(upload_id)
        if not await self._idle_since(info, cutoff) or (info.is_complete and not include_complete):
            return None
        if await self._chunks_busy(info):  # chunks take their own locks, not this one
            raise UploadBusy()
        stored = await self.stored_bytes(info)
        if not dry_run:
            async with self._recording(Hook.POST_EXPIRE, info, None, when=not info.is_complete):
                await self.storage.delete(upload_id)
        return info, not dry_run, stored

    async def _idle_since(self, info: UploadInfo, cutoff: float) -> bool:
        """Whether nothing happened to the upload after `cutoff`, its stored chunks included."""
        if info.updated_at <= cutoff:
            await self._note_chunk_activity(info)
        return info.updated_at <= cutoff

    async def expire(self) -> list[str]:
        """Delete every expired upload not being written right now; returns their ids."""
        if self.expiry is None:
            return []
        removed = []
        async for info, deleted, _ in self.prune(self.expiry):
            if deleted and isinstance(info, UploadInfo):
                removed.append(info.id)
                await self._upload_ended(info)
                self.emit(UploadEvent.EXPIRED, info)
                log.info("upload expired", extra={"upload_id": info.id})
        return removed

    # -- internals ---------------------------------------------------------------

    def _new(
        self,
        length: int | None,
        metadata: dict[str, str | None] | None,
        caller: Caller | None,
        **kind: object,
    ) -> UploadInfo:
        """A new upload's record, its length and metadata checked against the limits."""
        if length is not None:
            check_length(length, self.max_size)
        if metadata and metadata_size(metadata) > self.max_metadata_size:
            raise TooLarge(f"metadata is over {self.max_metadata_size} bytes (as Upload-Metadata)")
        now = self._clock()
        return UploadInfo(
            id=new_upload_id(),
            length=length,
            metadata=metadata or {},
            owner=caller.owner if caller else None,
            protocol=caller.protocol if caller else "tus",
            created_at=now,
            updated_at=now,
            **kind,  # type: ignore[arg-type]  # the callers' keyword arguments, passed through
        )

    def _permits(self, caller: Caller | None, info: UploadInfo) -> bool:
        """Whether `caller` may act on the upload: its owner may, and so may a signed URL of
        the owner's for this upload, until the URL's expiry or the upload's, the later."""
        if caller is None or not self.enforce_owners:
            return True
        if caller.owner is None or caller.owner != info.owner:
            return False
        if caller.grant is None or caller.grant_expires is None:
            return caller.grant in (None, info.id)
        now = self._clock()
        upload_expires = self.expires_at(info)
        return caller.grant == info.id and (
            caller.grant_expires > now or (upload_expires is not None and upload_expires > now)
        )

    async def _authorize(self, upload_id: str, caller: Caller | None) -> None:
        """Check, before its lock is taken, that the caller may act on the upload.

        Only pairs that passed are remembered, so anyone else's request reads the record
        every time, as it does for an id that does not exist: no faster answer for a real one.
        """
        if caller is None or not self.enforce_owners:
            return
        key = (caller.owner, upload_id)
        if key in self._owned and caller.grant in (None, upload_id):
            self._owned.move_to_end(key)
            return
        if not self._permits(caller, await self.storage.get(upload_id)):
            raise UploadNotFound()
        self._remember(key)

    async def _upload_ended(self, info: UploadInfo) -> None:
        """An unfinished upload finished or went away: it no longer counts against its owner."""
        if self.quotas is not None and info.owner is not None:
            await self.quotas.upload_ended(info.owner)

    def _remember(self, key: tuple[str | None, str]) -> None:
        self._owned[key] = None
        if len(self._owned) > OWNED_CACHE:
            self._owned.popitem(last=False)

    def _known(self, upload_id: str) -> str:
        if not is_upload_id(upload_id):
            raise UploadNotFound()
        return upload_id

    async def _live(self, upload_id: str, caller: Caller | None = None) -> UploadInfo:
        """The upload, if it exists, has not expired and the caller may see it: one that
        the caller may not see is not found, through the same steps as an unknown one."""
        info = await self.storage.get(self._known(upload_id))
        if not self._permits(caller, info):
            raise UploadNotFound()
        if self.is_expired(info):
            await self._note_chunk_activity(info)
            if self.is_expired(info):
                raise UploadGone()
        return info

    async def _chunks_busy(self, info: UploadInfo) -> bool:
        """A chunk leased through the coordinator, or locked in the backend."""
        chunks = self.capabilities.chunks
        if info.chunk_size is None or chunks is None:
            return False
        if self.coordinator is not None and await self.coordinator.chunks_busy(info.id):
            return True
        return await chunks.chunks_busy(info)

    async def stored_bytes(self, info: UploadInfo) -> int:
        """Bytes the upload holds: its offset, or for a chunk session not yet assembled
        (offset 0 until then) the sizes of its stored chunks."""
        if info.chunk_size is None or info.is_complete:
            return info.offset
        return sum(chunk.size for chunk in await self.stored_chunks(info))

    async def _note_chunk_activity(self, info: UploadInfo) -> None:
        """A chunk session's stored chunks are activity its record does not show (they
        arrive in parallel, and a shared record would need a write per chunk). Asked only
        when the record alone says the session is idle, so it costs nothing on busy ones."""
        for chunk in await self.stored_chunks(info):
            info.updated_at = max(info.updated_at, chunk.stored_at)

    async def _declare_length(self, info: UploadInfo, length: int) -> None:
        """Set a deferred length once the body showed it."""
        info.length = declared_length(info.length, length, info.offset, self.max_size)
        await self.storage.update(info)

    def _after_append(self, info: UploadInfo) -> None:
        info.updated_at = self._clock()
        self.emit(UploadEvent.APPENDED, info)

    async def finish(
        self,
        info: UploadInfo,
        caller: Caller | None = None,
        *,
        asked: bool = False,
        intent: EventIntent | None = None,
    ) -> None:
        """The upload reached its length: ask the pre-finish hook (unless `asked` already),
        let the backend finalise it, and tell listeners. `intent` is the post-finish the
        request committed before its bytes (`_finish_intent`), if it did.

        A pre-finish hook that cannot be reached leaves the upload unfinished, marked so,
        and raises: the next request for it asks again (503 until then).
        """
        if self.hooks is not None and not asked:
            try:
                await self.hooks.pre_finish(info, caller)
            except (HookUnavailable, HookInvalid):
                if not info.finish_pending:
                    info.finish_pending = True
                    await self.storage.update(info)
                if intent is not None:
                    await intent.not_made()
                raise
        async with self._recording(Hook.POST_FINISH, info, caller, intent=intent):
            if info.finish_pending:
                info.finish_pending = False
                await self.storage.update(info)
            await self.storage.finish(info)
        if not info.is_final:  # a concatenation result was never an unfinished upload
            await self._upload_ended(info)
        self.emit(UploadEvent.COMPLETED, info)
        log.info("upload completed", extra={"upload_id": info.id, "length": info.length})

    # -- hooks -------------------------------------------------------------------

    async def _create_record(
        self, info: UploadInfo, caller: Caller | None, *, then: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Ask the pre-create hook (it may refuse, or change the id and metadata), then
        store, and do `then` (a concatenation's join): post-create reports both."""
        if self.hooks is not None:
            await self.hooks.pre_create(info, caller)
        async with self._recording(Hook.POST_CREATE, info, caller):
            try:
                await self.storage.create(info)
            except UploadExists:
                if self.hooks is None:
                    raise
                raise HookInvalid(
                    f"the pre-create hook chose the id of an existing upload, {info.id}"
                ) from None
            if then is not None:
                await then()

    def _recording(
        self,
        hook: Hook,
        info: UploadInfo,
        caller: Caller | None,
        *,
        when: bool = True,
        intent: EventIntent | None = None,
    ) -> AbstractAsyncContextManager[None]:
        """A durable hook event committed before the change the block makes (`when` it
        is due), delivered after it: no crash in between loses it."""
        if self.hooks is None or not when:
            return nullcontext()
        return self.hooks.recording(hook, info, caller, intent=intent)

    async def _finish_intent(
        self, info: UploadInfo, ask: AppendRequest, caller: Caller | None
    ) -> EventIntent | None:
        """The post-finish of a request that may finish the upload, committed before its
        bytes: a byte written to disk counts as stored (after a crash too), so the change
        the event reports happens while the body arrives."""
        if not may_finish(info, ask):
            return None
        return await self.intend_finish(info, caller)

    async def intend_finish(self, info: UploadInfo, caller: Caller | None) -> EventIntent | None:
        """The post-finish of a change that is to finish the upload (its last bytes, a chunk
        session's assembly), committed before it; pass it to `finish`, or settle it."""
        length = info.length
        if self.hooks is None or length is None:
            return None
        finished = dataclasses.replace(info, offset=length, stored_state=None)
        return await self.hooks.intend(Hook.POST_FINISH, finished, caller)

    async def _change_made(self, record: dict[str, object]) -> bool | None:
        """Whether the change a durable event's intent announced was made (asked by the
        outbox about an intent nobody holds: its writer died, or failed midway); None
        while the upload is busy. A finish whose bytes are all stored is completed here."""
        hook, upload_id = Hook(str(record["hook"])), str(record["upload_id"])
        try:
            async with self.locks.hold(upload_id, preempt=False):
                info = await self.storage.get(upload_id)
                if info.created_at != record["upload_created_at"]:  # another upload took the id
                    return hook in (Hook.POST_TERMINATE, Hook.POST_EXPIRE)
                if hook == Hook.POST_FINISH:
                    return await self._finish_found(info)
                return hook == Hook.POST_CREATE
        except UploadBusy:
            return None
        except UploadNotFound:
            return hook in (Hook.POST_TERMINATE, Hook.POST_EXPIRE)

    async def _finish_found(self, info: UploadInfo) -> bool:
        """An upload whose post-finish intent was left: finished if all its bytes are
        stored and its pre-finish hook agrees (asked again: its answer may have been lost)."""
        if not info.is_complete or info.finish_pending:
            return False
        if self.hooks is not None:
            try:
                await self.hooks.pre_finish(info, None)
            except (HookUnavailable, HookInvalid):
                info.finish_pending = True  # the next request asks again, and records it anew
                await self.storage.update(info)
                return False
        await self.storage.finish(info)  # safe to repeat
        return True

    def _receiving(self, info: UploadInfo, caller: Caller | None, hold: Hold) -> Progress | None:
        """The request's post-receive reports; a StopUpload answer stops the request."""
        return None if self.hooks is None else self.hooks.receiving(info, caller, hold.preempt)

    async def _stop(self, info: UploadInfo, answer: HookAnswer) -> None:
        """A post-receive hook said StopUpload: the upload goes, the client gets the hook's answer."""
        await self._remove(info, None)
        raise answer.refusal(400, "upload has been stopped by server")


class _Authorized:
    """`UploadService.hold` as a class, not a generator: every request on an upload takes one."""

    __slots__ = ("_caller", "_chunk", "_held", "_service", "_upload_id")

    def __init__(
        self, service: UploadService, upload_id: str, caller: Caller | None, chunk: int | None
    ) -> None:
        self._service, self._upload_id, self._caller, self._chunk = service, upload_id, caller, chunk

    async def __aenter__(self) -> Hold:
        service = self._service
        await service._authorize(service._known(self._upload_id), self._caller)
        self._held = service.locks.hold(self._upload_id, chunk=self._chunk)
        return await self._held.__aenter__()

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        return await self._held.__aexit__(*exc_info)


@dataclasses.dataclass(frozen=True)
class _BodyChecksum:
    """The checksum a body announced: in a header, or in a trailer read after the body."""

    header: Checksum | None
    trailer: Callable[[], Checksum | None] | None

    @property
    def announced(self) -> bool:
        return self.header is not None or self.trailer is not None

    def digester(self) -> Digester:
        """The header's algorithm, or all of them while the trailer's is not known yet."""
        return Digester({self.header.algorithm} if self.header else set(ALGORITHMS))

    def expected(self) -> Checksum | None:
        return self.header or (self.trailer() if self.trailer else None)


@dataclasses.dataclass
class _Finishing:
    """A request's post-finish intent, until `finish` takes it (`UploadService._settling`)."""

    intent: EventIntent | None = None


def _both(first: AfterWrite | None, second: AfterWrite | None) -> AfterWrite | None:
    """One after-write callback from two, either of which may be absent."""
    if first is None or second is None:
        return first or second

    def both(written: int) -> Awaitable[None] | None:
        pending = [done for done in (first(written), second(written)) if done is not None]
        return _in_turn(pending) if pending else None

    return both


async def _in_turn(pending: list[Awaitable[None]]) -> None:
    for done in pending:
        await done


class _ProgressReporter:
    """Reports the durable offset while a body streams in, never twice the same, never less.
    Per write it only counts and compares; a checkpoint is awaited when one is due."""

    def __init__(self, writer: Writer, report: Callable[[int], Awaitable[None]], start: int) -> None:
        self._writer = writer
        self._report = report
        self._reported = start
        self._since = 0
        self._at = time.monotonic()

    def __call__(self, written: int) -> Awaitable[None] | None:
        self._since += written
        if self._since < PROGRESS_BYTES and time.monotonic() - self._at < PROGRESS_SECONDS:
            return None
        self._since, self._at = 0, time.monotonic()
        return self._checkpoint()

    async def _checkpoint(self) -> None:
        offset = await self._writer.checkpoint()
        if offset > self._reported:
            self._reported = offset
            await self._report(offset)


def metadata_size(metadata: dict[str, str | None]) -> int:
    """Bytes of `metadata` as an `Upload-Metadata` header (keys, base64 values, commas):
    the form every HEAD returns it in, whichever protocol brought it."""
    size = max(len(metadata) - 1, 0)
    for key, value in metadata.items():
        size += len(key.encode("utf-8", "surrogateescape"))
        if value is not None:
            size += 1 + 4 * -(-len(value.encode("utf-8", "surrogateescape")) // 3)
    return size
