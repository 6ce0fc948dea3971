"""What the storage backend can do, recorded once at start-up.

As tusd's composer does: the optional storage Protocols are checked here, once, and the
routes, the advertised extensions, hooks, locks and the CLI follow from this record, not
from `isinstance` checks scattered over calls.
"""

from __future__ import annotations

from dataclasses import dataclass

from .storage import (
    Chunked,
    Concatenating,
    Fenced,
    Housekeeping,
    Locating,
    Outbox,
    Presigning,
    Storage,
)


@dataclass(frozen=True)
class Capabilities:
    """Each optional power of the backend: the backend itself where it has it, else None."""

    chunks: Chunked | None = None
    concatenation: Concatenating | None = None
    presigning: Presigning | None = None
    housekeeping: Housekeeping | None = None
    #: Writes checked against a coordinator's lease, which then stands in for its own lock.
    fenced: Fenced | None = None
    #: Where an upload's bytes are, for hooks.
    locating: Locating | None = None
    #: The durable hook-event queue.
    outbox: Outbox | None = None

    @classmethod
    def of(cls, storage: Storage) -> Capabilities:
        return cls(
            chunks=storage if isinstance(storage, Chunked) else None,
            concatenation=storage if isinstance(storage, Concatenating) else None,
            presigning=storage if isinstance(storage, Presigning) else None,
            housekeeping=storage if isinstance(storage, Housekeeping) else None,
            fenced=storage if isinstance(storage, Fenced) else None,
            locating=storage if isinstance(storage, Locating) else None,
            outbox=storage if isinstance(storage, Outbox) else None,
        )
