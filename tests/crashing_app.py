"""A test double: `uploadsrv serve` whose storage SIGKILLs the server at one moment of a
durable hook event's life, to prove that no moment loses the event or invents one.

    UPLOADSRV_TEST_CRASH=<hook>:<moment> python -m tests.crashing_app serve [flags]

`moment` is `intent` (right after the event is written to the outbox, before its change),
`before-change` (right before the storage call that makes the change, the intent written:
for post-finish, once every byte is stored) or `after-change` (right after that call,
before the event is delivered). The changes: post-create `create`, post-finish `finish`,
post-terminate `delete`.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette

import uploadsrv.app
from uploadsrv.backend import open_storage
from uploadsrv.cli import main
from uploadsrv.config import Settings
from uploadsrv.core.storage import Storage

CHANGES = {"post-create": "create", "post-finish": "finish", "post-terminate": "delete"}
create_app = uploadsrv.app.create_app


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def crashing(storage: Storage, hook: str, moment: str) -> Storage:
    put_event: Callable[..., Awaitable[None]] = storage.put_event  # type: ignore[attr-defined]
    change: Callable[..., Awaitable[Any]] = getattr(storage, CHANGES[hook])

    async def put_event_then_die(event_id: str, record: dict[str, Any], **kwargs: Any) -> None:
        await put_event(event_id, record, **kwargs)
        if moment == "intent" and record["hook"] == hook and record["state"] == "intent":
            die()

    async def change_then_die(*args: Any, **kwargs: Any) -> Any:
        if moment == "before-change":
            die()
        result = await change(*args, **kwargs)
        if moment == "after-change":
            die()
        return result

    storage.put_event = put_event_then_die  # type: ignore[attr-defined]
    setattr(storage, CHANGES[hook], change_then_die)
    return storage


def create_crashing_app(settings: Settings | None = None, storage: Storage | None = None) -> Starlette:
    settings = settings or Settings.from_env()
    hook, moment = os.environ["UPLOADSRV_TEST_CRASH"].split(":")
    return create_app(settings, crashing(storage or open_storage(settings, time.time), hook, moment))


if __name__ == "__main__":
    uploadsrv.app.create_app = create_crashing_app  # what `serve` hands uvicorn (one worker: this process)
    sys.exit(main())
