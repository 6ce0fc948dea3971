"""The arrows point one way: protocols -> core -> storage contract <- backends."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: What a backend may import of the core: its vocabulary, never the service.
CORE_VOCABULARY = {f"uploadsrv.core{m}" for m in ("", ".model", ".errors", ".storage")}
#: What the core must never import.
OUTWARD = ("uploadsrv.storage", "uploadsrv.protocols", "uploadsrv.app", "uploadsrv.backend", "starlette")
#: What importing a backend must not load.
ABOVE_STORAGE = ("uploadsrv.core.service", "uploadsrv.protocols", "uploadsrv.app")


def imported_modules(folder: pathlib.Path, package: str) -> dict[str, set[str]]:
    """For each module file under `folder` (installed as `package`), the modules it imports."""
    found = {}
    for path in folder.rglob("*.py"):
        here = ".".join([package, *path.relative_to(folder).parts[:-1]])  # where relative imports start
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level:
                base = here.rsplit(".", node.level - 1)[0]
                names.add(f"{base}.{node.module}" if node.module else base)
            elif isinstance(node, ast.ImportFrom):
                names.add(str(node.module))
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize("backend", ["uploadsrv.storage.local", "uploadsrv.storage.s3"])
def test_importing_a_backend_does_not_load_the_service(backend: str) -> None:
    probe = f"import sys, {backend}\nprint([m for m in sys.modules if m.startswith({ABOVE_STORAGE!r})])"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_core_imports_no_backend_and_no_protocol() -> None:
    for path, names in imported_modules(ROOT / "uploadsrv" / "core", "uploadsrv.core").items():
        outward = {name for name in names if name.startswith(OUTWARD)}
        assert not outward, f"{path} imports {outward}"


def test_backends_import_only_the_core_vocabulary() -> None:
    for path, names in imported_modules(ROOT / "storage", "uploadsrv.storage").items():
        ours = {n for n in names if n.startswith("uploadsrv") and not n.startswith("uploadsrv.storage")}
        assert ours <= CORE_VOCABULARY, f"{path} imports {ours - CORE_VOCABULARY}"
