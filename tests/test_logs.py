"""Log lines: one JSON object each, with the request's id and fields; no colours."""

from __future__ import annotations

import json
import re

import httpx

from .conftest import TUS, Server, create, patch, wait_for


def lines(server: Server) -> list[dict]:
    return [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith("{")]


def access_lines(server: Server, request_id: str) -> list[dict]:
    return [line for line in lines(server) if line.get("request_id") == request_id]


def test_a_request_id_is_echoed_and_in_the_log_line_of_an_error(start_server):
    srv: Server = start_server()
    response = httpx.head(srv.files + "0" * 32, headers={**TUS, "X-Request-Id": "req-42.a"})
    assert response.status_code == 404
    assert response.headers["x-request-id"] == "req-42.a"
    wait_for(lambda: access_lines(srv, "req-42.a"), what="the 404's log line")
    (line,) = access_lines(srv, "req-42.a")
    assert line["level"] == "info" and line["logger"] == "uploadsrv.access"
    assert line["status"] == 404 and line["problem"] == "not-found"
    assert line["method"] == "HEAD" and line["route"] == "/files/{upload_id}"
    assert line["protocol"] == "tus" and line["upload_id"] == "0" * 32
    assert isinstance(line["duration_ms"], float)


async def test_every_request_with_access_log_and_generated_ids(client, start_server):
    srv: Server = start_server("--access-log", "true")
    url = await create(client, srv, 5)
    response = await patch(client, url, 0, b"hello")
    assert response.status_code == 204
    request_id = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)

    def own_line() -> list[dict]:
        return [line for line in access_lines(srv, request_id) if line["logger"] == "uploadsrv.access"]

    wait_for(own_line, what="the PATCH's access line")  # written after the request's other lines
    (line,) = own_line()
    request_lines = access_lines(srv, request_id)
    assert line["status"] == 204 and line["upload_id"] == Server.upload_id(url)
    assert line["bytes_received"] == 5 and line["problem"] is None
    # What the core logged while it handled the request carries the same id.
    assert any(line["msg"] == "upload completed" for line in request_lines)


def test_no_ansi_and_no_color_message_in_any_line(start_server):
    srv: Server = start_server()
    httpx.get(srv.url + "/healthz")
    text = srv.log.read_text()
    assert "\x1b" not in text and "color_message" not in text
    assert all(line.startswith("{") for line in text.splitlines() if line.strip())


def test_text_format_for_a_terminal(start_server):
    srv: Server = start_server("--log-format", "text")
    httpx.get(srv.files + "0" * 32, headers={"X-Request-Id": "plain-1"})
    wait_for(lambda: "request_id=plain-1" in srv.log.read_text(), what="the text line")
    (line,) = [line for line in srv.log.read_text().splitlines() if "request_id=plain-1" in line]
    assert " info " in line and "status=404" in line and "problem=not-found" in line
    assert not line.startswith("{") and "\x1b" not in line
