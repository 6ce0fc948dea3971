"""What a server offers follows from what its backend can do, recorded once at start-up."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from uploadsrv.core.capabilities import Capabilities
from uploadsrv.storage.local import LocalStorage

from .conftest import TUS, create, download, free_port, patch, sha256, spawn
from .minimal_app import CoreOnly


def test_local_disk_has_every_capability(tmp_path: Path) -> None:
    capabilities = Capabilities.of(LocalStorage(tmp_path))
    assert None not in (capabilities.chunks, capabilities.concatenation, capabilities.housekeeping)


def test_local_disk_keeps_an_outbox_and_locates_but_needs_no_fence(tmp_path: Path) -> None:
    capabilities = Capabilities.of(LocalStorage(tmp_path))
    assert None not in (capabilities.outbox, capabilities.locating)
    assert capabilities.fenced is None  # its lock is the kernel's flock


def test_the_core_contract_alone_has_none(tmp_path: Path) -> None:
    assert Capabilities.of(CoreOnly(LocalStorage(tmp_path))) == Capabilities()  # type: ignore[arg-type]


@pytest.fixture
def minimal(tmp_path: Path) -> Iterator[SimpleNamespace]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPLOADSRV_")}
    env["UPLOADSRV_DATA_DIR"] = str(tmp_path / "data")
    command = [sys.executable, "-m", "uvicorn", "tests.minimal_app:create", "--factory", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    process = spawn(command, tmp_path / "minimal.log", url + "/healthz", env)
    try:
        yield SimpleNamespace(url=url, files=url + "/files/")
    finally:
        process.kill()
        process.wait()


async def test_a_backend_without_chunks_serves_tus_and_the_draft_and_no_chunk_api(
    minimal: SimpleNamespace, client: httpx.AsyncClient
) -> None:
    options = await client.options(minimal.files, headers=TUS)
    assert options.status_code == 204
    assert "concatenation" not in options.headers["tus-extension"].split(",")
    assert "creation" in options.headers["tus-extension"].split(",")

    url = await create(client, minimal, 11)  # type: ignore[arg-type]
    assert (await patch(client, url, 0, b"hello world")).status_code == 204
    assert sha256(await download(client, url)) == sha256(b"hello world")

    draft = await client.post(
        minimal.files,
        content=b"from iOS",
        headers={"Upload-Draft-Interop-Version": "6", "Upload-Complete": "?1"},
    )
    assert draft.status_code == 201
    assert sha256(await download(client, draft.headers["location"])) == sha256(b"from iOS")

    assert (await client.post(minimal.url + "/chunks/", json={"size": 10})).status_code == 404
    assert (await client.get(minimal.url + "/openapi.json")).status_code == 404
