"""Storage backends: where an upload's bytes and record live."""

from .base import Concatenating, Housekeeping, Orphan, Presigning, Storage, UploadLock, Writer

__all__ = ["Concatenating", "Housekeeping", "Orphan", "Presigning", "Storage", "UploadLock", "Writer"]
