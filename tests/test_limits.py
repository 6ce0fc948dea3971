"""What a hostile or broken client cannot do: malformed headers, leaked descriptors."""

from __future__ import annotations

import os

import httpx
import pytest

from tests.conftest import TUS, Server, create, patch

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
