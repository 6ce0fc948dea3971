"""The upload core: lifecycle, offsets, limits, checksums, locks and expiry.

The package imports only its vocabulary (model, errors, checksums, events, the storage
contract) eagerly: a backend imports that vocabulary, and importing it must not load
the upload service. `UploadService` is imported on first use.
"""

from typing import TYPE_CHECKING

from . import errors
from .checksums import ALGORITHMS, Checksum
from .events import UploadEvent
from .model import UploadInfo, is_upload_id

if TYPE_CHECKING:
    from .service import UploadService

__all__ = ["ALGORITHMS", "Checksum", "UploadEvent", "UploadInfo", "UploadService", "errors", "is_upload_id"]


def __getattr__(name: str) -> object:
    if name == "UploadService":
        from .service import UploadService

        return UploadService
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
