"""What `pip install uploadsrv` installs, what it needs, and how it fails when it lacks something."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import httpx
import pytest

from uploadsrv.cli import TESTED_UVICORN

from .conftest import TUS, free_port, sha256, spawn

ROOT = Path(__file__).parent.parent
#: Run the CLI in a process that cannot import boto3, as on a disk-only install.
WITHOUT_BOTO3 = (
    "import sys; sys.modules['boto3'] = sys.modules['botocore'] = None; "
    "from uploadsrv.cli import main; sys.exit(main())"
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[zipfile.ZipFile, str]:
    """The wheel pip builds from this checkout, and the build's output."""
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (path,) = out.glob("uploadsrv-*.whl")
    return zipfile.ZipFile(path), build.stdout + build.stderr


def _metadata(wheel: zipfile.ZipFile) -> list[str]:
    (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    return wheel.read(name).decode().splitlines()


def test_the_wheel_installs_only_the_uploadsrv_package(wheel):
    archive, _ = wheel
    top_level = {name.split("/")[0] for name in archive.namelist()}
    assert top_level == {"uploadsrv", "uploadsrv-0.1.0.dist-info"}
    names = set(archive.namelist())
    assert {"uploadsrv/storage/local.py", "uploadsrv/loadtest/__main__.py"} <= names


def test_the_wheel_carries_an_spdx_license_and_its_text(wheel):
    archive, output = wheel
    assert "License-Expression: MIT" in _metadata(archive)
    assert "uploadsrv-0.1.0.dist-info/licenses/LICENSE" in archive.namelist()
    assert "SetuptoolsDeprecationWarning" not in output


def test_boto3_and_redis_are_extras_and_uvicorn_brings_no_extras(wheel):
    archive, _ = wheel
    requires = [line.split(": ", 1)[1] for line in _metadata(archive) if line.startswith("Requires-Dist")]
    boto3 = [r for r in requires if r.startswith("boto3")]
    assert boto3 and all('extra == "s3"' in r for r in boto3)
    redis = [r for r in requires if r.startswith("redis")]
    assert redis and all('extra == "redis"' in r for r in redis)
    assert not [r for r in requires if r.startswith("uvicorn[")]


def test_the_uvicorn_pin_is_the_tested_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (pin,) = [d for d in project["dependencies"] if d.startswith("uvicorn")]
    major, last = TESTED_UVICORN[-1].split(".")
    assert pin == f"uvicorn>={TESTED_UVICORN[0]},<{major}.{int(last) + 1}"


def test_an_untested_uvicorn_stops_serve_with_one_line():
    code = (
        "import sys, uvicorn; uvicorn.__version__ = '0.99.1'; "
        "from uploadsrv.cli import main; sys.exit(main(['serve', '--port', '1']))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "uvicorn 0.99.1 is untested" in result.stderr and "0.54.x" in result.stderr


def test_s3_storage_without_boto3_fails_in_one_line(tmp_path):
    for command in (["serve"], ["list"]):
        args = [*command, "--data-dir", str(tmp_path), "--storage", "s3://bucket/uploads"]
        result = subprocess.run(
            [sys.executable, "-c", WITHOUT_BOTO3, *args], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 1, result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        assert "needs boto3: pip install 'uploadsrv[s3]'" in result.stderr


def test_local_disk_serves_without_boto3(tmp_path):
    port = free_port()
    command = [sys.executable, "-c", WITHOUT_BOTO3, "serve", "--port", str(port)]
    command += ["--data-dir", str(tmp_path / "data")]
    url = f"http://127.0.0.1:{port}"
    server = spawn(command, tmp_path / "server.log", url + "/healthz")
    try:
        created = httpx.post(
            url + "/files/",
            content=b"hello",
            headers={**TUS, "Upload-Length": "5", "Content-Type": "application/offset+octet-stream"},
        )
        assert created.status_code == 201
        assert sha256(httpx.get(created.headers["location"]).content) == sha256(b"hello")
    finally:
        server.terminate()
        server.wait(30)


def test_the_loadtest_runs_as_a_subcommand_and_as_a_module():
    for command in (["-m", "uploadsrv", "loadtest"], ["-m", "uploadsrv.loadtest"]):
        result = subprocess.run(
            [sys.executable, *command, "--help"], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert "--spawn" in result.stdout
