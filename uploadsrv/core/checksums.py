"""Checksums over a request body: the algorithms tus clients use, computed incrementally."""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .errors import InvalidRequest, UnsupportedChecksum


class _Hash(Protocol):
    @property
    def digest_size(self) -> int: ...

    def update(self, data: bytes | memoryview, /) -> None: ...
    def digest(self) -> bytes: ...


class _Crc32:
    """zlib.crc32 behind the hashlib interface; the digest is the 4-byte big-endian value."""

    digest_size = 4

    def __init__(self) -> None:
        self._value = 0

    def update(self, data: bytes | memoryview) -> None:
        self._value = zlib.crc32(data, self._value)

    def digest(self) -> bytes:
        return self._value.to_bytes(4, "big")


ALGORITHMS: dict[str, Callable[[], _Hash]] = {
    "sha1": hashlib.sha1,
    "md5": hashlib.md5,
    "sha256": hashlib.sha256,
    "sha512": hashlib.sha512,
    "crc32": _Crc32,
}


@dataclass(frozen=True)
class Checksum:
    algorithm: str
    digest: bytes

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise UnsupportedChecksum(f"unsupported checksum algorithm {self.algorithm!r}")
        if len(self.digest) != ALGORITHMS[self.algorithm]().digest_size:
            raise InvalidRequest(
                f"a {self.algorithm} digest has {ALGORITHMS[self.algorithm]().digest_size} bytes"
            )


class Digester:
    """Hashes a stream with one or more algorithms at once.

    Several at once serve trailer checksums, whose algorithm is known only after the body.
    """

    def __init__(self, algorithms: set[str]) -> None:
        self._hashes: dict[str, _Hash] = {name: ALGORITHMS[name]() for name in algorithms}

    def update(self, blocks: Sequence[bytes | memoryview]) -> None:
        for block in blocks:
            for h in self._hashes.values():
                h.update(block)

    def hexdigest(self, algorithm: str) -> str:
        return self._hashes[algorithm].digest().hex()

    def matches(self, checksum: Checksum) -> bool:
        h = self._hashes.get(checksum.algorithm)
        return h is not None and h.digest() == checksum.digest
