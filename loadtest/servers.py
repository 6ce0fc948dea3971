"""The servers one benchmark run measures side by side, each on its own port and data
directory: the bare sink (and the same sink behind uvicorn, and one that stores nothing),
the peers `@tus/server` and `tuspyserver`, and uploadsrv."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .procs import cpu_seconds, free_port, peak_rss_mb, process_tree

PEERS_DIR = Path(__file__).parent / "peers"
STARTUP_SECONDS = 60

ANSWERS_ONLY = "answers only"
SINK = "sink"
SINK_ASGI = "sink (uvicorn)"
TUS_NODE = "@tus/server"
TUSPY = "tuspyserver"
UPLOADSRV = "uploadsrv"
#: uploadsrv as a two-core machine would run it: two worker processes on one data directory
#: (its locks and records hold across processes; the peers' in-memory locks would not)
UPLOADSRV_WORKERS = "uploadsrv (2 workers)"
COMPARED = "uploadsrv (compared)"  #: uploadsrv from another checkout's interpreter (`--compare`)
ALL = (ANSWERS_ONLY, SINK, SINK_ASGI, TUS_NODE, TUSPY, UPLOADSRV, UPLOADSRV_WORKERS)
PEERS = (TUS_NODE, TUSPY)
OURS = (UPLOADSRV, UPLOADSRV_WORKERS, COMPARED)  #: whose uploads the bench downloads and verifies


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    url: str
    data: Path  #: its data directory, emptied between runs (uploadsrv's through its API)

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu(self) -> float:
        """CPU seconds so far, of the server's workers too (a worker that exited is not counted)."""
        return sum(cpu_seconds(pid) for pid in process_tree(self.pid))

    def peak_rss_mb(self) -> float:
        """The peak resident sets of the server's processes since `reset_peak_rss`, added up."""
        return sum(peak_rss_mb(pid) for pid in process_tree(self.pid))

    def reset_peak_rss(self) -> None:
        """Start VmHWM afresh, so each measurement reports its own peak."""
        for pid in process_tree(self.pid):
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")

    def clear(self) -> None:
        for entry in os.scandir(self.data):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)

    def stop(self) -> None:
        """Kill the server and its workers (they outlive a killed supervisor), and return
        once every one of them has ended."""
        ending = []
        for pid in process_tree(self.pid):
            with contextlib.suppress(ProcessLookupError):  # one that ended meanwhile
                ending.append(os.pidfd_open(pid))  # names this process, even if its pid is reused
                signal.pidfd_send_signal(ending[-1], signal.SIGKILL)
        self.process.wait()
        for pidfd in ending:  # readable once its process has ended
            select.select([pidfd], [], [], STARTUP_SECONDS)
            os.close(pidfd)


def start(name: str, work: Path, log: Path, python: str = sys.executable) -> Server | str:
    """Start server `name` (uploadsrv with `python`); a string says why it cannot run here."""
    data = work / "".join(c if c.isalnum() else "_" for c in name)
    data.mkdir(parents=True)
    port = free_port()
    command = _command(name, port, data, python)
    if isinstance(command, str):
        return command
    env = {**os.environ, "TUSPY_DIR": str(data)}
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=out, env=env, cwd=PEERS_DIR)
    _wait_for_port(port, process, log)
    return Server(name, process, f"http://127.0.0.1:{port}", data)


def _command(name: str, port: int, data: Path, interpreter: str) -> list[str] | str:
    if name in (ANSWERS_ONLY, SINK, SINK_ASGI):
        return _sink_command(name, port, data)
    if name in OURS:
        command = [interpreter, "-m", "uploadsrv", "serve", "--port", str(port), "--data-dir", str(data)]
        return command + (["--workers", "2"] if name == UPLOADSRV_WORKERS else [])
    if name == TUSPY:
        return _tuspy_command(port)
    if name == TUS_NODE:
        return _tus_node_command(port, data)
    raise ValueError(f"unknown server {name!r}; known: {', '.join(ALL)}")


def _sink_command(name: str, port: int, data: Path) -> list[str]:
    command = [sys.executable, "-m", "uploadsrv.loadtest.sink", "--port", str(port)]
    if name != ANSWERS_ONLY:
        command += ["--dir", str(data)]
    return command + (["--asgi"] if name == SINK_ASGI else [])


def _tuspy_command(port: int) -> list[str] | str:
    if importlib.util.find_spec("tuspyserver") is None:
        return "tuspyserver is not installed (pip install -e '.[bench]')"
    uvicorn = [sys.executable, "-m", "uvicorn", "tuspy_app:app", "--port", str(port), "--http", "httptools"]
    return [*uvicorn, "--loop", "uvloop", "--no-access-log", "--log-level", "warning"]


def _tus_node_command(port: int, data: Path) -> list[str] | str:
    """The node peer, its packages installed on first use."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "node and npm are not on the PATH"
    if not (PEERS_DIR / "node_modules" / "@tus" / "file-store").is_dir():
        install = ["npm", "ci", "--no-audit", "--no-fund", "--loglevel", "error"]
        subprocess.run(install, cwd=PEERS_DIR, check=True, timeout=600)
    return ["node", str(PEERS_DIR / "tus_node.mjs"), str(port), str(data)]


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}; see {log}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open in {STARTUP_SECONDS}s; see {log}")
