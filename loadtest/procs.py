"""Starting the processes a benchmark measures: a moto S3 endpoint and uploadsrv itself."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up in {timeout}s")


def start_moto(log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=out
        )
    endpoint = f"http://127.0.0.1:{port}"
    wait_until_up(endpoint + "/moto-api/", process)
    return process, endpoint


def start_uploadsrv(log: Path, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, **S3_CREDENTIALS}
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "uploadsrv", "serve", "--port", str(port), *args],
            stdout=out,
            stderr=out,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    wait_until_up(url + "/healthz", process)
    return process, url


@contextmanager
def spawned_server(backend: str, work: Path, *flags: str) -> Iterator[tuple[str, int]]:
    """uploadsrv on local disk or on a fresh moto endpoint; yields its URL and PID."""
    processes: list[subprocess.Popen[bytes]] = []
    work.mkdir(parents=True, exist_ok=True)
    try:
        storage: list[str] = []
        if backend == "s3":
            import boto3  # only here: a disk-only install has no boto3

            moto, endpoint = start_moto(work / "moto.log")
            processes.append(moto)
            boto3.client("s3", endpoint_url=endpoint, **boto3_credentials()).create_bucket(Bucket="loadtest")
            storage = ["--storage", "s3://loadtest/uploads", "--s3-endpoint-url", endpoint]
        server, url = start_uploadsrv(
            work / "uploadsrv.log", "--data-dir", str(work / "data"), *storage, *flags
        )
        processes.append(server)
        yield url, server.pid
    finally:
        for process in reversed(processes):
            process.kill()
            process.wait()


def boto3_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": S3_CREDENTIALS["AWS_DEFAULT_REGION"],
    }


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process has used so far, all its threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it (a server's workers), as /proc lists them now."""
    tree = [pid]
    for parent in tree:  # grows as children are found
        with contextlib.suppress(FileNotFoundError):  # a thread or process that just ended
            for task in Path(f"/proc/{parent}/task").iterdir():
                tree += [int(child) for child in (task / "children").read_text().split()]
    return tree
