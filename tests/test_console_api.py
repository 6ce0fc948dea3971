"""The console's HTTP side (`--console`): access, listing, one session, delete, and the
server-wide event stream, against the real server; the hub's bounded queues in process."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import CONSOLE_TOKEN, TUS, Server, create, patch, wait_for
from uploadsrv.console.hub import OPERATOR, QUEUE, ConsoleHub
from uploadsrv.core import UploadInfo, UploadService
from uploadsrv.core.chunks import ChunkSessions
from uploadsrv.core.events import UploadEvent
from uploadsrv.storage.local import LocalStorage

TOKEN = CONSOLE_TOKEN
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    """API tokens for `--auth bearer`: alice's and bob's."""
    path = tmp_path / "tokens"
    path.write_text("alice-token alice\nbob-token bob\n")
    return path


def as_user(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {name}-token"}


@pytest.fixture
def console_with_auth(start_server: Callable[..., Server], tokens: Path) -> Server:
    return start_server(
        "--console", "--console-token", TOKEN, "--auth", "bearer", "--tokens-file", str(tokens)
    )


class EventStream:
    """The console's event stream read as a client would, one event at a time."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def next(self, *names: str, where: Callable[[dict], bool] = bool) -> tuple[str, dict]:
        """The next event named in `names` (any but a tick if none) whose data passes `where`."""
        name, data = "", []
        async for line in self._lines:
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
            elif line == "" and data:
                event, body = name, json.loads("\n".join(data))
                name, data = "", []
                if (event in names if names else event != "tick") and where(body):
                    return event, body
        raise AssertionError("the stream ended")


@pytest.fixture
async def stream(console: Server) -> AsyncIterator[EventStream]:
    async with (
        httpx.AsyncClient(timeout=30) as client,
        client.stream("GET", console.url + "/console/api/events", headers=AUTH) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        yield EventStream(response)


async def test_console_is_off_by_default(server: Server, client: httpx.AsyncClient) -> None:
    assert (await client.get(server.url + "/console/")).status_code == 404
    assert (await client.get(server.url + "/console/api/sessions", headers=AUTH)).status_code == 404


async def test_page_is_served_without_a_token_and_holds_no_secret(
    console: Server, client: httpx.AsyncClient
) -> None:
    page = await client.get(console.url + "/console/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    scripts = re.findall(r'src="(static/[^"]+)"', page.text)
    assert scripts == ["static/console.js"]
    for path in ["static/console.js", "static/upload.js", "static/console.css"]:
        asset = await client.get(console.url + "/console/" + path)
        assert asset.status_code == 200, path
        assert TOKEN not in asset.text
        assert asset.headers["x-content-type-options"] == "nosniff"
    assert TOKEN not in page.text
    assert (await client.get(console.url + "/console", follow_redirects=False)).status_code == 308


async def test_api_needs_the_token(console: Server, client: httpx.AsyncClient) -> None:
    for credential in [None, "Bearer wrong", TOKEN, f"Basic {TOKEN}"]:
        headers = {"Authorization": credential} if credential else {}
        for method, path in [
            ("GET", "sessions"),
            ("GET", "events"),
            ("GET", "sessions/" + "0" * 32),
            ("DELETE", "sessions/" + "0" * 32),
        ]:
            response = await client.request(method, console.url + "/console/api/" + path, headers=headers)
            assert response.status_code == 401, (headers, method, path)
            assert response.headers["content-type"] == "application/problem+json"
            assert response.headers["www-authenticate"].startswith("Bearer")


async def test_listing_shows_sessions_with_filters(
    console_with_auth: Server, client: httpx.AsyncClient
) -> None:
    console = console_with_auth
    alice = await create(client, console, 5, **as_user("alice"))
    response = await client.post(
        console.url + "/chunks/", json={"size": 10, "chunk_size": 65536}, headers=as_user("bob")
    )
    bob = response.json()["id"]
    assert (await patch(client, alice, 0, b"hello")).status_code == 204

    async def ids(**filters: str) -> list[str]:
        response = await client.get(console.url + "/console/api/sessions", params=filters, headers=AUTH)
        assert response.status_code == 200
        assert response.headers["cache-control"] == "no-store"
        return [row["id"] for row in response.json()["sessions"]]

    alice_id = Server.upload_id(alice)
    assert await ids() == [alice_id, bob]  # most recently active first
    assert await ids(owner="alice") == [alice_id]
    assert await ids(protocol="chunks") == [bob]
    assert await ids(state="complete") == [alice_id]
    assert await ids(state="incomplete") == [bob]
    rows = (await client.get(console.url + "/console/api/sessions", headers=AUTH)).json()["sessions"]
    assert rows[0] | {"last_activity": 0, "created_at": 0} == rows[0] | {
        "id": alice_id,
        "owner": "alice",
        "protocol": "tus",
        "state": "complete",
        "size": 5,
        "received": 5,
        "expires_at": None,
        "last_activity": 0,
        "created_at": 0,
    }
    assert rows[1]["chunk_count"] == 1
    assert rows[1]["chunks_stored"] == 0


async def test_one_session_and_its_deletion(console: Server, client: httpx.AsyncClient) -> None:
    url = await create(client, console, 11, **{"Upload-Metadata": "filename aGVsbG8udHh0"})
    upload_id = Server.upload_id(url)
    await patch(client, url, 0, b"hello")
    response = await client.get(console.url + f"/console/api/sessions/{upload_id}", headers=AUTH)
    assert response.status_code == 200
    body = response.json()
    assert body["session"]["received"] == 5
    assert body["session"]["filename"] == "hello.txt"
    assert body["record"]["offset"] == 5
    assert [entry["event"] for entry in body["history"]] == ["created", "appended"]
    assert body["history"][1]["offset"] == 5
    assert body["download_url"] is None

    deleted = await client.delete(console.url + f"/console/api/sessions/{upload_id}", headers=AUTH)
    assert deleted.status_code == 204
    assert (await client.head(url, headers=TUS)).status_code == 404
    gone = await client.get(console.url + f"/console/api/sessions/{upload_id}", headers=AUTH)
    assert gone.status_code == 404
    assert gone.headers["content-type"] == "application/problem+json"
    again = await client.delete(console.url + f"/console/api/sessions/{upload_id}", headers=AUTH)
    assert again.status_code == 404


async def test_stream_starts_with_a_snapshot_then_tus_events(
    console: Server, client: httpx.AsyncClient, stream: EventStream
) -> None:
    name, snapshot = await stream.next()
    assert name == "snapshot"
    assert snapshot["paths"] == {"files": "/files/", "chunks": "/chunks/"}
    assert snapshot["viewer"] == {"owner": None, "operator": True}
    url = await create(client, console, 11)
    upload_id = Server.upload_id(url)
    await patch(client, url, 0, b"hello")
    await patch(client, url, 5, b" world")
    events = [await stream.next() for _ in range(4)]
    assert [(name, body["event"]) for name, body in events] == [
        ("upload", "created"),
        ("upload", "appended"),
        ("upload", "appended"),
        ("upload", "completed"),
    ]
    assert {body["session"]["id"] for _, body in events} == {upload_id}
    assert [body["entry"].get("offset") for _, body in events] == [None, 5, 11, None]
    assert [body["session"]["state"] for _, body in events] == ["incomplete"] * 2 + ["complete"] * 2

    await client.delete(url, headers=TUS)
    name, body = await stream.next()
    assert (name, body["event"], body["session"]["state"]) == ("upload", "terminated", "terminated")


async def test_stream_reports_each_chunk_by_number(
    console: Server, client: httpx.AsyncClient, stream: EventStream
) -> None:
    await stream.next("snapshot")
    spec = {"size": 3 * 65536, "chunk_size": 65536}
    session = (await client.post(console.url + "/chunks/", json=spec)).json()
    assert (await stream.next())[1]["event"] == "created"
    for number in (3, 1, 2):
        chunk_url = session["chunk_url_template"].replace("{n}", str(number))
        response = await client.put(chunk_url, content=b"x" * 65536)
        assert response.status_code == 201
        name, body = await stream.next()
        assert (name, body["number"]) == ("chunk", number)
        assert body["entry"]["bytes"] == 65536
    assert body["session"]["chunks_stored"] == 3
    assert body["session"]["received"] == 3 * 65536
    assert (await client.post(session["complete_url"])).status_code == 200
    name, body = await stream.next()
    assert (name, body["event"], body["session"]["state"]) == ("upload", "completed", "complete")


async def test_stream_sends_rates_every_second(
    console: Server, client: httpx.AsyncClient, stream: EventStream
) -> None:
    await stream.next("snapshot")
    url = await create(client, console, 1000)
    await patch(client, url, 0, b"x" * 1000)
    upload_id = Server.upload_id(url)
    _, tick = await stream.next("tick", where=lambda tick: upload_id in tick["rates"])
    assert tick["rates"][upload_id] > 0
    assert tick["bytes_per_second"] >= tick["rates"][upload_id]
    assert sum(stored for _, stored in tick["seconds"]) >= 1000


async def test_a_generated_token_is_printed_with_the_url(
    start_server: Callable[..., Server], client: httpx.AsyncClient
) -> None:
    server = start_server("--console")
    match = None

    def printed() -> bool:
        nonlocal match
        match = re.search(r"console at http://\S+/console/#token=(\S+)", server.log.read_text())
        return match is not None

    wait_for(printed, what="the console URL in the log")
    assert match is not None
    token = match[1]
    ok = await client.get(server.url + "/console/api/sessions", headers={"Authorization": f"Bearer {token}"})
    assert ok.status_code == 200
    assert (await client.get(server.url + "/console/api/sessions", headers=AUTH)).status_code == 401


async def test_a_slow_browser_gets_a_resync_not_a_growing_queue(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    service = UploadService(storage, max_size=1 << 30, expiry=None)
    hub = ConsoleHub(service, ChunkSessions(service, chunk_size=1 << 20))
    try:
        async with hub.watch(OPERATOR) as queue:
            for n in range(QUEUE * 3):
                service.emit(UploadEvent.CREATED, UploadInfo(id=f"{n:032x}", length=1))
            assert queue.qsize() == 1  # everything it missed is dropped: it reconnects for a snapshot
            assert queue.get_nowait()[0] == "resync"
        assert not hub._clients
    finally:
        await storage.close()


async def test_with_auth_on_a_user_sees_only_their_own_sessions(
    console_with_auth: Server, client: httpx.AsyncClient
) -> None:
    console = console_with_auth
    api = console.url + "/console/api/"
    bob = Server.upload_id(await create(client, console, 5, **as_user("bob")))
    async with client.stream("GET", api + "events", headers=as_user("alice")) as response:
        assert response.status_code == 200
        stream = EventStream(response)
        name, snapshot = await stream.next()
        assert (name, snapshot["sessions"], snapshot["viewer"]) == (
            "snapshot",
            [],
            {"owner": "alice", "operator": False},
        )
        assert snapshot["auth"] == "bearer"
        await create(client, console, 5, **as_user("bob"))  # not for alice's eyes
        alice = Server.upload_id(await create(client, console, 5, **as_user("alice")))
        name, body = await stream.next()
        assert (name, body["session"]["id"], body["session"]["owner"]) == ("upload", alice, "alice")
    listed = await client.get(api + "sessions", headers=as_user("alice"))
    assert [row["id"] for row in listed.json()["sessions"]] == [alice]
    # bob's session is, to alice, a session that does not exist
    assert (await client.get(api + f"sessions/{bob}", headers=as_user("alice"))).status_code == 404
    assert (await client.delete(api + f"sessions/{bob}", headers=as_user("alice"))).status_code == 404
    assert (await client.get(api + f"sessions/{bob}", headers=as_user("bob"))).status_code == 200
    assert (await client.delete(api + f"sessions/{alice}", headers=as_user("alice"))).status_code == 204
    # the operator's token sees everyone's; bad credentials see nothing
    everyone = await client.get(api + "sessions", headers=AUTH)
    assert {row["owner"] for row in everyone.json()["sessions"]} == {"alice", "bob"}
    for credential in ["Bearer nobody-token", "Bearer alice-token-not", ""]:
        refused = await client.get(api + "sessions", headers={"Authorization": credential})
        assert refused.status_code == 401


async def test_with_auth_on_no_console_token_is_made(
    start_server: Callable[..., Server], tokens: Path, client: httpx.AsyncClient
) -> None:
    server = start_server("--console", "--auth", "bearer", "--tokens-file", str(tokens))
    assert "console at" not in server.log.read_text()
    response = await client.get(server.url + "/console/api/sessions", headers=as_user("bob"))
    assert response.status_code == 200
