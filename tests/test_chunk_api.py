"""The chunk API end to end: the real server on local disk and on S3 (moto), over HTTP."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import random
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from openapi_spec_validator import validate
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TUS, Server, raw_request, read_response, sha256, wait_for
from uploadsrv.client import ChunkClient

SMALL = 64 << 10  #: a chunk size wish; the server raises it to what the backend needs


async def new_session(client: httpx.AsyncClient, server: Server, size: int, **spec: object) -> dict:
    response = await client.post(server.url + "/chunks/", json={"size": size, "chunk_size": SMALL, **spec})
    assert response.status_code == 201, response.text
    session = response.json()
    assert response.headers["location"] == session["url"]
    return session


async def file_session(
    client: httpx.AsyncClient, server: Server, chunks: int, extra: int = 0
) -> tuple[dict, bytes]:
    """A session for random bytes: `chunks` whole chunks of the size the server picks, plus `extra`."""
    probe = await new_session(client, server, 1)
    data = os.urandom(chunks * probe["chunk_size"] + extra)
    return await new_session(client, server, len(data)), data


def piece(data: bytes, session: dict, number: int) -> bytes:
    size = session["chunk_size"]
    return data[(number - 1) * size : number * size]


def chunk_url(session: dict, number: int | str) -> str:
    return session["chunk_url_template"].replace("{n}", str(number))


async def put_chunk(
    client: httpx.AsyncClient, session: dict, number: int, body: bytes, **headers: str
) -> httpx.Response:
    digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
    headers = {"Content-Digest": f"sha-256=:{digest}:", **headers}
    return await client.put(chunk_url(session, number), content=body, headers=headers)


def partial_put(srv: Server, session: dict, number: int, body: bytes, sent: int) -> socket.socket:
    """A chunk PUT over a raw socket that has sent only `sent` bytes of `body` so far."""
    path = chunk_url(session, number).split(str(srv.port), 1)[1]
    head = f"PUT {path} HTTP/1.1\nHost: x\nContent-Length: {len(body)}\n"
    return raw_request(srv.port, head, body[:sent], close=False)


async def status(client: httpx.AsyncClient, session: dict) -> dict:
    response = await client.get(session["url"])
    assert response.status_code == 200, response.text
    return response.json()


async def test_parallel_chunks_out_of_order_assemble_to_the_file(
    client: httpx.AsyncClient, server: Server
) -> None:
    probe = await new_session(client, server, 1)
    size = 16 * (probe["chunk_size"] if server.backend == "s3" else 3 * SMALL) + 12_345
    data = os.urandom(size)
    session = await new_session(
        client, server, size, chunk_size=3 * SMALL, sha256=sha256(data), metadata={"filename": "clip.mov"}
    )
    assert session["chunk_count"] == 17 and session["state"] == "incomplete"
    assert session["missing"] == [[1, 17]] and session["expires_at"].endswith("Z")
    order = list(range(1, 18))
    random.Random(7).shuffle(order)
    gate = asyncio.Semaphore(16)

    async def send(n: int) -> httpx.Response:
        async with gate:
            return await put_chunk(client, session, n, piece(data, session, n))

    responses = await asyncio.gather(*(send(n) for n in order))
    assert [r.status_code for r in responses] == [201] * 17
    assert {r.json()["sha256"] for r in responses} == {sha256(piece(data, session, n)) for n in range(1, 18)}
    progress = await status(client, session)
    assert progress["chunks_stored"] == 17 and progress["bytes_stored"] == size
    assert progress["fraction"] == 1.0 and progress["missing"] == []
    assert [c["number"] for c in progress["chunks"]] == list(range(1, 18))

    done = await client.post(session["complete_url"])
    assert done.status_code == 200, done.text
    assert done.json()["upload_url"] == session["upload_url"] == done.headers["location"]
    again = await client.post(session["complete_url"])
    assert again.status_code == 200 and again.json() == done.json()

    stored = await client.get(session["upload_url"])
    assert stored.status_code == 200 and sha256(stored.content) == sha256(data)
    assert "clip.mov" in stored.headers["content-disposition"]
    assert server.stored_size(session["upload_url"]) == size
    assert (await status(client, session))["state"] == "complete"
    listing = server.cli("list", "--json")
    assert session["id"] in listing.stdout


async def test_repeated_chunk_same_bytes_succeeds_other_bytes_conflict(
    client: httpx.AsyncClient, server: Server
) -> None:
    session, data = await file_session(client, server, 1, 1000)
    first = piece(data, session, 1)
    assert (await put_chunk(client, session, 1, first)).status_code == 201
    repeat = await put_chunk(client, session, 1, first)
    assert repeat.status_code == 200 and repeat.json()["sha256"] == sha256(first)
    other = await put_chunk(client, session, 1, os.urandom(len(first)))
    assert other.status_code == 409, other.text
    assert other.headers["content-type"] == "application/problem+json"
    assert other.json()["type"].endswith("chunk-conflict")
    assert (await status(client, session))["chunks"][0]["sha256"] == sha256(first)

    assert (await put_chunk(client, session, 2, piece(data, session, 2))).status_code == 201
    assert (await client.post(session["complete_url"])).status_code == 200
    assert sha256((await client.get(session["upload_url"])).content) == sha256(data)


async def test_digest_mismatch_stores_nothing(client: httpx.AsyncClient, server: Server) -> None:
    session = await new_session(client, server, 1000)
    body = os.urandom(1000)
    wrong = base64.b64encode(hashlib.sha256(b"something else").digest()).decode()
    refused = await put_chunk(client, session, 1, body, **{"Content-Digest": f"sha-256=:{wrong}:"})
    assert refused.status_code == 400 and refused.json()["type"].endswith("checksum-mismatch")
    bad_md5 = base64.b64encode(hashlib.md5(b"x").digest()).decode()
    refused = await client.put(chunk_url(session, 1), content=body, headers={"Content-MD5": bad_md5})
    assert refused.status_code == 400
    assert (await status(client, session))["missing"] == [[1, 1]]

    md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
    stored = await client.put(chunk_url(session, 1), content=body, headers={"Content-MD5": md5})
    assert stored.status_code == 201 and stored.json()["sha256"] == sha256(body)


async def test_chunk_cut_off_mid_body_is_not_recorded_and_can_be_resent(
    client: httpx.AsyncClient, server: Server
) -> None:
    session, data = await file_session(client, server, 2)
    first = piece(data, session, 1)
    partial_put(server, session, 1, first, len(first) // 2).close()  # the network drops the rest
    # The retry preempts the cut request if the server still waits for its bytes.
    assert (await put_chunk(client, session, 2, piece(data, session, 2))).status_code == 201
    progress = await status(client, session)
    assert progress["missing"] == [[1, 1]] and progress["bytes_stored"] == len(data) - len(first)
    incomplete = await client.post(session["complete_url"])
    assert incomplete.status_code == 409

    assert (await put_chunk(client, session, 1, first)).status_code == 201
    assert (await client.post(session["complete_url"])).status_code == 200
    assert sha256((await client.get(session["upload_url"])).content) == sha256(data)


async def test_complete_with_chunks_missing_lists_them(client: httpx.AsyncClient, server: Server) -> None:
    session, data = await file_session(client, server, 4, 10)
    for n in (1, 2, 4):
        assert (await put_chunk(client, session, n, piece(data, session, n))).status_code == 201
    refused = await client.post(session["complete_url"])
    assert refused.status_code == 409, refused.text
    assert refused.json()["missing"] == [[3, 3], [5, 5]]
    assert (await status(client, session))["state"] == "incomplete"


async def test_abort_deletes_the_session_and_its_chunks(client: httpx.AsyncClient, server: Server) -> None:
    session = await new_session(client, server, 5000)
    assert (await put_chunk(client, session, 1, os.urandom(5000))).status_code == 201
    assert (await client.delete(session["url"])).status_code == 204
    assert (await client.get(session["url"])).status_code == 404
    assert (await put_chunk(client, session, 1, b"x")).status_code == 404
    assert not server.exists(session["upload_url"])


async def test_bad_requests_get_clear_errors(client: httpx.AsyncClient, server: Server) -> None:
    session = await new_session(client, server, 1000)
    for number in ("0", "2", "x", "-1"):
        response = await client.put(chunk_url(session, number), content=b"a")
        assert response.status_code == 400, (number, response.text)
        assert response.headers["content-type"] == "application/problem+json"
    short = await client.put(chunk_url(session, 1), content=b"a" * 999)
    assert short.status_code == 400 and short.json()["expected-size"] == 1000
    for spec in ({"size": -1}, {"size": "1"}, {"size": 1, "metadata": {"a": 1}}, {"size": 1, "sha256": "zz"}):
        assert (await client.post(server.url + "/chunks/", json=spec)).status_code == 400
    assert (await client.post(server.url + "/chunks/", content=b"{not json")).status_code == 400
    assert (await client.post(server.url + "/chunks/", content=b"[" * 100_000)).status_code == 413
    deep = b"[" * 20_000 + b"]" * 20_000  # within the size limit, too deep for the parser
    assert (await client.post(server.url + "/chunks/", content=deep)).status_code == 400
    assert (await client.post(server.url + "/chunks/", json={"size": 1 << 50})).status_code == 413
    unknown = server.url + "/chunks/" + "0" * 32
    assert (await client.get(unknown)).status_code == 404
    assert (await client.put(unknown + "/1", content=b"a")).status_code == 404
    patched = await client.patch(
        session["upload_url"],
        content=b"a",
        headers={**TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"},
    )
    assert patched.status_code == 403  # a chunk session takes chunks, not tus appends

    assert (await put_chunk(client, session, 1, os.urandom(1000))).status_code == 201
    assert (await client.post(session["complete_url"])).status_code == 200
    finished = await put_chunk(client, session, 1, os.urandom(1000))
    assert finished.status_code == 409 and finished.json()["type"].endswith("completed-upload")


async def test_chunk_size_follows_backend_and_chunk_limits(client: httpx.AsyncClient, server: Server) -> None:
    tiny = await new_session(client, server, 100 << 20, chunk_size=1)
    assert tiny["chunk_size"] == (5 << 20 if server.backend == "s3" else 64 << 10)
    huge = await new_session(client, server, 16 << 30, chunk_size=1 << 20)
    assert huge["chunk_count"] <= 10_000 and huge["chunk_size"] * huge["chunk_count"] >= 16 << 30
    empty = await new_session(client, server, 0)
    assert empty["state"] == "complete" and empty["chunk_count"] == 0
    assert (await client.get(empty["upload_url"])).content == b""


async def test_a_chunk_arriving_while_its_session_is_aborted_is_a_404(
    client: httpx.AsyncClient, server: Server
) -> None:
    session = await new_session(client, server, 10_000)
    body = os.urandom(10_000)
    sock = partial_put(server, session, 1, body, 4000)
    try:
        assert (await client.delete(session["url"])).status_code == 204
        sock.sendall(body[4000:])
        status, _, problem = read_response(sock)
    finally:
        sock.close()
    assert status == 404, problem
    assert not server.exists(session["upload_url"])


async def test_more_than_ten_thousand_chunks_is_refused(client: httpx.AsyncClient, start_server) -> None:
    srv = start_server("--max-size", "100T")
    refused = await client.post(srv.url + "/chunks/", json={"size": 60 << 40})
    assert refused.status_code == 413, refused.text


async def test_completing_again_after_a_crash_between_s3_completion_and_its_record(
    client: httpx.AsyncClient, start_server
) -> None:
    """The multipart upload was completed, then the server died before writing it down."""
    srv = start_server(backend="s3")
    data = os.urandom((5 << 20) + 4321)
    session = await new_session(client, srv, len(data), sha256=sha256(data))
    for n in (1, 2):
        assert (await put_chunk(client, session, n, piece(data, session, n))).status_code == 201
    assert srv.moto is not None
    key = srv.layout.key(session["id"])
    state = srv.s3_state(session["upload_url"])
    parts = srv.moto.client.list_parts(Bucket=srv.bucket, Key=key, UploadId=state.multipart_id)["Parts"]
    srv.moto.client.complete_multipart_upload(
        Bucket=srv.bucket,
        Key=key,
        UploadId=state.multipart_id,
        MultipartUpload={"Parts": [{"PartNumber": p["PartNumber"], "ETag": p["ETag"]} for p in parts]},
    )
    assert (await status(client, session))["state"] == "incomplete"
    done = await client.post(session["complete_url"])
    assert done.status_code == 200, done.text
    assert sha256((await client.get(session["upload_url"])).content) == sha256(data)


async def test_whole_file_digest_mismatch_removes_the_session(
    client: httpx.AsyncClient, server: Server
) -> None:
    session = await new_session(client, server, 3000, sha256=sha256(b"not this file"))
    assert (await put_chunk(client, session, 1, os.urandom(3000))).status_code == 201
    refused = await client.post(session["complete_url"])
    assert refused.status_code == 400 and refused.json()["type"].endswith("checksum-mismatch")
    assert (await client.get(session["url"])).status_code == 404
    assert not server.exists(session["upload_url"])


async def sse(response: httpx.Response) -> AsyncIterator[tuple[str, dict]]:
    """Parse a Server-Sent Events stream into (event, data) pairs."""
    name, data = "message", ""
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
        elif line == "" and data:
            yield name, json.loads(data)
            name, data = "message", ""


async def test_events_arrive_in_order_and_end_with_completion(
    client: httpx.AsyncClient, server: Server
) -> None:
    session, data = await file_session(client, server, 3)
    async with client.stream("GET", session["events_url"]) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = sse(stream)
        kind, snapshot = await anext(events)
        assert kind == "status" and snapshot["chunks_stored"] == 0
        for n in (3, 1, 2):
            assert (await put_chunk(client, session, n, piece(data, session, n))).status_code == 201
        assert (await client.post(session["complete_url"])).status_code == 200
        received = [(kind, body) async for kind, body in events]
    assert [(k, b.get("number")) for k, b in received] == [
        ("chunk", 3),
        ("chunk", 1),
        ("chunk", 2),
        ("completed", None),
    ]
    assert [b["chunks_stored"] for _, b in received[:3]] == [1, 2, 3]
    assert received[2][1]["fraction"] == 1.0
    assert received[3][1]["upload_url"] == session["upload_url"]


async def test_events_see_chunks_stored_through_another_instance(
    client: httpx.AsyncClient, start_server
) -> None:
    first = start_server()
    second = start_server(data_dir=first.data_dir)
    data = os.urandom(100_000)
    session = await new_session(client, first, len(data))
    async with client.stream("GET", session["events_url"]) as stream:
        events = sse(stream)
        assert (await anext(events))[0] == "status"
        elsewhere = {
            **session,
            "chunk_url_template": session["chunk_url_template"].replace(first.url, second.url),
        }
        assert (await put_chunk(client, elsewhere, 2, piece(data, session, 2))).status_code == 201
        kind, body = await asyncio.wait_for(anext(events), 15)
    assert (kind, body["number"], body["chunks_stored"]) == ("chunk", 2, 1)


@pytest.mark.parametrize("backend", ["local", "s3"])
async def test_a_stored_chunk_is_activity_that_keeps_a_session_alive(
    client: httpx.AsyncClient, start_server, backend: str
) -> None:
    srv = start_server("--expiry", "1h", "--expiry-interval", "never", backend=backend)
    session, data = await file_session(client, srv, 2)
    assert (await put_chunk(client, session, 1, piece(data, session, 1))).status_code == 201
    srv.age(session["upload_url"], 2 * 3600)  # the record says idle for 2 h; the chunk is fresh
    alive = await status(client, session)
    assert alive["state"] == "incomplete" and alive["chunks_stored"] == 1
    assert json.loads(srv.cli("prune", "--json").stdout)["sessions_removed"] == 0
    assert (await put_chunk(client, session, 2, piece(data, session, 2))).status_code == 201
    assert (await client.post(session["complete_url"])).status_code == 200


def chunk_locked(srv: Server, session: dict, number: int) -> bool:
    """Whether the server holds chunk `number`'s lock (a request is writing it)."""
    return srv.layout.chunk_locked(session["id"], number)


@pytest.mark.parametrize("backend", ["local", "s3"])
async def test_prune_spares_a_session_whose_chunk_is_arriving(
    client: httpx.AsyncClient, start_server, backend: str
) -> None:
    srv = start_server("--expiry-interval", "never", backend=backend)
    session = await new_session(client, srv, 10_000)
    body = os.urandom(10_000)
    sock = partial_put(srv, session, 1, body, 4000)
    try:
        wait_for(lambda: chunk_locked(srv, session, 1), what="the chunk's lock")
        srv.age(session["upload_url"], 3 * 3600)  # idle by its record, but a chunk is arriving
        report = json.loads(srv.cli("prune", "--older-than", "1h", "--json").stdout)
        assert report["sessions_removed"] == 0 and report["busy"] == [session["id"]]
        sock.sendall(body[4000:])
        code, _, answer = read_response(sock)
    finally:
        sock.close()
    assert code == 201, answer
    assert (await client.post(session["complete_url"])).status_code == 200


@pytest.mark.parametrize("backend", ["local", "s3"])
async def test_an_idle_session_expires_and_its_watchers_hear_it(
    client: httpx.AsyncClient, start_server, backend: str
) -> None:
    srv = start_server("--expiry", "1h", "--expiry-interval", "1s", backend=backend)
    session = await new_session(client, srv, 10_000)
    async with client.stream("GET", session["events_url"]) as stream:
        events = sse(stream)
        assert (await anext(events))[0] == "status"
        srv.age(session["upload_url"], 2 * 3600)
        received = [kind async for kind, _ in events]
    assert received == ["expired"]
    wait_for(lambda: not srv.exists(session["upload_url"]), what="the expired session removed")
    assert (await client.get(session["events_url"])).status_code == 404


async def test_python_client_uploads_a_file_and_resumes_only_what_is_missing(
    client: httpx.AsyncClient, server: Server, tmp_path: Path
) -> None:
    _, data = await file_session(client, server, 5, 777)
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    seen: list[tuple[int, int]] = []
    done = await ChunkClient(client, server.url, parallel=4).upload(
        source, chunk_size=SMALL, on_progress=lambda done, total: seen.append((done, total))
    )
    assert done["state"] == "complete" and seen[-1] == (6, 6)
    assert sha256((await client.get(done["upload_url"])).content) == sha256(data)

    class Counting(ChunkClient):
        sent: list[int] = []  # noqa: RUF012

        async def request(self, kind: str, method: str, url: str, **kwargs: object) -> httpx.Response:
            if kind == "chunk":
                self.sent.append(int(url.rsplit("/", 1)[1]))
            return await super().request(kind, method, url, **kwargs)

    session = await new_session(client, server, len(data), sha256=sha256(data))
    for n in (1, 2, 5):
        assert (await put_chunk(client, session, n, piece(data, session, n))).status_code == 201
    resumed = await Counting(client, server.url).resume(session["url"], source)
    assert sorted(Counting.sent) == [3, 4, 6]
    assert resumed["state"] == "complete"
    assert sha256((await client.get(resumed["upload_url"])).content) == sha256(data)


async def test_openapi_description_is_valid_and_covers_the_chunk_api(
    client: httpx.AsyncClient, server: Server
) -> None:
    response = await client.get(server.url + "/openapi.json")
    assert response.status_code == 200
    spec = response.json()
    validate(spec)
    assert set(spec["paths"]) == {
        "/chunks/",
        "/chunks/{id}",
        "/chunks/{id}/{n}",
        "/chunks/{id}/complete",
        "/chunks/{id}/events",
    }


def counted(metrics: str, name: str, protocol: str) -> float:
    """The value of counter `name` for one protocol (0 if absent)."""
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == name and sample.labels == {"protocol": protocol}:
                return sample.value
    return 0.0


async def test_metrics_count_stored_chunks_and_finished_sessions(
    client: httpx.AsyncClient, server: Server
) -> None:
    before = (await client.get(server.url + "/metrics")).text
    session, data = await file_session(client, server, 2)
    for n in (1, 2):
        assert (await put_chunk(client, session, n, piece(data, session, n))).status_code == 201
    assert (await put_chunk(client, session, 1, piece(data, session, 1))).status_code == 200
    assert (await client.post(session["complete_url"])).status_code == 200
    after = (await client.get(server.url + "/metrics")).text
    expected = {  # created: also the probe
        "uploadsrv_uploads_created_total": 2,
        "uploadsrv_chunks_stored_total": 2,
        "uploadsrv_uploads_finished_total": 1,
    }
    for name, count in expected.items():
        assert counted(after, name, "chunks") - counted(before, name, "chunks") == count


async def test_a_session_expired_by_another_instance_is_reported_as_expired(
    client: httpx.AsyncClient, start_server
) -> None:
    """The watcher's instance learns of the removal only by polling; the session was past
    its expiry, so its watchers hear "expired", not "aborted"."""
    sweeper = start_server("--expiry", "3s", "--expiry-interval", "1s")
    watcher = start_server("--expiry", "3s", "--expiry-interval", "never", data_dir=sweeper.data_dir)
    session = await new_session(client, watcher, 10_000)
    async with client.stream("GET", session["events_url"]) as stream:
        events = sse(stream)
        assert (await anext(events))[0] == "status"
        received = [kind async for kind, _ in events]
    assert received == ["expired"]
    assert not sweeper.exists(session["upload_url"])
