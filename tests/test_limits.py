"""What a hostile or broken client cannot do: malformed headers, leaked descriptors."""

from __future__ import annotations

import os

import httpx
import pytest

from tests.conftest import TUS, Server, create, patch, raw_request, wait_for

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
