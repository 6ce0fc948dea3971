"""/metrics as Prometheus scrapes it: the families, their totals over workers, and the flags."""

from __future__ import annotations

import asyncio
import json
import os
import socket

import httpx
from prometheus_client.parser import text_string_to_metric_families

from uploadsrv.metrics import FLUSH_SECONDS

from .conftest import TUS, Server, create, patch, raw_request, wait_for
from .test_durability import patch_head

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str, **headers: str) -> Samples:
    response = httpx.get(url, headers=headers)
    assert response.status_code == 200, response.text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_totals_are_summed_over_two_workers(start_server):
    srv: Server = start_server("--workers", "2")
    batch, data = 20, os.urandom(3000)
    # No keep-alive: every request is a new connection. The kernel hands each one to
    # whichever worker accepts first, and on a busy machine one worker can take a whole
    # batch: send batches until both have finished uploads (so the sum is over two).
    limits = httpx.Limits(max_keepalive_connections=0)
    count = 0
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:

        async def one() -> None:
            url = await create(client, srv, len(data))
            assert (await patch(client, url, 0, data)).status_code == 204

        while len(_completing_workers(srv)) < 2 and count < 20 * batch:
            await asyncio.gather(*(one() for _ in range(batch)))
            count += batch
        assert len(_completing_workers(srv)) == 2, "both workers should have served uploads"
        assert (await client.head(srv.files + "0" * 32, headers=TUS)).status_code == 404

    def totals(samples: Samples) -> dict[str, float]:
        return {
            "created": value(samples, "uploadsrv_uploads_created_total", protocol="tus"),
            "finished": value(samples, "uploadsrv_uploads_finished_total", protocol="tus"),
            "received": value(samples, "uploadsrv_bytes_received_total", protocol="tus"),
            "posts": value(samples, "uploadsrv_requests_total", method="POST", route="/files/", status="201"),
            "patches": value(
                samples, "uploadsrv_requests_total", method="PATCH", route="/files/{upload_id}", status="204"
            ),
            "404s": value(samples, "uploadsrv_errors_total", status="404", problem="not-found"),
            "creates": value(samples, "uploadsrv_storage_operation_seconds_count", operation="create"),
            "commits": value(samples, "uploadsrv_storage_operation_seconds_count", operation="commit"),
            "in flight": value(samples, "uploadsrv_requests_in_flight"),  # the scrape itself
        }

    expected = {
        **dict.fromkeys(("created", "finished", "posts", "patches", "creates", "commits"), count),
        "received": count * len(data),
        "404s": 1,
        "in flight": 1,
    }
    # Each worker adds its counts to the shared files within FLUSH_SECONDS of making them.
    wait_for(lambda: totals(scrape(srv.url + "/metrics")) == expected, 5 * FLUSH_SECONDS, "every count")
    for _ in range(6):  # whichever worker answers the scrape, it shows every worker's counts
        assert totals(scrape(srv.url + "/metrics")) == expected


def _completing_workers(srv: Server) -> set[int]:
    """The pids of the workers that logged a finished upload."""
    lines = [json.loads(line) for line in srv.log.read_text().splitlines() if line.startswith("{")]
    return {line["pid"] for line in lines if line["msg"] == "upload completed"}


async def test_request_durations_bytes_sent_and_104s_are_counted(client, start_server):
    srv: Server = start_server()
    draft = {"Upload-Draft-Interop-Version": "8", "Upload-Complete": "?1"}
    created = await client.post(srv.files, content=b"0123456789", headers=draft)
    assert created.status_code == 201
    assert (await client.get(created.headers["location"])).content == b"0123456789"
    samples = scrape(srv.url + "/metrics")
    assert value(samples, "uploadsrv_informational_responses_total", status="104") == 1
    assert value(samples, "uploadsrv_bytes_received_total", protocol="ietf") == 10
    assert value(samples, "uploadsrv_bytes_sent_total", protocol="tus") == 10  # the download
    assert value(samples, "uploadsrv_uploads_created_total", protocol="ietf") == 1
    assert value(samples, "uploadsrv_request_duration_seconds_count", method="POST", route="/files/") == 1


async def test_a_large_body_read_straight_from_the_socket_counts_its_bytes(client, start_server):
    srv: Server = start_server()
    data = os.urandom(4 * 1024 * 1024 + 17)  # over socket_body.MIN_LENGTH: the direct path
    url = await create(client, srv, len(data))
    assert (await patch(client, url, 0, data)).status_code == 204
    samples = scrape(srv.url + "/metrics")
    assert value(samples, "uploadsrv_bytes_received_total", protocol="tus") == len(data)


async def test_open_connections_are_a_live_gauge(start_server):
    srv: Server = start_server()
    held = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(3)]

    def connections() -> float:  # each scrape on a connection of its own
        return value(scrape(srv.url + "/metrics"), "uploadsrv_open_connections")

    wait_for(lambda: connections() == 4, what="3 held connections and the scrape's")
    for sock in held:
        sock.close()
    wait_for(lambda: connections() == 1, what="only the scrape's connection")


async def test_a_preempted_request_counts_a_preemption_and_a_lock_wait(client, start_server):
    srv: Server = start_server()
    size = 5 * 1024 * 1024
    url = await create(client, srv, size)
    stalled = raw_request(srv.port, patch_head(srv, url, 0, size), b"x" * (3 * 1024 * 1024), close=False)
    try:
        wait_for(lambda: srv.landed(url) >= 1024 * 1024, what="the stalled request to hold the upload")
        head = await client.head(url, headers=TUS)
        assert head.status_code == 200
    finally:
        stalled.close()
    samples = scrape(srv.url + "/metrics")
    assert value(samples, "uploadsrv_lock_preemptions_total") == 1
    assert value(samples, "uploadsrv_lock_wait_seconds_count") == 1
    assert value(samples, "uploadsrv_lock_timeouts_total") == 0


async def test_metrics_path_and_token(client, start_server):
    srv: Server = start_server("--metrics-path", "/internal/metrics", "--metrics-token", "s3cret")
    assert (await client.get(srv.url + "/metrics")).status_code == 404
    refused = await client.get(srv.url + "/internal/metrics", headers={"Authorization": "Bearer nope"})
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == "Bearer"
    samples = scrape(srv.url + "/internal/metrics", Authorization="Bearer s3cret")
    assert value(samples, "uploadsrv_errors_total", status="401", problem="about:blank") == 1


async def test_metrics_can_be_turned_off(client, start_server):
    srv: Server = start_server("--metrics", "false")
    assert (await client.get(srv.url + "/metrics")).status_code == 404
    url = await create(client, srv, 5)
    assert (await patch(client, url, 0, b"hello")).status_code == 204
