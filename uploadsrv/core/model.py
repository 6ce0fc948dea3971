"""The state of one upload, shared by the core, the protocols and the backends."""

from __future__ import annotations

import dataclasses
import re
import secrets
from dataclasses import dataclass, field
from urllib.parse import quote

#: Our ids are 128 random bits as 32 lowercase hex digits; a pre-create hook may choose
#: its own within this pattern: URL-safe in a path segment, no dots (no `..`, and no clash
#: with a backend's `<id>.info`-style names), no slashes, at most 128 characters.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
MEDIA_TYPE = re.compile(r"[\w.+-]+/[\w.+-]+")
#: Types a browser may render inline; anything else downloads as an attachment, so a
#: stored HTML or SVG file can never run script where it is served from.
INLINE_TYPES = re.compile(
    r"(image/(png|jpeg|gif|webp|heic|avif)|video/.+|audio/.+|application/pdf|text/plain)"
)


def new_upload_id() -> str:
    return secrets.token_hex(16)


def is_upload_id(value: str) -> bool:
    return ID_PATTERN.fullmatch(value) is not None


@dataclass
class Reply:
    """What the application adds to the answer that finishes an upload (a pre-finish hook)."""

    headers: dict[str, str] = field(default_factory=dict)
    status: int | None = None
    body: str | None = None


@dataclass
class UploadInfo:
    """What is known about an upload.

    `offset` is the number of durable bytes; backends fill it from what they actually
    store, so it never runs ahead of the data. `updated_at` is the last activity.
    """

    id: str
    length: int | None
    metadata: dict[str, str | None] = field(default_factory=dict)
    owner: str | None = None
    protocol: str = "tus"
    created_at: float = 0.0
    updated_at: float = 0.0
    offset: int = 0
    #: A part meant for concatenation (tus `Upload-Concat: partial`).
    partial: bool = False
    #: For a concatenation result, the ids of its parts in order.
    parts: list[str] | None = None
    #: For a chunk session: the size of every chunk but the last. Its bytes arrive as
    #: numbered chunks in any order, and `offset` stays 0 until they are assembled.
    chunk_size: int | None = None
    #: The whole file's sha256 (hex) the client declared, checked on completion.
    sha256: str | None = None
    #: Its bytes are all stored, but a pre-finish hook has not agreed yet (it was down):
    #: the upload is not finished until the next request for it gets that answer.
    finish_pending: bool = False
    #: What the application adds to the answer that finishes the upload (pre-finish). Never stored.
    reply: Reply | None = field(default=None, repr=False, compare=False)
    #: The backend's own state, read together with this record (S3: the info object), so
    #: the later steps of one request under one lock need not read it again. Never stored.
    stored_state: object = field(default=None, repr=False, compare=False)

    @property
    def is_complete(self) -> bool:
        return self.length is not None and self.offset == self.length and not self.finish_pending

    @property
    def is_final(self) -> bool:
        return self.parts is not None

    @property
    def chunk_count(self) -> int:
        """How many chunks a chunk session has (none for zero bytes: it is complete at once)."""
        assert self.chunk_size is not None and self.length is not None
        return -(-self.length // self.chunk_size)

    def chunk_length(self, number: int) -> int:
        """The size of chunk `number` (1-based): `chunk_size`, except perhaps the last."""
        assert self.chunk_size is not None and self.length is not None
        return min(self.chunk_size, self.length - (number - 1) * self.chunk_size)

    @property
    def filename(self) -> str | None:
        return self.metadata.get("filename") or self.metadata.get("name")

    @property
    def content_type(self) -> str | None:
        """The media type clients declared in metadata, if it is a well-formed one."""
        declared = (
            self.metadata.get("filetype") or self.metadata.get("type") or self.metadata.get("contentType")
        )
        return declared if declared and MEDIA_TYPE.fullmatch(declared) else None

    @property
    def served_type(self) -> str:
        """The Content-Type a download of the finished upload carries."""
        return self.content_type or "application/octet-stream"

    @property
    def content_disposition(self) -> str:
        """How a download of the finished upload is shown (one rule for every way it is
        served: this server's GET and a presigned S3 URL)."""
        kind = "inline" if INLINE_TYPES.fullmatch(self.served_type) else "attachment"
        return f"{kind}; filename*=UTF-8''{self.quoted_filename}" if self.filename else kind

    @property
    def quoted_filename(self) -> str | None:
        """The file name for `filename*=UTF-8''...` (RFC 8187), if metadata has one."""
        name = self.filename
        return quote(name.encode("utf-8", "surrogateescape"), safe="") if name else None

    def to_record(self) -> dict[str, object]:
        """The persisted form; `offset` is left out because backends derive it from the bytes.

        Copies one level deep (the metadata dict, the parts list): the fields hold nothing
        deeper, and `dataclasses.asdict` cost more than the rest of a create."""
        record = {name: getattr(self, name) for name in _RECORD_FIELDS}
        record["metadata"] = dict(self.metadata)
        if self.parts is not None:
            record["parts"] = list(self.parts)
        return record

    @classmethod
    def from_record(cls, record: dict[str, object], offset: int) -> UploadInfo:
        fields = {k: v for k, v in record.items() if k in _RECORD_FIELDS}
        return cls(**fields, offset=offset)  # type: ignore[arg-type]  # a stored record has these fields' types


#: The stored fields, in both directions: `offset` comes from the bytes, `stored_state` from the backend.
_RECORD_FIELDS = tuple(
    f.name for f in dataclasses.fields(UploadInfo) if f.name not in ("offset", "stored_state", "reply")
)
