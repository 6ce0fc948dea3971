"""Hook figures: post-finish delivery latency, events lost and duplicated across a SIGKILL
while the receiver is down, and a large local upload with and without post-receive.

    python -m uploadsrv.loadtest.bench_hooks [--uploads 20] [--gib 1] [--rounds 3] [--only-throughput]

The receiver runs in this process (a thread) and records when each hook arrives. The
large uploads take turns, with and without post-receive, each on a fresh server; besides
MB/s (noisy on a shared machine) each reports the server's CPU seconds per GiB, from
/proc (all its threads), which is the steadier figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from .clients import tus_append_headers, tus_create_headers, tus_upload_in_one
from .procs import cpu_seconds, free_port, start_uploadsrv


class Receiver:
    """Records (type, upload id, webhook-id, arrival) of every hook; can go down and come back."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hooks"
        self.got: list[tuple[str, str, str, float]] = []
        self._server: ThreadingHTTPServer | None = None

    def up(self) -> None:
        got = self.got

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                return

            def do_POST(self) -> None:
                hook = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                got.append(
                    (hook["Type"], hook["Event"]["Upload"]["ID"], self.headers["webhook-id"], time.time())
                )
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def finished(self) -> list[tuple[str, str, str, float]]:
        return [hook for hook in list(self.got) if hook[0] == "post-finish"]


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(30)


def upload(client: httpx.Client, url: str, data: bytes) -> tuple[str, float]:
    """One tus upload; its id and when the final 204 arrived."""
    upload_url = tus_upload_in_one(client, url, [data], len(data))
    return upload_url.rsplit("/", 1)[1], time.time()


def wait(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def latency(work: Path, receiver: Receiver, count: int) -> list[float]:
    process, url = start_uploadsrv(
        work / "latency.log", "--data-dir", str(work / "latency"), "--hooks-http", receiver.url,
        "--hooks-enabled-events", "post-finish",
    )  # fmt: skip
    try:
        with httpx.Client(timeout=60) as client:
            answered = dict(upload(client, url, os.urandom(1024)) for _ in range(count))
        wait(lambda: len(receiver.finished()) >= count, 60)
        return sorted(at - answered[upload_id] for _, upload_id, _, at in receiver.finished())
    finally:
        stop(process)


def crash(work: Path, receiver: Receiver, count: int) -> dict[str, object]:
    flags = ("--data-dir", str(work / "crash"), "--hooks-http", receiver.url, "--hooks-enabled-events",
             "post-finish", "--hooks-http-backoff", "0.2")  # fmt: skip
    receiver.got.clear()
    receiver.down()
    process, url = start_uploadsrv(work / "crash.log", *flags)
    with httpx.Client(timeout=60) as client:
        ids = {upload(client, url, os.urandom(1000 + n))[0] for n in range(count)}
    process.kill()  # SIGKILL: no shutdown code runs
    process.wait()
    receiver.up()
    restarted = time.time()
    process, url = start_uploadsrv(work / "crash.log", *flags)
    try:
        wait(lambda: {hook[1] for hook in receiver.finished()} >= ids, 120)
        time.sleep(6)  # a scan period more, so a late duplicate would be counted too
        finished = receiver.finished()
        delivered = {hook[1] for hook in finished}
        return {
            "uploads": count,
            "lost": len(ids - delivered),
            "duplicates": len(finished) - len(delivered),
            "all delivered after restart (s)": round(max(hook[3] for hook in finished) - restarted, 2),
        }
    finally:
        stop(process)


def throughput(work: Path, receiver: Receiver, size: int, events: str) -> tuple[float, float]:
    """One large tus PATCH: (MB/s, server CPU seconds per GiB)."""
    os.sync()  # the previous run's writeback does not slow this one
    name = events.replace(",", "+")
    process, url = start_uploadsrv(
        work / f"{name}.log", "--data-dir", str(work / name), "--hooks-http", receiver.url,
        "--hooks-enabled-events", events, "--max-size", str(size),
    )  # fmt: skip
    block = os.urandom(1 << 20)

    def body() -> Iterator[bytes]:
        for _ in range(size >> 20):
            yield block

    try:
        with httpx.Client(timeout=600) as client:
            created = client.post(url + "/files/", headers=tus_create_headers(size))
            cpu_before = cpu_seconds(process.pid)
            started = time.perf_counter()
            done = client.patch(
                created.headers["location"],
                content=body(),
                headers={**tus_append_headers(0), "Content-Length": str(size)},
            )
            elapsed = time.perf_counter() - started
            cpu = cpu_seconds(process.pid) - cpu_before
            assert done.status_code == 204, done.text
        return size / elapsed / 1e6, cpu / (size / (1 << 30))
    finally:
        stop(process)
        for path in (work / name).rglob("data"):
            path.unlink()  # a GiB per run is not kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--uploads", type=int, default=20)
    parser.add_argument("--latency-uploads", type=int, default=50)
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only-throughput", action="store_true", help="only the large uploads")
    args = parser.parse_args()
    receiver = Receiver()
    receiver.up()
    with tempfile.TemporaryDirectory(prefix="bench-hooks-") as tmp:
        work = Path(tmp)
        if not args.only_throughput:
            delays = latency(work, receiver, args.latency_uploads)
            print(
                f"post-finish latency after the 204, {len(delays)} uploads: "
                f"median {statistics.median(delays) * 1000:.1f} ms, "
                f"p95 {delays[int(len(delays) * 0.95) - 1] * 1000:.1f} ms, max {delays[-1] * 1000:.1f} ms"
            )
            print("receiver down, SIGKILL, restart:", crash(work, receiver, args.uploads))
        size = int(args.gib * (1 << 30))
        print(f"load average before the large uploads: {os.getloadavg()[0]:.1f}")
        runs: dict[str, list[tuple[float, float]]] = {"post-finish": [], "post-receive,post-finish": []}
        for _ in range(args.rounds):  # taking turns: the machine is shared
            for events, figures in runs.items():
                figures.append(throughput(work, receiver, size, events))
        for events, figures in runs.items():
            label = "with post-receive (every second)" if "post-receive" in events else "without post-receive"
            speeds = ", ".join(f"{speed:.0f}" for speed, _ in figures)
            cpus = ", ".join(f"{cpu:.2f}" for _, cpu in figures)
            print(f"{args.gib} GiB local upload {label}: MB/s {speeds}; server CPU s/GiB {cpus}")
    receiver.down()


if __name__ == "__main__":
    main()
