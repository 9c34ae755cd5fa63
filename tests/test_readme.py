"""The README's Python example runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.e2e
def test_readme_example_runs(tmp_path):
    pytest.importorskip("lifelines")
    example = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    completed = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Federated GLM (binomial)" in completed.stdout
    assert (tmp_path / "km.png").stat().st_size > 5000
