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
