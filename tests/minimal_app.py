"""A test double: uploadsrv on a backend with the core storage contract only.

Local disk seen through the `Storage` Protocol alone: no chunks, no concatenation, no
presigned downloads, no housekeeping, so the server must serve what that allows.
"""

from __future__ import annotations

from starlette.types import ASGIApp

from uploadsrv.app import create_app
from uploadsrv.config import Settings
from uploadsrv.storage.local import LocalStorage

#: The methods of `uploadsrv.core.storage.Storage`.
CORE = (
    "create",
    "get",
    "update",
    "writer",
    "finish",
    "delete",
    "read",
    "lock",
    "upload_ids",
    "check",
    "close",
)


class CoreOnly:
    def __init__(self, backend: object) -> None:
        for name in CORE:
            setattr(self, name, getattr(backend, name))


def create() -> ASGIApp:
    settings = Settings.from_env()
    return create_app(settings, CoreOnly(LocalStorage(settings.data_dir)))  # type: ignore[arg-type]
