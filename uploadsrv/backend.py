"""Opening the storage backend the settings name; shared by the server and the CLI."""

from __future__ import annotations

import importlib.util
import time

from uploadsrv.core.storage import Clock, Storage
from uploadsrv.storage.local import LocalStorage

from .config import Settings


class MissingDependency(RuntimeError):
    """The configured storage needs a package this installation lacks."""


def require_backend(settings: Settings) -> None:
    """Fail in one line, before any worker starts, if the storage's packages are missing."""
    if settings.storage and importlib.util.find_spec("boto3") is None:
        raise MissingDependency(f"--storage {settings.storage} needs boto3: pip install 'uploadsrv[s3]'")


def open_storage(settings: Settings, clock: Clock = time.time) -> Storage:
    """The backend the settings name: local disk by default, S3 for s3:// URLs; `clock`
    is the core's, so both agree on time."""
    if not settings.storage:
        return LocalStorage(settings.data_dir, io_threads=settings.io_threads, clock=clock)
    require_backend(settings)
    from uploadsrv.storage.s3 import S3Storage

    return S3Storage(
        settings.storage,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        path_style=settings.s3_path_style,
        part_size=settings.s3_part_size,
        concurrency=settings.s3_concurrency,
        max_size=settings.max_size,
        presign_downloads=settings.s3_presign_downloads,
        checksums=settings.s3_checksums,
        spool_dir=settings.data_dir / "spool",
        clock=clock,
    )
