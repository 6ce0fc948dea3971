"""Who asks the core to act, and with which HTTP request.

Every core call made for a client carries a `Caller`; `None` means the operator CLI or the
server's own work (expiry), which sees every upload. Ownership checks read `owner` and
`grant`; hooks read the HTTP fields. Built once per request by the protocols, so it is a
slotted record holding the request's headers as they arrive (bytes), decoded only when
a hook asks for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Caller:
    #: The authenticated subject; None when auth is off or the request carried no credentials.
    owner: str | None
    #: "tus", "ietf" or "chunks".
    protocol: str
    method: str
    #: Path and query, as in the request line.
    uri: str
    #: "host:port" of the client (as a trusted proxy reports it, with --trust-proxy).
    remote_addr: str
    #: The request's headers as received (lowercase names, bytes), in order.
    raw_headers: Sequence[tuple[bytes, bytes]]
    #: The upload id a signed upload URL authorises, if the request carried one.
    grant: str | None = None
    #: When that signed URL stops being enough on its own (None: never); an unfinished
    #: upload's URL keeps working as long as the upload does.
    grant_expires: float | None = None

    @property
    def headers(self) -> list[tuple[str, str]]:
        """The request's headers as text (latin-1, as HTTP has them)."""
        return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in self.raw_headers]
