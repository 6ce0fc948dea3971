"""Large bodies, which uploadsrv reads straight from the socket on local disk: the
connection carries on afterwards, and checksums and 100-continue hold on that path too.
(Cut-off and preempted large bodies are in test_durability.py and test_ietf_draft.py.)"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import threading
import time

from uploadsrv.socket_body import SocketReader

from .conftest import TUS, Server, create, download, raw_request, read_response, sha256
from .test_durability import patch_head

MiB = 1 << 20


def send(sock, head: str, body: bytes = b"") -> None:
    sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)


def head_request(server: Server, url: str) -> str:
    return f"HEAD {url[len(server.url) :]} HTTP/1.1\nHost: 127.0.0.1:{server.port}\nTus-Resumable: 1.0.0\n"


async def test_a_connection_carries_on_after_a_large_body(client, server):
    data = os.urandom(5 * MiB + 17)
    url = await create(client, server, len(data))
    first = 3 * MiB
    sock = raw_request(server.port, patch_head(server, url, 0, first), data[:first], close=False)
    try:
        status, headers, _ = read_response(sock)
        assert (status, headers["upload-offset"]) == (204, str(first))
        send(sock, head_request(server, url))
        status, headers, _ = read_response(sock)
        assert (status, headers["upload-offset"]) == (200, str(first))
        send(sock, patch_head(server, url, first, len(data) - first), data[first:])
        status, headers, _ = read_response(sock)
        assert (status, headers["upload-offset"]) == (204, str(len(data)))
    finally:
        sock.close()
    assert sha256(await download(client, url)) == sha256(data)


async def test_a_request_sent_right_behind_a_large_body_is_answered_too(client, server):
    data = os.urandom(2 * MiB)
    url = await create(client, server, len(data))
    pipelined = data + (head_request(server, url) + "\n").replace("\n", "\r\n").encode()
    sock = raw_request(server.port, patch_head(server, url, 0, len(data)), pipelined, close=False)
    answers = b""
    try:
        while answers.count(b"\r\n\r\n") < 2:  # two answers without bodies: 204, then HEAD's 200
            received = sock.recv(65536)
            assert received, f"connection closed after {answers!r}"
            answers += received
    finally:
        sock.close()
    first, second, _ = answers.split(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 204") and second.startswith(b"HTTP/1.1 200")
    assert f"upload-offset: {len(data)}".encode() in second.lower()


async def test_a_large_body_with_a_wrong_checksum_stores_nothing(client, server):
    data = os.urandom(3 * MiB)
    url = await create(client, server, len(data))
    wrong = base64.b64encode(hashlib.sha1(data[:-1]).digest()).decode()
    assert _checksummed_patch(server, url, data, f"sha1 {wrong}") == 460
    assert (await client.head(url, headers=TUS)).headers["upload-offset"] == "0"
    right = base64.b64encode(hashlib.sha1(data).digest()).decode()
    assert _checksummed_patch(server, url, data, f"sha1 {right}") == 204
    assert sha256(await download(client, url)) == sha256(data)


def _checksummed_patch(server: Server, url: str, data: bytes, checksum: str) -> int:
    """The status of a raw PATCH of all of `data` at offset 0 with `Upload-Checksum`."""
    head = patch_head(server, url, 0, len(data), f"Upload-Checksum: {checksum}\n")
    sock = raw_request(server.port, head, data, close=False)
    try:
        return read_response(sock)[0]
    finally:
        sock.close()


async def test_a_large_body_waiting_for_100_continue_gets_it(client, server):
    data = os.urandom(2 * MiB)
    url = await create(client, server, len(data))
    sock = raw_request(
        server.port, patch_head(server, url, 0, len(data), "Expect: 100-continue\n"), close=False
    )
    try:
        assert read_response(sock)[0] == 100
        sock.sendall(data)
        status, headers, _ = read_response(sock)
        assert (status, headers["upload-offset"]) == (204, str(len(data)))
    finally:
        sock.close()
    assert sha256(await download(client, url)) == sha256(data)


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        served, _ = listener.accept()
    served.setblocking(False)  # as uvicorn's transport leaves it
    return client, served


def _splice_all(reader: SocketReader, pipe: tuple[int, int]) -> bytes:
    """Everything `reader` splices into `pipe` until it returns 0."""
    out, into = pipe
    received = b""
    deadline = time.monotonic() + 30
    while True:
        try:
            got = reader.splice_to(into, MiB)
        except BlockingIOError:  # nothing for WAIT_SECONDS: the loop would wait; try again
            assert time.monotonic() < deadline, f"stalled after {len(received)} bytes"
            continue
        if not got:
            return received
        while got:
            piece = os.read(out, got)
            received += piece
            got -= len(piece)


def test_a_spliced_body_stops_at_its_end_and_leaves_the_next_request_unread():
    body, after = os.urandom(3 * MiB + 7), b"HEAD /files/x HTTP/1.1\r\n\r\n"
    client, served = _tcp_pair()
    pipe = os.pipe()
    reader = SocketReader(served, len(body), None)
    try:
        sender = threading.Thread(target=client.sendall, args=(body + after,))
        sender.start()
        received = _splice_all(reader, pipe)
        sender.join()
        assert (reader.complete, reader.gone) == (True, False)
        assert hashlib.sha256(received).hexdigest() == hashlib.sha256(body).hexdigest()
        served.setblocking(True)
        assert served.recv(len(after), socket.MSG_WAITALL) == after
    finally:
        for fd in pipe:
            os.close(fd)
        client.close()
        served.close()


def test_a_spliced_body_cut_off_keeps_what_arrived_and_counts_the_client_gone():
    sent = os.urandom(MiB + 3)
    client, served = _tcp_pair()
    pipe = os.pipe()
    reader = SocketReader(served, 2 * MiB, None)
    try:
        sender = threading.Thread(target=lambda: (client.sendall(sent), client.close()))
        sender.start()
        received = _splice_all(reader, pipe)
        sender.join()
        assert (reader.complete, reader.gone, reader.remaining) == (False, True, MiB - 3)
        assert hashlib.sha256(received).hexdigest() == hashlib.sha256(sent).hexdigest()
    finally:
        for fd in pipe:
            os.close(fd)
        served.close()
