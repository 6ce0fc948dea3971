from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port
from uploadsrv import __version__
from uploadsrv.config import Settings, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [("1024", 1024), ("512M", 512 << 20), ("16G", 16 << 30), ("2TiB", 2 << 40), ("1k", 1024)],
)
def test_sizes_use_binary_units(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("30m", 1800), ("12h", 43200), ("7d", 604800), ("never", None)]
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten", "5 parsecs", "-1G"])
def test_bad_values_are_rejected(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_environment_and_flags_combine_and_round_trip():
    settings = Settings.from_env({"UPLOADSRV_MAX_SIZE": "1G", "UPLOADSRV_EXPIRY": "never"}, port=9999)
    assert (settings.max_size, settings.expiry, settings.port) == (1 << 30, None, 9999)
    assert Settings.from_env(settings.to_env()) == settings


def test_defaults_are_safe():
    settings = Settings()
    assert settings.host == "127.0.0.1"
    assert settings.expiry is not None and settings.max_size > 0


@pytest.mark.parametrize("text", ["true", "1", "yes", "TRUE", "Yes"])
def test_booleans_say_true_in_three_ways(text):
    assert Settings.parse("trust_proxy", text) is True


@pytest.mark.parametrize("text", ["false", "0", "no", "False"])
def test_booleans_say_false_in_three_ways(text):
    assert Settings.parse("trust_proxy", text) is False


@pytest.mark.parametrize("text", ["ture", "on", "off", "", "2", "y"])
def test_anything_else_is_not_a_boolean(text):
    with pytest.raises(ValueError, match="not a boolean"):
        Settings.parse("trust_proxy", text)


# -- the console script, as an operator runs it ------------------------------------

SCRIPT = str(Path(sys.executable).parent / "uploadsrv")


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("UPLOADSRV_")}
    return subprocess.run([SCRIPT, *args], env={**clean, **env}, capture_output=True, text=True, timeout=60)


def one_line_error(result: subprocess.CompletedProcess[str], status: int = 2) -> str:
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("flag", "value", "accepts"),
    [
        ("--max-size", "10X", "'10X' is not a size; use e.g. 512M or 16G"),
        ("--port", "abc", "use 1 to 65535"),
        ("--port", "70000", "use 1 to 65535"),
        ("--trust-proxy", "ture", "use true or false"),
        ("--log-level", "verbose", "debug, info, warning, error"),
        ("--http", "h3", "httptools, h11"),
        ("--expiry", "soon", "use e.g. 90s, 30m, 12h or 7d"),
        ("--lock-timeout", "inf", "use e.g. 90s"),
        ("--workers", "0", "use 1 to 1024"),
        ("--s3-part-size", "1M", "5M or more"),
        ("--storage", "ftp://x", "s3://bucket/prefix"),
        ("--s3-endpoint-url", "minio:9000", "e.g. https://"),
    ],
)
def test_a_bad_flag_is_one_line_naming_it_and_what_it_accepts(tmp_path, flag, value, accepts):
    line = one_line_error(run("serve", "--data-dir", str(tmp_path), flag, value))
    assert f"{flag}: " in line and accepts in line


@pytest.mark.parametrize(
    ("command", "variable", "value"),
    [
        ("serve", "UPLOADSRV_MAX_SIZE", "10X"),
        ("list", "UPLOADSRV_PORT", "abc"),
        ("stats", "UPLOADSRV_S3_PATH_STYLE", "maybe"),
        ("serve", "UPLOADSRV_LOG_LEVEL", "verbose"),
    ],
)
def test_a_bad_environment_value_is_one_line_naming_the_variable(tmp_path, command, variable, value):
    line = one_line_error(run(command, "--data-dir", str(tmp_path), **{variable: value}))
    assert f"{variable}: {value!r}" in line


def test_an_unknown_flag_is_one_line(tmp_path):
    assert "--bogus" in one_line_error(run("serve", "--bogus"))


def test_a_data_directory_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    line = one_line_error(run("serve", "--data-dir", str(tmp_path / "file" / "data")))
    assert line.startswith("uploadsrv serve: --data-dir: cannot create")


def test_an_unreachable_s3_endpoint_at_start_up_is_one_line(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    result = run(
        "serve",
        *("--data-dir", str(tmp_path), "--storage", "s3://uploads/x", "--s3-endpoint-url", dead),
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        AWS_DEFAULT_REGION="us-east-1",
    )
    line = one_line_error(result, status=1)
    assert "'uploads' is not usable" in line and dead in line


def test_an_unreachable_redis_at_start_up_is_one_line(tmp_path):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    line = one_line_error(run("serve", "--data-dir", str(tmp_path), "--redis-url", dead), status=1)
    assert line.startswith(f"uploadsrv serve: --redis-url {dead}: Redis unreachable")


def test_version():
    result = run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"uploadsrv {__version__}"


def test_max_connections_are_lowered_to_fit_the_open_file_limit(tmp_path):
    """With `ulimit -n 1000` (soft and hard) 4,096 connections cannot be served: the
    server says so in one line and serves (2 descriptors a connection, 256 spare) 372."""
    with socket.socket() as taken:  # the server then stops right after its settings
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = subprocess.run(
            [SCRIPT, "serve", "--data-dir", str(tmp_path), "--port", str(taken.getsockname()[1])],
            env={k: v for k, v in os.environ.items() if not k.startswith("UPLOADSRV_")},
            capture_output=True,
            text=True,
            timeout=60,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1000, 1000)),
        )
    first = result.stderr.splitlines()[0]
    assert (
        first
        == "uploadsrv serve: --max-connections lowered to 372 to fit the open-file limit of 1000 (ulimit -n)"
    )
