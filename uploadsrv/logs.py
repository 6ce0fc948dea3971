"""Structured logs: one JSON object per line (or a plain line, `--log-format text`).

Fields are passed as `extra`. A line logged while a request is handled carries that
request's `request_id`, so everything one request caused can be found by its id. The
access log is an observer of `exchange.Exchange`: every request when `--access-log` is
on, and always every answer of 400 or more (info; 5xx warning) with its problem type.
uvicorn's own access log is off, and its `color_message` (ANSI escapes) is dropped.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time

from .exchange import Exchange, current

#: Attributes every LogRecord has; anything else on a record came in `extra`.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}
FORMATS = ("json", "text")

access = logging.getLogger("uploadsrv.access")
_ENCODER = json.JSONEncoder(default=str)  #: made once: json.dumps with `default` makes one per line


def _lean_records() -> None:
    """Records without what no line here shows: the caller's file and line (a walk up the
    stack per record), thread and process names. Half of what a line cost to log; the
    pid is taken where the line is written."""
    logging._srcfile = None  # the logging HOWTO's "Optimization"
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


@functools.lru_cache(maxsize=4)
def _second(timestamp: int) -> str:
    """The line's time to the second (most lines share the second before them)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp))


def _fields(record: logging.LogRecord) -> dict[str, object]:
    entry: dict[str, object] = {
        "ts": f"{_second(int(record.created))}.{int(record.msecs):03d}Z",
        "level": record.levelname.lower(),
        "logger": record.name,
        "pid": os.getpid(),
        "msg": record.getMessage(),
    }
    exchange = current()
    if exchange is not None:
        entry["request_id"] = exchange.request_id
    entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
    return entry


class _LineFormatter(logging.Formatter):
    """A formatter of ours: made in every worker process by its logging config, it
    makes that process's records lean."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        _lean_records()


class JsonFormatter(_LineFormatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = _fields(record)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _ENCODER.encode(entry)


class TextFormatter(_LineFormatter):
    """For a terminal: time, level, message, then the fields as key=value; no colours."""

    def format(self, record: logging.LogRecord) -> str:
        entry = _fields(record)
        head = f"{entry.pop('ts')} {entry.pop('level'):<7} {entry.pop('msg')}"
        entry.pop("pid")
        del entry["logger"]
        line = " ".join([head, *(f"{k}={v}" for k, v in entry.items() if v is not None)])
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure(level: str, log_format: str = "json") -> dict[str, object]:
    """A logging dictConfig for the server and uvicorn, every line in `log_format`."""
    formatter = TextFormatter if log_format == "text" else JsonFormatter
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"line": {"()": formatter}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "line"}},
        "root": {"handlers": ["stderr"], "level": level.upper()},
        "loggers": {
            "uvicorn": {"handlers": [], "propagate": True},
            "uvicorn.error": {"handlers": [], "propagate": True},
            "uvicorn.access": {"handlers": [], "propagate": False},
        },
    }


class AccessLog:
    """An `Exchange` observer: one line per finished request, as fields."""

    def __init__(self, *, every_request: bool) -> None:
        self.every_request = every_request

    def __call__(self, exchange: Exchange) -> None:
        status = exchange.status
        if status >= 500:
            level = logging.WARNING
        elif status >= 400 or status == 0 or self.every_request:
            level = logging.INFO
        else:
            return
        if not access.isEnabledFor(level):
            return
        access.log(
            level,
            "request" if status else "request dropped without an answer",
            extra={
                "request_id": exchange.request_id,
                "method": exchange.method,
                "path": exchange.path,
                "route": exchange.route,
                "status": status,
                "duration_ms": round(exchange.seconds * 1000, 3),
                "protocol": exchange.protocol,
                "upload_id": exchange.upload_id,
                "owner": exchange.owner,
                "problem": exchange.problem,
                "bytes_received": exchange.received,
                "bytes_sent": exchange.sent,
            },
        )
