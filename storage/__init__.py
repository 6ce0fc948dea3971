"""Storage backends: where an upload's bytes and record live."""

from .base import Concatenating, Storage, UploadLock, Writer

__all__ = ["Concatenating", "Storage", "UploadLock", "Writer"]
