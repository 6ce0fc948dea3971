"""The upload core: lifecycle, offsets, limits, checksums, locks and expiry."""

from . import errors
from .checksums import ALGORITHMS, Checksum
from .model import UploadInfo, is_upload_id
from .service import UploadService

__all__ = ["ALGORITHMS", "Checksum", "UploadInfo", "UploadService", "errors", "is_upload_id"]
