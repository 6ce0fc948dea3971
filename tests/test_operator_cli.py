"""The operator CLI as a real process against real backends (local disk, moto S3)."""

from __future__ import annotations

import json
import os
import time

import pytest

from .conftest import BACKENDS, TUS, Server, create, patch, raw_request, wait_for
from .test_durability import patch_head


@pytest.fixture(params=BACKENDS)
def srv(request, start_server) -> Server:
    return start_server("--expiry-interval", "never", backend=request.param)


async def _sessions(client, srv: Server) -> dict[str, str]:
    """One upload in every state: complete, fresh, stale (idle 3 days), expired (idle 30 days)."""
    urls = {}
    urls["complete"] = await create(client, srv, 5, **{"Upload-Metadata": "filename ZG9uZS50eHQ="})
    await patch(client, urls["complete"], 0, b"hello")
    urls["fresh"] = await create(client, srv, 100)
    await patch(client, urls["fresh"], 0, b"x" * 40)
    urls["stale"] = await create(client, srv, 100)
    await patch(client, urls["stale"], 0, b"y" * 30)
    srv.age(urls["stale"], 3 * 86400)
    urls["expired"] = await create(client, srv, 1000)
    await patch(client, urls["expired"], 0, b"z" * 700)
    srv.age(urls["expired"], 30 * 86400)
    draft = {"Upload-Draft-Interop-Version": "8", "Upload-Complete": "?0", "Upload-Length": "50"}
    response = await client.post(srv.files, content=b"d" * 20, headers=draft)  # an iOS upload
    urls["ietf"] = response.headers["location"]
    return {name: Server.upload_id(url) for name, url in urls.items()}


def _json(result) -> object:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def test_list_shows_every_session_with_its_state(client, srv):
    ids = await _sessions(client, srv)
    rows = {row["id"]: row for row in _json(srv.cli("list", "--json"))}
    assert set(ids.values()) <= set(rows)
    assert rows[ids["complete"]]["state"] == "complete"
    assert rows[ids["complete"]]["filename"] == "done.txt"
    assert rows[ids["fresh"]]["state"] == "incomplete" and rows[ids["fresh"]]["offset"] == 40
    assert rows[ids["expired"]]["state"] == "expired"
    assert rows[ids["ietf"]]["protocol"] == "ietf" and rows[ids["ietf"]]["offset"] == 20
    assert rows[ids["fresh"]]["protocol"] == "tus"
    old = {row["id"] for row in _json(srv.cli("list", "--json", "--older-than", "2d"))}
    assert old == {ids["stale"], ids["expired"]}
    expired = {row["id"] for row in _json(srv.cli("list", "--json", "--state", "expired"))}
    assert expired == {ids["expired"]}
    table = srv.cli("list")
    assert table.returncode == 0 and ids["fresh"] in table.stdout


async def test_prune_dry_run_changes_nothing_and_prune_removes_exactly_the_stale(client, srv):
    ids = await _sessions(client, srv)
    dry = _json(srv.cli("prune", "--older-than", "2d", "--dry-run", "--json"))
    assert {row["id"] for row in dry["removed"]} == {ids["stale"], ids["expired"]}
    assert dry["bytes_reclaimed"] == 730
    assert len(_json(srv.cli("list", "--json"))) == 5
    done = _json(srv.cli("prune", "--older-than", "2d", "--json"))
    assert {row["id"] for row in done["removed"]} == {ids["stale"], ids["expired"]}
    assert done["sessions_removed"] == 2 and done["bytes_reclaimed"] == 730
    left = {row["id"] for row in _json(srv.cli("list", "--json"))}
    assert left == {ids["complete"], ids["fresh"], ids["ietf"]}
    assert (await client.head(srv.files + ids["stale"], headers=TUS)).status_code == 404
    assert (await client.head(srv.files + ids["fresh"], headers=TUS)).status_code == 200


async def test_prune_defaults_to_the_expiry_and_keeps_finished_uploads(client, srv):
    ids = await _sessions(client, srv)
    srv.age(srv.files + ids["complete"], 60 * 86400)
    report = _json(srv.cli("prune", "--json"))  # default expiry: 7 days
    assert {row["id"] for row in report["removed"]} == {ids["expired"]}
    report = _json(srv.cli("prune", "--json", "--older-than", "1d", "--include-complete"))
    assert {row["id"] for row in report["removed"]} == {ids["complete"], ids["stale"]}


async def test_a_session_being_written_survives_prune(client, srv):
    data = os.urandom(8 * 1024 * 1024)
    url = await create(client, srv, len(data))
    srv.age(url, 3 * 86400)  # idle long enough for --older-than 1d, not yet expired
    writing = raw_request(srv.port, patch_head(srv, url, 0, len(data)), data[: 6 * 1024 * 1024], close=False)
    try:
        wait_for(lambda: srv.landed(url) >= 5 * 1024 * 1024, what="the upload to be written")
        report = _json(srv.cli("prune", "--older-than", "1d", "--json"))
        assert report["busy"] == [Server.upload_id(url)]
        assert report["removed"] == []
    finally:
        writing.close()
    wait_for(lambda: srv.stored_size(url) > 0, what="the interrupted request's bytes to be committed")
    assert (await client.head(url, headers=TUS)).status_code == 200


async def test_stats_counts_bytes_by_state(client, srv):
    await _sessions(client, srv)
    totals = _json(srv.cli("stats", "--json"))
    assert totals["complete"] == {"count": 1, "bytes": 5}
    assert totals["incomplete"] == {"count": 3, "bytes": 90}
    assert totals["expired"] == {"count": 1, "bytes": 700}


async def test_inspect_shows_the_storage_details(client, srv):
    url = await create(client, srv, 20 * 1024 * 1024)
    await patch(client, url, 0, os.urandom(6 * 1024 * 1024))
    details = _json(srv.cli("inspect", Server.upload_id(url), "--json"))
    assert details["offset"] == 6 * 1024 * 1024 and details["state"] == "incomplete"
    if srv.backend == "s3":
        assert details["storage"]["multipart_upload_id"]
        assert [p["size"] for p in details["storage"]["parts"]] == [5 * 1024 * 1024]
        assert details["storage"]["tail"]["size"] == 1024 * 1024
    else:
        assert "data" in details["storage"]["files"]


async def test_inspect_shows_a_chunk_sessions_stored_chunks(client, srv):
    created = await client.post(srv.url + "/chunks/", json={"size": 12 * 1024 * 1024})
    session = created.json()
    first = os.urandom(session["chunk_size"])
    assert (await client.put(session["url"] + "/1", content=first)).status_code == 201
    details = _json(srv.cli("inspect", session["id"], "--json"))
    assert details["protocol"] == "chunks" and details["chunk_size"] == session["chunk_size"]
    assert details["chunks"] == {
        "count": session["chunk_count"],
        "stored": 1,
        "bytes_stored": session["chunk_size"],
    }


def test_inspect_of_an_unknown_upload_fails_naming_it(srv):
    result = srv.cli("inspect", "0" * 32)
    assert result.returncode == 1
    assert "0" * 32 in result.stderr and "not found" in result.stderr


async def test_prune_aborts_orphaned_multipart_uploads_and_objects(client, start_server):
    srv: Server = start_server(backend="s3")
    s3 = srv.moto.client
    orphan_key = srv.layout.key("f" * 32)
    orphan = s3.create_multipart_upload(Bucket=srv.bucket, Key=orphan_key)["UploadId"]
    s3.put_object(Bucket=srv.bucket, Key=orphan_key + ".tail-dead", Body=b"12345")
    live = await create(client, srv, 100)
    await patch(client, live, 0, b"abc")
    dry = _json(srv.cli("prune", "--orphan-age", "0s", "--dry-run", "--json"))
    assert {o["name"] for o in dry["orphans"]} == {orphan, orphan_key + ".tail-dead"}
    assert any(u["UploadId"] == orphan for u in s3.list_multipart_uploads(Bucket=srv.bucket)["Uploads"])
    report = _json(srv.cli("prune", "--orphan-age", "0s", "--json"))
    assert {o["kind"] for o in report["orphans"]} == {"multipart-upload", "object"}
    uploads = s3.list_multipart_uploads(Bucket=srv.bucket).get("Uploads", [])
    assert orphan not in {u["UploadId"] for u in uploads}
    assert len(uploads) == 1  # the live upload's multipart upload is untouched
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=srv.bucket)["Contents"]}
    assert orphan_key + ".tail-dead" not in keys
    assert (await client.head(live, headers=TUS)).headers["upload-offset"] == "3"


async def test_prune_removes_half_created_upload_directories(client, start_server):
    srv: Server = start_server()
    broken = srv.local.directory("ab" + "0" * 30)
    broken.mkdir(parents=True)
    (broken / "data").write_bytes(b"x" * 10)
    crashed_at = time.time() - 3600
    os.utime(broken, (crashed_at, crashed_at))
    started = time.time()
    report = _json(srv.cli("prune", "--orphan-age", "0s", "--json"))
    # The CLI reads its clock at some moment while it runs (seconds after it starts, on a
    # loaded machine): the age it reports lies between the ages at its start and its exit.
    oldest = int(time.time() - crashed_at)
    age = report["orphans"][0].pop("age_seconds")
    assert report["orphans"] == [{"kind": "directory", "name": str(broken), "size": 10}]
    assert int(started - crashed_at) <= age <= oldest
    assert not broken.exists()


async def test_the_list_shows_full_ids_human_sizes_and_progress_at_80_columns(client, srv):
    ids = await _sessions(client, srv)
    table = srv.cli("list", columns=80)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), table.stdout
    row = next(line for line in lines if line.startswith(ids["fresh"]))  # the whole id, pasteable
    assert row.split()[1:5] == ["incomplete", "40%", "40", "B"]
    assert srv.cli("inspect", row.split()[0]).returncode == 0
    limited = _json(srv.cli("list", "--json", "--sort", "stored", "--limit", "2"))
    assert [r["id"] for r in limited] == [ids["expired"], ids["fresh"]]  # 700 and 40 bytes


async def test_chunk_sessions_count_their_stored_bytes_in_list_stats_and_prune(client, srv):
    created = await client.post(srv.url + "/chunks/", json={"size": 12 * 1024 * 1024})
    session = created.json()
    chunk = os.urandom(session["chunk_size"])
    assert (await client.put(session["url"] + "/1", content=chunk)).status_code == 201
    (row,) = [r for r in _json(srv.cli("list", "--json")) if r["id"] == session["id"]]
    assert row["offset"] == 0 and row["stored"] == len(chunk)
    assert _json(srv.cli("stats", "--json"))["incomplete"] == {"count": 1, "bytes": len(chunk)}
    stored_at = time.time()
    wait_for(lambda: time.time() > stored_at + 1.5, what="the session to be idle for a second")
    dry = _json(srv.cli("prune", "--older-than", "1s", "--dry-run", "--json"))
    assert [r["id"] for r in dry["removed"]] == [session["id"]]
    assert dry["bytes_reclaimed"] == len(chunk)


def test_stats_prints_sizes_without_colour(srv):
    result = srv.cli("stats")
    assert result.returncode == 0 and "\x1b" not in result.stdout
    assert "0 bytes (0 B)" in result.stdout
