"""The real `tuspy` client (not written here) against the real server."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
from tusclient import client as tus_client

from .conftest import TUS, sha256


def _source(tmp_path: Path, size: int) -> tuple[Path, bytes]:
    data = os.urandom(size)
    path = tmp_path / "video.mov"
    path.write_bytes(data)
    return path, data


def test_tuspy_uploads_a_file_in_chunks_with_metadata(server, tmp_path):
    path, data = _source(tmp_path, 3 * 1024 * 1024 + 5)
    uploader = tus_client.TusClient(server.files).uploader(
        str(path), chunk_size=512 * 1024, metadata={"filename": "video.mov", "filetype": "video/quicktime"}
    )
    uploader.upload()
    response = httpx.get(uploader.url)
    assert sha256(response.content) == sha256(data)
    assert response.headers["content-type"] == "video/quicktime"
    assert "filename*=UTF-8''video.mov" in response.headers["content-disposition"]


def test_tuspy_sends_checksums_that_the_server_verifies(server, tmp_path):
    path, data = _source(tmp_path, 1024 * 1024 + 1)
    uploader = tus_client.TusClient(server.files).uploader(
        str(path), chunk_size=300_000, upload_checksum=True
    )
    uploader.upload()
    assert sha256(httpx.get(uploader.url).content) == sha256(data)


def test_tuspy_resumes_an_interrupted_upload_from_the_server_offset(server, tmp_path):
    path, data = _source(tmp_path, 2 * 1024 * 1024)
    first = tus_client.TusClient(server.files).uploader(str(path), chunk_size=256 * 1024)
    first.upload(stop_at=768 * 1024)  # the app is killed here
    assert first.offset == 768 * 1024
    resumed = tus_client.TusClient(server.files).uploader(str(path), url=first.url, chunk_size=1024 * 1024)
    assert resumed.offset == 768 * 1024  # asked the server with HEAD
    resumed.upload()
    assert sha256(httpx.get(first.url).content) == sha256(data)


def test_an_upload_started_by_tuspy_can_be_terminated(server, tmp_path):
    path, _ = _source(tmp_path, 1000)
    uploader = tus_client.TusClient(server.files).uploader(str(path), chunk_size=100)
    uploader.upload(stop_at=300)
    assert httpx.delete(uploader.url, headers=TUS).status_code == 204
    assert httpx.head(uploader.url, headers=TUS).status_code == 404
