"""Hooks: tell the application what happens to every upload, and let it decide.

The events, their JSON and the meaning of the answers are tusd's (v2), field for field,
so a backend written for tusd works unchanged. The core calls `Hooks` at the points of
an upload's life; how a hook reaches the application (HTTP, an executable) is a
`Delivery`, and the events that must not be lost go through the durable `HookSender`
(`outbox.py`) instead of straight to the delivery.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from .errors import HookInvalid, HookUnavailable, Refused, UploadError
from .model import Reply, UploadInfo, is_upload_id

if TYPE_CHECKING:
    from .caller import Caller
    from .outbox import HookSender

log = logging.getLogger("uploadsrv.hooks")


class Hook(StrEnum):
    PRE_CREATE = "pre-create"
    POST_CREATE = "post-create"
    POST_RECEIVE = "post-receive"
    PRE_FINISH = "pre-finish"
    POST_FINISH = "post-finish"
    PRE_TERMINATE = "pre-terminate"
    POST_TERMINATE = "post-terminate"
    #: Ours: an unfinished upload expired (or was pruned) and its bytes were removed.
    POST_EXPIRE = "post-expire"


#: The client waits for these; their answers change what happens.
BLOCKING = frozenset({Hook.PRE_CREATE, Hook.PRE_FINISH, Hook.PRE_TERMINATE})
#: These go through the durable outbox: delivered at least once, also across crashes.
DURABLE = frozenset({Hook.POST_CREATE, Hook.POST_FINISH, Hook.POST_TERMINATE, Hook.POST_EXPIRE})
#: tusd's default set, plus post-expire.
DEFAULT_EVENTS = (
    Hook.PRE_CREATE,
    Hook.POST_CREATE,
    Hook.POST_RECEIVE,
    Hook.POST_FINISH,
    Hook.POST_TERMINATE,
    Hook.POST_EXPIRE,
)
#: A post-receive's content read when it goes: the upload and the extra fields it reports.
Snapshot = tuple[UploadInfo, dict[str, Any]]
#: post-receive requests in flight at once, over all uploads; more are dropped (best effort).
MAX_PROGRESS_IN_FLIGHT = 64
#: Uploads whose last post-receive time is remembered before the stale ones are dropped.
PROGRESS_THROTTLES = 4096


def parse_events(text: str) -> list[str]:
    """`--hooks-enabled-events`: comma-separated hook names."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in Hook._value2member_map_]
    if unknown:
        raise ValueError(f"unknown hook events {', '.join(unknown)} (known: {', '.join(Hook)})")
    return names


@dataclass
class HookMessage:
    """One hook as delivered: its event, its JSON body and a stable id for webhook-id."""

    hook: Hook
    body: bytes
    id: str
    #: The request headers forwarded as they are (`--hooks-http-forward-headers`).
    forward: Sequence[tuple[str, str]] = ()
    #: For file hooks: TUS_ID, TUS_OFFSET, TUS_SIZE.
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class HookAnswer:
    """tusd's HookResponse; every field optional."""

    status: int | None = None
    body: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    reject_upload: bool = False
    reject_termination: bool = False
    stop_upload: bool = False
    change_id: str | None = None
    change_metadata: dict[str, str] | None = None

    @classmethod
    def parse(cls, data: bytes) -> HookAnswer:
        """The application's JSON answer; empty means "carry on"."""
        if not data.strip():
            return cls()
        try:
            answer = json.loads(data)
            return cls._from_json(answer if answer is not None else {})
        except (ValueError, TypeError, AttributeError) as exc:
            raise HookInvalid(f"the hook's answer is not a tusd hook response: {exc}") from None

    @classmethod
    def _from_json(cls, answer: dict[str, Any]) -> HookAnswer:
        response = answer.get("HTTPResponse") or {}
        change = answer.get("ChangeFileInfo") or {}
        return cls(
            status=_status(response.get("StatusCode")),
            body=None if response.get("Body") in (None, "") else str(response["Body"]),
            headers={str(k): str(v) for k, v in dict(response.get("Header") or {}).items()},
            reject_upload=answer.get("RejectUpload") is True,
            reject_termination=answer.get("RejectTermination") is True,
            stop_upload=answer.get("StopUpload") is True,
            change_id=change.get("ID") or None,
            change_metadata=_metadata(change.get("MetaData")),
        )

    def refusal(self, default_status: int, default_detail: str) -> Refused:
        """The error that sends the hook's HTTPResponse to the client, as tusd does."""
        status = self.status or default_status
        headers = dict(self.headers)
        if self.body is None:
            body = json.dumps({"type": "about:blank", "status": status, "detail": default_detail})
            headers.setdefault("Content-Type", "application/problem+json")
        else:
            body = self.body
        return Refused(default_detail, status=status, body=body, headers=headers)


def _status(status: Any) -> int | None:
    """HTTPResponse.StatusCode: absent or 0 is "the default", anything else an HTTP status."""
    if not status:
        return None
    if not (isinstance(status, int) and 200 <= status <= 599):
        raise ValueError(f"StatusCode {status!r} is not an HTTP status")
    return status


def _metadata(metadata: Any) -> dict[str, str] | None:
    """ChangeFileInfo.MetaData as strings (null values become empty ones); None: unchanged."""
    if metadata is None:
        return None
    return {str(k): "" if v is None else str(v) for k, v in dict(metadata).items()}


class Delivery(Protocol):
    """How hooks reach the application: HTTP or an executable."""

    async def deliver(self, message: HookMessage, *, attempts: int) -> HookAnswer:
        """Send `message`, trying up to `attempts` times on failures worth retrying;
        raise HookUnavailable when it did not get through, HookInvalid for an answer
        it cannot use."""

    async def close(self) -> None: ...


class Hooks:
    """The hooks the core calls; which events fire and how they travel is configured here."""

    def __init__(
        self,
        delivery: Delivery,
        *,
        events: Sequence[str],
        progress_interval: float,
        locate: Callable[[UploadInfo], dict[str, str] | None],
        forward_headers: Sequence[str] = (),
        attempts: int = 4,
    ) -> None:
        self.delivery = delivery
        self.events = frozenset(Hook(name) for name in events)
        self.progress_interval = progress_interval
        self.attempts = attempts
        self.sender: HookSender | None = None  # set when the durable outbox is configured
        self._locate = locate
        self._forward = frozenset(name.lower() for name in forward_headers)
        self._in_flight: set[asyncio.Task[None]] = set()
        #: upload id -> its post-receive in flight (at most one per upload).
        self._progress: dict[str, asyncio.Task[None]] = {}
        #: upload id -> when its last post-receive started (time.monotonic).
        self._last_progress: dict[str, float] = {}
        #: upload id -> the chunk session report to send when the one in flight ends.
        self._follow_ups: dict[str, tuple[Coroutine[Any, Any, Snapshot], Caller | None]] = {}
        #: Told of every hook sent outside the outbox: (hook, "delivered" or "failed").
        self.listeners: list[Callable[[str, str], None]] = []

    def message(
        self,
        hook: Hook,
        info: UploadInfo,
        caller: Caller | None,
        *,
        event_id: str | None = None,
        **extra: Any,
    ) -> HookMessage:
        body = hook_request(
            hook, info, caller, None if hook == Hook.PRE_CREATE else self._locate(info), extra
        )
        headers = caller.headers if caller is not None else ()
        return HookMessage(
            hook,
            json.dumps(body, separators=(",", ":")).encode(),
            event_id or "msg_" + secrets.token_hex(16),
            forward=[(k, v) for k, v in headers if k.lower() in self._forward],
            env={
                "TUS_ID": "" if hook == Hook.PRE_CREATE else info.id,
                "TUS_OFFSET": str(info.offset),
                "TUS_SIZE": "" if info.length is None else str(info.length),
            },
        )

    # -- blocking hooks: the client waits ------------------------------------------

    async def ask(self, hook: Hook, info: UploadInfo, caller: Caller | None) -> HookAnswer:
        """A blocking hook's answer; raises HookUnavailable (503) when it cannot be had."""
        if hook not in self.events:
            return HookAnswer()
        try:
            answer = await self.delivery.deliver(self.message(hook, info, caller), attempts=self.attempts)
        except (HookUnavailable, HookInvalid):
            self._tell(hook, "failed")
            raise
        self._tell(hook, "delivered")
        return answer

    async def pre_create(self, info: UploadInfo, caller: Caller | None) -> None:
        """Ask before creating: the application may refuse, replace the metadata, choose the id."""
        answer = await self.ask(Hook.PRE_CREATE, info, caller)
        if answer.reject_upload:
            raise answer.refusal(400, "upload creation has been rejected by server")
        if answer.change_id is not None:
            if not is_upload_id(answer.change_id):
                raise HookInvalid(
                    f"the pre-create hook chose an id that is not URL-safe: {answer.change_id!r}"
                )
            info.id = answer.change_id
        if answer.change_metadata is not None:
            info.metadata = dict(answer.change_metadata)

    async def pre_finish(self, info: UploadInfo, caller: Caller | None) -> None:
        """Ask before telling the client "done"; the answer's HTTPResponse goes with that answer."""
        answer = await self.ask(Hook.PRE_FINISH, info, caller)
        if answer.status or answer.body is not None or answer.headers:
            info.reply = Reply(dict(answer.headers), answer.status, answer.body)

    async def pre_terminate(self, info: UploadInfo, caller: Caller | None) -> None:
        answer = await self.ask(Hook.PRE_TERMINATE, info, caller)
        if answer.reject_termination:
            raise answer.refusal(400, "upload termination has been rejected by server")

    # -- durable hooks: the outbox --------------------------------------------------

    async def intend(self, hook: Hook, info: UploadInfo, caller: Caller | None) -> EventIntent | None:
        """Commit a durable event to the outbox before the change it reports is made (`info`
        as it will be then); None if the event is not enabled. Settle it when the change
        is made, or is not."""
        if hook not in self.events:
            return None
        message = self.message(hook, info, caller, event_id=event_id_for(hook, info))
        if self.sender is None:
            return _Unkept(self, message)
        return await self.sender.intend(message, info)

    @asynccontextmanager
    async def recording(
        self, hook: Hook, info: UploadInfo, caller: Caller | None, *, intent: EventIntent | None = None
    ) -> AsyncIterator[None]:
        """The durable event of the change the block makes: committed before it (or
        earlier: `intent`), delivered after it; an error inside leaves the outbox to find
        out whether it was made."""
        if intent is None:
            intent = await self.intend(hook, info, caller)
        if intent is None:
            yield
            return
        try:
            yield
        except BaseException:
            await intent.undecided()
            raise
        await intent.made()

    # -- post-receive: best effort --------------------------------------------------

    def receiving(self, info: UploadInfo, caller: Caller | None, stop: Callable[[], None]) -> Progress | None:
        """The post-receive reports of one request's body, if they are enabled; `stop`
        ends the request when the application answers StopUpload."""
        if Hook.POST_RECEIVE not in self.events:
            return None
        return Progress(
            self, info, caller, stop, self._last_progress.get(info.id, -1e9) + self.progress_interval
        )

    def progress_due(self, upload_id: str) -> bool:
        """Whether a post-receive for this upload is due: the interval has passed since the
        last one (a chunk session asks once per stored chunk)."""
        if Hook.POST_RECEIVE not in self.events:
            return False
        if time.monotonic() - self._last_progress.get(upload_id, -1e9) < self.progress_interval:
            return False
        self._sent_progress(upload_id)
        return True

    def progress_later(
        self, upload_id: str, snapshot: Coroutine[Any, Any, Snapshot], caller: Caller | None
    ) -> None:
        """A post-receive whose content takes a read first (a chunk session's stored chunks).
        While one for the session is in flight, this one follows it (only the latest waits:
        it reads the state when it goes), so the application always learns the last chunk."""
        if upload_id in self._progress:
            previous = self._follow_ups.pop(upload_id, None)
            if previous is not None:
                previous[0].close()
            self._follow_ups[upload_id] = (snapshot, caller)
        elif len(self._progress) >= MAX_PROGRESS_IN_FLIGHT:
            snapshot.close()
        else:
            self._start_progress(upload_id, self._send_snapshot(snapshot, caller))

    async def _send_snapshot(self, snapshot: Coroutine[Any, Any, Snapshot], caller: Caller | None) -> None:
        try:
            info, extra = await snapshot
        except UploadError:
            return  # gone meanwhile: nothing to report
        await self._send(self.message(Hook.POST_RECEIVE, info, caller, **extra), 1, None)

    def _report(self, progress: Progress) -> None:
        """Start sending `progress`'s report unless one for the upload is in flight (then
        this one is skipped, not queued) or too many are."""
        upload_id = progress.upload_id
        if upload_id in self._progress or len(self._progress) >= MAX_PROGRESS_IN_FLIGHT:
            return
        self._sent_progress(upload_id)
        self._start_progress(upload_id, progress.send())

    def _sent_progress(self, upload_id: str) -> None:
        now = time.monotonic()
        if len(self._last_progress) >= PROGRESS_THROTTLES:  # entries past the interval change nothing
            cutoff = now - self.progress_interval
            self._last_progress = {k: at for k, at in self._last_progress.items() if at > cutoff}
        self._last_progress[upload_id] = now

    def _start_progress(self, upload_id: str, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._progress[upload_id] = task
        task.add_done_callback(lambda _: self._progress_ended(upload_id))

    def _progress_ended(self, upload_id: str) -> None:
        self._progress.pop(upload_id, None)
        follow_up = self._follow_ups.pop(upload_id, None)
        if follow_up is not None:
            self._start_progress(upload_id, self._send_snapshot(*follow_up))

    async def _send(
        self, message: HookMessage, attempts: int, on_answer: Callable[[HookAnswer], None] | None
    ) -> None:
        try:
            answer = await self.delivery.deliver(message, attempts=attempts)
        except (HookUnavailable, HookInvalid) as exc:
            self._tell(message.hook, "failed")
            log.warning("hook not delivered", extra={"hook": message.hook.value, "error": exc.detail})
            return
        self._tell(message.hook, "delivered")
        if on_answer is not None:
            on_answer(answer)

    def _tell(self, hook: Hook, outcome: str) -> None:
        for listener in self.listeners:
            listener(hook.value, outcome)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def close(self) -> None:
        for snapshot, _ in self._follow_ups.values():
            snapshot.close()
        self._follow_ups.clear()
        tasks = [*self._in_flight, *self._progress.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.delivery.close()


class EventIntent(Protocol):
    """A durable event committed before its change (`outbox.Intent`), settled once."""

    async def made(self) -> None:
        """The change is made and durable: deliver the event."""

    async def not_made(self) -> None:
        """The change was not made: drop the event."""

    async def undecided(self) -> None:
        """Not known (an error): the outbox resolves it from the upload's state."""


class _Unkept:
    """A storage without an outbox: the event is sent in the background after its change, not kept."""

    def __init__(self, hooks: Hooks, message: HookMessage) -> None:
        self._hooks = hooks
        self._message = message

    async def made(self) -> None:
        self._hooks._spawn(self._hooks._send(self._message, self._hooks.attempts, None))

    async def not_made(self) -> None:
        return None

    async def undecided(self) -> None:
        return None


class Progress:
    """post-receive while one request's body arrives (tus, the draft).

    The byte path pays an addition and a clock compare per write (`__call__`), nothing
    else: no allocation, no await. When the interval has passed, a background task builds
    the hook request and sends it; while it is in flight, later reports for the upload
    are skipped, not queued. When the request ends, one more report says where it stands
    (after the one in flight, if any). A StopUpload answer calls `stop`, which ends the
    request; `stopped` keeps the answer for the client.
    """

    __slots__ = ("_caller", "_due", "_ended", "_hooks", "_info", "_reported", "_stop", "arrived", "stopped")

    def __init__(
        self, hooks: Hooks, info: UploadInfo, caller: Caller | None, stop: Callable[[], None], due: float
    ) -> None:
        self._hooks = hooks
        self._info = info
        self._caller = caller
        self._stop = stop
        self._due = due
        self._ended = False
        self._reported = info.offset
        #: The upload's offset counting every byte of this body that arrived so far.
        self.arrived = info.offset
        self.stopped: HookAnswer | None = None

    @property
    def upload_id(self) -> str:
        return self._info.id

    def __call__(self, written: int) -> None:
        """After each write of the body (`pump`'s after_write)."""
        self.arrived += written
        if time.monotonic() >= self._due:
            self._due = time.monotonic() + self._hooks.progress_interval
            self._hooks._report(self)

    def ended(self, offset: int) -> None:
        """The request ended with the upload at `offset`: report it if it moved since the
        last report, now or after the report in flight."""
        self.arrived = offset
        self._ended = True
        if offset > self._reported:
            self._hooks._report(self)

    async def send(self) -> None:
        """The reports of this request, one at a time (the task `Hooks._report` started)."""
        while True:
            offset = self._reported = self.arrived
            snapshot = dataclasses.replace(self._info, offset=offset, stored_state=None)
            message = self._hooks.message(Hook.POST_RECEIVE, snapshot, self._caller)
            await self._hooks._send(message, 1, self._answered)
            if not (self._ended and self.arrived > self._reported):
                return

    def _answered(self, answer: HookAnswer) -> None:
        if answer.stop_upload and self.stopped is None:
            self.stopped = answer
            self._stop()


def event_id_for(hook: Hook, info: UploadInfo) -> str:
    """The same id for the same event of the same upload, whoever records it and however
    often: a receiver drops duplicates by it (webhook-id)."""
    key = f"{info.id}\0{info.created_at!r}\0{hook.value}".encode()
    return "evt_" + hashlib.sha256(key).hexdigest()[:32]


def hook_request(
    hook: Hook,
    info: UploadInfo,
    caller: Caller | None,
    storage: dict[str, str] | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """tusd's HookRequest as JSON, plus `Owner` and `Protocol` (tusd backends ignore them)."""
    upload: dict[str, Any] = {
        "ID": "" if hook == Hook.PRE_CREATE else info.id,
        "Size": info.length or 0,
        "SizeIsDeferred": info.length is None,
        "Offset": info.offset,
        "MetaData": {k: "" if v is None else v for k, v in info.metadata.items()},
        "IsPartial": info.partial,
        "IsFinal": info.parts is not None,
        "PartialUploads": list(info.parts) if info.parts is not None else None,
        "Storage": storage,
        "Owner": info.owner,
        "Protocol": info.protocol,
        **(extra or {}),
    }
    return {"Type": hook.value, "Event": {"Upload": upload, "HTTPRequest": http_request(caller)}}


def http_request(caller: Caller | None) -> dict[str, Any]:
    """The client's request; empty for the server's own work (expiry)."""
    if caller is None:
        return {"Method": "", "URI": "", "RemoteAddr": "", "Header": {}}
    header: dict[str, list[str]] = {}
    for name, value in caller.headers:
        header.setdefault(canonical_header(name), []).append(value)
    return {"Method": caller.method, "URI": caller.uri, "RemoteAddr": caller.remote_addr, "Header": header}


def canonical_header(name: str) -> str:
    """Go's CanonicalHeaderKey, as tusd's Header has them: `upload-length` -> `Upload-Length`."""
    return "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))
