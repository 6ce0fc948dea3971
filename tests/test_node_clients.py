"""tus-js-client (from npm, run by node) against the real server: tus and the IETF draft."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .conftest import TUS, download, run_client, sha256


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(3 * 1024 * 1024 + 1234)
    path = tmp_path / "clip.bin"
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize("protocol", ["tus-v1", "ietf-draft-03", "ietf-draft-05"])
async def test_tus_js_client_uploads_a_file(client, server, node_clients, source, protocol):
    path, data = source
    result = run_client(node_clients, server.files, path, protocol, "plain")
    assert sha256(await download(client, result["url"])) == sha256(data)


@pytest.mark.parametrize("protocol", ["tus-v1", "ietf-draft-03", "ietf-draft-05"])
async def test_tus_js_client_resumes_after_an_abort(client, server, node_clients, source, protocol):
    path, data = source
    result = run_client(node_clients, server.files, path, protocol, "abort-resume")
    assert 0 < result["resumedFrom"] < len(data)  # it asked the server and did not start over
    assert result["resumedFrom"] == result["abortedAt"]
    assert sha256(await download(client, result["url"])) == sha256(data)


async def test_tus_js_client_parallel_uploads_concatenate(client, server, node_clients, source):
    path, data = source
    result = run_client(node_clients, server.files, path, "tus-v1", "parallel")
    head = await client.head(result["url"], headers=TUS)
    assert head.headers["upload-concat"].startswith("final;")
    assert len(head.headers["upload-concat"].split()) == 3
    assert sha256(await download(client, result["url"])) == sha256(data)
