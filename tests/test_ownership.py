"""Whose upload it is, on every protocol: another subject, or nobody, gets exactly the answer an
unknown id gets; signed upload URLs act for their owner on their upload alone; per-owner
limits; and real clients (tuspy, tus-js-client) resuming from a signed URL without a token."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from tusclient import client as tus_client

from uploadsrv.auth import UrlSigner
from uploadsrv.core.quotas import RECOUNT_SECONDS

from .conftest import TUS, Server, raw_request, run_client, sha256, wait_for
from .test_auth import CLAIMS, SECRET, bearer, mint
from .test_ietf_draft import HEADER as IETF_HEADER
from .test_ietf_draft import Wire, append_headers

URL_SECRET = "url-secret-for-tests-0123456789abcdef"
OFFSET = "application/offset+octet-stream"
IETF = {"Upload-Draft-Interop-Version": "6"}


def strip(url: str) -> str:
    """The upload URL without its signature."""
    return url.split("?")[0]


def upload_id(url: str) -> str:
    match = re.search(r"/([0-9a-f]{32})(/|$|\?)", url)
    assert match, url
    return match[1]


def other_id(url: str) -> str:
    """The same URL naming an upload that does not exist (same length, another id)."""
    return url.replace(upload_id(url), secrets.token_hex(16))


# -- alice's uploads ---------------------------------------------------------------------


@dataclass
class Uploads:
    """One of each kind of thing alice owns, and what each must still hold afterwards."""

    tus: str  #: unfinished tus upload, 400 of 1000 bytes
    tus_bytes: bytes
    done: str  #: finished tus upload
    done_bytes: bytes
    part: str  #: finished partial upload
    ietf: str  #: unfinished IETF upload, 500 of 1000 bytes
    ietf_bytes: bytes
    session: dict  #: chunk session of 3 chunks, chunk 1 stored
    chunk_one: bytes


async def alice_uploads(client: httpx.AsyncClient, server: Server, alice: dict[str, str]) -> Uploads:
    tus_bytes, done_bytes, part_bytes = os.urandom(1000), os.urandom(700), os.urandom(300)

    async def tus_create(length: int, body: bytes = b"", **headers: str) -> str:
        hdrs = {**TUS, **alice, "Upload-Length": str(length), **headers}
        if body:
            hdrs["Content-Type"] = OFFSET
        response = await client.post(server.files, headers=hdrs, content=body)
        assert response.status_code == 201, response.text
        return strip(response.headers["location"])

    tus = await tus_create(1000, tus_bytes[:400])
    done = await tus_create(700, done_bytes)
    part = await tus_create(300, part_bytes, **{"Upload-Concat": "partial"})
    ietf_bytes = os.urandom(1000)
    response = await client.post(
        server.files,
        headers={**alice, **IETF, "Upload-Complete": "?0", "Upload-Length": "1000"},
        content=ietf_bytes[:500],
    )
    assert response.status_code == 201, response.text
    chunk_size = 5 << 20 if server.backend == "s3" else 64 << 10
    created = await client.post(
        server.url + "/chunks/", headers=alice, json={"size": 3 * chunk_size, "chunk_size": chunk_size}
    )
    assert created.status_code == 201, created.text
    session = {k: strip(v) if k.endswith("url") or k == "url" else v for k, v in created.json().items()}
    session["chunk_url_template"] = strip(created.json()["chunk_url_template"])
    chunk_one = os.urandom(chunk_size)
    stored = await client.put(
        session["chunk_url_template"].replace("{n}", "1"), headers=alice, content=chunk_one
    )
    assert stored.status_code == 201, stored.text
    return Uploads(
        tus,
        tus_bytes,
        done,
        done_bytes,
        part,
        strip(response.headers["location"]),
        ietf_bytes,
        session,
        chunk_one,
    )


def attempts(server: Server, a: Uploads) -> list[tuple[str, str, str, dict[str, str], bytes]]:
    """Every protocol and method on alice's uploads: (name, method, url, headers, body)."""
    chunk = a.session["chunk_url_template"]
    final = {"Upload-Concat": f"final;{a.part}"}
    return [
        ("tus HEAD", "HEAD", a.tus, TUS, b""),
        ("tus PATCH", "PATCH", a.tus, {**TUS, "Upload-Offset": "400", "Content-Type": OFFSET}, b"x" * 100),
        (
            "tus PATCH by override",
            "POST",
            a.tus,
            {**TUS, "X-HTTP-Method-Override": "PATCH", "Upload-Offset": "400", "Content-Type": OFFSET},
            b"x",
        ),
        ("tus GET", "GET", a.done, {}, b""),
        ("tus GET unfinished", "GET", a.tus, {}, b""),
        ("tus DELETE", "DELETE", a.tus, TUS, b""),
        ("tus DELETE finished", "DELETE", a.done, TUS, b""),
        ("tus DELETE partial", "DELETE", a.part, TUS, b""),
        ("tus concatenate", "POST", server.files, {**TUS, **final}, b""),
        ("ietf HEAD", "HEAD", a.ietf, IETF, b""),
        (
            "ietf PATCH",
            "PATCH",
            a.ietf,
            {
                **IETF,
                "Upload-Offset": "500",
                "Upload-Complete": "?0",
                "Content-Type": "application/partial-upload",
            },
            b"y" * 100,
        ),
        ("ietf DELETE", "DELETE", a.ietf, IETF, b""),
        ("ietf GET download", "GET", a.done, IETF, b""),
        ("ietf 9 GET offset", "GET", a.ietf, {"Upload-Draft-Interop-Version": "9"}, b""),
        ("chunks status", "GET", a.session["url"], {}, b""),
        ("chunks events", "GET", a.session["events_url"], {}, b""),
        ("chunks PUT", "PUT", chunk.replace("{n}", "2"), {}, os.urandom(a.session["chunk_size"])),
        ("chunks PUT again", "PUT", chunk.replace("{n}", "1"), {}, os.urandom(a.session["chunk_size"])),
        ("chunks complete", "POST", a.session["complete_url"], {}, b""),
        ("chunks DELETE", "DELETE", a.session["url"], {}, b""),
        ("chunks download", "GET", a.session["upload_url"], {}, b""),
    ]


async def send(
    client: httpx.AsyncClient, method: str, url: str, headers: dict[str, str], body: bytes
) -> tuple[int, str | None, str]:
    response = await client.request(method, url, headers=headers, content=body)
    return response.status_code, response.headers.get("content-type"), response.text


def for_unknown(name: str, url: str, headers: dict[str, str]) -> tuple[str, dict[str, str], str]:
    """The same request for an id that does not exist, and the id it names in place of alice's."""
    if name == "tus concatenate":
        part = headers["Upload-Concat"].split(";")[1]
        unknown = other_id(part)
        return url, {**headers, "Upload-Concat": f"final;{unknown}"}, upload_id(unknown)
    unknown = other_id(url)
    return unknown, headers, upload_id(unknown)


def expected_status(who: str, name: str) -> int:
    if name == "tus concatenate":  # a POST to the collection: credentials first, then the parts
        return 401 if who == "anonymous" else 400
    return 404


async def assert_intact(client: httpx.AsyncClient, server: Server, a: Uploads, alice: dict[str, str]) -> None:
    """Alice's uploads are exactly as she left them, and she can still finish each."""
    head = await client.head(a.tus, headers={**TUS, **alice})
    assert head.status_code == 200 and head.headers["upload-offset"] == "400"
    done = await client.get(a.done, headers=alice)
    assert done.status_code == 200 and sha256(done.content) == sha256(a.done_bytes)
    assert (await client.head(a.part, headers={**TUS, **alice})).headers["upload-offset"] == "300"
    ietf = await client.head(a.ietf, headers={**IETF, **alice})
    assert ietf.status_code == 204 and ietf.headers["upload-offset"] == "500"
    status = (await client.get(a.session["url"], headers=alice)).json()
    assert [c["number"] for c in status["chunks"]] == [1]
    assert status["chunks"][0]["sha256"] == sha256(a.chunk_one)

    patch = {**TUS, **alice, "Upload-Offset": "400", "Content-Type": OFFSET}
    assert (await client.patch(a.tus, headers=patch, content=a.tus_bytes[400:])).status_code == 204
    assert sha256((await client.get(a.tus, headers=alice)).content) == sha256(a.tus_bytes)
    rest = {
        **IETF,
        **alice,
        "Upload-Offset": "500",
        "Upload-Complete": "?1",
        "Content-Type": "application/partial-upload",
    }
    assert (await client.patch(a.ietf, headers=rest, content=a.ietf_bytes[500:])).status_code == 204
    assert sha256((await client.get(a.ietf, headers=alice)).content) == sha256(a.ietf_bytes)


# -- the matrix --------------------------------------------------------------------------


MODES = {
    "jwt": (("--auth", "jwt", "--jwt-secret", SECRET, *CLAIMS), lambda who: bearer(mint(who))),
    "header": (("--owner-header", "X-User"), lambda who: {"X-User": who}),
}


@pytest.mark.parametrize(("mode", "backend"), [("jwt", "local"), ("header", "local"), ("jwt", "s3")])
async def test_bob_and_anonymous_get_exactly_what_an_unknown_id_gets(
    client, start_server, mode, backend
) -> None:
    flags, credentials = MODES[mode]
    server = start_server(*flags, backend=backend)
    alice = credentials("alice")
    a = await alice_uploads(client, server, alice)
    for who, extra in (("bob", credentials("bob")), ("anonymous", {})):
        for name, method, url, headers, body in attempts(server, a):
            answer = await send(client, method, url, {**headers, **extra}, body)
            unknown_url, unknown_headers, unknown_id = for_unknown(name, url, headers)
            unknown = await send(client, method, unknown_url, {**unknown_headers, **extra}, body)
            assert answer[0] == expected_status(who, name), (who, name, answer)
            mine = (answer[0], answer[1], answer[2].replace(upload_id(a.part), "ID"))
            assert mine == (unknown[0], unknown[1], unknown[2].replace(unknown_id, "ID")), (who, name)
    await assert_intact(client, server, a, alice)


# -- signed upload URLs -----------------------------------------------------------------


@pytest.fixture(scope="module")
def signing_server(start_module_server) -> Server:
    return start_module_server("--auth", "jwt", "--jwt-secret", SECRET, *CLAIMS, "--url-secret", URL_SECRET)


async def new_upload(client, server: Server, who: str = "alice", body: bytes = b"", length: int = 10) -> str:
    headers = {**TUS, **bearer(mint(who)), "Upload-Length": str(length)}
    if body:
        headers["Content-Type"] = OFFSET
    response = await client.post(server.files, headers=headers, content=body)
    assert response.status_code == 201, response.text
    return response.headers["location"]


async def test_a_signed_location_acts_for_its_owner_without_a_token(client, signing_server) -> None:
    signed = await new_upload(client, signing_server)
    assert "?sig=" in signed
    head = await client.head(signed, headers=TUS)
    assert head.status_code == 200 and head.headers["upload-offset"] == "0"
    patch = {**TUS, "Upload-Offset": "0", "Content-Type": OFFSET}
    assert (await client.patch(signed, headers=patch, content=b"hello")).status_code == 204
    expired_token = bearer(mint(exp=int(time.time()) - 3600))  # a background retry's stale token
    assert (await client.head(signed, headers={**TUS, **expired_token})).headers["upload-offset"] == "5"
    patch["Upload-Offset"] = "5"
    assert (await client.patch(signed, headers=patch, content=b"world")).status_code == 204
    assert (await client.get(signed)).content == b"helloworld"
    assert (await client.delete(signed, headers=TUS)).status_code == 204


async def test_the_parts_a_final_upload_lists_are_signed_urls_that_work(client, signing_server) -> None:
    partial = {**TUS, **bearer(mint()), "Upload-Concat": "partial", "Content-Type": OFFSET}
    parts = []
    for body in (b"hello ", b"world"):
        response = await client.post(
            signing_server.files, headers={**partial, "Upload-Length": str(len(body))}, content=body
        )
        assert response.status_code == 201, response.text
        parts.append(response.headers["location"])
    final = await client.post(
        signing_server.files,
        headers={**TUS, **bearer(mint()), "Upload-Concat": "final;" + " ".join(map(strip, parts))},
    )
    assert final.status_code == 201, final.text
    head = await client.head(final.headers["location"], headers=TUS)
    kind, _, listed = head.headers["upload-concat"].partition(";")
    assert kind == "final"
    listed_parts = listed.split()
    assert [urlsplit(part).path for part in listed_parts] == [urlsplit(part).path for part in parts]
    for part, body in zip(listed_parts, (b"hello ", b"world"), strict=True):
        assert "?sig=" in part
        response = await client.get(signing_server.url + part)  # no token: the signature is enough
        assert response.status_code == 200 and response.content == body


async def test_a_tampered_signature_is_a_404(client, signing_server) -> None:
    signed = await new_upload(client, signing_server)
    expires, owner, _ = signed.split("sig=")[1].split(".")
    bob = UrlSigner(URL_SECRET.encode()).sign(Server.upload_id(signed), "bob", int(expires)).split(".")[1]
    for tampered in (
        signed[:-2] + ("AA" if not signed.endswith("AA") else "BB"),
        signed.replace(f".{owner}.", f".{bob}."),
        signed.replace(f"sig={expires}", f"sig={int(expires) + 86400}"),
        signed.replace("sig=", "sig=x"),
        strip(signed),
    ):
        assert (await client.head(tampered, headers=TUS)).status_code == 404, tampered
    assert (await client.head(signed, headers=TUS)).status_code == 200


async def test_a_signed_url_never_opens_another_upload(client, signing_server) -> None:
    first = await new_upload(client, signing_server)
    second = await new_upload(client, signing_server)
    bobs = await new_upload(client, signing_server, "bob")
    signature = first.split("?")[1]
    for other in (second, bobs):
        borrowed = strip(other) + "?" + signature
        assert (await client.head(borrowed, headers=TUS)).status_code == 404
        assert (await client.delete(borrowed, headers=TUS)).status_code == 404
    session = await client.post(signing_server.url + "/chunks/", headers=bearer(mint()), json={"size": 10})
    borrowed_session = strip(session.json()["url"]) + "?" + signature
    assert (await client.get(borrowed_session)).status_code == 404
    assert (await client.head(second, headers=TUS)).status_code == 200
    assert (await client.head(bobs, headers=TUS)).status_code == 200


async def test_an_expired_signature_is_a_404_once_the_upload_is_finished(client, signing_server) -> None:
    signer = UrlSigner(URL_SECRET.encode())
    finished = strip(await new_upload(client, signing_server, body=b"0123456789"))
    upload_id = Server.upload_id(finished)
    past = f"{finished}?sig={signer.sign(upload_id, 'alice', int(time.time()) - 60)}"
    future = f"{finished}?sig={signer.sign(upload_id, 'alice', int(time.time()) + 60)}"
    assert (await client.get(past)).status_code == 404
    assert (await client.get(future)).content == b"0123456789"


async def test_an_unfinished_upload_keeps_its_url_working_while_it_lives(client, signing_server) -> None:
    """A URL handed out at creation stays good until the upload's own (sliding) expiry."""
    signer = UrlSigner(URL_SECRET.encode())
    unfinished = strip(await new_upload(client, signing_server))
    old = f"{unfinished}?sig={signer.sign(Server.upload_id(unfinished), 'alice', int(time.time()) - 60)}"
    assert (await client.head(old, headers=TUS)).status_code == 200


async def test_chunk_session_urls_are_signed_and_work_without_a_token(client, signing_server) -> None:
    data = os.urandom(100_000)
    spec = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    session = (await client.post(signing_server.url + "/chunks/", headers=bearer(mint()), json=spec)).json()
    for key in ("url", "chunk_url_template", "complete_url", "events_url", "upload_url"):
        assert "?sig=" in session[key], key
    assert (
        await client.put(session["chunk_url_template"].replace("{n}", "1"), content=data)
    ).status_code == 201
    assert (await client.get(session["url"])).json()["chunks_stored"] == 1
    async with client.stream("GET", session["events_url"]) as events:
        assert events.status_code == 200
    completed = await client.post(session["complete_url"])
    assert completed.status_code == 200 and "?sig=" in completed.json()["upload_url"]
    assert sha256((await client.get(completed.json()["upload_url"])).content) == sha256(data)


async def test_ietf_104_and_201_locations_are_signed(client, signing_server) -> None:
    body = b"abcdef"
    head = (
        f"POST /files/ HTTP/1.1\nHost: 127.0.0.1:{signing_server.port}\nUpload-Draft-Interop-Version: 8\n"
        f"Upload-Complete: ?1\nAuthorization: Bearer {mint()}\nContent-Length: {len(body)}\n"
        "Connection: close\n"
    )
    sock = raw_request(signing_server.port, head, body, close=False)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    finally:
        sock.close()
    heads = [part for part in received.split(b"\r\n\r\n") if part.startswith(b"HTTP/1.1")]
    locations = [
        line.split(b":", 1)[1].strip().decode()
        for h in heads
        for line in h.split(b"\r\n")
        if line.lower().startswith(b"location:")
    ]
    assert [h.split(b" ")[1] for h in heads] == [b"104", b"201"]
    assert len(locations) == 2 and all("?sig=" in url for url in locations)
    assert (await client.get(locations[1])).content == body


async def test_an_ios_upload_cut_off_resumes_from_the_104s_url_without_a_token(
    client, signing_server
) -> None:
    """URLSession's own HEAD and PATCH after a broken connection carry no fresh token."""
    data = os.urandom(3 * 1024 * 1024 + 17)
    wire = Wire(signing_server.port)
    headers = {IETF_HEADER: "8", "Upload-Complete": "?1", "Content-Length": str(len(data)), **bearer(mint())}
    wire.send_head("POST", "/files/", headers)
    status, interim, _ = wire.response()
    assert status == 104 and "?sig=" in interim["location"]
    wire.sock.sendall(data[: 2 * 1024 * 1024])
    wire.close()
    upload = signing_server.files + interim["location"].rsplit("/", 1)[1]
    wait_for(lambda: signing_server.stored_size(upload) > 0, what="the received bytes to be committed")

    stale = bearer(mint(exp=int(time.time()) - 3600))
    head = await client.head(upload, headers={IETF_HEADER: "8", **stale})
    assert head.status_code == 204
    offset = int(head.headers["upload-offset"])
    assert 0 < offset <= 2 * 1024 * 1024
    rest = await client.patch(upload, content=data[offset:], headers=append_headers(8, offset, True))
    assert rest.status_code == 204 and rest.headers["upload-complete"] == "?1"
    assert sha256((await client.get(upload)).content) == sha256(data)
    assert (await client.head(strip(upload), headers={IETF_HEADER: "8"})).status_code == 404


# -- per-owner limits ---------------------------------------------------------------------


async def test_unfinished_uploads_per_owner_are_limited(client, start_server) -> None:
    server = start_server("--auth", "jwt", "--jwt-secret", SECRET, *CLAIMS, "--max-uploads-per-owner", "2")
    first = await new_upload(client, server)
    second = await new_upload(client, server)
    refused = await client.post(server.files, headers={**TUS, **bearer(mint()), "Upload-Length": "10"})
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "60"
    assert refused.headers["content-type"] == "application/problem+json"
    await new_upload(client, server, "bob")  # another owner is not affected
    finish = {**TUS, "Upload-Offset": "0", "Content-Type": OFFSET}
    assert (await client.patch(second, headers=finish, content=b"0123456789")).status_code == 204
    third = await new_upload(client, server)  # a finished upload no longer counts
    assert (
        await client.post(server.files, headers={**TUS, **bearer(mint()), "Upload-Length": "1"})
    ).status_code == 429
    assert (await client.delete(first, headers=TUS)).status_code == 204
    await new_upload(client, server)  # nor does a deleted one
    assert (await client.head(third, headers=TUS)).status_code == 200


async def test_uploads_the_operator_prunes_stop_counting_against_their_owner(client, start_server) -> None:
    server = start_server("--auth", "jwt", "--jwt-secret", SECRET, *CLAIMS, "--max-uploads-per-owner", "2")
    stale = [await new_upload(client, server) for _ in range(2)]
    create = {**TUS, **bearer(mint()), "Upload-Length": "10"}
    assert (await client.post(server.files, headers=create)).status_code == 429
    for url in stale:
        server.age(strip(url), 3 * 86400)
    pruned = json.loads(server.cli("prune", "--older-than", "2d", "--json").stdout)
    assert {row["id"] for row in pruned["removed"]} == {Server.upload_id(url) for url in stale}
    # The server's count catches up with what storage holds within quotas.RECOUNT_SECONDS.
    deadline = time.monotonic() + RECOUNT_SECONDS + 15
    while (created := await client.post(server.files, headers=create)).status_code == 429:
        assert time.monotonic() < deadline, "the pruned uploads still count"
        await asyncio.sleep(0.5)
    assert created.status_code == 201
    assert (await client.post(server.files, headers=create)).status_code == 201
    assert (await client.post(server.files, headers=create)).status_code == 429  # the limit holds


async def test_requests_in_flight_per_owner_are_limited(client, start_server) -> None:
    server = start_server("--auth", "jwt", "--jwt-secret", SECRET, *CLAIMS, "--max-requests-per-owner", "1")
    upload = await new_upload(client, server, length=1000)
    path = upload.split(str(server.port), 1)[1]
    head = (
        f"PATCH {path} HTTP/1.1\nHost: 127.0.0.1\nTus-Resumable: 1.0.0\nUpload-Offset: 0\n"
        f"Content-Type: {OFFSET}\nContent-Length: 1000\n"
    )
    stalled = raw_request(server.port, head, b"x" * 10, close=False)  # alice's PATCH, in flight
    try:
        wait_for(
            lambda: httpx.head(strip(upload), headers={**TUS, **bearer(mint())}).status_code == 429,
            what="alice's second request to be refused",
        )
        refused = await client.head(strip(upload), headers={**TUS, **bearer(mint())})
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert (
            await client.post(server.files, headers={**TUS, **bearer(mint("bob")), "Upload-Length": "1"})
        ).status_code == 201
    finally:
        stalled.close()
    wait_for(
        lambda: httpx.head(strip(upload), headers={**TUS, **bearer(mint())}).status_code == 200,
        what="alice's request to end",
    )


# -- the operator ---------------------------------------------------------------------------


async def test_the_operator_cli_sees_every_upload_and_its_owner(client, signing_server) -> None:
    alices = Server.upload_id(await new_upload(client, signing_server, "alice"))
    bobs = Server.upload_id(await new_upload(client, signing_server, "bob"))
    rows = {row["id"]: row for row in json.loads(signing_server.cli("list", "--json").stdout)}
    assert rows[alices]["owner"] == "alice" and rows[bobs]["owner"] == "bob"
    only_bob = json.loads(signing_server.cli("list", "--json", "--owner", "bob").stdout)
    assert bobs in {row["id"] for row in only_bob} and alices not in {row["id"] for row in only_bob}
    assert json.loads(signing_server.cli("inspect", "--json", bobs).stdout)["owner"] == "bob"
    table = signing_server.cli("list").stdout
    assert "alice" in table and "bob" in table


# -- real clients -------------------------------------------------------------------------


def _file(tmp_path: Path, size: int) -> tuple[Path, bytes]:
    data = os.urandom(size)
    path = tmp_path / "clip.bin"
    path.write_bytes(data)
    return path, data


def test_tuspy_uploads_with_a_token_and_resumes_from_the_signed_url_without_one(
    signing_server, tmp_path
) -> None:
    path, data = _file(tmp_path, 2 * 1024 * 1024)
    first = tus_client.TusClient(signing_server.files, headers=bearer(mint())).uploader(
        str(path), chunk_size=256 * 1024
    )
    first.upload(stop_at=768 * 1024)
    assert "?sig=" in first.url
    resumed = tus_client.TusClient(signing_server.files).uploader(
        str(path), url=first.url, chunk_size=1024 * 1024
    )
    assert resumed.offset == 768 * 1024
    resumed.upload()
    assert sha256(httpx.get(first.url).content) == sha256(data)
    assert httpx.get(strip(first.url)).status_code == 404  # the bare URL is nobody's


@pytest.mark.parametrize("protocol", ["tus-v1", "ietf-draft-05"])
def test_tus_js_client_resumes_from_the_signed_url_without_a_token(
    signing_server, node_clients, tmp_path, protocol
) -> None:
    path, data = _file(tmp_path, 3 * 1024 * 1024 + 1234)
    env = {"UPLOAD_HEADERS": json.dumps(bearer(mint())), "RESUME_HEADERS": "{}"}
    result = run_client(node_clients, signing_server.files, path, protocol, "abort-resume", env)
    assert "?sig=" in result["url"]
    assert 0 < result["resumedFrom"] == result["abortedAt"] < len(data)
    assert sha256(httpx.get(result["url"]).content) == sha256(data)


def test_tus_js_client_parallel_uploads_concatenate_with_auth(signing_server, node_clients, tmp_path) -> None:
    path, data = _file(tmp_path, 3 * 1024 * 1024 + 1234)
    env = {"UPLOAD_HEADERS": json.dumps(bearer(mint()))}
    result = run_client(node_clients, signing_server.files, path, "tus-v1", "parallel", env)
    assert sha256(httpx.get(result["url"]).content) == sha256(data)
