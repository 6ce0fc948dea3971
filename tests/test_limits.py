"""What a hostile or broken client cannot do: malformed headers, leaked descriptors."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import TUS, Server, create, patch, raw_request, read_response, wait_for
from uploadsrv import memory
from uploadsrv.core.errors import ClientDisconnected, Superseded
from uploadsrv.core.locks import Hold
from uploadsrv.core.storage import RECEIVE_BUFFERS

OCTETS = "application/offset+octet-stream"
NON_ASCII = "é²€".encode()  # the server decodes header bytes as latin-1: never ASCII, never digits


async def session(client: httpx.AsyncClient, server: Server, size: int) -> dict:
    response = await client.post(server.url + "/chunks/", json={"size": size})
    assert response.status_code == 201, response.text
    return response.json()


@pytest.mark.parametrize("garbage_id", [False, True])
async def test_a_non_ascii_content_md5_is_a_400(client: httpx.AsyncClient, server: Server, garbage_id):
    chunk_url = (await session(client, server, 3))["chunk_url_template"].replace("{n}", "1")
    if garbage_id:
        chunk_url = server.url + "/chunks/not-a-session/1"
    response = await client.put(chunk_url, content=b"abc", headers={"Content-MD5": NON_ASCII})
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("metadata", [b"filename " + NON_ASCII, NON_ASCII + b" YQ=="])
async def test_a_non_ascii_upload_metadata_is_a_400(client, server, metadata):
    creation = await client.post(
        server.files, headers={**TUS, "Upload-Length": "3", "Upload-Metadata": metadata}
    )
    assert creation.status_code == 400, creation.text


async def test_a_non_ascii_upload_checksum_is_a_400_and_stores_nothing(client, server):
    url = await create(client, server, 3)
    response = await patch(client, url, 0, b"abc", **{"Upload-Checksum": b"sha1 " + NON_ASCII})
    assert response.status_code == 400, response.text
    assert server.stored_size(url) == 0


@pytest.mark.parametrize("version", [NON_ASCII, "²".encode("latin-1"), b"9" * 5000])
async def test_an_interop_version_that_is_no_number_is_a_400(client, server, version):
    response = await client.post(server.files, headers={"Upload-Draft-Interop-Version": version})
    assert response.status_code == 400, response.text


@pytest.mark.parametrize("range_", ["bytes=" + "9" * 5000 + "-", "bytes=-" + "9" * 5000, "bytes=²-³"])
async def test_a_range_of_absurd_numbers_is_ignored(client, server, range_):
    data = os.urandom(10)
    url = await create(client, server, len(data))
    assert (await patch(client, url, 0, data)).status_code == 204
    response = await client.get(url, headers={"Range": range_.encode("latin-1")})
    assert response.status_code == 200 and response.content == data


def upload_fds(srv: Server) -> list[str]:
    """The server's open descriptors on files under its data directory."""
    assert srv.process is not None
    fd_dir = f"/proc/{srv.process.pid}/fd"
    targets = []
    for name in os.listdir(fd_dir):
        try:
            targets.append(os.readlink(f"{fd_dir}/{name}"))
        except FileNotFoundError:  # closed meanwhile
            continue
    return [t for t in targets if t.startswith(str(srv.data_dir))]


def test_aborted_downloads_leave_no_descriptors_open(start_server):
    srv: Server = start_server()
    data = os.urandom(4 << 20)  # more than the socket buffers take: the server is mid-response
    url = httpx.post(srv.files, headers={**TUS, "Upload-Length": str(len(data))}).headers["location"]
    done = httpx.patch(url, content=data, headers={**TUS, "Upload-Offset": "0", "Content-Type": OCTETS})
    assert done.status_code == 204
    path = url.split(str(srv.port), 1)[1]
    for n in range(300):
        sock = raw_request(srv.port, f"GET {path} HTTP/1.1\nHost: x\n", close=False)
        if n % 2:
            sock.recv(1)  # half of them after the response began
        sock.close()
    assert httpx.get(srv.url + "/healthz").status_code == 200
    wait_for(lambda: not upload_fds(srv), 20, f"descriptors to close: {len(upload_fds(srv))} open")


# -- request heads ------------------------------------------------------------------

PARSERS = ["httptools", "h11"]


def refused(sock: socket.socket) -> tuple[int, dict[str, str], dict]:
    """The problem the server answered with, after which it closed the connection."""
    sock.settimeout(15)
    status, headers, body = read_response(sock)
    assert sock.recv(1) == b""  # closed after the answer
    assert headers["content-type"] == "application/problem+json" and headers["connection"] == "close"
    return status, headers, json.loads(body)


def head_with(port: int, *lines: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"
    )
    return sock


@pytest.fixture(scope="module", params=PARSERS)
def edge(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with default limits and short timeouts, once per HTTP parser."""
    data_dir = tmp_path_factory.mktemp(request.param) / "data"
    srv = Server(data_dir, "--http", request.param, "--header-timeout", "1", "--idle-timeout", "1").start()
    yield srv
    srv.stop()


@pytest.mark.parametrize(
    "lines",
    [
        [b"X-Big: " + b"a" * (100 << 10)],  # one 100 KiB header
        [b"X-Big: " + b"a" * (17 << 10)],  # just over 16 KiB
        [b"X-%d: %s" % (n, b"a" * 200) for n in range(90)],  # 90 lines, 18 KiB together
        [b"X-%d: 1" % n for n in range(101)],  # 101 short lines
        [b"X-%d: 1" % n for n in range(1000)],
    ],
    ids=["100KiB-header", "17KiB-header", "18KiB-in-90-lines", "101-lines", "1000-lines"],
)
def test_a_head_over_16_kib_or_100_lines_is_a_431_and_the_connection_closes(edge, lines):
    status, _headers, problem = refused(head_with(edge.port, *lines))
    assert status == 431 and problem["status"] == 431


def test_a_431_is_logged_once_by_uploadsrv_and_not_again_by_uvicorn(edge):
    def lines(text: str) -> int:
        return edge.log.read_text().count(text)

    ours, theirs = lines('"status": 431'), lines("Invalid HTTP request received.")
    refused(head_with(edge.port, b"X-Big: " + b"a" * (17 << 10)))
    wait_for(lambda: lines('"status": 431') == ours + 1, 10, "uploadsrv's line for the 431")
    assert httpx.get(edge.url + "/healthz").status_code == 200  # whatever uvicorn logs is out by now
    assert lines("Invalid HTTP request received.") == theirs
    assert lines('"status": 431') == ours + 1


def test_a_head_sent_in_pieces_is_refused_once_it_is_too_large(edge):
    sock = socket.create_connection(("127.0.0.1", edge.port))
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
    with contextlib.suppress(OSError):  # the server may stop reading before all of it is sent
        for _ in range(40):
            sock.sendall(b"a" * 1024)
    assert refused(sock)[0] == 431


def test_a_head_within_the_limits_is_served(edge):
    sock = head_with(edge.port, b"X-Big: " + b"a" * (15 << 10), *[b"X-%d: 1" % n for n in range(97)])
    assert read_response(sock)[0] == 200
    sock.close()


def test_metadata_over_4_kib_is_a_413_and_creates_nothing(edge):
    value = base64.b64encode(os.urandom(3200)).decode()  # 4,268 bytes as a header
    response = httpx.post(
        edge.files, headers={**TUS, "Upload-Length": "1", "Upload-Metadata": f"filename {value}"}
    )
    assert response.status_code == 413, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert not edge.local.stored()
    small = httpx.post(
        edge.files, headers={**TUS, "Upload-Length": "1", "Upload-Metadata": f"f {value[:4000]}"}
    )
    assert small.status_code == 201, small.text


def test_a_chunk_session_with_metadata_over_4_kib_is_a_413(edge):
    response = httpx.post(edge.url + "/chunks/", json={"size": 1, "metadata": {"filename": "x" * 4000}})
    assert response.status_code == 413, response.text


def test_a_chunk_api_json_body_over_64_kib_is_a_413(edge):
    body = json.dumps({"size": 1, "padding": "x" * (64 << 10)})
    response = httpx.post(edge.url + "/chunks/", content=body)
    assert response.status_code == 413, response.text
    assert response.headers["content-type"] == "application/problem+json"


# -- timeouts -----------------------------------------------------------------------

MARGIN = 4.0  #: seconds the server may take beyond a timeout on a loaded machine


def closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> float:
    """Seconds until the server closes `sock`, sending `trickle` a byte at a time meanwhile."""
    start = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - start < seconds:
        if trickle:
            with contextlib.suppress(OSError):
                sock.send(trickle[:1])
            trickle = trickle[1:]
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - start
        assert data == b"", data[:200]
        return time.monotonic() - start
    raise AssertionError(f"still open after {seconds} s")


def test_a_connection_that_sends_no_head_is_closed_after_the_header_timeout(edge):
    sock = socket.create_connection(("127.0.0.1", edge.port))
    assert closed_within(sock, 1 + MARGIN) > 0.8


def test_a_head_dribbled_a_byte_at_a_time_is_closed_after_the_header_timeout(edge):
    sock = socket.create_connection(("127.0.0.1", edge.port))
    assert closed_within(sock, 1 + MARGIN, trickle=b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X" * 100) > 0.8


def test_a_stalled_body_is_ended_after_the_idle_timeout_and_keeps_what_arrived(edge):
    url = httpx.post(edge.files, headers={**TUS, "Upload-Length": "1000"}).headers["location"]
    path = url.split(str(edge.port), 1)[1]
    head = f"PATCH {path} HTTP/1.1\nHost: x\nTus-Resumable: 1.0.0\nUpload-Offset: 0\n"
    head += f"Content-Type: {OCTETS}\nContent-Length: 1000\n"
    data = os.urandom(1000)
    sock = raw_request(edge.port, head, data[:300], close=False)
    assert closed_within(sock, 1 + MARGIN) > 0.8
    sock.close()
    wait_for(lambda: httpx.head(url, headers=TUS).headers["upload-offset"] == "300", 10, "offset 300")
    assert (patch_sync(url, 300, data[300:])).status_code == 204
    assert hashlib.sha256(httpx.get(url).content).digest() == hashlib.sha256(data).digest()


def test_a_slow_but_steady_body_is_not_cut_off(edge):
    """Each byte resets the idle timer: 3 s of a byte every 0.2 s against an idle timeout of 1 s."""
    url = httpx.post(edge.files, headers={**TUS, "Upload-Length": "15"}).headers["location"]
    path = url.split(str(edge.port), 1)[1]
    head = f"PATCH {path} HTTP/1.1\nHost: x\nTus-Resumable: 1.0.0\nUpload-Offset: 0\n"
    head += f"Content-Type: {OCTETS}\nContent-Length: 15\n"
    sock = raw_request(edge.port, head, close=False)
    for byte in range(15):
        sock.send(bytes([65 + byte]))
        time.sleep(0.2)  # the pace of the client, not a synchronisation
    sock.settimeout(15)
    assert read_response(sock)[0] == 204
    sock.close()


def test_a_download_the_client_stops_reading_is_cut_off_after_the_idle_timeout(edge):
    data = os.urandom(32 << 20)  # far more than the socket buffers hold
    url = httpx.post(edge.files, headers={**TUS, "Upload-Length": str(len(data))}).headers["location"]
    assert patch_sync(url, 0, data).status_code == 204
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    sock.connect(("127.0.0.1", edge.port))
    sock.sendall(f"GET {url.split(str(edge.port), 1)[1]} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    wait_for(lambda: bool(upload_fds(edge)), 10, "the download to open its file")
    began = time.monotonic()
    wait_for(lambda: not upload_fds(edge), 1 + MARGIN, "the unread download to close its file")
    assert time.monotonic() - began > 0.8
    received = 0
    sock.settimeout(15)
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(1 << 20):
            received += len(chunk)
    sock.close()
    assert 0 < received < len(data)  # cut off: the connection ended before the body
    assert httpx.get(url).content == data  # the server serves on


def patch_sync(url: str, offset: int, data: bytes) -> httpx.Response:
    return httpx.patch(
        url, content=data, headers={**TUS, "Upload-Offset": str(offset), "Content-Type": OCTETS}
    )


# -- connections --------------------------------------------------------------------


@pytest.mark.parametrize("parser", PARSERS)
def test_connections_beyond_the_limit_get_a_503_and_open_ones_carry_on(start_server, parser):
    srv: Server = start_server("--max-connections", "3", "--http", parser)
    url = httpx.post(srv.files, headers={**TUS, "Upload-Length": "6"}).headers["location"]
    with httpx.Client(limits=httpx.Limits(max_connections=1)) as first, httpx.Client() as second:
        assert patch_with(first, url, 0, b"abc").status_code == 204
        assert second.get(srv.url + "/healthz").status_code == 200
        third = head_with(srv.port)
        assert read_response(third)[0] == 200  # three connections open now
        status, headers, problem = refused(head_with(srv.port))
        assert status == 503 and problem["status"] == 503 and headers["retry-after"] == "5"
        assert patch_with(first, url, 3, b"def").status_code == 204  # on its open connection
        third.close()
    assert httpx.get(url).content == b"abcdef"


def patch_with(client: httpx.Client, url: str, offset: int, data: bytes) -> httpx.Response:
    return client.patch(
        url, content=data, headers={**TUS, "Upload-Offset": str(offset), "Content-Type": OCTETS}
    )


# -- memory -------------------------------------------------------------------------


def test_a_stalled_body_is_written_out_while_the_request_waits(start_server):
    """What arrived reaches the disk after a second without more, before the request ends:
    a stalled request holds no batch of bytes in memory."""
    srv: Server = start_server()
    url = httpx.post(srv.files, headers={**TUS, "Upload-Length": "1000000"}).headers["location"]
    path = url.split(str(srv.port), 1)[1]
    head = f"PATCH {path} HTTP/1.1\nHost: x\nTus-Resumable: 1.0.0\nUpload-Offset: 0\n"
    head += f"Content-Type: {OCTETS}\nContent-Length: 1000000\n"
    sock = raw_request(srv.port, head, os.urandom(300_000), close=False)
    wait_for(lambda: srv.stored_size(url) == 300_000, 15, "the stalled bytes on disk")
    sock.close()
    wait_for(lambda: httpx.head(url, headers=TUS).headers["upload-offset"] == "300000", 15, "offset")


@pytest.mark.parametrize("sent", ["4M", "400K"])  # read from the socket by a disk thread; batched
def test_stalled_uploads_give_their_memory_back_once_they_are_gone(sent):
    """The issue's target, scaled down: peak under 150 MB and back within 30 MB of the
    start, RSS read from /proc by the script."""
    result = subprocess.run(
        [sys.executable, "-m", "uploadsrv.loadtest.stalled", "--uploads", "40", "--sent", sent],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["kept_every_byte"] is True
    assert figures["rss_before_mb"] <= figures["rss_peak_mb"] < 150
    assert figures["rss_after_mb"] - figures["rss_before_mb"] < 30, figures


async def test_a_request_that_fails_frees_what_it_held_without_the_garbage_collector():
    """A failed body copy leaves no reference cycle (task, exception, traceback, frame)
    that would keep its buffers and connection until the collector's next full pass."""

    class Buffer:
        pass

    async def copy(held: Buffer) -> None:
        raise ClientDisconnected()

    held = Buffer()
    freed = weakref.ref(held)
    gc.disable()
    try:
        with pytest.raises(ClientDisconnected):
            await Hold(on_preempt=lambda: None).run(copy(held))
        del held
        assert freed() is None
    finally:
        gc.enable()


async def test_a_preempted_copy_is_superseded_however_it_ends_and_its_task_goes_on():
    """The copy runs in the request's own task: a preemption is answered as Superseded,
    whether it arrives while the copy waits or as it ends, and never reaches the
    request's later awaits (its commit) as a cancellation."""
    hold = Hold(on_preempt=lambda: None)
    waiting = asyncio.Event()

    async def stalled() -> None:
        waiting.set()
        await asyncio.Event().wait()

    copy = asyncio.ensure_future(hold.run(stalled()))
    await waiting.wait()
    hold.preempt()
    with pytest.raises(Superseded):
        await copy

    ending = Hold(on_preempt=lambda: None)

    async def preempted_as_it_ends() -> int:
        ending.preempt()  # from within, with no await after it
        return 1

    async def request() -> str:
        with pytest.raises(Superseded):
            await ending.run(preempted_as_it_ends())
        await asyncio.sleep(0)  # the commit after it: no cancellation left for it
        return "committed"

    assert await request() == "committed"


async def test_the_receive_buffers_kept_for_large_bodies_go_back_at_the_next_trim():
    with RECEIVE_BUFFERS.buffer(), RECEIVE_BUFFERS.buffer():
        pass
    assert RECEIVE_BUFFERS.idle >= 2
    memory.trim_soon(asyncio.get_running_loop())
    deadline = time.monotonic() + 30
    while RECEIVE_BUFFERS.idle and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert RECEIVE_BUFFERS.idle == 0


def test_the_slowloris_script_sees_every_connection_closed_by_the_header_timeout():
    command = [sys.executable, "-m", "uploadsrv.loadtest.slowloris", "--connections", "20", "--seconds", "10"]
    result = subprocess.run(
        [*command, "--", "--header-timeout", "2"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.splitlines()[-1])
    assert figures["closed_by_server"] == 20 and 1.5 < figures["last_closed_s"] < 2 + MARGIN
    assert figures["timeline"][-1]["open"] == 0


@pytest.mark.parametrize("parser", PARSERS)
def test_too_many_trailer_lines_end_the_request_and_keep_its_body(start_server, parser):
    srv: Server = start_server("--http", parser)
    url = httpx.post(srv.files, headers={**TUS, "Upload-Length": "10"}).headers["location"]
    path = url.split(str(srv.port), 1)[1]
    head = f"PATCH {path} HTTP/1.1\nHost: x\nTus-Resumable: 1.0.0\nUpload-Offset: 0\n"
    head += f"Content-Type: {OCTETS}\nTransfer-Encoding: chunked\n"
    trailers = b"".join(b"X-%d: 1\r\n" % n for n in range(150))
    sock = raw_request(srv.port, head, b"3\r\nabc\r\n0\r\n" + trailers + b"\r\n", close=False)
    assert closed_within(sock, 15) < 15
    sock.close()
    wait_for(lambda: httpx.head(url, headers=TUS).headers["upload-offset"] == "3", 15, "offset 3")
