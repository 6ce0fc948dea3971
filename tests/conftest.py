"""Fixtures that start the real server (the `uploadsrv serve` console script) on a free port."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest

TUS = {"Tus-Resumable": "1.0.0"}
STARTUP_SECONDS = 15


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `condition` until true: for state outside our control (another process, the disk)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class Server:
    """One `uploadsrv serve` process on a loopback port, with its own data directory."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        self.data_dir = data_dir
        self.args = args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.files = self.url + "/files/"
        self.process: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / f"server-{self.port}.log"

    def start(self) -> Server:
        command = [sys.executable, "-m", "uploadsrv", "serve", "--port", str(self.port)]
        command += ["--data-dir", str(self.data_dir), *self.args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("UPLOADSRV_")}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_for(self._ready, STARTUP_SECONDS, f"server on port {self.port} (log: {self.log})")
        return self

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"server exited with {self.process.returncode}: {self.log.read_text()}")
        try:
            return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def upload_dir(self, upload_url: str) -> Path:
        upload_id = upload_url.rstrip("/").rsplit("/", 1)[1]
        return self.data_dir / "uploads" / upload_id[:2] / upload_id

    def stored_size(self, upload_url: str) -> int:
        return (self.upload_dir(upload_url) / "data").stat().st_size


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The shared server with default settings."""
    srv = Server(tmp_path_factory.mktemp("shared") / "data").start()
    yield srv
    srv.stop()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start a dedicated server with extra flags (limits, expiry, a disk of its own)."""
    started: list[Server] = []

    def start(*args: str, data_dir: Path | None = None) -> Server:
        srv = Server(data_dir or tmp_path / f"data{len(started)}", *args).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as c:
        yield c


async def create(client: httpx.AsyncClient, server: Server, length: int | None, **headers: str) -> str:
    """Create a tus upload and return its URL."""
    hdrs = {**TUS, **headers}
    if length is None:
        hdrs["Upload-Defer-Length"] = "1"
    else:
        hdrs["Upload-Length"] = str(length)
    response = await client.post(server.files, headers=hdrs)
    assert response.status_code == 201, response.text
    return response.headers["location"]


async def patch(
    client: httpx.AsyncClient, url: str, offset: int, data: bytes, **headers: str
) -> httpx.Response:
    return await client.patch(
        url,
        content=data,
        headers={
            **TUS,
            "Upload-Offset": str(offset),
            "Content-Type": "application/offset+octet-stream",
            **headers,
        },
    )


async def download(client: httpx.AsyncClient, url: str) -> bytes:
    response = await client.get(url)
    assert response.status_code == 200, response.text
    return response.content


def raw_request(port: int, head: str, body: bytes = b"", *, close: bool = True) -> socket.socket:
    """Send a request head (and part of a body) over a plain socket, for cut-off bodies and trailers."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
    if close:
        sock.close()
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response with a Content-Length (or none) from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body
