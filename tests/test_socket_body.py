"""Large bodies, which uploadsrv reads straight from the socket on local disk: the
connection carries on afterwards, and checksums and 100-continue hold on that path too.
(Cut-off and preempted large bodies are in test_durability.py and test_ietf_draft.py.)"""

from __future__ import annotations

import base64
import hashlib
import os

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
