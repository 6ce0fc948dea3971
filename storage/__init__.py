"""Storage backends: where an upload's bytes and record live."""

from .base import Concatenating, Presigning, Storage, UploadLock, Writer

__all__ = ["Concatenating", "Presigning", "Storage", "UploadLock", "Writer"]
