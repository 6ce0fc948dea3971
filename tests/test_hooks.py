"""Hooks end to end: the real server sends tusd's hook JSON to a real receiver process."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import os
import signal
import stat
import sys
from pathlib import Path

import httpx
import pytest
from standardwebhooks import Webhook

from tests.conftest import TUS, Receiver, Server, create, download, patch, sha256, spawn, wait_for

SECRET = "whsec_" + base64.b64encode(b"a secret the app and this server share").decode()
ALL_EVENTS = (
    "pre-create,post-create,post-receive,pre-finish,post-finish,pre-terminate,post-terminate,post-expire"
)
QUICK = ("--hooks-http-retry", "1", "--hooks-http-backoff", "0.1", "--hooks-http-timeout", "5")
HEADER = "Upload-Draft-Interop-Version"


def hooked(receiver: Receiver, *flags: str, events: str = ALL_EVENTS) -> tuple[str, ...]:
    return ("--hooks-http", receiver.url, "--hooks-enabled-events", events, *QUICK, *flags)


def upload_of(request: dict) -> dict:
    return request["json"]["Event"]["Upload"]


def http_of(request: dict) -> dict:
    return request["json"]["Event"]["HTTPRequest"]


def local_storage(srv: Server, upload_id: str, protocol: str) -> dict:
    """A tus upload's file holds its record (an xattr), so it has no InfoPath; a chunk
    session is a directory with its record in `info.json`."""
    if protocol != "chunks":
        return {"Type": "filestore", "Path": str(srv.local.flat(upload_id))}
    directory = srv.local.directory(upload_id)
    return {"Type": "filestore", "Path": f"{directory}/data", "InfoPath": str(srv.local.record(upload_id))}


def expected_upload(srv: Server, upload_id: str, offset: int, size: int, protocol: str, **extra) -> dict:
    return {
        "ID": upload_id,
        "Size": size,
        "SizeIsDeferred": False,
        "Offset": offset,
        "MetaData": {"filename": "a.txt"},
        "IsPartial": False,
        "IsFinal": False,
        "PartialUploads": None,
        "Storage": local_storage(srv, upload_id, protocol),
        "Owner": None,
        "Protocol": protocol,
        **extra,
    }


# -- every event, on every protocol, in tusd's JSON ---------------------------------------


async def test_tus_upload_sends_every_event_in_tusd_format(client, start_server, receiver):
    srv = start_server(*hooked(receiver))
    url = await create(client, srv, 5, **{"Upload-Metadata": "filename YS50eHQ="})
    upload_id = Server.upload_id(url)
    assert (await patch(client, url, 0, b"hello")).status_code == 204

    pre_create = receiver.wait("pre-create")[0]
    assert pre_create["json"]["Type"] == "pre-create"
    assert upload_of(pre_create) == {
        **expected_upload(srv, "", 0, 5, "tus"),
        "Storage": None,
    }
    assert http_of(pre_create)["Method"] == "POST"
    assert http_of(pre_create)["URI"] == "/files/"
    assert http_of(pre_create)["RemoteAddr"].startswith("127.0.0.1:")
    assert http_of(pre_create)["Header"]["Tus-Resumable"] == ["1.0.0"]
    assert http_of(pre_create)["Header"]["Upload-Length"] == ["5"]
    assert http_of(pre_create)["Header"]["Upload-Metadata"] == ["filename YS50eHQ="]

    assert upload_of(receiver.wait("post-create")[0]) == expected_upload(srv, upload_id, 0, 5, "tus")
    for hook in ("post-receive", "pre-finish", "post-finish"):
        request = receiver.wait(hook)[0]
        assert upload_of(request) == expected_upload(srv, upload_id, 5, 5, "tus"), hook
        assert http_of(request)["Method"] == "PATCH"
        assert http_of(request)["URI"] == f"/files/{upload_id}"
        assert http_of(request)["Header"]["Upload-Offset"] == ["0"]
        assert request["headers"]["content-type"] == "application/json"

    assert (await client.delete(url, headers=TUS)).status_code == 204
    for hook in ("pre-terminate", "post-terminate"):
        request = receiver.wait(hook)[0]
        assert upload_of(request) == expected_upload(srv, upload_id, 5, 5, "tus"), hook
        assert http_of(request)["Method"] == "DELETE"
    assert [r["json"]["Type"] for r in receiver.requests()].count("post-finish") == 1


async def test_ietf_upload_sends_its_events(client, start_server, receiver):
    srv = start_server(*hooked(receiver))
    response = await client.post(
        srv.files,
        content=b"hello",
        headers={HEADER: "6", "Upload-Complete": "?1", "Upload-Metadata": "filename YS50eHQ="},
    )
    assert response.status_code == 201, response.text
    upload_id = Server.upload_id(response.headers["location"])
    assert upload_of(receiver.wait("pre-create")[0])["Protocol"] == "ietf"
    assert upload_of(receiver.wait("post-create")[0]) == expected_upload(srv, upload_id, 0, 5, "ietf")
    for hook in ("post-receive", "pre-finish", "post-finish"):
        request = receiver.wait(hook)[0]
        assert upload_of(request) == expected_upload(srv, upload_id, 5, 5, "ietf"), hook
        assert http_of(request)["Method"] == "POST"
        assert http_of(request)["Header"][HEADER] == ["6"]
    cancelled = await client.delete(response.headers["location"], headers={HEADER: "6"})
    assert cancelled.status_code == 204
    assert upload_of(receiver.wait("post-terminate")[0])["ID"] == upload_id


async def test_chunk_session_reports_chunks_and_finishes_once(client, start_server, receiver):
    srv = start_server(*hooked(receiver, "--progress-hooks-interval", "0"))
    # The first chunk's report is still in flight when the second chunk is stored: the
    # second report follows it rather than being skipped, so the last chunk is reported.
    receiver.answer("post-receive", delay=1)
    probe = (await client.post(srv.url + "/chunks/", json={"size": 1})).json()
    size = probe["chunk_size"]
    data = os.urandom(size + 10)
    created = await client.post(
        srv.url + "/chunks/", json={"size": len(data), "metadata": {"filename": "a.txt"}}
    )
    session = created.json()
    for number, start in ((2, size), (1, 0)):
        stored = await client.put(f"{session['url']}/{number}", content=data[start : start + size])
        assert stored.status_code == 201
    for _ in range(2):
        assert (await client.post(session["complete_url"])).status_code == 200

    upload_id = session["id"]
    chunks = {"Size": size, "Count": 2}
    assert upload_of(receiver.wait("post-create", upload_id)[0]) == expected_upload(
        srv, upload_id, 0, len(data), "chunks"
    )
    progress = receiver.wait("post-receive", upload_id, count=2)
    assert [upload_of(r)["Chunks"] for r in progress] == [{**chunks, "Stored": 1}, {**chunks, "Stored": 2}]
    assert upload_of(progress[1])["Offset"] == len(data)
    finished = receiver.wait("post-finish", upload_id)
    assert upload_of(finished[0]) == expected_upload(srv, upload_id, len(data), len(data), "chunks")
    assert http_of(finished[0])["URI"] == f"/chunks/{upload_id}/complete"
    assert len(receiver.requests("pre-finish", upload_id)) == 1
    assert len(receiver.requests("post-finish", upload_id)) == 1


async def test_an_expired_upload_sends_post_expire(client, start_server, receiver):
    srv = start_server(*hooked(receiver, events="post-expire"), "--expiry", "1s", "--expiry-interval", "1s")
    url = await create(client, srv, 5)
    assert (await patch(client, url, 0, b"ab")).status_code == 204
    expired = receiver.wait("post-expire")[0]
    assert upload_of(expired)["ID"] == Server.upload_id(url)
    assert upload_of(expired)["Offset"] == 2
    assert http_of(expired) == {"Method": "", "URI": "", "RemoteAddr": "", "Header": {}}
    assert not srv.exists(url)


# -- what the application decides -------------------------------------------------------


async def test_pre_create_rejection_goes_to_the_client_as_given(client, start_server, receiver):
    srv = start_server(*hooked(receiver))
    receiver.answer(
        "pre-create",
        RejectUpload=True,
        HTTPResponse={"StatusCode": 403, "Body": '{"message":"no"}', "Header": {"X-Why": "quota"}},
    )
    response = await client.post(srv.files, headers={**TUS, "Upload-Length": "5"})
    assert response.status_code == 403
    assert response.text == '{"message":"no"}'
    assert response.headers["x-why"] == "quota"
    assert not srv.local.stored()
    assert receiver.requests("post-create") == []


async def test_pre_create_sets_metadata_and_chooses_the_id(client, start_server, receiver):
    srv = start_server(*hooked(receiver))
    receiver.answer("pre-create", ChangeFileInfo={"ID": "report-2026_Q4", "MetaData": {"project": "7"}})
    url = await create(client, srv, 3, **{"Upload-Metadata": "filename YS50eHQ="})
    assert url.endswith("/files/report-2026_Q4")
    head = await client.head(url, headers=TUS)
    assert head.headers["upload-metadata"] == "project Nw=="
    assert (await patch(client, url, 0, b"abc")).status_code == 204
    assert (await client.get(url)).content == b"abc"
    assert upload_of(receiver.wait("post-finish")[0])["MetaData"] == {"project": "7"}

    taken = await client.post(srv.files, headers={**TUS, "Upload-Length": "3"})
    assert taken.status_code == 502  # the application chose an id already in use
    assert (await client.get(url)).content == b"abc"


@pytest.mark.parametrize("bad_id", ["../../etc", "a/b", "x.info", "", "a" * 129, "é"])
async def test_a_chosen_id_that_is_not_url_safe_is_refused(client, start_server, receiver, bad_id):
    srv = start_server(*hooked(receiver))
    receiver.answer("pre-create", ChangeFileInfo={"ID": bad_id})
    response = await client.post(srv.files, headers={**TUS, "Upload-Length": "3"})
    if bad_id == "":  # an empty ID changes nothing, as in tusd
        assert response.status_code == 201
        return
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/problem+json"
    assert not srv.local.stored()


async def test_pre_finish_headers_and_body_reach_the_final_answer(client, start_server, receiver):
    srv = start_server(*hooked(receiver))
    receiver.answer("pre-finish", HTTPResponse={"Header": {"X-Scan": "clean", "Link": "<https://x/1>"}})
    url = await create(client, srv, 2)
    first = await patch(client, url, 0, b"a")
    assert "x-scan" not in first.headers
    final = await patch(client, url, 1, b"b")
    assert final.status_code == 204
    assert final.headers["x-scan"] == "clean"
    assert final.headers["link"] == "<https://x/1>"


async def test_pre_finish_body_and_status_reach_a_chunk_completion(client, start_server, receiver):
    srv = start_server(*hooked(receiver))
    receiver.answer("pre-finish", HTTPResponse={"StatusCode": 202, "Body": '{"job":"42"}'})
    session = (await client.post(srv.url + "/chunks/", json={"size": 3})).json()
    assert (await client.put(session["url"] + "/1", content=b"abc")).status_code == 201
    done = await client.post(session["complete_url"])
    assert (done.status_code, done.text) == (202, '{"job":"42"}')


async def test_stop_upload_ends_the_request_and_removes_the_upload(client, start_server, receiver):
    srv = start_server(*hooked(receiver))
    receiver.answer(
        "post-receive", StopUpload=True, HTTPResponse={"StatusCode": 410, "Body": "project deleted"}
    )
    url = await create(client, srv, 10 << 20)
    upload_id = Server.upload_id(url)

    async def body():
        yield b"x" * (2 << 20)  # more than the server batches before a write
        while not receiver.requests("post-receive", upload_id):
            await asyncio.sleep(0.01)
        for _ in range(20_000):  # far more than the stop takes; the server ends the request first
            yield b"y" * 256
            await asyncio.sleep(0)

    response = await patch(client, url, 0, body())
    assert (response.status_code, response.text) == (410, "project deleted")
    assert (await client.head(url, headers=TUS)).status_code == 404
    assert not srv.exists(url)
    assert upload_of(receiver.wait("post-terminate")[0])["ID"] == upload_id


async def test_pre_terminate_can_refuse_a_delete(client, start_server, receiver):
    srv = start_server(*hooked(receiver))
    receiver.answer(
        "pre-terminate", RejectTermination=True, HTTPResponse={"StatusCode": 409, "Body": "keep it"}
    )
    url = await create(client, srv, 4)
    refused = await client.delete(url, headers=TUS)
    assert (refused.status_code, refused.text) == (409, "keep it")
    assert (await client.head(url, headers=TUS)).status_code == 200
    assert receiver.requests("post-terminate") == []


# -- a receiver that is down ------------------------------------------------------------


async def test_blocking_hook_down_is_a_503_and_creates_nothing(client, start_server, receiver):
    srv = start_server(*hooked(receiver))
    receiver.stop()
    response = await client.post(srv.files, headers={**TUS, "Upload-Length": "5"})
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.headers["content-type"] == "application/problem+json"
    assert not srv.local.stored()


async def test_blocking_hook_answering_5xx_is_a_503(client, start_server, receiver):
    srv = start_server(*hooked(receiver))
    receiver.answer("pre-create", status=500)
    response = await client.post(srv.files, headers={**TUS, "Upload-Length": "5"})
    assert response.status_code == 503
    assert len(receiver.requests("pre-create")) == 2  # the first try and one retry


async def test_pre_finish_down_leaves_the_upload_unfinished_until_it_answers(client, start_server, receiver):
    srv = start_server(*hooked(receiver))
    receiver.answer("pre-finish", status=503)
    url = await create(client, srv, 3)
    final = await patch(client, url, 0, b"abc")
    assert final.status_code == 503
    assert final.headers["retry-after"] == "1"
    assert (await client.head(url, headers=TUS)).status_code == 503
    assert (await client.get(url)).status_code == 409  # not finished: nothing to download yet
    assert receiver.requests("post-finish") == []

    receiver.answer("pre-finish", status=200, HTTPResponse={"Header": {"X-Done": "1"}})
    head = await client.head(url, headers=TUS)
    assert (head.status_code, head.headers["upload-offset"]) == (200, "3")
    assert (await client.get(url)).content == b"abc"
    assert len(receiver.wait("post-finish")) == 1


async def test_post_finish_is_delivered_when_the_receiver_comes_back(client, start_server, receiver):
    srv = start_server(*hooked(receiver, events="post-finish"))
    receiver.stop()
    url = await create(client, srv, 3)
    assert (await patch(client, url, 0, b"abc")).status_code == 204
    wait_for(lambda: _pending(srv) == 1, 10, "the event in the outbox")
    receiver.start()
    finished = receiver.wait("post-finish")
    assert upload_of(finished[0])["ID"] == Server.upload_id(url)
    wait_for(lambda: _pending(srv) == 0, 10, "the outbox to empty")


@pytest.mark.parametrize("backend", ["local", "s3"])
async def test_post_finish_survives_a_sigkill_right_after_the_last_204(
    client, start_server, receiver, backend
):
    srv = start_server(*hooked(receiver, events="post-finish"), backend=backend)
    receiver.stop()
    url = await create(client, srv, 3)
    assert (await patch(client, url, 0, b"abc")).status_code == 204
    srv.kill()
    assert _pending(srv) == 1
    receiver.start()
    start_server(
        *hooked(receiver, events="post-finish"), data_dir=srv.data_dir, backend=backend, bucket=srv.bucket
    )
    finished = receiver.wait("post-finish")
    assert upload_of(finished[0])["ID"] == Server.upload_id(url)
    assert finished[0]["headers"]["webhook-id"].startswith("evt_")


async def test_no_post_finish_lost_across_twenty_uploads_and_a_sigkill(client, start_server, receiver):
    srv = start_server(*hooked(receiver, events="post-finish"))
    receiver.stop()
    ids = set()
    for n in range(20):
        data = os.urandom(1000 + n)
        url = await create(client, srv, len(data))
        assert (await patch(client, url, 0, data)).status_code == 204
        ids.add(Server.upload_id(url))
    srv.kill()
    receiver.start()
    restarted = start_server(*hooked(receiver, events="post-finish"), data_dir=srv.data_dir)
    receiver.wait("post-finish", count=20)
    wait_for(lambda: _pending(restarted) == 0, 30, "the outbox to empty")
    got = [upload_of(r)["ID"] for r in receiver.requests("post-finish")]
    assert set(got) == ids
    webhook_ids = [r["headers"]["webhook-id"] for r in receiver.requests("post-finish")]
    assert len(set(webhook_ids)) == 20  # a duplicate, if any, would carry the same id


def _pending(srv: Server) -> int:
    """Events in the server's outbox, counted behind its back (the directory, or S3 objects)."""
    if srv.moto is None:
        return len(list((srv.data_dir / "outbox").glob("*.json")))
    listing = srv.moto.client.list_objects_v2(Bucket=srv.bucket, Prefix=srv.prefix + "_outbox/")
    return len(listing.get("Contents", []))


def _attempts(srv: Server) -> list[int]:
    """Each event's attempts so far, read from the outbox files behind the server's back."""
    attempts = []
    for path in (srv.data_dir / "outbox").glob("*.json"):
        try:
            attempts.append(json.loads(path.read_text())["attempts"])
        except (FileNotFoundError, ValueError):
            continue
    return sorted(attempts)


# -- S3 -----------------------------------------------------------------------------------


async def test_s3_events_say_where_the_object_is(client, start_server, receiver):
    srv = start_server(*hooked(receiver), backend="s3")
    url = await create(client, srv, 2)
    assert (await patch(client, url, 0, b"ok")).status_code == 204
    storage = upload_of(receiver.wait("post-finish")[0])["Storage"]
    assert storage == {"Type": "s3store", "Bucket": srv.bucket, "Key": f"uploads/{Server.upload_id(url)}"}


async def test_two_s3_instances_deliver_an_event_once(client, start_server, receiver):
    flags = hooked(receiver, events="post-finish")
    first = start_server(*flags, backend="s3")
    second = start_server(*flags, backend="s3", bucket=first.bucket)
    receiver.stop()
    url = await create(client, first, 3)
    assert (await patch(client, url, 0, b"abc")).status_code == 204
    assert _pending(first) == 1
    receiver.start()
    receiver.wait("post-finish")
    wait_for(lambda: _pending(second) == 0, 30, "the outbox to empty")
    # Only a claim lets an instance send, and the event is gone: no second delivery can start.
    assert len(receiver.requests("post-finish")) == 1


@pytest.mark.parametrize("backend", ["local", "s3"])
async def test_ids_that_extend_one_another_stay_apart(client, start_server, receiver, backend):
    srv = start_server(*hooked(receiver), backend=backend)
    urls = {}
    for upload_id in ("ab", "abc"):
        receiver.answer("pre-create", ChangeFileInfo={"ID": upload_id})
        urls[upload_id] = await create(client, srv, 3)
        assert (await patch(client, urls[upload_id], 0, upload_id.encode().ljust(3))).status_code == 204
    receiver.answer("pre-create", ChangeFileInfo={"ID": "abc"})
    assert (await client.post(srv.files, headers={**TUS, "Upload-Length": "1"})).status_code == 502
    assert (await client.delete(urls["ab"], headers=TUS)).status_code == 204
    assert (await client.get(urls["abc"])).content == b"abc"
    assert (await client.head(urls["ab"], headers=TUS)).status_code == 404


# -- signatures and file hooks ------------------------------------------------------------


async def test_hooks_are_signed_per_standard_webhooks(client, start_server, receiver):
    srv = start_server(*hooked(receiver, "--hooks-secret", SECRET))
    url = await create(client, srv, 1)
    assert (await patch(client, url, 0, b"a")).status_code == 204
    receiver.wait("post-finish")
    verifier = Webhook(SECRET)
    for request in receiver.requests():
        assert verifier.verify(request["body"], request["headers"]) == request["json"]
    forged = dict(receiver.requests("post-finish")[0]["headers"])
    with pytest.raises(Exception, match="signature"):
        verifier.verify(receiver.requests("post-finish")[0]["body"].replace("1", "2"), forged)


async def test_forwarded_headers_go_on_the_hook_request(client, start_server, receiver):
    srv = start_server(*hooked(receiver, "--hooks-http-forward-headers", "Authorization,Cookie"))
    await create(client, srv, 1, Authorization="Bearer t0k", Cookie="s=1")
    request = receiver.wait("pre-create")[0]
    assert request["headers"]["authorization"] == "Bearer t0k"
    assert request["headers"]["cookie"] == "s=1"


async def test_file_hooks_run_the_script_named_after_the_event(client, start_server, tmp_path: Path):
    hooks_dir = tmp_path / "hooks"
    hooks_dir.mkdir()
    record = tmp_path / "ran.jsonl"
    script = f"""#!/bin/sh
body=$(cat)
printf '{{"event":"%s","id":"%s","offset":"%s","size":"%s","body":%s}}\\n' \\
  "$(basename $0)" "$TUS_ID" "$TUS_OFFSET" "$TUS_SIZE" "$body" >> {record}
if [ "$(basename $0)" = pre-create ]; then echo '{{"ChangeFileInfo": {{"MetaData": {{"by": "script"}}}}}}'; fi
"""
    for event in ("pre-create", "post-finish"):
        (hooks_dir / event).write_text(script)
        (hooks_dir / event).chmod(stat.S_IRWXU)
    srv = start_server("--hooks-dir", str(hooks_dir), *QUICK)
    url = await create(client, srv, 2)
    assert (await patch(client, url, 0, b"ok")).status_code == 204
    wait_for(lambda: record.exists() and len(record.read_text().splitlines()) == 2, 10, "both scripts")
    pre, post = (json.loads(line) for line in record.read_text().splitlines())
    assert (pre["event"], pre["id"], pre["offset"], pre["size"]) == ("pre-create", "", "0", "2")
    assert pre["body"]["Type"] == "pre-create"
    upload_id = Server.upload_id(url)
    assert (post["event"], post["id"], post["offset"], post["size"]) == ("post-finish", upload_id, "2", "2")
    assert post["body"]["Event"]["Upload"]["MetaData"] == {"by": "script"}


# -- operators ----------------------------------------------------------------------------


async def test_operators_list_retry_and_drop_pending_events(client, start_server, receiver):
    srv = start_server(*hooked(receiver, events="post-create,post-finish"))
    receiver.stop()
    url = await create(client, srv, 1)
    assert (await patch(client, url, 0, b"a")).status_code == 204
    wait_for(lambda: _attempts(srv) == [1, 1], 10, "two events tried once")
    srv.stop()
    listing = srv.cli("hooks", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    events = json.loads(listing.stdout)
    assert sorted(e["hook"] for e in events) == ["post-create", "post-finish"]
    assert {e["upload_id"] for e in events} == {Server.upload_id(url)}
    assert all(e["state"] == "pending" and e["attempts"] >= 1 and e["last_error"] for e in events)

    create_event = next(e["id"] for e in events if e["hook"] == "post-create")
    assert srv.cli("hooks", "drop", create_event).returncode == 0
    assert srv.cli("hooks", "drop", create_event).returncode == 1
    assert srv.cli("hooks", "retry").returncode == 0
    receiver.start()
    start_server(*hooked(receiver, events="post-create,post-finish"), data_dir=srv.data_dir)
    receiver.wait("post-finish")
    assert receiver.requests("post-create") == []


async def test_metrics_count_deliveries_and_pending_events(client, start_server, receiver):
    srv = start_server(*hooked(receiver, events="post-finish"))
    url = await create(client, srv, 1)
    assert (await patch(client, url, 0, b"a")).status_code == 204
    receiver.wait("post-finish")

    def delivered() -> bool:
        text = httpx.get(srv.url + "/metrics").text
        return 'uploadsrv_hook_deliveries_total{event="post-finish",outcome="delivered"} 1.0' in text

    wait_for(delivered, 10, "the delivery counted")
    text = httpx.get(srv.url + "/metrics").text
    assert "uploadsrv_hook_outbox_pending 0.0" in text
    assert "uploadsrv_hook_outbox_oldest_seconds 0.0" in text


async def test_bytes_are_unchanged_with_post_receive_on(client, start_server, receiver):
    srv = start_server(*hooked(receiver, "--progress-hooks-interval", "0"))
    data = os.urandom(3 << 20)
    url = await create(client, srv, len(data))
    assert (await patch(client, url, 0, data)).status_code == 204
    assert sha256((await client.get(url)).content) == sha256(data)
    wait_for(lambda: len(data) in [upload_of(r)["Offset"] for r in receiver.requests("post-receive")])
    offsets = [upload_of(r)["Offset"] for r in receiver.requests("post-receive")]
    assert len(offsets) == len(set(offsets)) and all(0 < offset <= len(data) for offset in offsets)


async def test_post_receive_is_skipped_while_one_is_in_flight(client, start_server, receiver):
    srv = start_server(*hooked(receiver, "--progress-hooks-interval", "0", events="post-receive"))
    receiver.answer("post-receive", delay=0.5)
    data = os.urandom(4 << 20)
    url = await create(client, srv, len(data))
    upload_id = Server.upload_id(url)

    async def paced():  # a write every 0.1 s, each one due (interval 0)
        for start in range(0, len(data), 256 << 10):
            yield data[start : start + (256 << 10)]
            await asyncio.sleep(0.1)

    assert (await patch(client, url, 0, paced())).status_code == 204

    def offsets() -> list[int]:
        return [upload_of(r)["Offset"] for r in receiver.requests("post-receive", upload_id)]

    wait_for(lambda: len(data) in offsets(), 30, "the report of the request's end")
    reports = receiver.requests("post-receive", upload_id)
    arrivals = [r["at"] for r in reports]
    # The next one starts only once the answer to the last came: none overlap, none queued up.
    assert all(later - earlier >= 0.5 for earlier, later in itertools.pairwise(arrivals))
    assert offsets() == sorted(set(offsets()))
    assert len(reports) < 16  # 16 writes were due; most fell while one was in flight


@pytest.mark.parametrize("body_kind", ["socket", "chunked", "checksummed"])
async def test_post_receive_reports_while_the_body_still_arrives(client, start_server, receiver, body_kind):
    """The direct socket path (a Content-Length of MiBs), uvicorn's path (chunked), and a
    checksummed body (whose bytes count once they arrived, while being verified)."""
    srv = start_server(*hooked(receiver, events="post-receive"))
    data = os.urandom(4 << 20)
    half = len(data) // 2
    url = await create(client, srv, len(data))
    upload_id = Server.upload_id(url)

    def reported() -> list[int]:
        return [upload_of(r)["Offset"] for r in receiver.requests("post-receive", upload_id)]

    async def body():
        yield data[:half]
        while not reported():  # the second half waits for a report of the first
            await asyncio.sleep(0.01)
        yield data[half:]

    headers = {} if body_kind == "chunked" else {"Content-Length": str(len(data))}
    if body_kind == "checksummed":
        digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
        headers["Upload-Checksum"] = f"sha256 {digest}"
    response = await patch(client, url, 0, body(), **headers)
    assert response.status_code == 204, response.text
    assert 0 < reported()[0] <= half
    wait_for(lambda: reported()[-1] == len(data), 10, "the report of the request's end")
    assert sha256(await download(client, url)) == sha256(data)


# -- a crash at every moment of a durable event's life --------------------------------------


class CrashingServer(Server):
    """`tests/crashing_app.py`: the server SIGKILLs itself at `crash` (`<hook>:<moment>`)."""

    def __init__(self, data_dir: Path, *args: str, crash: str, **kwargs) -> None:
        super().__init__(data_dir, *args, **kwargs)
        self.crash = crash

    def start(self) -> Server:
        command = [sys.executable, "-m", "tests.crashing_app", "serve", "--port", str(self.port)]
        command += ["--data-dir", str(self.data_dir), *self.args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("UPLOADSRV_")}
        env["UPLOADSRV_TEST_CRASH"] = self.crash
        if self.moto:
            env.update(self.moto.credentials)
        self.process = spawn(command, self.log, self.url + "/healthz", env)
        return self

    def died(self) -> bool:
        assert self.process is not None
        return self.process.wait(30) == -signal.SIGKILL


CRASHES = [
    # (hook, moment, events the receiver gets after the restart)
    ("post-create", "intent", 0),
    ("post-create", "after-change", 1),
    ("post-finish", "intent", 0),
    ("post-finish", "before-change", 1),  # every byte stored: the finish is completed on restart
    ("post-finish", "after-change", 1),
    ("post-terminate", "intent", 0),
    ("post-terminate", "after-change", 1),
]


@pytest.mark.parametrize(
    ("backend", "hook", "moment", "expected"),
    [("local", *crash) for crash in CRASHES] + [("s3", *crash) for crash in CRASHES if crash[1] != "intent"],
)
async def test_a_crash_around_a_change_neither_loses_nor_invents_its_event(
    client, start_server, receiver, tmp_path, request, backend, hook, moment, expected
):
    flags = hooked(receiver, events=hook)
    moto = request.getfixturevalue("moto") if backend == "s3" else None
    data_dir = tmp_path / "data"
    crashing = CrashingServer(data_dir, *flags, crash=f"{hook}:{moment}", moto=moto).start()
    data = os.urandom(3000)
    url = None
    try:
        if hook != "post-create":
            url = await create(client, crashing, len(data))
        if hook == "post-terminate":
            assert (await patch(client, url, 0, data)).status_code == 204
        with pytest.raises(httpx.TransportError):  # the server dies before it answers
            if hook == "post-create":
                await client.post(crashing.files, headers={**TUS, "Upload-Length": str(len(data))})
            elif hook == "post-finish":
                await patch(client, url, 0, data)
            else:
                await client.delete(url, headers=TUS)
        assert crashing.died()
    finally:
        crashing.stop()

    srv = start_server(*flags, backend=backend, data_dir=data_dir, bucket=crashing.bucket)
    wait_for(lambda: _pending(srv) == 0, 60, "the outbox resolved")
    if expected:
        receiver.wait(hook, count=expected)
    got = receiver.requests(hook)
    assert len(got) == expected, [upload_of(r) for r in got]
    if hook == "post-create":
        if expected:
            created = srv.files + upload_of(got[0])["ID"]
            assert (await client.head(created, headers=TUS)).status_code == 200
        return
    url = srv.files + Server.upload_id(url)  # the restarted server's port
    head = await client.head(url, headers=TUS)
    if hook == "post-terminate":
        assert head.status_code == (404 if expected else 200)
        return
    if not expected:  # nothing was stored: the client resumes from 0, and the event comes once
        assert head.headers["upload-offset"] == "0"
        assert (await patch(client, url, 0, data)).status_code == 204
        receiver.wait(hook)
        wait_for(lambda: _pending(srv) == 0, 30, "the outbox to empty")
        assert len(receiver.requests(hook)) == 1
    assert upload_of(receiver.requests(hook)[0])["Offset"] == len(data)
    assert sha256(await download(client, url)) == sha256(data)


async def test_a_final_request_cut_short_sends_no_post_finish_until_the_upload_finishes(
    client, start_server, receiver
):
    srv = start_server(*hooked(receiver, events="post-finish"))
    data = os.urandom(3 << 20)
    url = await create(client, srv, len(data))

    async def cut_short():
        yield data[: 1 << 20]
        raise ConnectionAbortedError("the phone lost its network")

    with pytest.raises(ConnectionAbortedError):
        await patch(client, url, 0, cut_short(), **{"Content-Length": str(len(data))})
    wait_for(lambda: _pending(srv) == 0, 30, "the post-finish intent dropped")
    head = await client.head(url, headers=TUS)
    offset = int(head.headers["upload-offset"])
    assert offset < len(data)
    assert receiver.requests("post-finish") == []
    assert (await patch(client, url, offset, data[offset:])).status_code == 204
    assert upload_of(receiver.wait("post-finish")[0])["Offset"] == len(data)
    wait_for(lambda: _pending(srv) == 0, 30, "the outbox to empty")
    assert len(receiver.requests("post-finish")) == 1
