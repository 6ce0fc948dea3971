"""What the console shows live, fed by the upload core's events.

The hub subscribes to `UploadService` and keeps, for this process: the sessions it has
seen (bounded), each one's recent rate and event history, a per-second throughput
history, and one bounded queue per browser watching the server-wide event stream. A
slow browser cannot grow memory: when its queue is full it is emptied and the browser
told to resync, which it does by reconnecting and reading a fresh snapshot.

Bytes are counted when they become durable (an append's commit, a stored chunk), so a
long single request shows up when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from uploadsrv.core import UploadInfo, UploadService
from uploadsrv.core.chunks import ChunkSessions
from uploadsrv.core.errors import UploadError
from uploadsrv.core.events import UploadEvent

TRACKED = 2000  #: sessions remembered, the least recently active forgotten first
HISTORY = 200  #: events remembered per session
THROUGHPUT_SECONDS = 600  #: per-second byte counts kept for the chart
RATE_WINDOW = 5.0  #: seconds over which a current rate is averaged
QUEUE = 512  #: events waiting for one browser before it is told to resync
TICK_SECONDS = 1.0  #: how often a stream sends rates (only to connected browsers)

#: (name, data) as sent on the event stream
Message = tuple[str, dict[str, object]]


@dataclass(frozen=True)
class Viewer:
    """Who looks: the operator sees every session, anyone else the sessions they own."""

    owner: str | None
    operator: bool = False

    def sees(self, owner: str | None) -> bool:
        return self.operator or (self.owner is not None and owner == self.owner)


OPERATOR = Viewer(None, operator=True)


@dataclass
class SessionView:
    """One session as the console sees it."""

    info: UploadInfo
    state: str
    received: int = 0  #: bytes durable (a chunk session: bytes of its stored chunks)
    chunks: dict[int, int] = field(default_factory=dict)  #: stored chunk number -> size
    writing: list[int] = field(default_factory=list)  #: chunks being written in this process
    history: deque[dict[str, object]] = field(default_factory=lambda: deque(maxlen=HISTORY))
    recent: deque[tuple[float, int]] = field(default_factory=deque)  #: (time, bytes) in RATE_WINDOW
    refreshing: bool = False
    refresh_again: bool = False

    def rate(self, now: float) -> float:
        while self.recent and self.recent[0][0] < now - RATE_WINDOW:
            self.recent.popleft()
        return sum(n for _, n in self.recent) / RATE_WINDOW


class _Client:
    """One browser's queue; overflowing it empties it and leaves a single resync, after
    which nothing more is queued (the stream ends there and the browser reconnects)."""

    def __init__(self, viewer: Viewer) -> None:
        self.viewer = viewer
        self.queue: asyncio.Queue[Message] = asyncio.Queue(QUEUE)
        self.behind = False

    def put(self, message: Message) -> None:
        if self.behind:
            return
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            self.behind = True
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(("resync", {"reason": "this browser fell behind"}))


class ConsoleHub:
    def __init__(
        self, service: UploadService, sessions: ChunkSessions, clock: Callable[[], float] = time.time
    ) -> None:
        self._service = service
        self._sessions = sessions
        self._clock = clock
        self._views: OrderedDict[str, SessionView] = OrderedDict()
        self._seconds: deque[list[int]] = deque(maxlen=THROUGHPUT_SECONDS)  # [second, bytes]
        self._owner_seconds: OrderedDict[str, deque[list[int]]] = OrderedDict()  # the same, by owner
        self._clients: set[_Client] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        service.subscribe(self.on_event)

    # -- what the core tells us --------------------------------------------------

    def on_event(self, event: UploadEvent, info: UploadInfo) -> None:
        name = str(event)
        view = self._views.get(info.id)
        is_new = view is None
        if view is None:
            view = self._remember(info)
        now = self._clock()
        entry: dict[str, object] = {"at": now, "event": name}
        if event is UploadEvent.CHUNK:
            self._refresh_chunks_soon(view)
            return  # the refresh reports which chunk it was
        if event is UploadEvent.APPENDED and not is_new:
            added = max(0, info.offset - view.received)
            self._count(view, added, now)
            entry |= {"offset": info.offset, "bytes": added}
        view.info = _copy(info)
        if view.info.chunk_size is None or view.info.is_complete:
            view.received = max(view.received, info.offset)
        if event in (UploadEvent.TERMINATED, UploadEvent.EXPIRED):
            view.state = name  # gone from storage: the last word on it
        else:
            view.state = self._service.state_of(view.info)
        if event is UploadEvent.COMPLETED:
            view.writing = []
        view.history.append(entry)
        self._broadcast(("upload", {"event": name, "session": self.row(view, now), "entry": entry}), view)

    def _remember(self, info: UploadInfo, state: str | None = None) -> SessionView:
        view = SessionView(_copy(info), state or self._service.state_of(info), received=info.offset)
        self._views[info.id] = view
        while len(self._views) > TRACKED:
            self._views.popitem(last=False)
        return view

    def _count(self, view: SessionView, added: int, now: float) -> None:
        if not added:
            return
        view.received += added
        view.recent.append((now, added))
        self._views.move_to_end(view.info.id)
        _add(self._seconds, int(now), added)
        owner = view.info.owner
        if owner is not None:
            if owner not in self._owner_seconds:
                self._owner_seconds[owner] = deque(maxlen=THROUGHPUT_SECONDS)
                if len(self._owner_seconds) > TRACKED:
                    self._owner_seconds.popitem(last=False)
            self._owner_seconds.move_to_end(owner)
            _add(self._owner_seconds[owner], int(now), added)

    def _refresh_chunks_soon(self, view: SessionView) -> None:
        """Find out which chunks a "chunk" event stored: one status read at a time per
        session, however fast chunks arrive."""
        if view.refreshing:
            view.refresh_again = True
            return
        view.refreshing = True
        task = asyncio.get_running_loop().create_task(self._refresh_chunks(view))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh_chunks(self, view: SessionView) -> None:
        try:
            while True:
                view.refresh_again = False
                try:
                    status = await self._sessions.status(view.info.id)
                except UploadError:
                    return
                now = self._clock()
                view.writing = self._sessions.writing(view.info.id)
                for chunk in status.chunks:
                    if chunk.number in view.chunks:
                        continue
                    view.chunks[chunk.number] = chunk.size
                    self._count(view, chunk.size, now)
                    entry = {"at": now, "event": "chunk", "chunk": chunk.number, "bytes": chunk.size}
                    view.history.append(entry)
                    row = self.row(view, now)
                    self._broadcast(("chunk", {"number": chunk.number, "session": row, "entry": entry}), view)
                if not view.refresh_again:
                    return
        finally:
            view.refreshing = False

    # -- what the browser reads ---------------------------------------------------

    def row(self, view: SessionView, now: float | None = None) -> dict[str, object]:
        """One line of the sessions table."""
        info = view.info
        now = self._clock() if now is None else now
        expires = self._service.expires_at(info) if view.state == "incomplete" else None
        return {
            "id": info.id,
            "owner": info.owner,
            "protocol": info.protocol,
            "state": view.state,
            "size": info.length,
            "received": info.length if info.is_complete else view.received,
            "filename": info.filename,
            "created_at": info.created_at,
            "last_activity": info.updated_at if not view.recent else max(info.updated_at, view.recent[-1][0]),
            "expires_at": expires,
            "chunk_size": info.chunk_size,
            "chunk_count": info.chunk_count if info.chunk_size is not None else None,
            "chunks_stored": len(view.chunks),
            "writing": view.writing,
            "rate": view.rate(now),
        }

    def view(self, info: UploadInfo) -> SessionView:
        """The hub's view of an upload read from storage (remembered if it is new)."""
        known = self._views.get(info.id)
        if known is None:
            return self._remember(info)
        if known.state == "terminated":
            return known
        if (info.updated_at, info.offset) != (known.info.updated_at, known.info.offset):
            known.info = _copy(info)  # changed through another process
            if info.chunk_size is None or info.is_complete:
                known.received = info.offset
        known.state = self._service.state_of(known.info)  # it may have expired meanwhile
        return known

    async def fill_chunks(self, view: SessionView) -> None:
        """Read which chunks of an unfinished chunk session are stored and being written."""
        if view.info.chunk_size is None or view.info.is_complete or view.state == "terminated":
            return
        view.writing = self._sessions.writing(view.info.id)
        if not view.chunks:
            status = await self._sessions.status(view.info.id)
            view.chunks = {c.number: c.size for c in status.chunks}
            view.received = sum(view.chunks.values())

    def views(self) -> list[SessionView]:
        return list(self._views.values())

    def _seconds_of(self, viewer: Viewer) -> deque[list[int]]:
        if viewer.operator:
            return self._seconds
        return self._owner_seconds.get(viewer.owner or "", deque())

    def throughput(self, viewer: Viewer) -> list[list[int]]:
        """[second, bytes] for the seconds with bytes the viewer may see, oldest first."""
        cutoff = int(self._clock()) - THROUGHPUT_SECONDS
        return [list(s) for s in self._seconds_of(viewer) if s[0] > cutoff]

    def tick(self, viewer: Viewer) -> dict[str, object]:
        """Rates now: of all the viewer sees, and of each such session that moved in RATE_WINDOW."""
        now = self._clock()
        moving = (view for view in self._views.values() if view.recent and viewer.sees(view.info.owner))
        rates = {view.info.id: rate for view in moving if (rate := view.rate(now))}
        recent = [s for s in self._seconds_of(viewer) if s[0] >= int(now) - 10]
        return {
            "at": now,
            "bytes_per_second": sum(rates.values()),
            "rates": rates,
            "seconds": [list(s) for s in recent],
        }

    @contextlib.asynccontextmanager
    async def watch(self, viewer: Viewer) -> AsyncIterator[asyncio.Queue[Message]]:
        """A queue of this process's console events that `viewer` may see, from now on."""
        client = _Client(viewer)
        self._clients.add(client)
        try:
            yield client.queue
        finally:
            self._clients.discard(client)

    def _broadcast(self, message: Message, view: SessionView) -> None:
        for client in self._clients:
            if client.viewer.sees(view.info.owner):
                client.put(message)


def _add(seconds: deque[list[int]], second: int, added: int) -> None:
    if seconds and seconds[-1][0] == second:
        seconds[-1][1] += added
    else:
        seconds.append([second, added])


def _copy(info: UploadInfo) -> UploadInfo:
    """A snapshot: the core goes on changing the object it emitted."""
    return UploadInfo.from_record(info.to_record(), info.offset)
