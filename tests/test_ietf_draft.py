"""The IETF resumable upload draft, table-driven over every interop version, on the wire."""

from __future__ import annotations

import base64
import hashlib
import os
import socket

import http_sf
import pytest

from .conftest import TUS, Responses, Server, create, download, patch, sha256, wait_for

VERSIONS = [3, 4, 5, 6, 7, 8, 9]
HEADER = "Upload-Draft-Interop-Version"
MiB = 1024 * 1024


def complete_header(version: int, complete: bool) -> tuple[str, str]:
    """Version 3 says Upload-Incomplete (inverted); later versions Upload-Complete."""
    if version == 3:
        return "Upload-Incomplete", "?0" if complete else "?1"
    return "Upload-Complete", "?1" if complete else "?0"


def is_complete(version: int, headers) -> bool:
    if version == 3:
        return headers["upload-incomplete"] == "?0"
    return headers["upload-complete"] == "?1"


def append_headers(version: int, offset: int, complete: bool) -> dict[str, str]:
    name, value = complete_header(version, complete)
    headers = {HEADER: str(version), "Upload-Offset": str(offset), name: value}
    if version >= 6:
        headers["Content-Type"] = "application/partial-upload"
    return headers


class Wire:
    """A raw HTTP/1.1 client that sees every interim response, like URLSession does."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.settimeout(20)
        self._responses = Responses(self.sock)

    def send_head(self, method: str, path: str, headers: dict[str, str], version: str = "1.1") -> None:
        lines = [f"{method} {path} HTTP/{version}", "Host: 127.0.0.1"] + [
            f"{k}: {v}" for k, v in headers.items()
        ]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """The next response, interim (1xx) or final."""
        return self._responses.next()

    def final(self) -> tuple[int, dict[str, str], bytes, list[dict[str, str]]]:
        """Skip interim responses; return the final one and the interim ones seen."""
        interim = []
        while True:
            status, headers, body = self.response()
            if status >= 200:
                return status, headers, body, interim
            interim.append(headers)

    def close(self) -> None:
        self.sock.close()


def path_of(url: str) -> str:
    return "/" + url.split("/", 3)[3]


# -- iOS URLSession, on the wire -------------------------------------------------------


@pytest.mark.parametrize("version", [3, 5, 6, 8, 9])
async def test_urlsession_style_upload_cut_off_then_resumed(client, server, version):
    """POST the whole file, get the 104 before sending the body, lose the connection
    midway, then HEAD and PATCH the rest, as URLSession does by itself."""
    data = os.urandom(9 * MiB + 321)
    name, value = complete_header(version, True)
    wire = Wire(server.port)
    wire.send_head("POST", "/files/", {HEADER: str(version), name: value, "Content-Length": str(len(data))})
    status, headers, _ = wire.response()  # before a single body byte was sent
    assert status == 104
    assert headers["upload-draft-interop-version"] == str(version)
    url = headers["location"]
    assert url.startswith("http://127.0.0.1/files/") or url.startswith(server.files)
    if version >= 8:
        limit = http_sf.parse(headers["upload-limit"].encode(), tltype="dictionary")
        assert limit["max-size"][0] > len(data)
    sent = 6 * MiB + 5
    wire.sock.sendall(data[:sent])
    wire.close()
    upload = server.files + url.rsplit("/", 1)[1]
    wait_for(lambda: server.stored_size(upload) > 0, what="the received bytes to be committed")

    head = await client.head(upload, headers={HEADER: str(version)})
    assert head.status_code == 204
    assert head.headers["cache-control"] == "no-store"
    assert not is_complete(version, head.headers)
    offset = int(head.headers["upload-offset"])
    assert 0 < offset <= sent and offset == server.stored_size(upload)

    response = await client.patch(
        upload, content=data[offset:], headers=append_headers(version, offset, True)
    )
    assert response.status_code == 204, response.text
    assert is_complete(version, response.headers)
    assert sha256(await download(client, upload)) == sha256(data)


@pytest.mark.parametrize("version", VERSIONS)
def test_the_104_arrives_before_the_body_and_carries_the_location(server, version):
    name, value = complete_header(version, True)
    wire = Wire(server.port)
    wire.send_head("POST", "/files/", {HEADER: str(version), name: value, "Content-Length": "5"})
    status, headers, _ = wire.response()
    assert status == 104
    assert headers["location"].startswith("http://127.0.0.1")
    assert headers[HEADER.lower()] == str(version)
    assert ("upload-limit" in headers) == (version >= 8)
    wire.sock.sendall(b"hello")
    status, headers, _, _interim = wire.final()
    wire.close()
    assert status == 201
    assert is_complete(version, headers)
    assert headers["upload-offset"] == "5"


@pytest.mark.parametrize("version", [5, 6, 7, 8, 9])
def test_progress_104s_report_an_increasing_durable_offset(server, version):
    """The body goes in three stretches, each once the storage holds the one before it
    (the ends are whole 5 MiB parts of the test server's S3), so the durable offset grows
    while the body streams: the server reads a body faster than moto confirms parts, and
    unpaced, all of it may have arrived before the first part landed."""
    data = os.urandom(40 * MiB)
    name, value = complete_header(version, True)
    wire = Wire(server.port)
    wire.send_head("POST", "/files/", {HEADER: str(version), name: value, "Content-Length": str(len(data))})
    status, headers, _ = wire.response()
    assert status == 104
    for start, end in ((0, 20 * MiB), (20 * MiB, 30 * MiB)):
        wire.sock.sendall(data[start:end])
        wait_for(lambda end=end: server.landed(headers["location"]) >= end, 30, f"{end} bytes stored")
    wire.sock.sendall(data[30 * MiB :])
    status, _headers, _, interim = wire.final()
    wire.close()
    assert status == 201
    offsets = [int(h["upload-offset"]) for h in interim]
    assert len(offsets) >= 2
    assert offsets == sorted(set(offsets)) and offsets[0] > 0 and offsets[-1] <= len(data)
    assert all(h[HEADER.lower()] == str(version) and "location" not in h for h in interim)


@pytest.mark.parametrize("version", [3, 4])
def test_versions_before_5_get_a_single_104(server, version):
    data = os.urandom(20 * MiB)
    name, value = complete_header(version, True)
    wire = Wire(server.port)
    wire.send_head("POST", "/files/", {HEADER: str(version), name: value, "Content-Length": str(len(data))})
    wire.sock.sendall(data)
    status, _, _, interim = wire.final()
    wire.close()
    assert status == 201 and len(interim) == 1 and "location" in interim[0]


def test_no_1xx_for_http_1_0(server):
    wire = Wire(server.port)
    wire.send_head(
        "POST", "/files/", {HEADER: "8", "Upload-Complete": "?1", "Content-Length": "5"}, version="1.0"
    )
    wire.sock.sendall(b"hello")
    status, headers, _ = wire.response()
    wire.close()
    assert status == 201
    assert headers["upload-complete"] == "?1"


def test_expect_100_continue_still_gets_its_100(server):
    wire = Wire(server.port)
    wire.send_head(
        "POST",
        "/files/",
        {HEADER: "8", "Upload-Complete": "?1", "Content-Length": "5", "Expect": "100-continue"},
    )
    statuses = []
    while True:
        status, _, _ = wire.response()
        statuses.append(status)
        if status == 100:
            wire.sock.sendall(b"hello")
        if status >= 200:
            break
    wire.close()
    assert statuses[-1] == 201 and 100 in statuses and 104 in statuses


def test_unknown_versions_get_a_400_and_no_104(server):
    wire = Wire(server.port)
    wire.send_head("POST", "/files/", {HEADER: "99", "Upload-Complete": "?1", "Content-Length": "0"})
    status, headers, body = wire.response()
    wire.close()
    assert status == 400
    assert b"99" in body and headers["content-type"] == "application/problem+json"


async def test_without_a_version_the_request_is_tus(client, server):
    response = await client.post(server.files, headers={"Upload-Complete": "?1"})
    assert response.status_code == 412  # tus: Tus-Resumable missing
    assert response.headers["tus-version"] == "1.0.0"


# -- every version, table-driven ---------------------------------------------------------


async def _create(client, server, version: int, data: bytes, complete: bool) -> tuple[str, object]:
    name, value = complete_header(version, complete)
    response = await client.post(server.files, content=data, headers={HEADER: str(version), name: value})
    assert response.status_code == 201, response.text
    assert response.headers[HEADER.lower()] == str(version)
    return response.headers["location"], response


@pytest.mark.parametrize("version", VERSIONS)
async def test_creation_head_append_in_every_version(client, server, version):
    data = os.urandom(300_000)
    url, created = await _create(client, server, version, data[:100_000], complete=False)
    assert created.headers["upload-offset"] == "100000"
    assert not is_complete(version, created.headers)
    head = await client.head(url, headers={HEADER: str(version)})
    assert head.status_code == 204
    assert head.headers["upload-offset"] == "100000"
    assert head.headers["cache-control"] == "no-store"
    assert not is_complete(version, head.headers)
    assert ("upload-limit" in head.headers) == (version >= 8)
    middle = await client.patch(
        url, content=data[100_000:200_000], headers=append_headers(version, 100_000, False)
    )
    assert middle.status_code == 204 and middle.headers["upload-offset"] == "200000"
    last = await client.patch(url, content=data[200_000:], headers=append_headers(version, 200_000, True))
    assert last.status_code == 204 and is_complete(version, last.headers)
    assert sha256(await download(client, url)) == sha256(data)
    head = await client.head(url, headers={HEADER: str(version)})
    assert is_complete(version, head.headers)
    if version >= 6:
        assert head.headers["upload-length"] == str(len(data))


@pytest.mark.parametrize("version", VERSIONS)
async def test_options_advertises_limits_from_version_6(client, server, version):
    response = await client.options(server.files, headers={HEADER: str(version)})
    assert response.status_code == 204
    if version < 6:
        assert "upload-limit" not in response.headers
        return
    limit = http_sf.parse(response.headers["upload-limit"].encode(), tltype="dictionary")
    assert limit["max-size"][0] == 16 << 30
    assert ("expires" if version == 6 else "max-age") in limit
    assert response.headers["accept-patch"] == "application/partial-upload"


@pytest.mark.parametrize("version", VERSIONS)
async def test_wrong_offset_is_a_409_with_the_real_offset(client, server, version):
    url, _ = await _create(client, server, version, b"12345", complete=False)
    response = await client.patch(url, content=b"67890", headers=append_headers(version, 3, False))
    assert response.status_code == 409
    assert response.headers["upload-offset"] == "5"
    body = response.json()
    if version >= 6:
        assert body["type"] == "https://iana.org/assignments/http-problem-types#mismatching-upload-offset"
        assert (body["expected-offset"], body["provided-offset"]) == (5, 3)
    assert server.stored_size(url) == 5


@pytest.mark.parametrize("version", VERSIONS)
async def test_repeating_the_final_append_replays_the_final_state(client, server, version):
    url, _ = await _create(client, server, version, b"12345", complete=False)
    final = append_headers(version, 5, True)
    first = await client.patch(url, content=b"678", headers=final)
    again = await client.patch(url, content=b"678", headers=final)
    assert first.status_code == again.status_code == 204
    assert again.headers["upload-offset"] == "8" and is_complete(version, again.headers)
    assert await download(client, url) == b"12345678"


async def test_reaching_the_declared_length_completes_even_with_upload_complete_false(client, server):
    response = await client.post(
        server.files, content=b"abc", headers={HEADER: "6", "Upload-Complete": "?0", "Upload-Length": "6"}
    )
    url = response.headers["location"]
    last = await client.patch(url, content=b"def", headers=append_headers(6, 3, False))
    assert last.status_code == 204 and last.headers["upload-complete"] == "?1"
    assert await download(client, url) == b"abcdef"


@pytest.mark.parametrize("version", [7, 8, 9])
async def test_appends_without_upload_complete_are_a_400_from_version_7(client, server, version):
    url, _ = await _create(client, server, version, b"12", complete=False)
    headers = append_headers(version, 2, False)
    del headers["Upload-Complete"]
    assert (await client.patch(url, content=b"34", headers=headers)).status_code == 400


@pytest.mark.parametrize("version", [6, 7, 8, 9])
async def test_appends_must_be_partial_upload_from_version_6(client, server, version):
    url, _ = await _create(client, server, version, b"12", complete=False)
    headers = {**append_headers(version, 2, False), "Content-Type": "application/octet-stream"}
    assert (await client.patch(url, content=b"34", headers=headers)).status_code == 415
    assert server.stored_size(url) == 2


async def test_inconsistent_length_is_a_400_with_its_problem_type(client, server):
    url, _ = await _create(client, server, 8, b"12", complete=False)
    headers = {**append_headers(8, 2, False), "Upload-Length": "10"}
    assert (await client.patch(url, content=b"34", headers=headers)).status_code == 204
    headers = {**append_headers(8, 4, True)}
    response = await client.patch(url, content=b"56", headers=headers)  # ends at 6, not 10
    assert response.status_code == 400
    assert response.json()["type"].endswith("#inconsistent-upload-length")


async def test_get_retrieves_the_offset_in_version_9(client, server):
    url, _ = await _create(client, server, 9, b"12345", complete=False)
    response = await client.get(url, headers={HEADER: "9"})
    assert response.status_code == 204 and response.headers["upload-offset"] == "5"


@pytest.mark.parametrize("version", VERSIONS)
async def test_cancellation_deletes_the_upload(client, server, version):
    url, _ = await _create(client, server, version, b"12345", complete=False)
    assert (await client.delete(url, headers={HEADER: str(version)})).status_code == 204
    assert not server.exists(url)
    assert (await client.head(url, headers={HEADER: str(version)})).status_code == 404


async def test_content_digest_is_verified_and_a_mismatch_stores_nothing(client, server):
    url, _ = await _create(client, server, 8, b"", complete=False)
    good = "sha-256=:" + base64.b64encode(hashlib.sha256(b"hello").digest()).decode() + ":"
    bad = "sha-256=:" + base64.b64encode(hashlib.sha256(b"other").digest()).decode() + ":"
    response = await client.patch(
        url, content=b"hello", headers={**append_headers(8, 0, False), "Content-Digest": bad}
    )
    assert response.status_code == 400
    assert server.stored_size(url) == 0
    response = await client.patch(
        url, content=b"hello", headers={**append_headers(8, 0, True), "Content-Digest": good}
    )
    assert response.status_code == 204
    assert await download(client, url) == b"hello"


async def test_tus_and_the_draft_share_uploads(client, server):
    url = await create(client, server, 10)
    await patch(client, url, 0, b"12345")
    head = await client.head(url, headers={HEADER: "8"})
    assert head.headers["upload-offset"] == "5" and head.headers["upload-complete"] == "?0"
    done = await client.patch(url, content=b"67890", headers=append_headers(8, 5, True))
    assert done.status_code == 204
    tus_head = await client.head(url, headers=TUS)
    assert tus_head.headers["upload-offset"] == tus_head.headers["upload-length"] == "10"
    draft_url, _ = await _create(client, server, 6, b"abc", complete=False)
    assert (await client.head(draft_url, headers=TUS)).headers["upload-offset"] == "3"


async def test_a_new_head_stops_a_stalled_append_and_keeps_its_bytes(client, server: Server):
    url, _ = await _create(client, server, 8, b"", complete=False)
    wire = Wire(server.port)
    headers = {**append_headers(8, 0, True), "Content-Length": str(8 * MiB)}
    wire.send_head("PATCH", path_of(url), headers)
    wire.sock.sendall(os.urandom(6 * MiB))
    try:
        wait_for(lambda: server.landed(url) >= 5 * MiB, what="the stalled append to write")
        head = await client.head(url, headers={HEADER: "8"})
        assert head.status_code == 204
        assert int(head.headers["upload-offset"]) == server.stored_size(url) > 0
    finally:
        wire.close()


def test_locations_honour_forwarded_headers_only_from_a_trusted_proxy(start_server):
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "uploads.example"}
    for trust, expected in (("true", "https://uploads.example/files/"), ("false", "http://127.0.0.1/files/")):
        srv = start_server("--trust-proxy", trust)
        wire = Wire(srv.port)
        wire.send_head(
            "POST", "/files/", {HEADER: "8", "Upload-Complete": "?1", "Content-Length": "2", **forwarded}
        )
        status, headers, _ = wire.response()
        assert status == 104 and headers["location"].startswith(expected)
        wire.sock.sendall(b"ok")
        status, headers, _, _ = wire.final()
        wire.close()
        assert status == 201 and headers["location"].startswith(expected)


async def test_creation_by_put_works_like_post(client, server):
    response = await client.put(
        server.files, content=b"hello", headers={HEADER: "8", "Upload-Complete": "?1"}
    )
    assert response.status_code == 201
    assert response.headers["upload-complete"] == "?1"
    assert await download(client, response.headers["location"]) == b"hello"


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_both_http_parsers_send_104s(start_server, http):
    srv = start_server("--http", http)
    data = os.urandom(12 * MiB)
    wire = Wire(srv.port)
    wire.send_head(
        "POST", "/files/", {HEADER: "8", "Upload-Complete": "?1", "Content-Length": str(len(data))}
    )
    status, headers, _ = wire.response()
    assert status == 104 and headers["location"].startswith("http://127.0.0.1")
    wire.sock.sendall(data)
    status, headers, _, interim = wire.final()
    wire.close()
    assert status == 201 and headers["upload-offset"] == str(len(data))
    assert interim and all(int(h["upload-offset"]) <= len(data) for h in interim)


async def test_upload_length_on_the_first_append_declares_the_length(client, server):
    url, _ = await _create(client, server, 8, b"", complete=False)
    headers = {**append_headers(8, 0, False), "Upload-Length": "6"}
    assert (await client.patch(url, content=b"abc", headers=headers)).status_code == 204
    head = await client.head(url, headers={HEADER: "8"})
    assert head.headers["upload-length"] == "6"
    done = await client.patch(url, content=b"def", headers=append_headers(8, 3, False))
    assert done.headers["upload-complete"] == "?1"
