"""Core errors: one hierarchy, one status lookup along it, messages written out."""

from __future__ import annotations

import pytest

from uploadsrv.core import errors as e
from uploadsrv.protocols import chunks, common, tus

#: Every core error and the status it has always answered with on each protocol.
STATUSES = {
    e.InvalidRequest: 400,
    e.Unauthorized: 401,
    e.UnsupportedChecksum: 400,
    e.LengthConflict: 400,
    e.ClientDisconnected: 400,
    e.NotAppendable: 403,
    e.UploadNotFound: 404,
    e.OffsetMismatch: 409,
    e.UploadComplete: 409,
    e.ChunkConflict: 409,
    e.ChunksMissing: 409,
    e.NotReady: 409,
    e.Superseded: 409,
    e.UploadGone: 410,
    e.TooLarge: 413,
    e.TooManyRequests: 429,
    e.UploadBusy: 423,
    e.StorageUnavailable: 503,
    e.StorageFull: 507,
}


@pytest.mark.parametrize(("error", "status"), STATUSES.items(), ids=lambda v: getattr(v, "__name__", v))
def test_each_error_has_its_status(error: type[e.UploadError], status: int) -> None:
    instance = error(1, 2) if error is e.OffsetMismatch else error()
    assert common.status_of(instance) == status


def test_protocols_override_what_their_spec_defines() -> None:
    assert common.status_of(e.ChecksumMismatch()) == 400
    assert common.status_of(e.ChecksumMismatch(), tus.STATUS) == 460
    assert common.status_of(e.NotAppendable(), chunks.STATUS) == 404


def test_a_new_error_takes_the_status_of_its_middle_class() -> None:
    class Throttled(e.Retryable):
        slug = "throttled"
        message = "Slow down."

    assert common.status_of(Throttled()) == 503
    assert common.error_headers(Throttled())["Retry-After"] == "1"
    assert common.status_of(e.UploadError()) == 500


def test_messages_are_strings_not_docstrings() -> None:
    assert e.UploadNotFound().detail == "No such upload."
    assert e.UploadNotFound("no upload 7").detail == "no upload 7"
    with pytest.raises(TypeError, match="message"):

        class Unexplained(e.ClientError):
            """A docstring is not a message."""
