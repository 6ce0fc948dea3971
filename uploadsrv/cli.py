"""The `uploadsrv` console script."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from .config import ENV_PREFIX, Settings

PROTOCOL_CLASSES = {
    "httptools": "uploadsrv.uvicorn_protocols:HttpToolsUploadProtocol",
    "h11": "uploadsrv.uvicorn_protocols:H11UploadProtocol",
}

SERVE_FLAGS = {
    "host": "address to listen on (0.0.0.0 for every interface)",
    "port": "TCP port",
    "data_dir": "where uploads are stored",
    "max_size": "largest upload accepted, e.g. 512M or 16G",
    "expiry": "unfinished uploads idle this long expire, e.g. 12h or 7d; 'never' keeps them",
    "expiry_interval": "how often the server removes expired uploads; 'never' leaves it to cron",
    "storage": "empty for local disk, or s3://bucket/prefix",
    "s3_endpoint_url": "endpoint of an S3-compatible store",
    "s3_region": "S3 region",
    "s3_path_style": "path-style S3 addressing (true/false), for MinIO and the like",
    "s3_part_size": "preferred S3 part size, at least 5M",
    "s3_concurrency": "S3 parts of one request uploaded in parallel",
    "s3_presign_downloads": "redirect downloads to presigned S3 URLs (true/false)",
    "base_path": "URL path of the tus endpoint",
    "cors_origins": "comma-separated origins allowed by CORS, or *",
    "trust_proxy": "trust X-Forwarded-Proto/Host from a reverse proxy (true/false)",
    "owner_header": "request header whose value is recorded as the upload's owner",
    "lock_timeout": "seconds a request waits for a busy upload",
    "io_threads": "threads for blocking disk calls",
    "workers": "worker processes",
    "http": "HTTP implementation: httptools or h11",
    "log_level": "debug, info, warning or error",
    "access_log": "log every request (true/false)",
}


def _serve_parser(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="run the upload server")
    defaults = Settings()
    for name, help_text in SERVE_FLAGS.items():
        default = getattr(defaults, name)
        serve.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=lambda text, name=name: Settings.parse(name, text),
            help=f"{help_text} [env {ENV_PREFIX}{name.upper()}; default {default}]",
        )
    serve.set_defaults(run=serve_command)


def serve_command(args: argparse.Namespace) -> int:
    import uvicorn

    from .logs import configure

    overrides = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(Settings)}
    settings = Settings.from_env(**overrides)
    if settings.http not in PROTOCOL_CLASSES:
        sys.exit(f"uploadsrv: --http must be one of {', '.join(PROTOCOL_CLASSES)}")
    settings.data_dir = settings.data_dir.resolve()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # Workers rebuild the settings from the environment, so one path serves 1 or N.
    os.environ.update(settings.to_env())
    uvicorn.run(
        "uploadsrv.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        http=PROTOCOL_CLASSES[settings.http],
        loop="uvloop",
        log_config=configure(settings.log_level),
        access_log=settings.access_log,
        proxy_headers=settings.trust_proxy,
        timeout_graceful_shutdown=10,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="uploadsrv", description="Resumable upload server.")
    subparsers = parser.add_subparsers(required=True, metavar="COMMAND")
    _serve_parser(subparsers)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
