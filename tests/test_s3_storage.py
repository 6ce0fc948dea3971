"""What only S3 has: parts, tails, several instances, outages, server-side joins, orphans."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import itertools
import os
import socket
import subprocess
import sys
import threading
import zlib

import httpx
import pytest

from uploadsrv.core import errors
from uploadsrv.storage.s3 import MAX_PARTS, MIN_PART, part_size_for

from .conftest import TUS, Moto, Server, create, download, free_port, patch, sha256

MiB = 1024 * 1024


@pytest.fixture
def s3_server(start_server):
    return start_server(backend="s3")


async def test_patches_crossing_part_boundaries_at_odd_offsets(client, s3_server):
    data = os.urandom(17 * MiB + 12345)
    url = await create(client, s3_server, len(data))
    cuts = [0, 3 * MiB + 1, 5 * MiB - 1, 5 * MiB + 2, 11 * MiB - 7, 16 * MiB, len(data)]
    for start, end in itertools.pairwise(cuts):
        response = await patch(client, url, start, data[start:end])
        assert response.status_code == 204, response.text
        assert int(response.headers["upload-offset"]) == end == s3_server.stored_size(url)
    assert sha256(await download(client, url)) == sha256(data)


async def test_many_tiny_patches_add_up_to_several_parts(client, s3_server):
    data = os.urandom(16 * MiB + 99)
    url = await create(client, s3_server, len(data))
    step = 700 * 1024
    for start in range(0, len(data), step):
        assert (await patch(client, url, start, data[start : start + step])).status_code == 204
    state = s3_server.s3_state(url)
    assert state.completed and len(state.parts) == 4  # three of 5 MiB and the rest
    assert sha256(await download(client, url)) == sha256(data)


async def test_an_upload_resumes_through_a_second_server_instance(client, s3_server, start_server):
    other = Server(s3_server.data_dir.parent / "other", *s3_server.args, moto=s3_server.moto)
    other.bucket = s3_server.bucket
    other.args = tuple(a.replace(f"s3://{other.bucket}", f"s3://{s3_server.bucket}") for a in other.args)
    other.start()
    try:
        data = os.urandom(7 * MiB + 5)
        url = await create(client, s3_server, len(data))
        assert (await patch(client, url, 0, data[: 6 * MiB])).status_code == 204
        there = url.replace(s3_server.url, other.url)
        head = await client.head(there, headers=TUS)
        assert head.headers["upload-offset"] == str(6 * MiB)
        assert (await patch(client, there, 6 * MiB, data[6 * MiB :])).status_code == 204
        assert sha256(await download(client, url)) == sha256(data)
    finally:
        other.stop()


async def test_concatenation_copies_large_parts_inside_s3(client, s3_server):
    pieces = [os.urandom(6 * MiB), os.urandom(MiB + 3), os.urandom(7 * MiB + 1), os.urandom(10)]
    urls = []
    for piece in pieces:
        url = await create(client, s3_server, len(piece), **{"Upload-Concat": "partial"})
        assert (await patch(client, url, 0, piece)).status_code == 204
        urls.append(url)
    response = await client.post(s3_server.files, headers={**TUS, "Upload-Concat": "final;" + " ".join(urls)})
    assert response.status_code == 201, response.text
    final = response.headers["location"]
    assert sha256(await download(client, final)) == sha256(b"".join(pieces))
    parts = s3_server.s3_state(final).parts
    assert all(p.size >= MIN_PART for p in parts[:-1])


async def test_termination_leaves_no_object_and_no_multipart_upload(client, s3_server):
    url = await create(client, s3_server, 20 * MiB)
    await patch(client, url, 0, os.urandom(6 * MiB + 1))
    assert s3_server.exists(url)
    assert (await client.delete(url, headers=TUS)).status_code == 204
    assert not s3_server.exists(url)
    uploads = s3_server.moto.client.list_multipart_uploads(Bucket=s3_server.bucket)
    assert not uploads.get("Uploads")


def _crc32(data: bytes) -> bytes:
    return zlib.crc32(data).to_bytes(4, "big")


async def test_s3_checks_a_crc32_of_every_part_and_keeps_a_composite_one(client, s3_server):
    data = os.urandom(12 * MiB + 7)
    url = await create(client, s3_server, len(data))
    assert (await patch(client, url, 0, data[: 3 * MiB])).status_code == 204  # a tail first
    assert (await patch(client, url, 3 * MiB, data[3 * MiB :])).status_code == 204
    parts = s3_server.s3_state(url).parts
    bounds = list(itertools.pairwise(itertools.accumulate([p.size for p in parts], initial=0)))
    assert len(parts) == 3 and bounds[-1][1] == len(data)
    # What CompleteMultipartUpload was given: the CRC32 S3 confirmed for each part.
    assert [p.checksum for p in parts] == [base64.b64encode(_crc32(data[a:b])).decode() for a, b in bounds]
    key = s3_server.layout.key(Server.upload_id(url))
    head = s3_server.moto.client.head_object(Bucket=s3_server.bucket, Key=key, ChecksumMode="ENABLED")
    composite = base64.b64encode(_crc32(b"".join(_crc32(data[a:b]) for a, b in bounds))).decode()
    assert head["ChecksumCRC32"].partition("-")[0] == composite  # S3 adds "-3", moto does not
    assert sha256(await download(client, url)) == sha256(data)


async def test_checksums_can_be_turned_off_for_stores_without_them(client, start_server):
    srv: Server = start_server("--s3-checksums", "false", backend="s3")
    data = os.urandom(6 * MiB)
    url = await create(client, srv, len(data))
    assert (await patch(client, url, 0, data)).status_code == 204
    state = srv.s3_state(url)
    assert state.checksum is None and all(p.checksum is None for p in state.parts)
    head = srv.moto.client.head_object(
        Bucket=srv.bucket, Key=srv.layout.key(Server.upload_id(url)), ChecksumMode="ENABLED"
    )
    assert "ChecksumCRC32" not in head
    assert sha256(await download(client, url)) == sha256(data)


def test_part_size_fits_any_upload_in_ten_thousand_parts():
    assert part_size_for(100 * MiB, 8 * MiB, 16 << 30) == 8 * MiB
    assert part_size_for(None, 8 * MiB, 16 << 30) == 8 * MiB
    assert part_size_for(1, 1, 16 << 30) == MIN_PART
    five_tib = 5 << 40
    size = part_size_for(five_tib, 8 * MiB, five_tib)
    assert size * MAX_PARTS >= five_tib and size % MiB == 0


async def test_presigned_downloads_redirect_to_s3(client, start_server):
    srv: Server = start_server("--s3-presign-downloads", "true", backend="s3")
    url = await create(client, srv, 5)
    await patch(client, url, 0, b"hello")
    response = await client.get(url)
    assert response.status_code == 302
    assert response.headers["location"].startswith(srv.moto.endpoint)
    assert httpx.get(response.headers["location"]).content == b"hello"


def test_a_missing_bucket_is_a_clear_error_at_startup(moto, tmp_path):
    env = {**os.environ, **Moto.credentials}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "uploadsrv",
            "serve",
            "--port",
            str(free_port()),
            "--storage",
            "s3://no-such-bucket/x",
            "--s3-endpoint-url",
            moto.endpoint,
            "--data-dir",
            str(tmp_path / "data"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "no-such-bucket" in result.stderr and "not usable" in result.stderr


class Outage:
    """A TCP proxy in front of moto that can drop every connection and refuse new ones."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def up(self) -> None:
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(64)
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def down(self) -> None:
        assert self._listener is not None
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def behind_outage(moto, tmp_path):
    """A server whose S3 traffic goes through an `Outage` proxy the test can take down."""
    proxy = Outage(moto.port)
    proxy.up()
    srv = Server(tmp_path / "data", moto=moto)
    srv.args = tuple(a.replace(moto.endpoint, f"http://127.0.0.1:{proxy.port}") for a in srv.args)
    srv.start()
    yield srv, proxy
    srv.stop()
    proxy.down()


async def test_an_s3_outage_is_a_503_and_the_upload_resumes_when_s3_is_back(client, behind_outage):
    srv, proxy = behind_outage
    data = os.urandom(12 * MiB)
    url = await create(client, srv, len(data))
    assert (await patch(client, url, 0, data[: 6 * MiB])).status_code == 204
    proxy.down()
    response = await patch(client, url, 6 * MiB, data[6 * MiB :])
    assert response.status_code == 503
    assert response.headers["retry-after"]
    assert response.headers["content-type"] == "application/problem+json"
    assert (await client.head(url, headers=TUS)).status_code == 503
    proxy.up()
    head = await client.head(url, headers=TUS)
    assert head.status_code == 200, head.headers
    offset = int(head.headers["upload-offset"])
    assert offset == 6 * MiB == srv.stored_size(url)
    assert (await patch(client, url, offset, data[offset:])).status_code == 204
    assert sha256(await download(client, url)) == sha256(data)


async def test_an_s3_failure_after_the_104_drops_the_connection_so_ios_resumes(client, behind_outage):
    from .test_ietf_draft import HEADER, Wire, append_headers

    srv, proxy = behind_outage
    data = os.urandom(16 * MiB)
    wire = Wire(srv.port)
    wire.send_head(
        "POST", "/files/", {HEADER: "8", "Upload-Complete": "?1", "Content-Length": str(len(data))}
    )
    status, headers, _ = wire.response()
    assert status == 104
    upload = srv.files + headers["location"].rsplit("/", 1)[1]
    proxy.down()
    with pytest.raises(OSError):  # closed (or reset) without a final response
        wire.sock.sendall(data)
        while True:
            status, _, _ = wire.response()
            assert status < 200, f"got a final {status} instead of a dropped connection"
    wire.close()
    proxy.up()
    head = await client.head(upload, headers={HEADER: "8"})
    offset = int(head.headers["upload-offset"])
    response = await client.patch(upload, content=data[offset:], headers=append_headers(8, offset, True))
    assert response.status_code == 204
    assert sha256(await download(client, upload)) == sha256(data)


async def test_the_finished_object_has_the_type_and_name_from_metadata(client, s3_server):
    url = await create(
        client, s3_server, 5, **{"Upload-Metadata": "filename cmVwb3J0LnBkZg==,filetype YXBwbGljYXRpb24vcGRm"}
    )
    await patch(client, url, 0, b"%PDF-")
    key = s3_server.layout.key(Server.upload_id(url))
    head = s3_server.moto.client.head_object(Bucket=s3_server.bucket, Key=key)
    assert head["ContentType"] == "application/pdf"
    assert head["ContentDisposition"] == "inline; filename*=UTF-8''report.pdf"  # as GET shows it
    assert head["ContentLength"] == 5


def _listed(*sizes: int) -> list[dict[str, object]]:
    """ListParts' entries for parts 1, 2, ... of these sizes."""
    return [{"PartNumber": n, "Size": size, "ETag": f'"e{n}"'} for n, size in enumerate(sizes, 1)]


def test_an_open_info_object_adopts_only_confirmed_parts_that_continue_the_named_ones():
    from uploadsrv.storage.s3.state import Part, State

    def state(**fields: object) -> State:
        record = {"id": "a" * 32, "length": 30 * MiB, "metadata": {}, "created_at": 0.0, "updated_at": 0.0}
        named = {"parts": [Part(1, '"e1"', 5 * MiB)], "part_size": 5 * MiB, "high_part": 1, "open": True}
        return State(record=record, multipart_id="m", **{**named, **fields})  # type: ignore[arg-type]

    listed = _listed(5 * MiB, 5 * MiB, 5 * MiB, 2 * MiB, 5 * MiB)
    opened = state(tail_key="t", tail_size=MiB)
    opened.adopt(listed)
    # Parts 2 and 3 continue part 1 (the tail's bytes are in part 2); part 4 is short of a
    # part and does not end the upload, so neither it nor anything after it counts.
    assert [p.number for p in opened.parts] == [1, 2, 3]
    assert (opened.offset, opened.tail_key, opened.dropped_tail) == (15 * MiB, None, "t")
    for found in (state(open=False), state(high_part=2), state(high_part=None), state(completed=True)):
        found.adopt(listed)  # not open, stale parts may follow, written before `high_part`, done
        assert [p.number for p in found.parts] == [1]
    short = state()
    short.record["length"] = 12 * MiB
    short.adopt([*listed[:2], {"PartNumber": 3, "Size": 2 * MiB, "ETag": '"e3"'}, *listed[3:]])
    assert [p.number for p in short.parts] == [1, 2, 3] and short.offset == 12 * MiB  # it ends the upload


async def test_a_streaming_patch_writes_the_info_object_twice_however_many_parts(client, s3_server):
    """Once to mark it open before the first part, once to commit, however many parts;
    a PATCH that completes the upload leaves the naming to the completion. Counted as
    versions of the info object."""
    moto, bucket = s3_server.moto.client, s3_server.bucket
    moto.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    data = os.urandom(6 * 5 * MiB + 1234)  # six full parts and a last one
    url = await create(client, s3_server, len(data))
    info_key = s3_server.layout.key(Server.upload_id(url), ".info")

    def versions() -> int:
        listed = moto.list_object_versions(Bucket=bucket, Prefix=info_key)["Versions"]
        return len([v for v in listed if v["Key"] == info_key])

    cut = 3 * 5 * MiB + MiB  # three parts and a tail
    assert (await patch(client, url, 0, data[:cut])).status_code == 204
    assert versions() == 3  # create, open, commit
    assert (await patch(client, url, cut, data[cut:])).status_code == 204
    assert versions() == 5  # open, complete
    assert sha256(await download(client, url)) == sha256(data)


async def test_a_rejected_checksummed_body_leaves_parts_no_reader_adopts(client, s3_server):
    data = os.urandom(12 * MiB)
    url = await create(client, s3_server, len(data))
    bad = f"sha1 {base64.b64encode(hashlib.sha1(data + b'x').digest()).decode()}"
    assert (await patch(client, url, 0, data[: 11 * MiB], **{"Upload-Checksum": bad})).status_code == 460
    assert s3_server.landed(url) >= 10 * MiB  # its two full parts are in S3...
    stored = s3_server.layout.stored_info(Server.upload_id(url))
    assert stored.high_part == 3 and not stored.open  # ...below `high_part`, never adopted
    assert (await client.head(url, headers=TUS)).headers["upload-offset"] == "0"
    assert s3_server.stored_size(url) == 0
    assert (await patch(client, url, 0, data[: 6 * MiB])).status_code == 204  # over the stale part 1
    assert (await client.head(url, headers=TUS)).headers["upload-offset"] == str(6 * MiB)
    assert (await patch(client, url, 6 * MiB, data[6 * MiB :])).status_code == 204
    assert sha256(await download(client, url)) == sha256(data)


@pytest.mark.parametrize("open_backend", ["s3"], indirect=True)
async def test_a_long_held_lease_is_kept_by_its_process_heartbeat_without_rewriting_it(open_backend, clock):
    """Past its own LEASE_SECONDS a lease holds while its process's heartbeat does: the
    lease object is written once, and another instance takes it once the heartbeat stops."""
    from uploadsrv.storage.s3.lease import LEASE_SECONDS

    from .test_storage_contract import new_upload

    holder, other = open_backend(), open_backend()
    info = await new_upload(holder, 10)
    lock_key = holder.s3.key(info.id, ".lock")

    async def next_beat(after: str | None) -> str:
        while True:
            with contextlib.suppress(errors.UploadNotFound):
                _, etag = await holder.s3.read_object(holder.heartbeat.key)
                if etag != after:
                    return etag
            await asyncio.sleep(0.05)

    async with holder.lock(info.id, timeout=5.0):
        _, taken = await holder.s3.read_object(lock_key)
        beat = await next_beat(None)
        clock.now += LEASE_SECONDS + 1  # the lease's own time is over...
        await next_beat(beat)  # ...and a beat since says its process is alive
        with pytest.raises(errors.UploadBusy):
            async with other.lock(info.id, timeout=5.0, preempt=False):
                pass
        assert (await holder.s3.read_object(lock_key))[1] == taken  # never rewritten
        await holder.heartbeat.close()  # the holder's process stops beating (it died)
        clock.now += LEASE_SECONDS + 1
        async with other.lock(info.id, timeout=5.0, preempt=False):
            pass
