"""One hierarchy for everything that can go wrong with an upload.

Protocols catch `UploadError` and map each subclass to their own status code and
problem type in one place; the core and the backends only ever raise these.
"""

from __future__ import annotations


class UploadError(Exception):
    """Base class; `slug` names the problem in problem+json bodies and logs."""

    slug = "upload-error"

    def __init__(self, detail: str = "", **extra: object) -> None:
        super().__init__(detail or self.__doc__ or self.slug)
        self.detail = detail or (self.__doc__ or self.slug).strip().splitlines()[0]
        self.extra = extra


class InvalidRequest(UploadError):
    """The request is malformed."""

    slug = "invalid-request"


class UploadNotFound(UploadError):
    """No such upload."""

    slug = "not-found"


class UploadGone(UploadError):
    """The upload expired and its bytes were or will be removed."""

    slug = "expired"


class OffsetMismatch(UploadError):
    """The request's offset does not match the upload's offset."""

    slug = "offset-mismatch"

    def __init__(self, expected: int, provided: int) -> None:
        super().__init__(
            f"upload is at offset {expected}, request says {provided}",
            expected_offset=expected,
            provided_offset=provided,
        )
        self.expected = expected
        self.provided = provided


class ChecksumMismatch(UploadError):
    """The body does not match the checksum the client sent; nothing was stored."""

    slug = "checksum-mismatch"


class UnsupportedChecksum(UploadError):
    """The checksum algorithm is not supported."""

    slug = "unsupported-checksum"


class TooLarge(UploadError):
    """The upload or this request's body is larger than allowed."""

    slug = "too-large"


class LengthConflict(UploadError):
    """The declared length conflicts with what is already known or stored."""

    slug = "length-conflict"


class ChunkConflict(UploadError):
    """A chunk with different bytes is already stored under this number; it is unchanged."""

    slug = "chunk-conflict"


class ChunksMissing(UploadError):
    """Chunks are still missing, so the session cannot be completed yet."""

    slug = "chunks-missing"


class UploadComplete(UploadError):
    """The upload is already complete; nothing more can be appended."""

    slug = "completed-upload"


class NotAppendable(UploadError):
    """This upload cannot be appended to (a concatenation result)."""

    slug = "not-appendable"


class NotReady(UploadError):
    """The upload is not complete yet."""

    slug = "incomplete-upload"


class UploadBusy(UploadError):
    """Another request holds this upload and did not let go in time."""

    slug = "busy"


class Superseded(UploadError):
    """A newer request for this upload took over; the bytes received so far are kept."""

    slug = "superseded"


class ClientDisconnected(UploadError):
    """The client went away before the body ended."""

    slug = "client-disconnected"


class StorageFull(UploadError):
    """The storage has no space left; the upload resumes once space returns."""

    slug = "storage-full"


class StorageUnavailable(UploadError):
    """The storage failed or is unreachable; retry later."""

    slug = "storage-unavailable"


class Unauthorized(UploadError):
    """The request carries no valid credentials."""

    slug = "unauthorized"

    def __init__(self, detail: str = "", *, invalid_token: bool = False) -> None:
        super().__init__(detail)
        #: The `WWW-Authenticate` challenge (RFC 6750): an error code only for a token that was sent.
        self.challenge = 'Bearer realm="uploadsrv"'
        if invalid_token:
            description = self.detail.replace('"', "'").replace("\\", "/")
            self.challenge += f', error="invalid_token", error_description="{description}"'


class TooManyRequests(UploadError):
    """This owner has too many uploads or requests at once; retry later."""

    slug = "too-many-requests"

    def __init__(self, detail: str = "", *, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.retry_after = retry_after
