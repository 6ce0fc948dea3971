"""/readyz: 200 while the storage answers, 503 naming it while it does not."""

from __future__ import annotations

import httpx

from .conftest import Moto, Server, wait_for


def readyz(server: Server) -> httpx.Response:
    return httpx.get(server.url + "/readyz", timeout=30)


def test_ready_on_local_disk(start_server):
    response = readyz(start_server())
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "checks": {"storage": "ok"}}


def test_not_ready_while_s3_is_down_and_ready_when_it_returns(tmp_path):
    moto = Moto(tmp_path / "moto.log").start()  # its own: the suite's endpoint must stay up
    server = Server(tmp_path / "data", moto=moto).start()
    try:
        assert readyz(server).status_code == 200
        moto.stop()
        down = readyz(server)
        assert down.status_code == 503
        assert down.headers["content-type"] == "application/problem+json"
        body = down.json()
        assert body["type"] == "urn:uploadsrv:problem:not-ready"
        assert body["checks"]["storage"] != "ok" and body["detail"].startswith("storage: ")
        assert (httpx.get(server.url + "/healthz")).status_code == 200  # the process still answers
        moto.start()  # the same port; moto keeps nothing, so the bucket comes back as S3's would
        moto.client.create_bucket(Bucket=server.bucket)
        wait_for(lambda: readyz(server).status_code == 200, timeout=30, what="/readyz to recover")
    finally:
        server.stop()
        moto.stop()
