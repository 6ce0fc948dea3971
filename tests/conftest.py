"""Fixtures that start the real server (the `uploadsrv serve` console script) on a free port."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import httpx
import pytest

from uploadsrv.storage.local import RECORD_XATTR

if TYPE_CHECKING:
    from uploadsrv.core.storage import Storage
    from uploadsrv.storage.s3.state import State

TUS = {"Tus-Resumable": "1.0.0"}
BACKENDS = ["local", "s3"]
STARTUP_SECONDS = 60  #: generous: a loaded CI machine takes over 15 s to import and start a server


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


def spawn(
    command: list[str], log: Path, ready_url: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a process with its output in `log`, and wait until `ready_url` answers 200."""
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"{command[2]} exited with {process.returncode}: {log.read_text()[-3000:]}")
        try:
            return httpx.get(ready_url, timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(ready, STARTUP_SECONDS, f"{ready_url} (log: {log})")
    return process


class Moto:
    """A real S3 endpoint: moto's server mode in its own process."""

    credentials = {  # noqa: RUF012
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
        )
        self._buckets = 0

    def start(self) -> Moto:
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self.process = spawn(command, self.log, self.endpoint + "/moto-api/")
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def new_bucket(self) -> str:
        self._buckets += 1
        name = f"uploads-{self._buckets}-{os.getpid()}"
        self.client.create_bucket(Bucket=name)
        return name


class RedisServer:
    """A real Redis: the Debian package's `redis-server` in its own process, no persistence.

    `stop` and `start` again reuse the port, so servers configured with its URL see an
    outage and a recovery (with every key gone, as after a restart without persistence).
    """

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--dir", str(self.log.parent)]
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        wait_for(self.ping, STARTUP_SECONDS, f"redis-server on port {self.port} (log: {self.log})")
        return self

    def ping(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(
                f"redis-server exited with {self.process.returncode}: {self.log.read_text()}"
            )
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class LocalLayout:
    """Where local disk keeps an upload: the one place the tests know it (storage/local.py's
    module docstring describes it), for looking behind the server's back. Two layouts:
    ``files/<id>`` (a tus or draft upload: the bytes, the record an xattr), and
    ``uploads/<id[:2]>/<id>/`` (chunk sessions, large records, older data directories)."""

    def __init__(self, data_dir: Path) -> None:
        root = data_dir.resolve()
        self.files = root / "files"
        self.uploads = root / "uploads"

    def flat(self, upload_id: str) -> Path:
        """The file of a tus or IETF draft upload's bytes, its record an xattr."""
        return self.files / upload_id

    def directory(self, upload_id: str) -> Path:
        """The directory of a chunk session (or an upload whose record is a file)."""
        return self.uploads / upload_id[:2] / upload_id

    def data(self, upload_id: str) -> Path:
        """The file of the upload's bytes, in whichever layout it is stored."""
        flat = self.flat(upload_id)
        return flat if flat.exists() else self.directory(upload_id) / "data"

    def record(self, upload_id: str) -> Path:
        """The record of an upload in the directory layout."""
        return self.directory(upload_id) / "info.json"

    def chunk_locked(self, upload_id: str, number: int) -> bool:
        return (self.directory(upload_id) / "chunks" / f"{number}.lock").exists()

    def stored(self) -> list[Path]:
        """Everything stored for uploads, in both layouts (finished, half-made or being removed)."""
        return sorted([*self.files.glob("*"), *self.uploads.glob("*/*")])

    def stored_size(self, upload_id: str) -> int:
        return self.data(upload_id).stat().st_size

    def exists(self, upload_id: str) -> bool:
        return self.flat(upload_id).exists() or self.directory(upload_id).exists()

    def age(self, upload_id: str, past: float) -> None:
        flat = self.flat(upload_id)
        if flat.exists():
            record = json.loads(os.getxattr(flat, RECORD_XATTR))
            record["created_at"] = record["updated_at"] = past
            os.setxattr(flat, RECORD_XATTR, json.dumps(record).encode())
        else:
            record = json.loads(self.record(upload_id).read_text())
            record["created_at"] = record["updated_at"] = past
            self.record(upload_id).write_text(json.dumps(record))
        os.utime(self.data(upload_id), (past, past))


class S3Layout:
    """Where S3 keeps an upload: the multipart upload under its key, the info object (read
    with the backend's own `State`) beside it, and a tail object for bytes short of a part."""

    def __init__(self, moto: Moto, bucket: str, prefix: str) -> None:
        self.client = moto.client
        self.bucket = bucket
        self.prefix = prefix

    def key(self, upload_id: str, suffix: str = "") -> str:
        return self.prefix + upload_id + suffix

    def stored_info(self, upload_id: str) -> State:
        """The info object exactly as stored."""
        from uploadsrv.storage.s3.state import State

        body = self.client.get_object(Bucket=self.bucket, Key=self.key(upload_id, ".info"))["Body"].read()
        return State.from_json(body)

    def state(self, upload_id: str) -> State:
        """The info object as the backend reads it: with the parts an open one adopts."""
        state = self.stored_info(upload_id)
        if state.adoptable():
            listed = self.client.list_parts(
                Bucket=self.bucket,
                Key=self.key(upload_id),
                UploadId=state.multipart_id,
                PartNumberMarker=len(state.parts),
            )
            state.adopt(listed.get("Parts", []))
        return state

    def _confirmed_parts(self, upload_id: str, multipart_id: str) -> dict[int, int]:
        listed = self.client.list_parts(Bucket=self.bucket, Key=self.key(upload_id), UploadId=multipart_id)
        return {p["PartNumber"]: p["Size"] for p in listed.get("Parts", [])}

    def chunk_locked(self, upload_id: str, number: int) -> bool:
        key = self.key(upload_id, f".chunk-{number}.lock")
        return "Contents" in self.client.list_objects_v2(Bucket=self.bucket, Prefix=key)

    def stored_size(self, upload_id: str) -> int:
        state = self.state(upload_id)
        if state.completed:
            return self.client.head_object(Bucket=self.bucket, Key=self.key(upload_id))["ContentLength"]
        confirmed = self._confirmed_parts(upload_id, state.multipart_id)
        size = sum(confirmed[p.number] for p in state.parts)
        if state.tail_key:
            size += self.client.head_object(Bucket=self.bucket, Key=state.tail_key)["ContentLength"]
        return size

    def landed(self, upload_id: str) -> int:
        return sum(self._confirmed_parts(upload_id, self.state(upload_id).multipart_id).values())

    def exists(self, upload_id: str) -> bool:
        key = self.key(upload_id)
        listing = self.client.list_objects_v2(Bucket=self.bucket, Prefix=key)
        uploads = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=self.prefix)
        mine = [u for u in uploads.get("Uploads", []) if u["Key"] == key]
        return bool(listing.get("Contents")) or bool(mine)

    def age(self, upload_id: str, past: float) -> None:
        state = self.state(upload_id)
        state.record["created_at"] = state.record["updated_at"] = past
        self.client.put_object(Bucket=self.bucket, Key=self.key(upload_id, ".info"), Body=state.to_json())


class Server:
    """One `uploadsrv serve` process on a loopback port, on local disk or S3."""

    def __init__(
        self,
        data_dir: Path,
        *args: str,
        moto: Moto | None = None,
        bucket: str | None = None,
        redis: RedisServer | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.moto = moto
        self.redis = redis
        self.backend = "s3" if moto else "local"
        self.bucket = bucket or (moto.new_bucket() if moto else None)
        self.prefix = "uploads/"
        #: Where the server's backend keeps its uploads; `local` also for an S3 server,
        #: whose data directory should stay empty.
        self.local = LocalLayout(data_dir)
        self.layout: LocalLayout | S3Layout = self.local
        if moto:
            assert self.bucket is not None
            self.layout = S3Layout(moto, self.bucket, self.prefix)
        storage = []
        if moto:
            storage = ["--storage", f"s3://{self.bucket}/{self.prefix}", "--s3-endpoint-url", moto.endpoint]
            storage += ["--s3-part-size", "5M"]
        if redis:
            storage += ["--redis-url", redis.url]
        self.args = (*storage, *args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.files = self.url + "/files/"
        self.process: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / f"server-{self.port}.log"

    def __repr__(self) -> str:
        return f"Server({self.backend}, {self.url})"

    def cli(self, *args: str, columns: int | None = None) -> subprocess.CompletedProcess[str]:
        """Run an operator command (`uploadsrv list`, ...) against this server's storage."""
        storage = ["--data-dir", str(self.data_dir)]
        if self.moto:
            storage += [
                "--storage",
                f"s3://{self.bucket}/{self.prefix}",
                "--s3-endpoint-url",
                self.moto.endpoint,
            ]
        if self.redis:
            storage += ["--redis-url", self.redis.url]
        env = {k: v for k, v in os.environ.items() if not k.startswith("UPLOADSRV_")}
        if self.moto:
            env.update(Moto.credentials)
        if columns is not None:  # the width of the terminal it pretends to print to
            env["COLUMNS"] = str(columns)
        command = [sys.executable, "-m", "uploadsrv", args[0], *storage, *args[1:]]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)

    def start(self) -> Server:
        command = [sys.executable, "-m", "uploadsrv", "serve", "--port", str(self.port)]
        command += ["--data-dir", str(self.data_dir), *self.args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("UPLOADSRV_")}
        if self.moto:
            env.update(Moto.credentials)
        self.process = spawn(command, self.log, self.url + "/healthz", env)
        return self

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

    # -- looking at the storage behind the server's back --------------------------

    @staticmethod
    def upload_id(upload_url: str) -> str:
        return upload_url.split("?")[0].rstrip("/").rsplit("/", 1)[1]

    def upload_dir(self, upload_url: str) -> Path:
        """The directory of a chunk session (or an upload whose record is a file)."""
        return self.local.directory(self.upload_id(upload_url))

    def data_file(self, upload_url: str) -> Path:
        """The file of the upload's bytes, in whichever layout the server stored it."""
        return self.local.data(self.upload_id(upload_url))

    def s3_state(self, upload_url: str) -> State:
        """The upload's info object, as the S3 backend reads it."""
        assert isinstance(self.layout, S3Layout)
        return self.layout.state(self.upload_id(upload_url))

    def stored_size(self, upload_url: str) -> int:
        """Bytes the storage itself holds for the upload (not what the server says)."""
        return self.layout.stored_size(self.upload_id(upload_url))

    def landed(self, upload_url: str) -> int:
        """Bytes that reached the storage, committed or not (S3: every part uploaded so far)."""
        if isinstance(self.layout, LocalLayout):
            return self.layout.stored_size(self.upload_id(upload_url))
        return self.layout.landed(self.upload_id(upload_url))

    def exists(self, upload_url: str) -> bool:
        """Whether the storage holds anything at all of the upload."""
        return self.layout.exists(self.upload_id(upload_url))

    def age(self, upload_url: str, seconds: float) -> None:
        """Backdate an upload's record (and data) as if it had been idle for `seconds`."""
        self.layout.age(self.upload_id(upload_url), time.time() - seconds)


class Receiver:
    """A real hook receiver process (tests/hook_receiver.py) that records what it gets."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hooks"
        self.record = directory / f"hooks-{self.port}.jsonl"
        self.log = directory / f"receiver-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Receiver:
        script = str(Path(__file__).with_name("hook_receiver.py"))
        command = [sys.executable, script, str(self.port), str(self.record)]
        self.process = spawn(command, self.log, f"http://127.0.0.1:{self.port}/_control")
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def answer(self, hook: str, status: int = 200, delay: float = 0, **answer: object) -> None:
        """What the receiver answers to `hook` (a tusd hook response) from now on."""
        rule = {"status": status, "answer": answer, "delay": delay}
        httpx.post(f"http://127.0.0.1:{self.port}/_control", json={hook: rule}).raise_for_status()

    def requests(self, hook: str | None = None, upload_id: str | None = None) -> list[dict]:
        """The hook requests received so far, oldest first, with `json` parsed from the body
        and header names in lowercase."""
        if not self.record.exists():
            return []
        entries = [json.loads(line) for line in self.record.read_text().splitlines()]
        for entry in entries:
            entry["json"] = json.loads(entry["body"])
            entry["headers"] = {name.lower(): value for name, value in entry["headers"].items()}
        return [
            e
            for e in entries
            if (hook is None or e["json"]["Type"] == hook)
            and (upload_id is None or e["json"]["Event"]["Upload"]["ID"] == upload_id)
        ]

    def wait(
        self, hook: str, upload_id: str | None = None, count: int = 1, timeout: float = 30
    ) -> list[dict]:
        """The first `count` requests for `hook`, once they have arrived."""
        wait_for(lambda: len(self.requests(hook, upload_id)) >= count, timeout, f"{count} {hook} hook(s)")
        return self.requests(hook, upload_id)


# -- the backends themselves, without a server -----------------------------------------

NOW = 1_700_000_000.0  #: far from the wall clock, so a backend reading that one shows


class FakeClock:
    """The one clock of a test, shared by the backend and the core; moved by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name, value in Moto.credentials.items():
        monkeypatch.setenv(name, value)
    yield


@pytest.fixture(params=BACKENDS)
async def open_backend(
    request: pytest.FixtureRequest, tmp_path: Path, aws_credentials: None, clock: FakeClock
) -> AsyncIterator[Callable[[], Storage]]:
    """Opens an instance of the backend under test, on the test's one clock; every instance
    shares one store, as server instances do."""
    from uploadsrv.storage.local import LocalStorage
    from uploadsrv.storage.s3 import S3Storage

    opened: list[Storage] = []
    if request.param == "s3":
        moto: Moto = request.getfixturevalue("moto")
        bucket = moto.new_bucket()

    def open_one() -> Storage:
        if request.param == "local":
            backend: Storage = LocalStorage(tmp_path / "data", clock=clock)
        else:
            backend = S3Storage(
                f"s3://{bucket}/contract/",
                endpoint_url=moto.endpoint,
                spool_dir=tmp_path / "spool",
                clock=clock,
            )
        opened.append(backend)
        return backend

    yield open_one
    for backend in opened:
        await backend.close()


@pytest.fixture
async def storage(open_backend: Callable[[], Storage]) -> Storage:
    """The backend under test (each test runs on every backend), checked and open."""
    backend = open_backend()
    await backend.check()
    return backend


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    """A fresh hook receiver for one test."""
    started = Receiver(tmp_path).start()
    yield started
    started.stop()


NODE_DIR = Path(__file__).parent / "node"


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    server = Moto(tmp_path_factory.mktemp("moto") / "moto.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One Redis for the whole run; tests that stop Redis start their own (`own_redis`)."""
    server = RedisServer(tmp_path_factory.mktemp("redis") / "redis.log").start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, free to be stopped and started again."""
    server = RedisServer(tmp_path / "redis.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="session", params=BACKENDS)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The shared server with default settings, once per storage backend."""
    moto = request.getfixturevalue("moto") if request.param == "s3" else None
    srv = Server(tmp_path_factory.mktemp(request.param) / "data", moto=moto).start()
    yield srv
    srv.stop()


@pytest.fixture
def start_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Server]]:
    """Start a dedicated server with extra flags: `start_server(*flags, backend="s3")`."""
    started: list[Server] = []

    def start(
        *args: str, backend: str = "local", data_dir: Path | None = None, bucket: str | None = None
    ) -> Server:
        moto = request.getfixturevalue("moto") if backend == "s3" else None
        srv = Server(data_dir or tmp_path / f"data{len(started)}", *args, moto=moto, bucket=bucket).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(scope="module")
def start_module_server(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Server]]:
    """`start_server` for servers that the tests of one module share."""
    started: list[Server] = []

    def start(*args: str, backend: str = "local") -> Server:
        moto = request.getfixturevalue("moto") if backend == "s3" else None
        srv = Server(tmp_path_factory.mktemp(backend) / "data", *args, moto=moto).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


#: The operator's `--console-token` of the `console` fixture's server.
CONSOLE_TOKEN = "console-test-token"


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One console server per test module, each test looking only at the sessions it made."""
    server = Server(
        tmp_path_factory.mktemp("console") / "data", "--console", "--console-token", CONSOLE_TOKEN
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def node_clients() -> Path:
    """Install the JavaScript clients (tus-js-client) from the lock file once per test session."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is needed for these tests (install Node.js 18+)")
    if not (NODE_DIR / "node_modules" / "tus-js-client").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=300)
    return NODE_DIR


def run_client(
    node_dir: Path, endpoint: str, path: Path, protocol: str, mode: str, env: dict[str, str] | None = None
) -> dict:
    """Upload `path` with tus-js-client (tests/node/upload.mjs); `env` may set UPLOAD_HEADERS
    (JSON, sent with every request) and RESUME_HEADERS (instead, once an abort-resume resumes)."""
    result = subprocess.run(
        ["node", str(node_dir / "upload.mjs"), endpoint, str(path), protocol, mode],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


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


class Responses:
    """The HTTP/1.1 responses arriving on a raw socket, one at a time, interim (1xx) ones too."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _receive(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def next(self, *, until_closed: bool = False) -> tuple[int, dict[str, str], bytes]:
        """The next response; a connection closed before its head raises ConnectionError,
        or with `until_closed` gives what arrived."""
        while b"\r\n\r\n" not in self.buffer:
            if not self._receive():
                if not until_closed:
                    raise ConnectionError("closed")
                break
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        length = int(headers.get("content-length", "0")) if status >= 200 else 0
        while len(self.buffer) < length and self._receive():
            pass
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return status, headers, body


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response with a Content-Length (or none) from a raw socket."""
    return Responses(sock).next(until_closed=True)
