"""TLS in uploadsrv itself, a unix socket, and what a stopping server does with an append."""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .conftest import TUS, Server, create, free_port, sha256, wait_for
from .test_durability import patch_head

DRAFT = "Upload-Draft-Interop-Version: 8\r\nUpload-Complete: ?1"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, and its key, as PEM files."""
    where = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = where / "cert.pem", where / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file


@pytest.fixture
def https_server(tmp_path: Path, certificate: tuple[Path, Path]):
    cert, key = certificate
    port = free_port()
    command = [sys.executable, "-m", "uploadsrv", "serve", "--port", str(port)]
    command += ["--data-dir", str(tmp_path / "data"), "--tls-cert", str(cert), "--tls-key", str(key)]
    log = tmp_path / "server.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"https://127.0.0.1:{port}"

    def ready() -> bool:
        assert process.poll() is None, log.read_text()
        try:
            return (
                httpx.get(url + "/healthz", verify=ssl.create_default_context(cafile=str(cert))).status_code
                == 200
            )
        except httpx.TransportError:
            return False

    wait_for(ready, 15, "the HTTPS server")
    yield port, url
    process.terminate()
    process.wait(30)


def _read_head(sock: ssl.SSLSocket, buffered: bytes) -> tuple[int, dict[str, str], bytes]:
    """One response head (interim or final) from `sock`; returns what followed it too."""
    while b"\r\n\r\n" not in buffered:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before a response"
        buffered += chunk
    head, _, rest = buffered.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), fields, rest


def test_an_ietf_upload_over_https_gets_its_104s(https_server, certificate):
    port, url = https_server
    data = os.urandom(9 * 1024 * 1024)
    context = ssl.create_default_context(cafile=str(certificate[0]))
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="127.0.0.1") as s:
        head = f"POST /files/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{DRAFT}"
        s.sendall(f"{head}\r\nContent-Length: {len(data)}\r\n\r\n".encode())
        status, fields, rest = _read_head(s, b"")  # before any body byte was sent
        assert status == 104 and fields["location"].startswith(url + "/files/")
        s.sendall(data)
        offsets = []
        while True:
            status, more, rest = _read_head(s, rest)
            if status != 104:
                break
            offsets.append(int(more["upload-offset"]))
        assert status == 201 and more["location"] == fields["location"]
    assert offsets and all(0 < o <= len(data) for o in offsets) and offsets == sorted(offsets)
    download = httpx.get(fields["location"], verify=ssl.create_default_context(cafile=str(certificate[0])))
    assert sha256(download.content) == sha256(data)


def test_curl_with_cacert_uploads_over_https_and_sees_the_104(https_server, certificate, tmp_path):
    _, url = https_server
    body = tmp_path / "body.bin"
    body.write_bytes(os.urandom(100_000))
    result = subprocess.run(
        [
            *("curl", "-sS", "-v", "--cacert", str(certificate[0]), "-X", "POST", url + "/files/"),
            *("-H", "Upload-Draft-Interop-Version: 8", "-H", "Upload-Complete: ?1"),
            *("--data-binary", f"@{body}", "-o", "/dev/null", "-w", "%{http_code}"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "201"
    assert "< HTTP/1.1 104 Upload Resumption Supported" in result.stderr


def test_a_unix_socket_serves_uploads(tmp_path):
    path = tmp_path / "uploadsrv.sock"
    command = [sys.executable, "-m", "uploadsrv", "serve", "--unix-socket", str(path)]
    command += ["--data-dir", str(tmp_path / "data")]
    with open(tmp_path / "server.log", "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        client = httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), base_url="http://uploadsrv")

        def ready() -> bool:
            assert process.poll() is None, (tmp_path / "server.log").read_text()
            try:
                return client.get("/healthz").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, 15, "the socket")
        created = client.post(
            "/files/",
            content=b"hello",
            headers={**TUS, "Upload-Length": "5", "Content-Type": "application/offset+octet-stream"},
        )
        assert created.status_code == 201
        assert client.get(created.headers["location"]).content == b"hello"
    finally:
        process.terminate()
        process.wait(30)


async def test_sigterm_mid_patch_keeps_the_bytes_that_arrived(client, start_server):
    srv: Server = start_server("--shutdown-timeout", "1")
    data = os.urandom(5 * 1024 * 1024)
    sent = 3 * 1024 * 1024 + 123
    url = await create(client, srv, len(data))
    stalled = socket.create_connection(("127.0.0.1", srv.port))
    stalled.sendall(patch_head(srv, url, 0, len(data)).replace("\n", "\r\n").encode() + b"\r\n" + data[:sent])
    try:
        # Batches of 512 KiB or more are written as they fill; the rest waits in memory.
        wait_for(lambda: srv.stored_size(url) >= 2 * 1024 * 1024, what="the request to be writing")
        assert srv.process is not None
        srv.process.send_signal(signal.SIGTERM)
        srv.process.wait(15)  # the 1 s grace, then the append is ended
    finally:
        stalled.close()
    assert srv.process.returncode == -signal.SIGTERM  # uvicorn shuts down, then re-raises the signal
    # The append's commit ran before the storage closed (no "cannot schedule new futures").
    assert "RuntimeError" not in srv.log.read_text()
    assert srv.stored_size(url) == sent
    srv.start()
    head = await client.head(url, headers=TUS)
    assert head.headers["upload-offset"] == str(sent)
