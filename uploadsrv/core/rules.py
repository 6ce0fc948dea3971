"""The rules of an append, apart from its I/O.

What a request may store is decided from the upload's state and the request alone, so
each rule reads as the protocols state it and can be tested without a backend;
`UploadService.append` then does the storing.
"""

from __future__ import annotations

from dataclasses import dataclass

from .checksums import Checksum, Digester
from .errors import (
    ChecksumMismatch,
    InvalidRequest,
    LengthConflict,
    NotAppendable,
    OffsetMismatch,
    TooLarge,
    UploadComplete,
)
from .model import UploadInfo


@dataclass(frozen=True)
class AppendRequest:
    """What one request asks of an upload."""

    offset: int
    #: The body's length, when the request says it (a chunked body does not).
    content_length: int | None = None
    #: A deferred length the request declares.
    length: int | None = None
    #: This body ends the upload: a deferred length becomes the final offset.
    complete: bool = False
    #: A finished upload answers a request that conflicts with it with its final state
    #: (the IETF draft: a client repeating its final request), instead of a 409.
    replay_finished: bool = False


@dataclass(frozen=True)
class AppendPlan:
    """What may be stored: nothing (a replay), or at most `limit` bytes at the offset."""

    replay: bool = False
    #: The upload's length once the request's declarations apply.
    length: int | None = None
    limit: int = 0


REPLAY = AppendPlan(replay=True)


def plan_append(info: UploadInfo, ask: AppendRequest, max_size: int) -> AppendPlan:
    """Decide what `ask` may store on `info`, or raise the error that refuses it."""
    _check_appendable(info)
    length = info.length
    if ask.length is not None and ask.length != length:  # a deferred length declared
        length = declared_length(length, ask.length, info.offset, max_size)
    if info.is_complete and _replays(info, ask):
        return REPLAY
    if ask.offset != info.offset:
        raise OffsetMismatch(expected=info.offset, provided=ask.offset)
    if ask.complete and ask.content_length is not None:
        length = declared_length(length, info.offset + ask.content_length, info.offset, max_size, exact=True)
    if length == info.offset and ask.content_length:
        raise UploadComplete()
    return AppendPlan(length=length, limit=_limit(length, info.offset, ask.content_length, max_size))


def may_finish(info: UploadInfo, ask: AppendRequest) -> bool:
    """Whether the request's body may bring the upload (its length known) to its end:
    its Content-Length says so, or it has none (a chunked body)."""
    if info.length is None or info.is_complete:
        return False
    return ask.content_length is None or info.offset + ask.content_length >= info.length


def _check_appendable(info: UploadInfo) -> None:
    if info.is_final:
        raise NotAppendable("a concatenated upload cannot be appended to")
    if info.chunk_size is not None:
        raise NotAppendable("a chunk session takes numbered chunks, not appends")


def _replays(info: UploadInfo, ask: AppendRequest) -> bool:
    """Whether a request to the finished upload `info` is answered with its final state:
    a repeated final request is; with `replay_finished`, so is any that conflicts with it."""
    if ask.offset != info.offset:
        return ask.replay_finished
    return ask.complete or (ask.replay_finished and bool(ask.content_length))


def _limit(length: int | None, offset: int, content_length: int | None, max_size: int) -> int:
    """How many bytes the body may carry: up to the upload's length, or the maximum size."""
    limit = (max_size if length is None else length) - offset
    if content_length is not None and content_length > limit:
        raise TooLarge(f"body of {content_length} bytes goes past the end of the upload")
    return limit


def check_length(length: int, max_size: int) -> None:
    if length < 0:
        raise InvalidRequest("length must not be negative")
    if length > max_size:
        raise TooLarge(f"{length} bytes is more than the maximum of {max_size}")


def declared_length(
    known: int | None, length: int, offset: int, max_size: int, *, exact: bool = False
) -> int:
    """The length once `length` is declared: a deferred one is set; with `exact`, a known
    one must equal `length` instead."""
    if known is not None:
        if exact and known == length:
            return known
        raise LengthConflict(f"the upload's length is already {known}, not {length}")
    check_length(length, max_size)
    if length < offset:
        raise LengthConflict(f"{offset} bytes are already stored, more than {length}")
    return length


def check_digest(digester: Digester, expected: Checksum | None) -> None:
    """A verified body is kept only if the checksum it announced arrived and matches."""
    if expected is None:
        raise InvalidRequest("the announced checksum trailer did not arrive")
    if not digester.matches(expected):
        raise ChecksumMismatch()
