"""What several server instances share besides the storage: leases and events.

Without a coordinator each backend's own lock is the cross-process lock (flock on disk,
lease objects in S3), and instances learn of each other's changes by polling. A
coordinator (`--redis-url`) gives leases with a short TTL and a fencing token, pushes a
release request to the instance holding an upload, and carries events to every instance
at once. The core sees only this contract; `uploadsrv.coordination` implements it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol, runtime_checkable

from .quotas import Counters
from .storage import Lease

#: An event from another instance: its name, the upload's id and what it carries.
RemoteListener = Callable[[str, str, dict[str, object]], None]


@runtime_checkable
class Coordinator(Protocol):
    @property
    def counters(self) -> Counters:
        """Per-owner counts shared by every instance (`--max-uploads-per-owner`, ...)."""

    def lock(
        self,
        upload_id: str,
        *,
        timeout: float,
        preempt: bool = True,
        chunk: int | None = None,
        on_preempt: Callable[[bool], None] | None = None,
    ) -> AbstractAsyncContextManager[Lease]:
        """Hold the upload's (or chunk's) lease; `on_preempt` runs when another instance
        asks for it (with False) or it is lost (with True). Raises UploadBusy when not
        acquired within `timeout` (at once without `preempt`), StorageUnavailable when the
        coordinator is down."""

    async def chunks_busy(self, upload_id: str) -> bool:
        """Whether any chunk of the session is leased right now, by any instance."""

    def publish(self, event: str, upload_id: str, data: dict[str, object]) -> None:
        """Tell every other instance, in order and without waiting; best effort (an outage
        loses the event, never data: a watcher's fallback poll still finds the change)."""

    def subscribe(self, listener: RemoteListener) -> None:
        """`listener` gets the events other instances publish."""

    async def start(self) -> None:
        """Connect (raise RuntimeError if the coordinator cannot be used) and listen."""

    async def check(self) -> None:
        """Raise if the coordinator does not answer now (for /readyz)."""

    async def close(self) -> None: ...
