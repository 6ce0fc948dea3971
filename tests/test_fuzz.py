"""No request, however malformed, gets a 5xx or leaves a traceback in the server's log.

Seeded garbage over raw sockets (httpx would refuse to send most of it): random and real
methods, every route with real and garbage ids, every header the protocols read with
valid, mutated, non-ASCII and huge values, bodies of every shape. FUZZ_REQUESTS and
FUZZ_SEED set the run (`FUZZ_REQUESTS=30000 pytest tests/test_fuzz.py -s` for the long
one; it prints the count of statuses).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import json
import os
import random
from collections.abc import Callable

import httpx

from tests.conftest import TUS, Server

REQUESTS = int(os.environ.get("FUZZ_REQUESTS", "3000"))
SEED = int(os.environ.get("FUZZ_SEED", "14"))
IN_FLIGHT = 16
ANSWER_SECONDS = 20.0  #: a request the server never answers counts as a failure after this

METHODS = [b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"]
DRAFT = b"Upload-Draft-Interop-Version"


class Garbage:
    """Requests made of plausible and implausible parts, from one seeded generator."""

    def __init__(self, rng: random.Random, ids: dict[str, list[str]]) -> None:
        self.rng = rng
        self.ids = ids
        self.headers: dict[bytes, Callable[[], bytes]] = {
            b"Tus-Resumable": lambda: self.pick(b"1.0.0", b"0.2.2", self.noise()),
            b"Upload-Length": self.number,
            b"Upload-Offset": self.number,
            b"Upload-Defer-Length": lambda: self.pick(b"1", b"0", self.number()),
            b"Upload-Metadata": self.metadata,
            b"Upload-Checksum": lambda: self.pick(b"sha1 ", b"md5 ", b"crc32 ", b"sha256 ", b"") + self.b64(),
            b"Upload-Concat": self.concat,
            b"X-HTTP-Method-Override": lambda: self.pick(*METHODS, self.noise()),
            b"Content-Type": lambda: self.pick(
                b"application/offset+octet-stream",
                b"application/partial-upload",
                b"application/json",
                self.noise(),
            ),
            b"Content-Length": self.number,
            b"Transfer-Encoding": lambda: self.pick(b"chunked", b"gzip", b"chunked, gzip", self.noise()),
            DRAFT: lambda: self.pick(b"3", b"5", b"6", b"8", b"9", b"10", self.number()),
            b"Upload-Complete": lambda: self.pick(b"?1", b"?0", b"?2", b"1", self.noise()),
            b"Upload-Incomplete": lambda: self.pick(b"?1", b"?0", self.noise()),
            b"Content-Digest": self.digest,
            b"Repr-Digest": self.digest,
            b"Content-MD5": self.b64,
            b"Range": lambda: b"bytes=" + self.number() + b"-" + self.pick(b"", self.number()),
            b"If-Range": lambda: self.pick(b'"' + self.an_id().encode() + b'"', self.noise()),
            b"Origin": lambda: self.pick(b"https://app.example", b"null", self.noise()),
            b"Access-Control-Request-Method": lambda: self.pick(*METHODS, self.noise()),
            b"Access-Control-Request-Headers": lambda: self.pick(
                b"upload-offset, tus-resumable", self.noise()
            ),
            b"X-Forwarded-Proto": lambda: self.pick(b"https", self.noise()),
            b"X-Forwarded-Host": lambda: self.pick(b"uploads.example.com", self.noise()),
            b"Expect": lambda: self.pick(b"100-continue", self.noise()),
            b"Trailer": lambda: self.pick(b"Upload-Checksum", self.noise()),
            b"Connection": lambda: self.pick(b"close", b"keep-alive", b"upgrade", self.noise()),
            b"Upgrade": lambda: self.pick(b"websocket", b"h2c", self.noise()),
        }

    def pick(self, *options: bytes) -> bytes:
        return self.rng.choice(options)

    def noise(self, most: int = 40) -> bytes:
        """Bytes a header value may carry: ASCII, latin-1, UTF-8, sometimes a lot of them."""
        kind = self.rng.random()
        if kind < 0.05:
            return b"x" * self.rng.choice([1000, 5000, 17000, 70000])
        if kind < 0.4:
            return "".join(self.rng.choice("é²€ß中😀\u00a0٣") for _ in range(self.rng.randint(1, 8))).encode(
                self.rng.choice(["utf-8", "utf-16-le"]) if kind < 0.2 else "utf-8"
            )
        if kind < 0.5:
            return bytes(self.rng.randint(0x80, 0xFF) for _ in range(self.rng.randint(1, most)))
        alphabet = b"abcXYZ019 -_=+/;,.:?!*@\"'()[]{}<>\\%&#~"
        return bytes(self.rng.choice(alphabet) for _ in range(self.rng.randint(0, most)))

    def number(self) -> bytes:
        return self.pick(
            b"0", b"1", b"3", b"100", b"1048576", b"-1", b"1e3", b"0x10", b" 5", b"18446744073709551616",
            b"9" * self.rng.choice([19, 20, 400, 5000]), "٣²".encode(), b"", self.noise(5),
        )  # fmt: skip

    def b64(self) -> bytes:
        raw = os.urandom(self.rng.choice([0, 4, 16, 20, 32]))
        return self.pick(base64.b64encode(raw), base64.b64encode(raw)[:-1], self.noise(30))

    def metadata(self) -> bytes:
        pairs = []
        for _ in range(self.rng.randint(0, 5)):
            key = self.pick(b"filename", b"filetype", b"name", b"type", b"", self.noise(10))
            value = self.pick(b"", b" " + base64.b64encode(self.noise(30)), b" " + self.noise(10), b" a b")
            pairs.append(key + value)
        return b",".join(pairs)

    def concat(self) -> bytes:
        urls = b" ".join(b"/files/" + self.an_id().encode() for _ in range(self.rng.randint(0, 3)))
        return self.pick(
            b"partial", b"final;" + urls, b"final;http://evil.example/files/x", b"final", self.noise()
        )

    def digest(self) -> bytes:
        name = self.pick(b"sha-256", b"sha-512", b"md5", b"crc32", b"sha", b"unknown", self.noise(8))
        return self.pick(name + b"=:" + self.b64() + b":", name + b"=" + self.noise(20), self.noise())

    def an_id(self) -> str:
        kind = self.rng.random()
        if kind < 0.6:
            return self.rng.choice(self.rng.choice(list(self.ids.values())))
        if kind < 0.8:
            return os.urandom(16).hex()
        return self.noise(40).decode("latin-1").replace(" ", "%20").replace("?", "%3F")

    def path(self) -> bytes:
        session = self.rng.choice(self.ids["chunks"] + [self.an_id()])
        number = self.pick(b"1", b"2", b"0", b"-1", b"10001", self.number())
        template = self.rng.choice(
            [
                b"/files/", b"/files/" + self.an_id().encode("utf-8", "surrogateescape"),
                b"/files/" + self.an_id().encode() + b"/", b"/chunks/", b"/chunks/" + session.encode(),
                b"/chunks/" + session.encode() + b"/" + number,
                b"/chunks/" + session.encode() + b"/complete", b"/chunks/" + session.encode() + b"/events",
                b"/openapi.json", b"/healthz", b"/metrics", b"/", b"/files/%2e%2e/%2e%2e/etc/passwd",
                b"/" + self.noise(20).replace(b" ", b"%20"), b"*",
                b"http://127.0.0.1/files/" + self.an_id().encode(), b"/files/?" + self.noise(10),
            ]
        )  # fmt: skip
        return bytes(b for b in template if b not in b" \r\n") or b"/"

    def body(self, path: bytes) -> bytes:
        kind = self.rng.random()
        if path.startswith(b"/chunks/") and kind < 0.5:
            spec = {
                "size": self.rng.choice([0, 1, 100, -1, 1.5, "10", None, 2**70, True]),
                "chunk_size": self.rng.choice([None, 0, 1, 65536, 5 << 20, -5, "x"]),
                "metadata": self.rng.choice([None, {}, {"filename": "a.txt"}, {"k": 1}, [], "x", {"é": "€"}]),
                "sha256": self.rng.choice([None, "00" * 32, 5, "zz"]),
            }
            text = json.dumps({k: v for k, v in spec.items() if self.rng.random() < 0.8})
            return self.pick(text.encode(), text.encode()[: len(text) // 2], b"[]", b"{" * 3000, b"\xff\xfe")
        if kind < 0.3:
            return b""
        if kind < 0.9:
            return os.urandom(self.rng.choice([1, 5, 100, 4096, 70000]))
        return self.noise(200)

    def request(self) -> bytes:
        """One request's bytes; its framing may leave the server waiting for more."""
        rng = self.rng
        method = self.pick(*METHODS) if rng.random() < 0.9 else self.pick(b"PROPFIND", b"GETT", self.noise(8))
        path = self.path()
        version = b"HTTP/1.1" if rng.random() < 0.95 else self.pick(b"HTTP/1.0", b"HTTP/2", b"HTTP/1.1x")
        body = self.body(path)
        names = rng.sample(list(self.headers), rng.randint(0, 8))
        fields = [(b"Host", b"127.0.0.1" if rng.random() < 0.9 else self.noise())]
        if rng.random() < 0.4:
            fields.append((b"Tus-Resumable", b"1.0.0"))
        if rng.random() < 0.2:
            fields.append((DRAFT, self.pick(b"3", b"6", b"8")))
        fields += [(name, self.headers[name]()) for name in names]
        if rng.random() < 0.05:
            fields.append((self.noise(12).replace(b":", b"") or b"X", self.noise()))
        if rng.random() < 0.02:
            fields += [(b"X-%d" % n, b"1") for n in range(rng.choice([50, 101, 500]))]
        chunked = any(name == b"Transfer-Encoding" for name, _ in fields)
        declared = any(name == b"Content-Length" for name, _ in fields)
        if not chunked and not declared and body:
            fields.append((b"Content-Length", str(len(body)).encode()))
        elif chunked and rng.random() < 0.7:
            body = (
                b"%x\r\n%s\r\n0\r\n" % (len(body), body)
                + self.pick(b"", b"Upload-Checksum: sha1 x\r\n")
                + b"\r\n"
            )
        head = b"%s %s %s\r\n" % (method, path, version)
        head += b"".join(
            name + b": " + value.replace(b"\r", b"").replace(b"\n", b"") + b"\r\n" for name, value in fields
        )
        return head + b"\r\n" + body


async def send(port: int, request: bytes) -> list[int]:
    """Every status line the server answers with (interim ones too), until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    statuses = []
    try:
        writer.write(request)
        received = b""
        async with asyncio.timeout(ANSWER_SECONDS):
            while not (statuses and statuses[-1] >= 200):
                while b"\r\n\r\n" not in received:
                    try:
                        block = await reader.read(65536)
                    except ConnectionError:
                        block = b""
                    if not block:
                        return statuses  # closed
                    received += block
                head, _, received = received.partition(b"\r\n\r\n")
                statuses.append(int(head.split(b" ", 2)[1]))
    finally:
        writer.close()
    return statuses


async def fuzz(srv: Server, count: int, seed: int) -> collections.Counter[int]:
    ids = await real_ids(srv)
    garbage = Garbage(random.Random(seed), ids)
    requests = [garbage.request() for _ in range(count)]
    statuses: collections.Counter[int] = collections.Counter()
    failures: list[bytes] = []
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(request: bytes) -> None:
        async with gate:
            try:
                answered = await send(srv.port, request)
            except TimeoutError:
                failures.append(b"no answer: " + request[:300])
                return
        finals = [s for s in answered if s >= 200]
        statuses.update(finals or [0])  # 0: closed without a final answer (malformed, timed out)
        if any(s >= 500 for s in finals):
            failures.append(b"%d: %s" % (max(finals), request[:300]))

    await asyncio.gather(*(one(request) for request in requests))
    assert not failures, b"\n".join(failures[:10]).decode("latin-1")
    return statuses


async def real_ids(srv: Server) -> dict[str, list[str]]:
    """Uploads of every kind for the garbage to hit: unfinished, finished, partial, chunked."""
    ids: dict[str, list[str]] = {"tus": [], "chunks": []}
    async with httpx.AsyncClient(timeout=30) as client:
        for length in (10, 0, 5):
            created = await client.post(srv.files, headers={**TUS, "Upload-Length": str(length)})
            ids["tus"].append(created.headers["location"].rsplit("/", 1)[1])
        done = ids["tus"][2]
        await client.patch(
            srv.files + done,
            content=b"hello",
            headers={**TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"},
        )
        partial = await client.post(
            srv.files, headers={**TUS, "Upload-Length": "0", "Upload-Concat": "partial"}
        )
        ids["tus"].append(partial.headers["location"].rsplit("/", 1)[1])
        for size in (100, 1 << 20):
            session = await client.post(srv.url + "/chunks/", json={"size": size})
            ids["chunks"].append(session.json()["id"])
        digest = base64.b64encode(hashlib.sha256(b"x" * 100).digest()).decode()
        await client.put(
            srv.url + f"/chunks/{ids['chunks'][0]}/1",
            content=b"x" * 100,
            headers={"Content-Digest": f"sha-256=:{digest}:"},
        )
    return ids


def test_garbage_requests_get_no_5xx_and_leave_no_traceback(start_server):
    srv: Server = start_server("--idle-timeout", "1", "--header-timeout", "2")
    statuses = asyncio.run(fuzz(srv, REQUESTS, SEED))
    print(f"\n{REQUESTS} requests, seed {SEED}: {dict(sorted(statuses.items()))}")
    assert not any(status >= 500 for status in statuses)
    assert sum(statuses[s] for s in statuses if 200 <= s < 500) > REQUESTS / 2  # most were answered
    log = srv.log.read_text()
    assert "Traceback" not in log and '"level": "error"' not in log, log[-5000:]
    assert httpx.get(srv.url + "/healthz").status_code == 200
