"""What a small upload costs the server in instructions: steady where CPU time is not.

    python -m uploadsrv.loadtest.instructions [pair|one] [--uploads 400] [--python PYTHON]
        [--without metrics,log]

On a shared machine the CPU time of a request swings by half with the load beside it;
the number of instructions it takes does not. This runs the app in-process (the ASGI
application called directly: no sockets, the same middleware, core and local storage,
its disk threads included) for `--uploads` small tus uploads, 32 at a time, under
valgrind's cachegrind, once with 100 and once with 100 + `--uploads`, and prints the
difference per upload: start-up and imports cancel out. `pair` is a create and a 1 KiB
PATCH, `one` a 1 KiB creation-with-upload. `--python` measures another checkout's venv.
`--without` turns off what settings can turn off, to see its share: `metrics` (`--metrics
false`), `log` (`--log-level warning`: no "upload completed" line). The HTTP server's own
share (uvicorn, httptools) is not in it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

BODY = os.urandom(1024)
CONCURRENCY = 32
BASE = 100  #: uploads in the run whose instructions are subtracted


async def _call(app: Any, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> dict:
    """One request to the ASGI app; its response start."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"bench"), (b"tus-resumable", b"1.0.0"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 1080),
        "state": {},
    }
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:
        if messages:
            return messages.pop()
        await asyncio.Event().wait()  # the app never reads past the body
        raise AssertionError("unreachable")

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]


async def pair(app: Any) -> None:
    length = str(len(BODY)).encode()
    created = await _call(
        app, "POST", "/files/", [(b"upload-length", length), (b"content-length", b"0")], b""
    )
    assert created["status"] == 201, created
    location = dict(created["headers"])[b"location"].decode()
    path = "/" + location.split("/", 3)[3]
    headers = [
        (b"upload-offset", b"0"),
        (b"content-type", b"application/offset+octet-stream"),
        (b"content-length", length),
    ]
    appended = await _call(app, "PATCH", path, headers, BODY)
    assert appended["status"] == 204, appended


async def one(app: Any) -> None:
    length = str(len(BODY)).encode()
    headers = [
        (b"upload-length", length),
        (b"content-type", b"application/offset+octet-stream"),
        (b"content-length", length),
    ]
    created = await _call(app, "POST", "/files/", headers, BODY)
    assert created["status"] == 201, created


KINDS: dict[str, Callable[[Any], Awaitable[None]]] = {"pair": pair, "one": one}


WITHOUT = ("metrics", "log")  #: what `--without` can turn off


async def run(kind: str, uploads: int, data: str, without: frozenset[str] = frozenset()) -> None:
    """`uploads` uploads of `kind` through the app on a data directory `data`, without the
    parts named in `without`."""
    import logging.config

    from uploadsrv.app import create_app
    from uploadsrv.config import Settings
    from uploadsrv.logs import configure

    logging.config.dictConfig(configure("warning" if "log" in without else "info"))
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(open(os.devnull, "w"))  # noqa: SIM115  (open for the process's life)
    app = create_app(Settings.from_env({}, data_dir=data, metrics="metrics" not in without))
    upload = KINDS[kind]
    remaining = iter(range(uploads))

    async def worker() -> None:
        for _ in remaining:
            await upload(app)

    async with app.router.lifespan_context(app):
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


def instructions(python: str, kind: str, uploads: int, without: str = "") -> int:
    """User-space instructions of one in-process run, all threads (cachegrind's I refs)."""
    data = tempfile.mkdtemp(prefix="uploadsrv-instructions-")
    try:
        command = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null"]
        # by path: another venv may lack this module
        command += [python, __file__, "--run", kind, str(uploads), data, without]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
    finally:
        shutil.rmtree(data, ignore_errors=True)
    refs = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    if refs is None:
        raise RuntimeError(f"no instruction count in valgrind's output: {done.stderr[-500:]}")
    return int(refs[1].replace(",", ""))


def main() -> None:
    if sys.argv[1:2] == ["--run"]:  # the measured process
        kind, uploads, data = sys.argv[2], int(sys.argv[3]), sys.argv[4]
        without = frozenset(filter(None, sys.argv[5].split(","))) if len(sys.argv) > 5 else frozenset()
        import uvloop

        uvloop.run(run(kind, uploads, data, without))
        return
    from uploadsrv.loadtest.options import names_of  # here: the measured process runs this file by path

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("kind", nargs="?", choices=sorted(KINDS), default="pair")
    parser.add_argument("--uploads", type=int, default=400)
    parser.add_argument("--python", default=sys.executable, help="the interpreter whose uploadsrv to measure")
    parser.add_argument(
        "--without",
        type=names_of(WITHOUT, "part named"),
        default=[],
        help=f"turn off, to see their share: {', '.join(WITHOUT)}",
    )
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        parser.exit(2, "valgrind is not installed (apt-get install valgrind)\n")
    off = ",".join(args.without)
    base = instructions(args.python, args.kind, BASE, off)
    more = instructions(args.python, args.kind, BASE + args.uploads, off)
    label = f"{args.kind} without {', '.join(args.without)}" if args.without else args.kind
    print(f"{label}: {(more - base) / args.uploads:,.0f} instructions per upload")


if __name__ == "__main__":
    main()
