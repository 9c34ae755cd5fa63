"""The layering is enforced: the import-linter contracts in pyproject.toml hold, a broken one fails
`lint-imports` naming the contract, `import medveil` loads no server code, and `medveil.__all__`
is exactly the documented public API."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import medveil

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
SERVER_MODULES = ["uvicorn", "fastapi", "starlette", "sqlalchemy", "medveil.runtime.hub", "medveil.runtime.servers",
                  "medveil.runtime.node", "torch"]
PURE_CONTRACT = "crypto, privacy, analyses and models never import the runtime, the API, the CLI or the web console"

needs_import_linter = pytest.mark.skipif(LINT_IMPORTS is None, reason="import-linter is in the test extra")


def lint_imports(config: Path, cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT_IMPORTS, "--no-cache", "--no-logo", str(config)], cwd=cwd, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(pythonpath)}, timeout=300)


@needs_import_linter
def test_the_project_keeps_its_import_contracts():
    run = lint_imports(ROOT / "pyproject.toml", ROOT, ROOT / "src")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout and PURE_CONTRACT in " ".join(run.stdout.split())


@needs_import_linter
def test_an_analysis_that_imports_the_node_breaks_the_contract(tmp_path):
    """The same contracts over a copy of the package in which one analysis imports the runtime."""
    shutil.copytree(ROOT / "src" / "medveil", tmp_path / "src" / "medveil",
                    ignore=shutil.ignore_patterns("__pycache__"))
    ping = tmp_path / "src" / "medveil" / "analyses" / "ping.py"
    ping.write_text(ping.read_text() + "\nimport medveil.runtime.node  # noqa: E402\n")
    config = shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")

    run = lint_imports(config, tmp_path, tmp_path / "src")

    output = " ".join(run.stdout.split())
    assert run.returncode == 1, run.stdout + run.stderr
    assert f"{PURE_CONTRACT} BROKEN" in output and "1 broken" in output
    assert "medveil.analyses.ping -> medveil.runtime.node" in output


def test_import_medveil_loads_no_server_code():
    probe = ("import json, sys; import medveil; "
             f"print(json.dumps([name for name in {SERVER_MODULES!r} if name in sys.modules]))")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert run.stdout.strip() == "[]"


def test_every_public_name_exists_and_is_documented():
    assert medveil.__all__ == sorted(medveil.__all__) and len(set(medveil.__all__)) == len(medveil.__all__)
    assert {"connect", "Federation", "FederationError", "RefusedError", "SiteTimeoutError"} <= set(medveil.__all__)
    for name in medveil.__all__:
        value = getattr(medveil, name)
        assert (value.__doc__ or "").strip(), f"medveil.{name} has no docstring"
        assert f"`{name}" in medveil.__doc__, f"medveil.{name} is not described in the package docstring"
    assert issubclass(medveil.RefusedError, medveil.FederationError)
    assert issubclass(medveil.SiteTimeoutError, medveil.FederationError)


def test_star_import_gives_exactly_the_public_names():
    namespace: dict = {}
    exec("from medveil import *", namespace)
    assert sorted(name for name in namespace if name != "__builtins__") == medveil.__all__


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        medveil.no_such_name  # noqa: B018
