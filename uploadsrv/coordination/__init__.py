"""Coordinators: what instances share besides the storage (see `uploadsrv.core.coordination`)."""

from __future__ import annotations

from uploadsrv.core.coordination import Coordinator


def open_coordinator(url: str | None) -> Coordinator | None:
    """The coordinator `--redis-url` names, or None for none. Raises ValueError for a bad URL."""
    if not url:
        return None
    try:
        from .redis import RedisCoordinator
    except ImportError:
        raise ValueError("needs redis-py: pip install 'uploadsrv[redis]'") from None
    return RedisCoordinator(url)
