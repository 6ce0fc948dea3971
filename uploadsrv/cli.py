"""The `uploadsrv` console script: `serve`, the operator commands `list`, `inspect`,
`prune` and `stats`, which take the same storage flags and environment as the server,
and `loadtest`.

Exit codes: 0 success, 1 a command failed (the message names the upload and the cause),
2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import os
import resource
import ssl
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from . import __version__
from .config import ConfigError, Settings, env_name, flag_name, parse_duration

if TYPE_CHECKING:  # the operator commands import these lazily, to keep `serve` start-up lean
    from rich.console import Console

    from .core import UploadService
    from .core.storage import Outbox

#: uvicorn minor versions `uvicorn_protocols.py`, which subclasses uvicorn's private
#: protocol classes, is tested against; pyproject.toml pins the same range.
TESTED_UVICORN = ("0.54",)
#: Descriptors one connection may hold (its socket, a file it writes or reads), and what
#: the process needs besides (logs, the listening socket, lock files, S3 connections).
FDS_PER_CONNECTION = 2
FDS_SPARE = 256

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"

PROTOCOL_CLASSES = {
    "httptools": "uploadsrv.uvicorn_protocols:HttpToolsUploadProtocol",
    "h11": "uploadsrv.uvicorn_protocols:H11UploadProtocol",
}

#: Flags of the storage, its limits and expiry: `serve` and every operator command take them.
STORAGE_FLAGS = {
    "data_dir": "where uploads are stored (with S3: scratch space)",
    "storage": "empty for local disk, or s3://bucket/prefix",
    "s3_endpoint_url": "endpoint of an S3-compatible store",
    "s3_region": "S3 region",
    "s3_path_style": "path-style S3 addressing (true/false), for MinIO and the like",
    "expiry": "unfinished uploads idle this long expire, e.g. 12h or 7d; 'never' keeps them",
    "lock_timeout": "seconds a request waits for a busy upload",
    "redis_url": "Redis shared by several instances (leases, release requests, events): redis://host:port/db",
    "max_size": "largest upload accepted, e.g. 512M or 16G",
    "expiry_interval": "how often the server removes expired uploads; 'never' leaves it to cron",
    "s3_part_size": "preferred S3 part size, at least 5M",
    "s3_concurrency": "S3 parts of one request uploaded in parallel",
    "s3_presign_downloads": "redirect downloads to presigned S3 URLs (true/false)",
    "s3_checksums": "CRC32 of every S3 part, checked by S3 (true/false); false for stores without checksums",
    "chunk_size": "chunk size of a chunk session whose client names none",
    "io_threads": "threads for blocking disk calls",
}
SERVE_FLAGS = {
    "host": "address to listen on (0.0.0.0 for every interface)",
    "port": "TCP port",
    "base_path": "URL path of the tus endpoint",
    "cors_origins": "comma-separated origins allowed by CORS, or *",
    "trust_proxy": "trust X-Forwarded-Proto/Host from a reverse proxy (true/false)",
    "auth": "who may upload: none, header, bearer or jwt (default: header with --owner-header, else none)",
    "owner_header": "request header in which a trusted auth proxy names the user (implies --auth header)",
    "tokens_file": "--auth bearer: a file of 'token subject' lines, reloaded on SIGHUP",
    "jwt_secret": "--auth jwt: HS256 key",
    "jwt_public_key": "--auth jwt: PEM public key or JWKS file for RS256/ES256",
    "jwt_audience": "--auth jwt: required aud claim",
    "jwt_issuer": "--auth jwt: required iss claim",
    "jwt_subject_claim": "--auth jwt: the claim naming the user",
    "jwt_leeway": "--auth jwt: seconds of clock skew allowed",
    "url_secret": "key of signed upload URLs (default: derived from --jwt-secret)",
    "url_secret_previous": "the previous --url-secret, still accepted while you rotate",
    "max_uploads_per_owner": "unfinished uploads one user may have (429 beyond)",
    "max_requests_per_owner": "requests one user may have in flight (429 beyond)",
    "workers": "worker processes",
    "http": "HTTP implementation: httptools or h11",
    "log_level": "debug, info, warning or error",
    "log_format": "json (one object per line) or text (for a terminal)",
    "access_log": "log every request (true/false); 4xx and 5xx are always logged",
    "keep_alive": "seconds an idle connection stays open; keep it above your load balancer's idle timeout",
    "tls_cert": "PEM certificate (chain) to serve HTTPS with; needs --tls-key",
    "tls_key": "PEM private key of --tls-cert",
    "unix_socket": "listen on this unix socket instead of --host and --port",
    "shutdown_timeout": "seconds requests in flight get when the server stops; appends keep what arrived",
    "metrics": "serve Prometheus metrics (true/false)",
    "metrics_path": "URL path of the metrics",
    "metrics_token": "serve metrics only with Authorization: Bearer <this token>",
    "console": "serve the web console at /console/ (true/false; the flag alone means true)",
    "console_token": "the console operator's bearer token (auth none: a random one is logged if unset)",
    "max_header_size": "largest request head (request line and headers), e.g. 16K; larger is a 431",
    "max_metadata_size": "largest Upload-Metadata, e.g. 4K; larger is a 413",
    "header_timeout": "seconds a request head may take; then the connection is closed ('never': no limit)",
    "idle_timeout": "seconds a request body, or a client reading a response, may stall ('never': no limit)",
    "max_connections": "open connections per worker; beyond it new connections get a 503 with Retry-After",
}
HOOK_FLAGS = {
    "hooks_http": "POST every hook event (tusd's JSON) to this URL",
    "hooks_dir": "or run the executable named after the event in this directory (tusd's file hooks)",
    "hooks_http_timeout": "seconds a hook may take to answer",
    "hooks_http_retry": "retries of a hook that failed (5xx, network errors)",
    "hooks_http_backoff": "seconds before the first retry; doubling, with jitter",
    "hooks_http_forward_headers": "comma-separated request headers copied onto hook requests",
    "hooks_enabled_events": "comma-separated hook events to send",
    "progress_hooks_interval": "seconds between two post-receive hooks of one upload",
    "hooks_secret": "Standard Webhooks secret (whsec_...) that signs every HTTP hook",
    "hooks_max_age": "give up on a durable hook event not delivered for this long, e.g. 3d",
}


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line that names the flag and what it accepts, exit status 2."""

    def error(self, message: str) -> NoReturn:
        message = message.removeprefix("argument ")
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _setting_type(name: str) -> Callable[[str], object]:
    def parse(text: str) -> object:
        try:
            return Settings.parse(name, text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _add_settings(parser: argparse.ArgumentParser, flags: dict[str, str]) -> None:
    defaults = Settings()
    for name, help_text in flags.items():
        switch = isinstance(getattr(defaults, name), bool)  # `--console` alone means true
        parser.add_argument(
            flag_name(name),
            dest=name,
            nargs="?" if switch else None,
            const=True if switch else None,
            type=_setting_type(name),
            help=f"{help_text} [env {env_name(name)}; default {getattr(defaults, name)}]",
        )


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(Settings)}
    return Settings.from_env(**overrides)


def untested_uvicorn(version: str) -> str | None:
    """Why `version` of uvicorn must not run uploadsrv, or None if it is a tested one."""
    if ".".join(version.split(".")[:2]) in TESTED_UVICORN:
        return None
    tested = ", ".join(v + ".x" for v in TESTED_UVICORN)
    return f"uvicorn {version} is untested with uploadsrv's protocol classes; install uvicorn {tested}"


def serve_command(args: argparse.Namespace) -> int:
    import uvicorn

    problem = untested_uvicorn(uvicorn.__version__)
    if problem:
        sys.exit(f"uploadsrv: {problem}")
    settings = _settings(args)
    problem = _settings_problem(settings)
    if problem:
        sys.exit(f"uploadsrv: {problem}")
    _check_redis_url(settings.redis_url)
    if not _auth_ready(settings):
        return 2
    _fit_open_files(settings)
    _make_data_dir(settings)
    _check_storage(settings)
    _announce_console(settings)
    # Workers rebuild the settings from the environment, so one path serves 1 or N.
    os.environ.update(settings.to_env())
    with _metrics_dir(settings):
        _run_uvicorn(settings)
    return 0


def _settings_problem(settings: Settings) -> str | None:
    """Why these settings cannot serve (TLS files, log format, the backend's package), or None."""
    from .backend import MissingDependency, require_backend
    from .logs import FORMATS

    problem = _tls_problem(settings)
    if problem:
        return problem
    if settings.log_format not in FORMATS:
        return f"--log-format must be one of {', '.join(FORMATS)}"
    try:
        require_backend(settings)
    except MissingDependency as missing:
        return str(missing)
    return None


def _auth_ready(settings: Settings) -> bool:
    """Prepare authentication (keys, token files), printing its warnings; False if it cannot work."""
    from . import auth

    try:
        for warning in auth.prepare(settings):
            print(f"uploadsrv: warning: {warning}", file=sys.stderr)
    except auth.ConfigError as error:
        print(f"uploadsrv serve: {error}", file=sys.stderr)
        return False
    return True


def _make_data_dir(settings: Settings) -> None:
    settings.data_dir = settings.data_dir.resolve()
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--data-dir: cannot create {str(settings.data_dir)!r}: {error.strerror}") from None


def _announce_console(settings: Settings) -> None:
    if settings.console:
        from .console import console_url, ensure_token

        if ensure_token(settings):  # before the workers start, so they share it
            print(f"uploadsrv: console at {console_url(settings)}", file=sys.stderr)


def _run_uvicorn(settings: Settings) -> None:
    import uvicorn

    from .logs import configure

    uvicorn.run(
        "uploadsrv.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        uds=str(settings.unix_socket) if settings.unix_socket else None,
        ssl_certfile=settings.tls_cert,
        ssl_keyfile=settings.tls_key,
        workers=settings.workers,
        http=PROTOCOL_CLASSES[settings.http],
        ws="none",  # no WebSocket routes: an Upgrade must not hand the connection past the limits
        loop="uvloop",
        log_config=configure(settings.log_level, settings.log_format),
        access_log=False,  # uploadsrv's own access log has the request's fields
        proxy_headers=settings.trust_proxy,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout),
        timeout_keep_alive=math.ceil(settings.keep_alive),  # uvicorn takes whole seconds
        h11_max_incomplete_event_size=settings.max_header_size,
    )


def _tls_problem(settings: Settings) -> str | None:
    """Why the TLS flags cannot work, found before any worker starts, or None."""
    if settings.tls_cert is None and settings.tls_key is None:
        return None
    if settings.tls_cert is None or settings.tls_key is None:
        return "--tls-cert and --tls-key go together"
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as error:
        return f"--tls-cert {settings.tls_cert} / --tls-key {settings.tls_key}: {error}"
    return None


def _check_redis_url(url: str | None) -> None:
    """Refuse a malformed Redis URL before any worker starts."""
    from .coordination import open_coordinator

    try:
        open_coordinator(url)
    except ValueError as exc:
        raise ConfigError(f"--redis-url: {exc}") from None


@contextlib.contextmanager
def _metrics_dir(settings: Settings) -> Iterator[None]:
    """prometheus-client's multiprocess directory for `--workers N`: made fresh for this
    run and removed after it. One the operator set in PROMETHEUS_MULTIPROC_DIR is emptied
    at start instead, so no counts from an earlier run are added to this one's."""
    given = os.environ.get(MULTIPROC_DIR)
    if given:
        for stale in Path(given).glob("*.db"):
            stale.unlink()
        yield
    elif settings.workers > 1 and settings.metrics:
        with tempfile.TemporaryDirectory(prefix="uploadsrv-metrics-") as made:
            os.environ[MULTIPROC_DIR] = made
            try:
                yield
            finally:
                del os.environ[MULTIPROC_DIR]
    else:
        yield


def _fit_open_files(settings: Settings) -> None:
    """Raise the soft open-file limit (`ulimit -n`) so that `--max-connections` fit, as
    far as the hard limit allows; else lower the connection limit to what fits, so that
    the 503 comes before the process runs out of descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = FDS_PER_CONNECTION * settings.max_connections + FDS_SPARE
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft < needed:
        settings.max_connections = max(1, (soft - FDS_SPARE) // FDS_PER_CONNECTION)
        print(
            f"uploadsrv serve: --max-connections lowered to {settings.max_connections} "
            f"to fit the open-file limit of {soft} (ulimit -n)",
            file=sys.stderr,
        )


def _check_storage(settings: Settings) -> None:
    """Open the storage (and Redis, when configured) once before serving: a missing bucket
    or an unreachable endpoint is one line and exit status 1, not a traceback from every
    worker's start-up."""
    from .backend import open_storage
    from .coordination import open_coordinator

    async def check() -> None:
        storage = open_storage(settings)
        try:
            await storage.check()
        finally:
            await storage.close()
        coordinator = open_coordinator(settings.redis_url)
        if coordinator is None:
            return
        try:
            await coordinator.check()
        except RuntimeError as error:
            raise RuntimeError(f"--redis-url {settings.redis_url}: {error}") from None
        finally:
            await coordinator.close()

    try:
        asyncio.run(check())
    except RuntimeError as error:
        print(f"uploadsrv serve: {error}", file=sys.stderr)
        sys.exit(1)


def _operator(run: Callable[..., Awaitable[int]]) -> Callable[[argparse.Namespace], int]:
    """Run an operator command against the configured storage, through the core."""

    def command(args: argparse.Namespace) -> int:
        from . import operator
        from .backend import open_storage
        from .coordination import open_coordinator
        from .core import UploadService
        from .core.capabilities import Capabilities
        from .core.errors import UploadError
        from .hook_delivery import open_hooks

        settings = _settings(args)

        async def main() -> int:
            storage = open_storage(settings)
            coordinator = open_coordinator(settings.redis_url)
            capabilities = Capabilities.of(storage)
            hooks = open_hooks(settings, capabilities, send=False)  # prune records post-expire
            try:
                await storage.check()
                if coordinator is not None:
                    await coordinator.start()
                service = UploadService(
                    storage,
                    **settings.core_limits(),
                    coordinator=coordinator,
                    hooks=hooks,
                    capabilities=capabilities,
                )
                return await run(service, settings, args, operator.console())
            finally:
                if hooks is not None:
                    await hooks.close()
                if coordinator is not None:
                    await coordinator.close()
                await storage.close()

        try:
            return asyncio.run(main())
        except (UploadError, RuntimeError, ValueError) as error:
            detail = error.detail if isinstance(error, UploadError) else str(error)
            print(f"uploadsrv {args.command}: {detail}", file=sys.stderr)
            return 1

    return command


def _show(
    args: argparse.Namespace, data: Any, print_table: Callable[[Any, Console], None], console: Console
) -> None:
    """An operator command's answer: JSON with --json, else for people to read."""
    from . import operator

    if args.json:
        operator.emit_json(data)
    else:
        print_table(data, console)


async def list_command(
    service: UploadService, settings: Settings, args: argparse.Namespace, console: Console
) -> int:
    from . import operator

    rows = await operator.list_uploads(
        service,
        state=args.state,
        older_than=args.older_than,
        owner=args.owner,
        sort=args.sort,
        limit=args.limit,
    )
    _show(args, rows, operator.print_uploads, console)
    return 0


async def inspect_command(
    service: UploadService, settings: Settings, args: argparse.Namespace, console: Console
) -> int:
    from . import operator
    from .core.errors import UploadNotFound

    try:
        details = await operator.inspect(service, args.upload_id)
    except UploadNotFound:
        print(f"uploadsrv inspect: upload {args.upload_id}: not found", file=sys.stderr)
        return 1
    _show(args, details, lambda data, out: out.print_json(data=data), console)
    return 0


async def prune_command(
    service: UploadService, settings: Settings, args: argparse.Namespace, console: Console
) -> int:
    from rich.console import Console

    from . import operator

    idle_for = args.older_than if args.older_than is not None else settings.expiry
    if idle_for is None:
        print("uploadsrv prune: no --older-than given and expiry is 'never'", file=sys.stderr)
        return 2
    with operator.progress_bar(Console(stderr=True)) as bar:
        task = bar.add_task("pruning", total=None)
        report = await operator.prune(
            service,
            idle_for=idle_for,
            include_complete=args.include_complete,
            orphan_age=args.orphan_age,
            dry_run=args.dry_run,
            progress=lambda name: bar.update(task, description=f"pruning {name}"),
        )
    if args.json:
        operator.emit_json(report.to_json())
    else:
        operator.print_prune(report, console)
    return 1 if report.errors else 0


async def stats_command(
    service: UploadService, settings: Settings, args: argparse.Namespace, console: Console
) -> int:
    from . import operator

    totals = await operator.stats(service)
    _show(args, totals, operator.print_stats, console)
    return 0


async def hooks_command(
    service: UploadService, settings: Settings, args: argparse.Namespace, console: Console
) -> int:
    from . import operator

    outbox = service.capabilities.outbox
    if outbox is None:
        print(f"uploadsrv hooks: {service.storage!r} keeps no hook outbox", file=sys.stderr)
        return 1
    if args.action == "list":
        _show(args, await operator.hook_events(outbox), operator.print_hook_events, console)
        return 0
    if args.action == "drop" and not args.event_id:
        print("uploadsrv hooks drop: which event? (see uploadsrv hooks list)", file=sys.stderr)
        return 2
    return await _act_on_hook_events(outbox, args.action, args.event_id, console)


async def _act_on_hook_events(outbox: Outbox, action: str, event_id: str | None, console: Console) -> int:
    """`hooks drop` one event, or `hooks retry` one or all: 1 if any was not there to act on."""
    from . import operator
    from .core.outbox import drop_event, retry_event

    ids = [event_id] if event_id else [row["id"] for row in await operator.hook_events(outbox)]
    act = drop_event if action == "drop" else retry_event
    failed = 0
    for one in ids:
        if await act(outbox, one):
            console.print(f"{action}: {one}")
        else:
            print(
                f"uploadsrv hooks {action}: {one}: no such event, or a server is sending it", file=sys.stderr
            )
            failed += 1
    return 1 if failed else 0


def _duration(text: str) -> float:
    value = parse_duration(text)
    if value is None:
        raise argparse.ArgumentTypeError("a duration such as 90s, 30m, 12h or 7d")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="uploadsrv", description="Resumable upload server.")
    parser.add_argument("--version", action="version", version=f"uploadsrv {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND", dest="command", parser_class=_Parser)

    serve = commands.add_parser("serve", help="run the upload server")
    _add_settings(serve, {**STORAGE_FLAGS, **SERVE_FLAGS, **HOOK_FLAGS})
    serve.set_defaults(run=serve_command)

    listing = commands.add_parser("list", help="list upload sessions")
    listing.add_argument("--state", choices=("incomplete", "complete", "expired"))
    listing.add_argument("--older-than", type=_duration, help="no activity for this long, e.g. 2d")
    listing.add_argument("--owner")
    listing.add_argument(
        "--sort", default="last_activity", choices=("last_activity", "created", "stored", "offset", "id")
    )
    listing.add_argument("--limit", type=int, help="show at most this many (after sorting)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=_operator(list_command))

    inspect = commands.add_parser("inspect", help="everything about one upload")
    inspect.add_argument("upload_id")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(run=_operator(inspect_command))

    prune = commands.add_parser("prune", help="remove stale uploads and orphaned storage")
    prune.add_argument("--older-than", type=_duration, help="idle for this long (default: the expiry)")
    prune.add_argument("--include-complete", action="store_true", help="also remove finished uploads")
    prune.add_argument(
        "--orphan-age", type=_duration, default=86400.0, help="leave orphans younger than this (default 1d)"
    )
    prune.add_argument("--dry-run", action="store_true", help="show what would go, change nothing")
    prune.add_argument("--json", action="store_true")
    prune.set_defaults(run=_operator(prune_command))

    stats = commands.add_parser("stats", help="counts and bytes by state")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(run=_operator(stats_command))

    # Listed for --help; `main` hands everything after it to the load test's own parser.
    commands.add_parser("loadtest", help="load a server and verify every upload (see loadtest --help)")

    hooks = commands.add_parser(
        "hooks",
        help="durable hook events not delivered yet",
        description="list: pending and given-up events with attempts and last error; "
        "retry [ID]: send one event (or all) again now; drop ID: remove one without sending it",
    )
    hooks.add_argument("action", choices=("list", "retry", "drop"))
    hooks.add_argument("event_id", nargs="?")
    hooks.add_argument("--json", action="store_true")
    hooks.set_defaults(run=_operator(hooks_command))

    for sub in (listing, inspect, prune, stats, hooks):
        _add_settings(sub, STORAGE_FLAGS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["loadtest"]:
        from .loadtest.__main__ import main as loadtest

        return loadtest(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as error:  # a bad UPLOADSRV_* value, or a setting the system refuses
        print(f"uploadsrv {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
