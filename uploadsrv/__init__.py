"""uploadsrv: a resumable upload server."""

__version__ = "0.1.0"
