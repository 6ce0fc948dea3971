"""One hierarchy for everything that can go wrong with an upload.

The core and the backends only ever raise these. Middle classes name what a caller can
do about an error (`ClientError`: fix the request; `Conflict`: ask where the upload
stands; `Gone`: start over; `Retryable`: try again shortly), so callers catch at the
level they care about, and a protocol maps the classes to status codes with one lookup
along the class hierarchy (`uploadsrv.protocols.common.status_of`). Each error's
`message` is its default text, written out: editing a docstring changes no answer.
"""

from __future__ import annotations


class UploadError(Exception):
    """Base class; `slug` names the problem in problem+json bodies and logs."""

    slug = "upload-error"
    message = "The upload failed."
    #: The request broke off, what arrived is kept, and the client should resume from the
    #: upload's offset rather than give up (the IETF draft drops the connection for these).
    resumable = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "message" not in cls.__dict__:  # loud at import, not a silently generic answer
            raise TypeError(f"{cls.__name__} needs its own `message`, the text clients see by default")

    def __init__(self, detail: str = "", **extra: object) -> None:
        self.detail = detail or self.message
        super().__init__(self.detail)
        self.extra = extra


# -- the client can fix the request ------------------------------------------------


class ClientError(UploadError):
    """The request cannot be served as it is; repeating it unchanged will not help."""

    slug = "client-error"
    message = "The request cannot be served."


class InvalidRequest(ClientError):
    slug = "invalid-request"
    message = "The request is malformed."


class UnsupportedChecksum(ClientError):
    slug = "unsupported-checksum"
    message = "The checksum algorithm is not supported."


class ChecksumMismatch(ClientError):
    slug = "checksum-mismatch"
    message = "The body does not match the checksum the client sent; nothing was stored."


class LengthConflict(ClientError):
    slug = "length-conflict"
    message = "The declared length conflicts with what is already known or stored."


class TooLarge(ClientError):
    slug = "too-large"
    message = "The upload or this request's body is larger than allowed."


class NotAppendable(ClientError):
    slug = "not-appendable"
    message = "This upload cannot be appended to (a concatenation result)."


class ClientDisconnected(ClientError):
    slug = "client-disconnected"
    message = "The client went away before the body ended."
    resumable = True


class Unauthorized(ClientError):
    slug = "unauthorized"
    message = "The request carries no valid credentials."

    def __init__(self, detail: str = "", *, invalid_token: bool = False) -> None:
        super().__init__(detail)
        #: The `WWW-Authenticate` challenge (RFC 6750): an error code only for a token that was sent.
        self.challenge = 'Bearer realm="uploadsrv"'
        if invalid_token:
            description = self.detail.replace('"', "'").replace("\\", "/")
            self.challenge += f', error="invalid_token", error_description="{description}"'


# -- the upload is not where the request thinks it is -------------------------------


class UploadNotFound(ClientError):
    slug = "not-found"
    message = "No such upload."


class Gone(ClientError):
    """The upload existed and is no more; the client starts over."""

    slug = "gone"
    message = "The upload is gone."


class UploadGone(Gone):
    slug = "expired"
    message = "The upload expired and its bytes were or will be removed."


class Conflict(ClientError):
    """The request does not fit the upload's current state; ask where it stands."""

    slug = "conflict"
    message = "The request conflicts with the upload's state."


class OffsetMismatch(Conflict):
    slug = "offset-mismatch"
    message = "The request's offset does not match the upload's offset."

    def __init__(self, expected: int, provided: int) -> None:
        super().__init__(
            f"upload is at offset {expected}, request says {provided}",
            expected_offset=expected,
            provided_offset=provided,
        )
        self.expected = expected
        self.provided = provided


class UploadComplete(Conflict):
    slug = "completed-upload"
    message = "The upload is already complete; nothing more can be appended."


class NotReady(Conflict):
    slug = "incomplete-upload"
    message = "The upload is not complete yet."


class ChunkConflict(Conflict):
    slug = "chunk-conflict"
    message = "A chunk with different bytes is already stored under this number; it is unchanged."


class ChunksMissing(Conflict):
    slug = "chunks-missing"
    message = "Chunks are still missing, so the session cannot be completed yet."


class Superseded(Conflict):
    slug = "superseded"
    message = "A newer request for this upload took over; the bytes received so far are kept."
    resumable = True


# -- the server cannot serve it now ----------------------------------------------


class Retryable(UploadError):
    """Nothing is wrong with the request: the same request later can succeed."""

    slug = "unavailable"
    message = "The request cannot be served right now; retry later."
    #: Seconds a client should wait, sent as `Retry-After`.
    retry_after = 1


class UploadBusy(Retryable):
    slug = "busy"
    message = "Another request holds this upload and did not let go in time."


class StorageUnavailable(Retryable):
    slug = "storage-unavailable"
    message = "The storage failed or is unreachable; retry later."
    resumable = True


class TooManyRequests(Retryable):
    slug = "too-many-requests"
    message = "This owner has too many uploads or requests at once; retry later."

    def __init__(self, detail: str = "", *, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class StorageFull(UploadError):
    slug = "storage-full"
    message = "The storage has no space left; the upload resumes once space returns."


class UploadExists(Conflict):
    slug = "upload-exists"
    message = "An upload with this id already exists."


class HookUnavailable(Retryable):
    slug = "hook-unavailable"
    message = "The application's hook could not be reached or failed; nothing was changed, retry later."


# -- the application decided -------------------------------------------------------


class Refused(UploadError):
    """A hook refused the request; its own answer goes to the client as given."""

    slug = "refused"
    message = "The application refused the request."

    def __init__(self, detail: str, *, status: int, body: str, headers: dict[str, str]) -> None:
        super().__init__(detail)
        self.status = status
        self.body = body
        self.headers = headers


class HookInvalid(UploadError):
    slug = "hook-invalid"
    message = "The application's hook answered something this server cannot use; nothing was changed."
