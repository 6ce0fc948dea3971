"""tus 1.0.0 and its extensions, end to end against the real server over HTTP."""

from __future__ import annotations

import base64
import hashlib
import os
import time
import zlib

import httpx
import pytest

from .conftest import (
    BACKENDS,
    TUS,
    Server,
    create,
    download,
    patch,
    raw_request,
    read_response,
    sha256,
    wait_for,
)

OCTETS = "application/offset+octet-stream"


async def test_options_advertises_version_extensions_limits_and_algorithms(client, server):
    response = await client.options(server.files)
    assert response.status_code == 204
    assert response.headers["tus-version"] == "1.0.0"
    extensions = set(response.headers["tus-extension"].split(","))
    assert extensions == {
        "creation",
        "creation-with-upload",
        "creation-defer-length",
        "termination",
        "expiration",
        "checksum",
        "checksum-trailer",
        "concatenation",
    }
    assert int(response.headers["tus-max-size"]) > 0
    assert {"sha1", "md5", "sha256", "crc32"} <= set(response.headers["tus-checksum-algorithm"].split(","))


async def test_upload_in_several_patches_is_stored_byte_for_byte(client, server):
    data = os.urandom(3 * 1024 * 1024 + 17)
    url = await create(client, server, len(data))
    assert url.startswith(server.files)
    offset = 0
    for size in (1_000_000, 2_000_000, len(data)):
        response = await patch(client, url, offset, data[offset:size])
        assert response.status_code == 204, response.text
        offset = size
        assert response.headers["upload-offset"] == str(offset)
    assert sha256(await download(client, url)) == sha256(data)


async def test_head_reports_offset_length_metadata_and_no_store(client, server):
    url = await create(client, server, 10, **{"Upload-Metadata": "filename cmVwb3J0LnBkZg==,flag"})
    await patch(client, url, 0, b"1234")
    response = await client.head(url, headers=TUS)
    assert response.status_code == 200
    assert response.headers["upload-offset"] == "4"
    assert response.headers["upload-length"] == "10"
    assert response.headers["upload-metadata"] == "filename cmVwb3J0LnBkZg==,flag"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["tus-resumable"] == "1.0.0"


async def test_creation_with_upload_stores_the_body_of_the_post(client, server):
    data = os.urandom(100_000)
    response = await client.post(
        server.files,
        content=data[:60_000],
        headers={**TUS, "Upload-Length": str(len(data)), "Content-Type": OCTETS},
    )
    assert response.status_code == 201
    assert response.headers["upload-offset"] == "60000"
    url = response.headers["location"]
    assert (await patch(client, url, 60_000, data[60_000:])).status_code == 204
    assert sha256(await download(client, url)) == sha256(data)


async def test_deferred_length_is_declared_by_a_later_patch(client, server):
    url = await create(client, server, None)
    head = await client.head(url, headers=TUS)
    assert head.headers["upload-defer-length"] == "1"
    assert "upload-length" not in head.headers
    assert (await patch(client, url, 0, b"abc")).status_code == 204
    response = await patch(client, url, 3, b"def", **{"Upload-Length": "6"})
    assert response.status_code == 204
    assert await download(client, url) == b"abcdef"


@pytest.mark.parametrize("size", [1000, 6 * 1024 * 1024 + 5])
async def test_a_length_declared_after_the_last_bytes_completes_the_upload(client, server, size):
    """On S3 the bytes that did not fill a part are still in the tail when the length comes."""
    data = os.urandom(size)
    url = await create(client, server, None)
    assert (await patch(client, url, 0, data)).status_code == 204
    response = await patch(client, url, size, b"", **{"Upload-Length": str(size)})
    assert response.status_code == 204, response.text
    assert sha256(await download(client, url)) == sha256(data)
    assert server.stored_size(url) == size


async def test_declaring_a_length_below_the_stored_bytes_is_rejected(client, server):
    url = await create(client, server, None)
    await patch(client, url, 0, b"abcdef")
    response = await patch(client, url, 6, b"", **{"Upload-Length": "3"})
    assert response.status_code == 400
    assert (await client.head(url, headers=TUS)).headers["upload-defer-length"] == "1"


async def test_termination_deletes_the_upload(client, server):
    url = await create(client, server, 10)
    await patch(client, url, 0, b"12345")
    assert server.exists(url)
    assert (await client.delete(url, headers=TUS)).status_code == 204
    assert not server.exists(url)
    assert (await client.head(url, headers=TUS)).status_code == 404
    assert (await patch(client, url, 5, b"67890")).status_code == 404


async def test_expiration_header_on_creation_and_patch_of_unfinished_uploads(client, server):
    response = await client.post(server.files, headers={**TUS, "Upload-Length": "4"})
    assert "GMT" in response.headers["upload-expires"]
    url = response.headers["location"]
    assert "upload-expires" in (await patch(client, url, 0, b"12")).headers
    assert "upload-expires" not in (await patch(client, url, 2, b"34")).headers


@pytest.mark.parametrize(
    ("algorithm", "digest"),
    [
        ("sha1", lambda d: hashlib.sha1(d).digest()),
        ("md5", lambda d: hashlib.md5(d).digest()),
        ("sha256", lambda d: hashlib.sha256(d).digest()),
        ("sha512", lambda d: hashlib.sha512(d).digest()),
        ("crc32", lambda d: zlib.crc32(d).to_bytes(4, "big")),
    ],
)
async def test_checksum_that_matches_is_accepted_and_one_that_does_not_stores_nothing(
    client, server, algorithm, digest
):
    data = os.urandom(2_500_000)
    url = await create(client, server, len(data))
    good = f"{algorithm} {base64.b64encode(digest(data)).decode()}"
    bad = f"{algorithm} {base64.b64encode(digest(data + b'x')).decode()}"
    response = await patch(client, url, 0, data, **{"Upload-Checksum": bad})
    assert response.status_code == 460
    assert response.headers["content-type"] == "application/problem+json"
    assert (await client.head(url, headers=TUS)).headers["upload-offset"] == "0"
    assert server.stored_size(url) == 0
    response = await patch(client, url, 0, data, **{"Upload-Checksum": good})
    assert response.status_code == 204
    assert sha256(await download(client, url)) == sha256(data)


@pytest.mark.parametrize("header", ["whirlpool AAAA", "sha1 not*base64", "sha1"])
async def test_unsupported_or_malformed_checksum_is_a_400(client, server, header):
    url = await create(client, server, 3)
    response = await patch(client, url, 0, b"abc", **{"Upload-Checksum": header})
    assert response.status_code == 400
    assert server.stored_size(url) == 0


async def test_partial_uploads_concatenate_into_a_final_upload(client, server):
    pieces = [os.urandom(300_000), os.urandom(1), os.urandom(1_234_567)]
    part_urls = []
    for piece in pieces:
        url = await create(client, server, len(piece), **{"Upload-Concat": "partial"})
        assert (await patch(client, url, 0, piece)).status_code == 204
        part_urls.append(url)
    head = await client.head(part_urls[0], headers=TUS)
    assert head.headers["upload-concat"] == "partial"
    response = await client.post(
        server.files,
        headers={
            **TUS,
            "Upload-Concat": "final;" + " ".join(part_urls),
            "Upload-Metadata": "filename am9pbmVkLmJpbg==",
        },
    )
    assert response.status_code == 201, response.text
    final = response.headers["location"]
    head = await client.head(final, headers=TUS)
    assert head.headers["upload-length"] == head.headers["upload-offset"] == str(sum(map(len, pieces)))
    assert head.headers["upload-concat"].startswith("final;")
    assert sha256(await download(client, final)) == sha256(b"".join(pieces))
    assert (await patch(client, final, int(head.headers["upload-offset"]), b"x")).status_code == 403


async def test_concatenating_an_unfinished_or_normal_upload_is_a_400(client, server):
    unfinished = await create(client, server, 10, **{"Upload-Concat": "partial"})
    normal = await create(client, server, 0)
    for parts in ([unfinished], [normal], ["http://elsewhere/files/zz"], []):
        response = await client.post(
            server.files, headers={**TUS, "Upload-Concat": "final;" + " ".join(parts)}
        )
        assert response.status_code == 400, parts


async def test_method_override_turns_post_into_patch_and_delete(client, server):
    url = await create(client, server, 3)
    response = await client.post(
        url,
        content=b"abc",
        headers={**TUS, "X-HTTP-Method-Override": "PATCH", "Upload-Offset": "0", "Content-Type": OCTETS},
    )
    assert response.status_code == 204
    assert await download(client, url) == b"abc"
    response = await client.post(url, headers={**TUS, "X-HTTP-Method-Override": "DELETE"})
    assert response.status_code == 204
    assert (await client.head(url, headers=TUS)).status_code == 404


async def test_download_serves_ranges_and_the_stored_name_and_type(client, server):
    data = os.urandom(5000)
    metadata = f"filename {base64.b64encode('résumé 1.png'.encode()).decode()},filetype aW1hZ2UvcG5n"
    url = await create(client, server, len(data), **{"Upload-Metadata": metadata})
    await patch(client, url, 0, data)
    full = await client.get(url)
    assert full.headers["content-type"] == "image/png"
    assert full.headers["content-disposition"] == "inline; filename*=UTF-8''r%C3%A9sum%C3%A9%201.png"
    assert full.headers["accept-ranges"] == "bytes"
    assert full.headers["x-content-type-options"] == "nosniff"
    ranged = await client.get(url, headers={"Range": "bytes=100-199"})
    assert ranged.status_code == 206
    assert ranged.headers["content-range"] == "bytes 100-199/5000"
    assert ranged.content == data[100:200]
    suffix = await client.get(url, headers={"Range": "bytes=-10"})
    assert suffix.content == data[-10:]
    open_ended = await client.get(url, headers={"Range": "bytes=4990-"})
    assert open_ended.content == data[4990:]
    unsatisfiable = await client.get(url, headers={"Range": "bytes=6000-"})
    assert unsatisfiable.status_code == 416
    assert unsatisfiable.headers["content-range"] == "bytes */5000"
    stale = await client.get(url, headers={"Range": "bytes=0-9", "If-Range": '"other"'})
    assert stale.status_code == 200 and stale.content == data


async def test_download_of_html_is_an_attachment(client, server):
    url = await create(client, server, 5, **{"Upload-Metadata": "filetype dGV4dC9odG1s"})
    await patch(client, url, 0, b"<b>x</b>"[:5])
    response = await client.get(url)
    assert response.headers["content-disposition"].startswith("attachment")


async def test_download_of_an_unfinished_upload_is_refused(client, server):
    url = await create(client, server, 10)
    response = await client.get(url)
    assert response.status_code == 409
    assert response.headers["content-type"] == "application/problem+json"


async def test_cors_preflight_allows_tus_headers_and_responses_expose_them(client, server):
    preflight = await client.options(
        server.files,
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "PATCH",
            "Access-Control-Request-Headers": "tus-resumable,upload-offset,upload-checksum,content-type",
        },
    )
    assert preflight.status_code == 200
    assert "PATCH" in preflight.headers["access-control-allow-methods"]
    allowed = preflight.headers["access-control-allow-headers"].lower()
    assert {"upload-offset", "upload-checksum", "tus-resumable"} <= set(map(str.strip, allowed.split(",")))
    response = await client.post(
        server.files, headers={**TUS, "Upload-Length": "1", "Origin": "https://app.example"}
    )
    exposed = response.headers["access-control-expose-headers"].lower()
    for name in ("location", "upload-offset", "upload-expires", "tus-resumable"):
        assert name in exposed


async def test_answers_vary_on_origin_with_or_without_one(client, server):
    """A cache between browser and server must not hand one origin's answer to another."""
    plain = await client.post(server.files, headers={**TUS, "Upload-Length": "1"})
    assert plain.status_code == 201
    assert plain.headers.get_list("vary") == ["Origin"]
    assert "access-control-allow-origin" not in plain.headers
    cross = await client.post(
        server.files, headers={**TUS, "Upload-Length": "1", "Origin": "https://app.example"}
    )
    assert cross.headers["access-control-allow-origin"] == "*"
    assert cross.headers.get_list("vary") == ["Origin"]


# -- bad input gets a clear error and loses nothing -------------------------------------


async def test_wrong_offset_is_a_409_with_the_real_offset(client, server):
    url = await create(client, server, 10)
    await patch(client, url, 0, b"12345")
    response = await patch(client, url, 3, b"45678")
    assert response.status_code == 409
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["expected-offset"] == 5
    assert server.stored_size(url) == 5


async def test_wrong_content_type_is_a_415(client, server):
    url = await create(client, server, 3)
    response = await client.patch(
        url, content=b"abc", headers={**TUS, "Upload-Offset": "0", "Content-Type": "text/plain"}
    )
    assert response.status_code == 415
    assert server.stored_size(url) == 0


@pytest.mark.parametrize("version", [None, "0.2.2", "2.0.0"])
async def test_wrong_tus_version_is_a_412_naming_the_supported_one(client, server, version):
    headers = {"Upload-Length": "3"} if version is None else {"Tus-Resumable": version, "Upload-Length": "3"}
    response = await client.post(server.files, headers=headers)
    assert response.status_code == 412
    assert response.headers["tus-version"] == "1.0.0"


@pytest.mark.parametrize(
    "path",
    ["ffffffffffffffffffffffffffffffff", "..%2f..%2fetc%2fpasswd", "ABCDEF", "%2e%2e", "0" * 33],
)
async def test_ids_that_are_not_ours_are_404_and_touch_nothing(client, server, path):
    response = await client.head(server.files + path, headers=TUS)
    assert response.status_code == 404
    response = await patch(client, server.files + path, 0, b"x")
    assert response.status_code == 404
    assert not list(server.data_dir.parent.glob("**/passwd"))


@pytest.mark.parametrize(
    "headers",
    [
        {"Upload-Length": "-1"},
        {"Upload-Length": "ten"},
        {"Upload-Length": "1e3"},
        {},
        {"Upload-Defer-Length": "2"},
        {"Upload-Length": "5", "Upload-Defer-Length": "1"},
        {"Upload-Length": "5", "Upload-Metadata": "key not-base64!"},
        {"Upload-Length": "5", "Upload-Metadata": "key a b"},
        {"Upload-Length": "5", "Upload-Metadata": "key YQ==,key YQ=="},
        {"Upload-Length": "5", "Upload-Concat": "whole"},
    ],
)
async def test_malformed_creation_headers_are_a_400(client, server, headers):
    response = await client.post(server.files, headers={**TUS, **headers})
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == 400


async def test_empty_metadata_header_is_accepted(client, server):
    response = await client.post(server.files, headers={**TUS, "Upload-Length": "1", "Upload-Metadata": ""})
    assert response.status_code == 201


@pytest.mark.parametrize("offset", ["-1", "x", "", "1.0"])
async def test_malformed_offset_is_a_400(client, server, offset):
    url = await create(client, server, 3)
    response = await client.patch(
        url, content=b"abc", headers={**TUS, "Upload-Offset": offset, "Content-Type": OCTETS}
    )
    assert response.status_code == 400


async def test_body_longer_than_the_length_is_refused_before_storing(client, server):
    url = await create(client, server, 4)
    response = await patch(client, url, 0, b"123456")
    assert response.status_code == 413
    assert server.stored_size(url) == 0


async def test_chunked_body_longer_than_the_length_stores_nothing_past_it(client, server):
    url = await create(client, server, 4)

    async def chunks():
        yield b"12"
        yield b"3456"

    response = await client.patch(
        url, content=chunks(), headers={**TUS, "Upload-Offset": "0", "Content-Type": OCTETS}
    )
    assert response.status_code == 413
    assert server.stored_size(url) == 4
    assert await download(client, url) == b"1234"


async def test_patch_to_a_finished_upload_is_a_409_and_changes_nothing(client, server):
    url = await create(client, server, 3)
    await patch(client, url, 0, b"abc")
    response = await patch(client, url, 3, b"d")
    assert response.status_code == 409
    assert await download(client, url) == b"abc"


@pytest.mark.parametrize("backend", BACKENDS)
async def test_uploads_over_the_max_size_are_a_413(client, start_server, backend):
    small: Server = start_server("--max-size", "1M", backend=backend)
    options = await client.options(small.files)
    assert options.headers["tus-max-size"] == str(1 << 20)
    response = await client.post(small.files, headers={**TUS, "Upload-Length": str((1 << 20) + 1)})
    assert response.status_code == 413
    url = await create(client, small, None)
    response = await patch(client, url, 0, os.urandom((1 << 20) + 1))
    assert response.status_code == 413
    assert small.stored_size(url) == 0


async def test_expired_uploads_answer_410_everywhere(client, server):
    url = await create(client, server, 10)
    await patch(client, url, 0, b"12345")
    server.age(url, seconds=30 * 86400)
    response = await client.head(url, headers=TUS)
    assert response.status_code == 410
    assert response.headers["content-type"] == "application/problem+json"
    assert (await patch(client, url, 5, b"67890")).status_code == 410
    assert (await client.get(url)).status_code == 410
    assert server.stored_size(url) == 5  # gone for clients, bytes still there until removal


@pytest.mark.parametrize("backend", BACKENDS)
async def test_the_server_removes_expired_uploads_by_itself(client, start_server, backend):
    srv: Server = start_server("--expiry", "1h", "--expiry-interval", "0.2s", backend=backend)
    stale = await create(client, srv, 10)
    await patch(client, stale, 0, b"12345")
    fresh = await create(client, srv, 10)
    srv.age(stale, seconds=2 * 3600)
    wait_for(lambda: not srv.exists(stale), what="the expired upload to be removed")
    assert (await client.head(stale, headers=TUS)).status_code == 404
    assert (await client.head(fresh, headers=TUS)).status_code == 200


async def test_finished_uploads_do_not_expire(client, server):
    url = await create(client, server, 3)
    await patch(client, url, 0, b"abc")
    server.age(url, seconds=30 * 86400)
    assert await download(client, url) == b"abc"


async def test_unknown_routes_and_methods_get_problem_responses(client, server):
    for response, status in (
        (await client.put(server.files + "0" * 32, headers=TUS), 405),
        (await client.request("PATCH", server.files, headers=TUS), 405),
        (await client.get(server.url + "/nowhere"), 404),
    ):
        assert response.status_code == status, response.request
        assert response.headers["content-type"] == "application/problem+json"


def test_problem_bodies_are_short_json(server):
    response = httpx.head(server.files + "0" * 32, headers=TUS)
    assert response.status_code == 404
    body = httpx.patch(
        server.files + "0" * 32, headers={**TUS, "Upload-Offset": "0", "Content-Type": OCTETS}
    ).json()
    assert body["status"] == 404 and body["type"].endswith("not-found") and len(str(body)) < 300


def test_an_idle_connection_stays_open_for_the_keep_alive_setting(start_server):
    """The server closes an idle connection after --keep-alive seconds (uvicorn's own
    default would be 5; uploadsrv's is 75, above load balancers' idle timeouts)."""
    srv: Server = start_server("--keep-alive", "1")
    sock = raw_request(srv.port, "GET /healthz HTTP/1.1\nHost: uploads\n", close=False)
    try:
        assert read_response(sock)[0] == 200
        answered = time.monotonic()
        sock.settimeout(10)
        assert sock.recv(1) == b""  # closed by the server
        assert 0.8 < time.monotonic() - answered < 4
    finally:
        sock.close()
