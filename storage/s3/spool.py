"""Scratch files that hold a part's bytes on local disk until S3 has them."""

from __future__ import annotations

import base64
import os
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, cast

from uploadsrv.core.storage import Hasher, Readable, receive_into

SPOOL_READ_BLOCK = 64 << 10  #: under `uploadsrv.memory.MMAP_THRESHOLD`


class Spool:
    """One part's bytes on local scratch disk until S3 has them.

    Parts are several MiB and many uploads run at once; spooling keeps the server's
    memory flat (only the page cache grows) and gives boto3 a seekable body to retry.
    With `crc32`, the part's CRC32 is taken as the bytes arrive (while they are in the
    CPU's cache), so botocore does not read the file once more to compute it.
    """

    def __init__(self, directory: Path, *, crc32: bool) -> None:
        self.file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115  (closed by close())
        self.size = 0
        self._crc32: int | None = 0 if crc32 else None

    def write(self, blocks: Sequence[bytes | memoryview]) -> None:
        for block in blocks:
            view = memoryview(block)
            while view:  # a short write (a disk filling up) must not leave a gap
                written = os.write(self.file.fileno(), view)
                self.size += written  # counts what is in the file, even if the next write fails
                if self._crc32 is not None:
                    self._crc32 = zlib.crc32(view[:written], self._crc32)
                view = view[written:]

    def receive(self, source: Readable, count: int, hasher: Hasher | None, deadline: float) -> int:
        """Up to `count` bytes read from `source` into this file, until it ends, has
        nothing for now, or `deadline` (monotonic) passes (see the storage `Receiving`)."""
        return receive_into(self._write_block, source, count, hasher, deadline)

    def _write_block(self, block: memoryview) -> None:
        self.write((block,))

    def checksum(self) -> dict[str, str]:
        """UploadPart's ChecksumCRC32 parameter for these bytes, if they have one."""
        if self._crc32 is None:
            return {}
        return {"ChecksumCRC32": base64.b64encode(self._crc32.to_bytes(4, "big")).decode()}

    def body(self) -> BinaryIO:
        self.file.seek(0)
        return cast(BinaryIO, _SmallReads(self.file))

    def close(self) -> None:
        self.file.close()


class _SmallReads:
    """A spool file read in blocks under glibc's mmap threshold (`uploadsrv.memory`):
    botocore hashes a body in 1 MiB reads, and a fresh mapping per read costs a page
    fault every 4 KiB; smaller blocks reuse the same heap memory."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file

    def read(self, size: int = -1) -> bytes:
        return self._file.read(size if size < 0 else min(size, SPOOL_READ_BLOCK))

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()
