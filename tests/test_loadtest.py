"""The load test: its report maths, a small real run, and a server that corrupts bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from uploadsrv.loadtest import servers
from uploadsrv.loadtest.procs import peak_rss_mb, process_tree
from uploadsrv.loadtest.report import Report, percentile

from .conftest import Server, free_port, spawn


def test_percentiles_use_the_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.50) == 50
    assert percentile(values, 0.95) == 95
    assert percentile(values, 0.99) == 99
    assert percentile([7.0], 0.99) == 7
    assert percentile([], 0.5) == 0
    assert percentile([3.0, 1.0, 2.0, 4.0], 0.5) == 2


def test_the_s3_bench_counts_moto_requests_by_kind(tmp_path):
    from uploadsrv.loadtest.bench_s3 import requests_since

    log = tmp_path / "moto.log"
    before = '127.0.0.1 - - [02/Dec/2026 00:55:08] "PUT /b HTTP/1.1" 200 -\n'
    lines = [
        '"POST /b/u/abc?uploads HTTP/1.1" 200',
        '"PUT /b/u/abc?uploadId=X&partNumber=1 HTTP/1.1" 200',
        '"PUT /b/u/abc?uploadId=X&partNumber=2 HTTP/1.1" 200',
        '"GET /b/u/abc?uploadId=X&part-number-marker=1 HTTP/1.1" 200',
        '"POST /b/u/abc?uploadId=X HTTP/1.1" 200',
        '"PUT /b/u/abc.info HTTP/1.1" 200',
        '"GET /b/u/abc.info HTTP/1.1" 200',
        '"PUT /b/u/abc.lock HTTP/1.1" 200',
        '"\x1b[35m\x1b[1mDELETE /b/u/abc.lock HTTP/1.1\x1b[0m" 204',  # coloured: not a 200
        '"PUT /b/u/abc.tail-1f2e HTTP/1.1" 200',
        '"PUT /b/u/_preempt/abc HTTP/1.1" 200',
        '"PUT /b/u/_heartbeats/0123abcd HTTP/1.1" 200',
        '"PUT /b/other HTTP/1.1" 200',
        '"GET /b?list-type=2&prefix=u/_preempt/&encoding-type=url HTTP/1.1" 200',
    ]
    log.write_text(before + "".join(f"127.0.0.1 - - [x] {line} -\n" for line in lines))
    assert requests_since(log, len(before)) == {
        "create": 1,
        "part": 2,
        "list-parts": 1,
        "complete": 1,
        "PUT info": 1,
        "GET info": 1,
        "PUT lock": 1,
        "DELETE lock": 1,
        "PUT tail": 1,
        "PUT marker": 1,
        "PUT heartbeat": 1,
        "PUT object": 1,
        "listing": 1,
    }


def test_the_report_fails_on_a_single_corrupted_or_lost_upload():
    report = Report(started=10.0, finished=12.0, uploads=3, verified=3, bytes_sent=4_000_000)
    assert report.ok
    figures = report.to_json()
    assert figures["mb_per_s"] == 2.0 and figures["uploads_per_s"] == 1.5
    assert not Report(uploads=3, verified=2, corrupted=1).ok
    assert not Report(uploads=3, verified=2, failed=1).ok
    assert not Report(uploads=3, verified=2).ok  # one upload unaccounted for


def test_latencies_are_reported_per_request_type():
    report = Report(started=0, finished=1)
    for ms in (10, 20, 30, 40):
        report.record("append", ms / 1000)
    report.record("head", 0.005)
    latency = report.to_json()["latency_ms"]
    assert latency["append"] == {"count": 4, "p50": 20.0, "p95": 40.0, "p99": 40.0}
    assert latency["head"]["count"] == 1


def run_loadtest(url: str, tmp_path: Path, *extra: str) -> tuple[int, dict]:
    out = tmp_path / "report.json"
    command = [sys.executable, "-m", "uploadsrv.loadtest", "--url", url, "--json", str(out), *extra]
    command += ["--clients", "3", "--uploads", "2", "--min-size", "100K", "--max-size", "1500K"]
    command += ["--chunk-size", "512K", "--pause-seconds", "0.05"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    return result.returncode, json.loads(out.read_text())


def test_a_small_interrupted_load_test_verifies_every_upload(server: Server, tmp_path):
    code, report = run_loadtest(
        server.files,
        tmp_path,
        "--interrupt",
        "0.5",
        "--pause",
        "0.3",
        "--server-pid",
        str(server.process.pid),
    )
    assert code == 0, report
    assert report["ok"] and report["uploads"] == report["verified"] == 6
    assert report["corrupted"] == report["failed"] == 0
    assert report["resumes"] > 0
    assert set(report["latency_ms"]) >= {
        "create",
        "append",
        "head",
        "download",
        "chunk",
        "status",
        "complete",
    }
    assert report["mb_per_s"] > 0 and report["server_peak_rss_mb"] > 0


def test_the_chunk_api_load_resends_cut_chunks_and_verifies_every_upload(server: Server, tmp_path):
    code, report = run_loadtest(server.files, tmp_path, "--protocols", "chunks", "--interrupt", "0.5")
    assert code == 0, report
    assert report["uploads"] == report["verified"] == 6 and report["resumes"] > 0
    assert set(report["latency_ms"]) == {"create", "chunk", "status", "complete", "download"}


def test_a_server_that_corrupts_bytes_fails_the_load_test(tmp_path):
    port = free_port()
    env = {**os.environ, "UPLOADSRV_DATA_DIR": str(tmp_path / "data")}
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "tests.corrupting_app:create",
        "--factory",
        "--port",
        str(port),
    ]
    process = spawn(command, tmp_path / "corrupting.log", f"http://127.0.0.1:{port}/healthz", env)
    try:
        code, report = run_loadtest(f"http://127.0.0.1:{port}/files/", tmp_path, "--interrupt", "0")
    finally:
        process.kill()
        process.wait()
    assert code == 1
    assert not report["ok"] and report["corrupted"] == 6


def test_the_benchmark_runs_every_server_and_verifies_uploadsrv(tmp_path):
    """The benchmark harness on tiny sizes, so it cannot rot: every scenario measured on
    every server (uploadsrv's uploads verified by sha256 inside), figures in the JSON."""
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "uploadsrv.loadtest.bench", "--json", str(out), "--no-s3"]
    everyone = {"answers only", "sink", "sink (uvicorn)", "@tus/server", "uploadsrv", "uploadsrv (2 workers)"}
    command += ["--servers", ",".join(sorted(everyone)), "--rounds", "1"]
    # 16M: the chunk API row's upload (two 8 MiB chunks) has the single upload's size, and
    # each is verified against its own content
    command += ["--single", "16M", "--sequential", "3", "--sequential-size", "100K", "--streams", "3"]
    command += ["--stream-size", "300K", "--small", "20", "--connections", "3", "--drop-caches"]  # CI is root
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    by_name = {s["name"]: s["figures"] for s in report["scenarios"]}
    assert len(by_name) == 8
    for name, figures in list(by_name.items())[:5]:
        assert set(figures) == everyone, name
        assert all(f["rate"] > 0 and f["server_cpu"] >= 0 and f["rss_mb"] > 0 for f in figures.values())
    for name, figures in list(by_name.items())[5:]:  # uploadsrv only, beside the sink's single upload
        assert set(figures) == {"sink", "uploadsrv"}, name
    assert "vs sink" in result.stdout and "2 workers vs best peer" in result.stdout


def test_the_benchmark_runs_only_the_scenarios_named(tmp_path):
    """`--only` for an A/B of one row: the others are not run, and an unknown name is refused."""
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "uploadsrv.loadtest.bench", "--json", str(out), "--no-s3"]
    command += ["--servers", "sink,uploadsrv", "--rounds", "1", "--single", "1M", "--streams", "2"]
    command += ["--stream-size", "100K", "--only", "streams,single"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    scenarios = json.loads(out.read_text())["scenarios"]
    assert [s["name"] for s in scenarios] == ["1048576 B in one PATCH", "2 concurrent 100 KiB PATCHes"]
    assert all(set(s["figures"]) == {"sink", "uploadsrv"} for s in scenarios)
    refused = subprocess.run([*command[:3], "--only", "streams,nope"], capture_output=True, text=True)
    assert refused.returncode == 2 and "no scenario nope" in refused.stderr


def test_warming_writes_the_bytes_and_leaves_no_file(tmp_path):
    """The warm-up before a measurement writes what it is asked to (counted by the kernel
    in /proc/self/io, so a warm-up that wrote nothing fails) and deletes its file."""
    import argparse

    from uploadsrv.loadtest.bench import Bench

    def written() -> int:
        fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
        return int(fields["wchar"])

    before = written()
    Bench(argparse.Namespace(), tmp_path).warm(5 << 20)
    assert written() - before >= 5 << 20
    assert list(tmp_path.iterdir()) == []


def test_a_server_is_its_worker_processes_too(tmp_path):
    """The 2-worker uploadsrv row is a supervisor and its workers: their CPU and memory are
    found through /proc, grandchildren included, and stopping it stops them all (workers
    outlive a killed supervisor)."""
    grandchild = "import time; print('ready', flush=True); time.sleep(60)"
    child = "import subprocess, sys, time; "
    child += f"subprocess.Popen([sys.executable, '-c', {grandchild!r}]); time.sleep(60)"
    process = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE)
    server = servers.Server("tree", process, "http://127.0.0.1:9", tmp_path)
    try:
        assert process.stdout is not None and process.stdout.readline() == b"ready\n"  # it runs
        tree = process_tree(process.pid)
        assert tree[0] == process.pid and len(tree) == 2
        assert b"ready" in Path(f"/proc/{tree[1]}/cmdline").read_bytes()
        assert server.peak_rss_mb() > peak_rss_mb(process.pid)
    finally:
        server.stop()
    assert _ended(tree[1])


def _ended(pid: int) -> bool:
    """Gone, or a zombie waiting for init to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_the_instruction_count_stores_every_upload_it_measures(tmp_path):
    """The in-process run it measures stores each upload whole; under valgrind it reports
    instructions per upload (a figure the benchmark's CPU times cannot give on a busy machine)."""
    data = tmp_path / "data"
    module = [sys.executable, "-m", "uploadsrv.loadtest.instructions"]
    stored = subprocess.run([*module, "--run", "one", "40", str(data)], capture_output=True, text=True)
    assert stored.returncode == 0, stored.stderr[-2000:]
    files = list((data / "files").iterdir())
    assert len(files) == 40 and all(f.stat().st_size == 1024 for f in files)
    command = [*module, "one", "--uploads", "20"]
    measured = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert measured.returncode == 0, measured.stderr[-2000:]
    count = int(measured.stdout.split(": ")[1].split()[0].replace(",", ""))
    assert 10_000 < count < 100_000_000, measured.stdout
    # metrics and the "upload completed" line, turned off by their settings, cost ~15% of
    # an upload: counts are steady to a few hundred instructions, so the drop shows
    leaner = subprocess.run(
        [*command, "--without", "metrics,log"], capture_output=True, text=True, timeout=900
    )
    assert leaner.returncode == 0, leaner.stderr[-2000:]
    assert leaner.stdout.startswith("one without metrics, log: "), leaner.stdout
    assert count - int(leaner.stdout.split(": ")[1].split()[0].replace(",", "")) > 50_000, leaner.stdout
