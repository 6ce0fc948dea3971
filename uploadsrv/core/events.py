"""What can happen to an upload: the events the core emits and its listeners receive."""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum

from .model import UploadInfo


class UploadEvent(StrEnum):
    """Emitted by `UploadService.emit`; the values are the names metrics and logs show."""

    CREATED = "created"
    APPENDED = "appended"  #: bytes became durable (also after a request broke off)
    CHUNK = "chunk"  #: a chunk of a chunk session was stored
    COMPLETED = "completed"
    TERMINATED = "terminated"  #: deleted by a client or the operator
    EXPIRED = "expired"  #: removed by expiry


#: Called with each event and the upload; metrics, progress streams and hooks subscribe.
Listener = Callable[[UploadEvent, UploadInfo], None]


class LockEvent(StrEnum):
    """What happened while a request took an upload's lock (see `UploadLocks`)."""

    WAITED = "waited"  #: the upload was held in this process; the request waited for it
    PREEMPTED = "preempted"  #: a holder was asked to stop for a newer request
    TIMED_OUT = "timed_out"  #: the holder did not let go within the lock timeout (423)


#: Called with each lock event and the seconds the request waited (0 for preemptions).
LockListener = Callable[[LockEvent, float], None]
