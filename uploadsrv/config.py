"""Server settings: flags and environment variables with safe defaults."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

ENV_PREFIX = "UPLOADSRV_"

_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"\s*(\d{1,15})\s*([kmgt]?)(?:i?b)?\s*", re.ASCII)
_DURATION = re.compile(r"\s*(\d{1,9}(?:\.\d{1,9})?)\s*([smhd]?)\s*", re.ASCII)
_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class ConfigError(ValueError):
    """A flag or `UPLOADSRV_*` value the setting does not accept; one line for the operator."""


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def parse_size(text: str) -> int:
    """Bytes from '1048576', '512M', '16GiB', '2T' (binary units)."""
    match = _SIZE.fullmatch(text.lower())
    if not match:
        raise ValueError(f"{text!r} is not a size; use e.g. 512M or 16G")
    return int(match[1]) * _SIZE_UNITS[match[2]]


def parse_duration(text: str) -> float | None:
    """Seconds from '3600', '30m', '12h', '7d'; '0' or 'never' means no limit (None)."""
    if text.strip().lower() in ("0", "never", "none"):
        return None
    return parse_seconds(text)


def parse_seconds(text: str) -> float:
    """Seconds from '10', '1.5', '90s', '30m', '12h', '7d'; 0 is 0 here."""
    match = _DURATION.fullmatch(text.lower())
    if not match:
        raise ValueError(f"{text!r} is not a duration; use e.g. 90s, 30m, 12h or 7d")
    return float(match[1]) * _DURATION_UNITS[match[2]]


def _parse_list(text: str) -> list[str]:
    return [origin.strip() for origin in text.split(",") if origin.strip()]


def _parse_events(text: str) -> list[str]:
    from .core.hooks import parse_events

    return parse_events(text)


def parse_bool(text: str) -> bool:
    """Only the six spellings people mean: a typo is an error, not false."""
    try:
        return _BOOLEANS[text.strip().lower()]
    except KeyError:
        raise ValueError(f"{text!r} is not a boolean; use true or false (or 1/0, yes/no)") from None


def _count(low: int, high: int | None = None, what: str = "a number") -> Callable[[str], int]:
    """A decimal integer from `low` to `high`."""
    accepts = f"{low} or more" if high is None else f"{low} to {high}"

    def parse(text: str) -> int:
        value = text.strip()
        if not (value.isascii() and value.isdigit() and len(value) < 10):
            raise ValueError(f"{text!r} is not {what}; use {accepts}")
        number = int(value)
        if number < low or (high is not None and number > high):
            raise ValueError(f"{text!r} is out of range; use {accepts}")
        return number

    return parse


def _at_least(minimum: int, parse: Callable[[str], int], hint: str) -> Callable[[str], int]:
    def checked(text: str) -> int:
        value = parse(text)
        if value < minimum:
            raise ValueError(f"{text!r} is too small; use {hint}")
        return value

    return checked


def _choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in options:
            raise ValueError(f"{text!r} is not one of {', '.join(options)}")
        return value

    return parse


def _parse_storage(text: str) -> str:
    value = text.strip()
    if value and not re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?", value):
        raise ValueError(f"{text!r} is not a storage; use s3://bucket/prefix, or nothing for local disk")
    return value


def _parse_url(text: str) -> str:
    value = text.strip()
    if not re.fullmatch(r"https?://[^\s/?#]+(/\S*)?", value):
        raise ValueError(f"{text!r} is not a URL; use e.g. https://minio.internal:9000")
    return value


@dataclass
class Settings:
    """Every knob of the server. Each field `x` is also read from `UPLOADSRV_X`."""

    host: str = "127.0.0.1"
    port: int = 1080
    data_dir: Path = field(default_factory=lambda: Path("data"))
    #: Largest upload accepted (bytes); advertised as Tus-Max-Size.
    max_size: int = 16 << 30
    #: Unfinished uploads with no activity for this long expire (None: never).
    #: Days, because iOS background retries back off over hours.
    expiry: float | None = 7 * 86400.0
    #: How often the server deletes expired uploads itself (None: never).
    expiry_interval: float | None = 3600.0
    #: Where uploads go: empty for local disk under `data_dir`, or s3://bucket/prefix.
    storage: str = ""
    #: For S3-compatible stores (MinIO, R2, ...); credentials come from the AWS chain.
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_path_style: bool = False
    #: Preferred S3 part size; raised for huge uploads so they fit in 10,000 parts.
    s3_part_size: int = 8 << 20
    #: Parts of one request uploaded in parallel (memory: about part size x this).
    s3_concurrency: int = 4
    #: Send a CRC32 of every part for S3 to check, as AWS SDKs do; the finished object
    #: keeps a composite CRC32. False for S3-compatible stores without checksum support.
    s3_checksums: bool = True
    #: Answer downloads with a redirect to a presigned S3 URL instead of streaming.
    s3_presign_downloads: bool = False
    #: Chunk size of a chunk session whose client names none (raised where S3 or the
    #: 10,000-chunk limit needs it).
    chunk_size: int = 8 << 20
    base_path: str = "/files/"
    #: Origins allowed by CORS; '*' lets any browser app upload.
    cors_origins: list[str] = field(default_factory=lambda: ["*"])
    #: Trust X-Forwarded-Proto/Host for the URLs the server hands out.
    trust_proxy: bool = False
    #: Who may upload, and whose upload it is: 'none' (anyone; for a loopback dev server),
    #: 'header' (a trusted proxy names the subject in `owner_header`), 'bearer' (static
    #: tokens in `tokens_file`) or 'jwt'. Empty: 'header' if `owner_header` is set, else 'none'.
    auth: str = ""
    #: The request header in which a trusted auth proxy names the subject (`auth` header).
    owner_header: str | None = None
    #: Redis shared by the instances (redis://, rediss://, redis+sentinel://, redis+cluster://):
    #: leases with a short TTL, release requests and events pushed between instances.
    redis_url: str | None = None
    #: `token subject` per line, for `auth` bearer; reloaded on SIGHUP.
    tokens_file: Path | None = None
    #: HS256 key for `auth` jwt; also the default key of signed upload URLs.
    jwt_secret: str | None = None
    #: A PEM public key or a JWKS file, for RS256/ES256 JWTs.
    jwt_public_key: Path | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    #: The claim that names the subject (the upload's owner).
    jwt_subject_claim: str = "sub"
    #: Seconds of clock skew allowed for `exp` and `nbf`.
    jwt_leeway: float = 30.0
    #: Key of the signatures on upload URLs; `url_secret_previous` still verifies, for rotation.
    url_secret: str | None = None
    url_secret_previous: str | None = None
    #: Unfinished uploads, and requests in flight, one owner may have at once (None: no limit).
    max_uploads_per_owner: int | None = None
    max_requests_per_owner: int | None = None
    #: Seconds a request waits for an upload held by another request that will not let go.
    lock_timeout: float = 10.0
    #: Threads for blocking disk calls (writes, fsync), shared by all requests.
    io_threads: int = 16
    workers: int = 1
    #: uvicorn HTTP implementation: 'httptools' (fast, C) or 'h11' (pure Python).
    http: str = "httptools"
    log_level: str = "info"
    #: 'json' (one object per line, for collectors) or 'text' (for a terminal).
    log_format: str = "json"
    access_log: bool = False
    #: Seconds an idle keep-alive connection stays open. Longer than clients' pools and
    #: load balancers keep theirs (AWS ALB: 60 s), so the other side always closes first:
    #: when the server closes a connection a client is about to reuse, that request fails.
    keep_alive: float = 75.0
    #: TLS in uploadsrv itself (uvicorn's): PEM certificate chain and its private key.
    #: For iOS clients behind no proxy that passes 104s through.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: Listen on this unix socket instead of host and port (a proxy on the same machine).
    unix_socket: Path | None = None
    #: Seconds a stopping server (SIGTERM) gives requests in flight; then they are ended,
    #: appends keeping every byte that arrived. Below your orchestrator's kill timeout
    #: (Docker's and Kubernetes' default: 10 s and 30 s).
    shutdown_timeout: float = 8.0
    #: Serve Prometheus metrics at `metrics_path`; with `metrics_token`, only to
    #: `Authorization: Bearer <token>`.
    metrics: bool = True
    metrics_path: str = "/metrics"
    metrics_token: str | None = None
    #: Serve the web console at /console/ (off: a public server exposes nothing new).
    console: bool = False
    #: The console's bearer token: whoever holds it sees every session. With the console
    #: on, auth off and none set, a random one is made at start-up and logged with the
    #: console's URL; with auth on, users of the server's auth see their own sessions.
    console_token: str | None = None
    #: Hooks (tusd's): POST every event's JSON to this URL...
    hooks_http: str | None = None
    #: ...or run the executable named after the event in this directory.
    hooks_dir: Path | None = None
    hooks_http_timeout: float = 15.0
    #: Retries of a failed blocking or best-effort hook (5xx, network errors).
    hooks_http_retry: int = 3
    #: Seconds before the first retry; each next one waits about twice as long, with jitter.
    hooks_http_backoff: float = 1.0
    #: Request headers copied onto hook requests as they are (e.g. Authorization, Cookie).
    hooks_http_forward_headers: list[str] = field(default_factory=list)
    hooks_enabled_events: list[str] = field(
        default_factory=lambda: [
            "pre-create",
            "post-create",
            "post-receive",
            "post-finish",
            "post-terminate",
            "post-expire",
        ]
    )
    #: Seconds between two post-receive hooks of one upload.
    progress_hooks_interval: float = 1.0
    #: A Standard Webhooks secret (whsec_...): every HTTP hook is signed with it.
    hooks_secret: str | None = None
    #: A durable event not delivered for this long is given up (kept for `uploadsrv hooks`).
    hooks_max_age: float | None = 3 * 86400.0
    #: Largest request head (request line and header lines) in bytes; larger is a 431.
    max_header_size: int = 16 << 10
    #: Largest `Upload-Metadata` (as the header carries it, base64 values); larger is a 413.
    max_metadata_size: int = 4 << 10
    #: Seconds a connection has to deliver a complete request head (None: no limit).
    #: Slow-header clients (slowloris) otherwise hold a connection each, for ever.
    header_timeout: float | None = 30.0
    #: Seconds a request body may deliver no byte before the request is ended (None: no
    #: limit). What arrived is kept; the client resumes from there. A client that reads
    #: nothing of a response for as long is dropped too.
    idle_timeout: float | None = 60.0
    #: Open connections per worker process; beyond it a new connection gets a 503.
    max_connections: int = 4096

    _parsers: ClassVar[dict[str, Callable[[str], object]]] = {
        "port": _count(1, 65535, "a port"),
        "data_dir": Path,
        "tokens_file": Path,
        "jwt_public_key": Path,
        "jwt_leeway": parse_seconds,
        "max_uploads_per_owner": _count(0, 1 << 30),
        "max_requests_per_owner": _count(0, 1 << 30),
        "max_size": _at_least(1, parse_size, "e.g. 512M or 16G"),
        "expiry": parse_duration,
        "expiry_interval": parse_duration,
        "storage": _parse_storage,
        "s3_endpoint_url": _parse_url,
        "cors_origins": _parse_list,
        "trust_proxy": parse_bool,
        "lock_timeout": parse_seconds,
        "io_threads": _count(1, 1024),
        "workers": _count(1, 1024),
        "http": _choice("httptools", "h11"),
        "log_level": _choice("debug", "info", "warning", "error"),
        "access_log": parse_bool,
        "keep_alive": parse_seconds,
        "tls_cert": Path,
        "tls_key": Path,
        "unix_socket": Path,
        "shutdown_timeout": parse_seconds,
        "metrics": parse_bool,
        "s3_path_style": parse_bool,
        "s3_part_size": _at_least(5 << 20, parse_size, "5M or more"),
        "chunk_size": _at_least(1, parse_size, "e.g. 8M"),
        "s3_concurrency": _count(1, 64),
        "s3_presign_downloads": parse_bool,
        "s3_checksums": parse_bool,
        "console": parse_bool,
        "hooks_dir": Path,
        "hooks_http_timeout": parse_seconds,
        "hooks_http_retry": _count(0, 1000),
        "hooks_http_backoff": parse_seconds,
        "hooks_http_forward_headers": _parse_list,
        "hooks_enabled_events": _parse_events,
        "progress_hooks_interval": parse_seconds,
        "hooks_max_age": parse_duration,
        "max_header_size": _at_least(1 << 10, parse_size, "1K or more, e.g. 16K"),
        "max_metadata_size": _at_least(1, parse_size, "e.g. 4K"),
        "header_timeout": parse_duration,
        "idle_timeout": parse_duration,
        "max_connections": _count(1, 1 << 20),
    }

    @classmethod
    def parse(cls, name: str, text: str) -> object:
        """A setting's value from its text; ValueError says what the setting accepts."""
        return cls._parsers.get(name, str)(text)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from `UPLOADSRV_*` variables, then `overrides` (parsed flags) on top.

        Raises ConfigError naming the variable when one holds what its setting does not accept.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            text = environ.get(env_name(f.name))
            if text is not None and text != "":
                try:
                    values[f.name] = cls.parse(f.name, text)
                except ValueError as error:
                    raise ConfigError(f"{env_name(f.name)}: {error}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)  # type: ignore[arg-type]  # each value comes from its field's parser
        settings.base_path = "/" + settings.base_path.strip("/") + "/"
        if not settings.auth:  # a proxy naming the owner is what --owner-header always meant
            settings.auth = "header" if settings.owner_header else "none"
        return settings

    def core_limits(self) -> dict[str, Any]:
        """The upload core's limits (`UploadService`'s keywords): the server and the
        operator commands apply the same ones."""
        return {
            "max_size": self.max_size,
            "expiry": self.expiry,
            "lock_timeout": self.lock_timeout,
            "max_metadata_size": self.max_metadata_size,
        }

    def to_env(self) -> dict[str, str]:
        """The environment that makes `from_env` rebuild these settings (for worker processes)."""
        env = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                text = "never" if self._parsers.get(f.name) is parse_duration else ""
            elif isinstance(value, list):
                text = ",".join(value)
            else:
                text = str(value)
            env[env_name(f.name)] = text
        return env
