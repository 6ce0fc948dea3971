"""What happens when things go wrong: cut-off bodies, crashes, full disks, busy uploads."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from uploadsrv.core.model import UploadInfo, new_upload_id
from uploadsrv.storage.local import LocalStorage, _DirectorySync

from .conftest import (
    TUS,
    LocalLayout,
    Server,
    create,
    download,
    patch,
    raw_request,
    read_response,
    sha256,
    wait_for,
)


def patch_head(server: Server, url: str, offset: int, length: int, extra: str = "") -> str:
    path = url[len(server.url) :]
    return (
        f"PATCH {path} HTTP/1.1\nHost: 127.0.0.1:{server.port}\nTus-Resumable: 1.0.0\n"
        f"Upload-Offset: {offset}\nContent-Type: application/offset+octet-stream\n"
        f"Content-Length: {length}\n{extra}"
    )


@pytest.mark.parametrize(
    ("size", "sent"),
    [(5 * 1024 * 1024, 3 * 1024 * 1024 + 123), (40_000, 10_001)],
    ids=["large", "small-held-until-commit"],
)
async def test_a_body_cut_off_midway_keeps_what_arrived_and_resumes(client, server, size, sent):
    data = os.urandom(size)
    url = await create(client, server, len(data))
    raw_request(server.port, patch_head(server, url, 0, len(data)), data[:sent])  # then closed
    wait_for(lambda: server.stored_size(url) == sent, what="the bytes that arrived to be stored")
    head = await client.head(url, headers=TUS)
    assert head.headers["upload-offset"] == str(sent)
    assert (await patch(client, url, sent, data[sent:])).status_code == 204
    assert sha256(await download(client, url)) == sha256(data)


async def test_bytes_buffered_when_the_connection_drops_are_kept_with_h11_too(client, start_server):
    srv: Server = start_server("--http", "h11")
    data = os.urandom(40_000)
    url = await create(client, srv, len(data))
    raw_request(srv.port, patch_head(srv, url, 0, len(data)), data[:10_001])  # then closed
    wait_for(lambda: srv.stored_size(url) == 10_001, what="the bytes that arrived to be stored")
    assert (await patch(client, url, 10_001, data[10_001:])).status_code == 204
    assert sha256(await download(client, url)) == sha256(data)


async def test_a_new_request_for_a_busy_upload_stops_the_stale_one_and_is_answered(client, server):
    """A phone reconnects after a network change while its old PATCH still holds the upload."""
    data = os.urandom(8 * 1024 * 1024)
    url = await create(client, server, len(data))
    first = 6 * 1024 * 1024 + 7  # past one 5 MiB S3 part and the 1 MiB batch after it
    stale = raw_request(server.port, patch_head(server, url, 0, len(data)), data[:first], close=False)
    try:
        wait_for(lambda: server.landed(url) >= 5 * 1024 * 1024, what="the stale request to write")
        started = time.monotonic()
        head = await client.head(url, headers=TUS)
        waited = time.monotonic() - started
        assert head.status_code == 200
        assert waited < 5, f"HEAD waited {waited:.1f}s behind a stale request"
        offset = int(head.headers["upload-offset"])
        assert 0 < offset <= first
        assert offset == server.stored_size(url)
        # The stale request was told it was superseded.
        status, _, body = read_response(stale)
        assert status == 409 and b"superseded" in body
    finally:
        stale.close()
    assert (await patch(client, url, offset, data[offset:])).status_code == 204
    assert sha256(await download(client, url)) == sha256(data)


async def test_fifty_concurrent_uploads_are_all_intact(client, server):
    sources = [os.urandom(64 * 1024 + i * 9973) for i in range(50)]

    async def upload(data: bytes) -> str:
        url = await create(client, server, len(data))
        half = len(data) // 2
        assert (await patch(client, url, 0, data[:half])).status_code == 204
        assert (await patch(client, url, half, data[half:])).status_code == 204
        return url

    urls = await asyncio.gather(*(upload(data) for data in sources))
    stored = await asyncio.gather(*(download(client, url) for url in urls))
    assert [sha256(s) for s in stored] == [sha256(d) for d in sources]


async def test_sigkill_mid_upload_loses_no_acknowledged_byte(client, start_server):
    srv: Server = start_server()
    data = os.urandom(6 * 1024 * 1024)
    url = await create(client, srv, len(data))
    acked = 2 * 1024 * 1024
    assert (await patch(client, url, 0, data[:acked])).status_code == 204
    sock = raw_request(
        srv.port, patch_head(srv, url, acked, len(data) - acked), data[acked : acked + 2_500_000], close=False
    )
    wait_for(
        lambda: srv.stored_size(url) > acked + 1024 * 1024, what="unacknowledged bytes to reach the disk"
    )
    srv.kill()
    sock.close()
    srv.start()  # same data directory, new process
    head = await client.head(url, headers=TUS)
    offset = int(head.headers["upload-offset"])
    assert acked <= offset <= acked + 2_500_000
    assert (await patch(client, url, offset, data[offset:])).status_code == 204
    assert sha256(await download(client, url)) == sha256(data)


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 4 MiB tmpfs, so the server really runs out of space (needs root, as CI has)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


async def test_a_full_disk_is_a_507_and_the_upload_resumes_once_space_returns(
    client, start_server, tiny_disk
):
    srv: Server = start_server(data_dir=tiny_disk / "data")
    filler = tiny_disk / "filler"
    filler.write_bytes(b"\0" * (2 * 1024 * 1024))
    data = os.urandom(3 * 1024 * 1024)
    url = await create(client, srv, len(data))
    response = await patch(client, url, 0, data)
    assert response.status_code == 507
    assert response.headers["content-type"] == "application/problem+json"
    offset = int((await client.head(url, headers=TUS)).headers["upload-offset"])
    assert offset == srv.stored_size(url) < len(data)
    filler.unlink()
    assert (await patch(client, url, offset, data[offset:])).status_code == 204
    assert sha256(await download(client, url)) == sha256(data)


def _chunked(data: bytes, trailer: str) -> bytes:
    pieces = [data[i : i + 100_000] for i in range(0, len(data), 100_000)]
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
    return body + b"0\r\n" + trailer.encode() + b"\r\n\r\n"


@pytest.mark.parametrize("http", ["httptools", "h11"])
async def test_checksum_in_a_trailer_is_verified(client, start_server, http):
    srv: Server = start_server("--http", http)
    data = os.urandom(700_000)
    url = await create(client, srv, len(data))
    path = url[len(srv.url) :]
    head = (
        f"PATCH {path} HTTP/1.1\nHost: x\nTus-Resumable: 1.0.0\nUpload-Offset: 0\n"
        "Content-Type: application/offset+octet-stream\n"
        "Transfer-Encoding: chunked\nTrailer: Upload-Checksum\n"
    )
    bad = base64.b64encode(hashlib.sha1(b"other").digest()).decode()
    sock = raw_request(srv.port, head, _chunked(data, f"Upload-Checksum: sha1 {bad}"), close=False)
    status, _, _ = read_response(sock)
    sock.close()
    assert status == 460
    assert srv.stored_size(url) == 0
    good = base64.b64encode(hashlib.sha256(data).digest()).decode()
    sock = raw_request(srv.port, head, _chunked(data, f"Upload-Checksum: sha256 {good}"), close=False)
    status, headers, _ = read_response(sock)
    sock.close()
    assert status == 204
    assert headers["upload-offset"] == str(len(data))
    assert sha256(await download(client, url)) == sha256(data)


async def test_an_announced_trailer_that_never_comes_stores_nothing(client, server):
    url = await create(client, server, 5)
    path = url[len(server.url) :]
    head = (
        f"PATCH {path} HTTP/1.1\nHost: x\nTus-Resumable: 1.0.0\nUpload-Offset: 0\n"
        "Content-Type: application/offset+octet-stream\n"
        "Transfer-Encoding: chunked\nTrailer: Upload-Checksum\n"
    )
    sock = raw_request(server.port, head, _chunked(b"hello", ""), close=False)
    status, _, _ = read_response(sock)
    sock.close()
    assert status == 400
    assert server.stored_size(url) == 0


class _Fsyncs:
    """Records what os.fsync was called on (by path) and when, and when each file was
    created, then really does it: a power loss cannot be staged here, so the order of
    syncs stands for what one would keep."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, float, float]] = []  # path, started, ended
        self.created: dict[str, float] = {}  # path -> when its entry existed
        real_fsync, real_open = os.fsync, os.open

        def fsync(fd: int) -> None:
            started = time.monotonic()
            real_fsync(fd)
            self.calls.append((os.readlink(f"/proc/self/fd/{fd}"), started, time.monotonic()))

        def open_(path, flags, *args, **kwargs):
            fd = real_open(path, flags, *args, **kwargs)
            if flags & os.O_CREAT:
                self.created.setdefault(os.readlink(f"/proc/self/fd/{fd}"), time.monotonic())
            return fd

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "open", open_)


async def test_a_new_uploads_first_commit_returns_after_its_file_and_entry_are_synced(tmp_path, monkeypatch):
    """Each of 32 new uploads committed at once: its file was fsynced (bytes, size and
    record: one inode), and so was the directory, in an fsync that began after the file
    existed, before the commit returned; the uploads shared those directory syncs."""
    storage = LocalStorage(tmp_path / "data")
    fsyncs = _Fsyncs(monkeypatch)
    try:
        infos = [UploadInfo(id=new_upload_id(), length=3) for _ in range(32)]
        committed: dict[str, float] = {}

        async def upload(info: UploadInfo) -> None:
            await storage.create(info)
            async with storage.writer(info, transactional=False) as writer:
                await writer.write([b"abc"])
                assert await writer.commit() == 3
            committed[info.id] = time.monotonic()

        await asyncio.gather(*(upload(info) for info in infos))
    finally:
        await storage.close()
    files = str(LocalLayout(tmp_path / "data").files)
    directory_syncs = [(started, ended) for path, started, ended in fsyncs.calls if path == files]
    for info in infos:
        path = f"{files}/{info.id}"
        data = [ended for synced, _, ended in fsyncs.calls if synced == path]
        assert data and data[0] <= committed[info.id]
        created = fsyncs.created[path]
        assert any(created <= s and e <= committed[info.id] for s, e in directory_syncs)
    assert len(directory_syncs) < len(infos)


async def test_an_upload_created_before_a_directory_sync_needs_none_of_its_own(tmp_path, monkeypatch):
    storage = LocalStorage(tmp_path / "data")
    fsyncs = _Fsyncs(monkeypatch)
    try:
        first, second = UploadInfo(id=new_upload_id(), length=1), UploadInfo(id=new_upload_id(), length=1)
        for info in (first, second):
            await storage.create(info)
        for info in (first, second):  # the first commit's directory sync covers both entries
            async with storage.writer(info, transactional=False) as writer:
                await writer.write([b"x"])
                await writer.commit()
    finally:
        await storage.close()
    files = str((tmp_path / "data" / "files").resolve())
    assert [path for path, _, _ in fsyncs.calls] == [f"{files}/{first.id}", files, f"{files}/{second.id}"]


def test_threads_asking_while_a_directory_sync_runs_share_the_next_one(tmp_path, monkeypatch):
    syncer = _DirectorySync(str(tmp_path))
    release = threading.Event()
    synced: list[int] = []
    real = os.fsync

    def held_fsync(fd: int) -> None:  # the first sync is held: the others ask meanwhile
        assert release.wait(60)
        real(fd)
        synced.append(fd)

    monkeypatch.setattr(os, "fsync", held_fsync)
    threads = [threading.Thread(target=syncer.sync) for _ in range(9)]
    threads[0].start()
    wait_for(lambda: syncer._syncing, what="the first sync to start")
    for thread in threads[1:]:
        thread.start()
    wait_for(lambda: syncer._asked == 9, what="the other threads to ask")
    release.set()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive()
    assert len(synced) == 2  # the first, and one for the eight that asked while it ran
