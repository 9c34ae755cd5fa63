"""Every benchmark script still runs (at a tiny size); timings are never asserted."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize(("script", "args"), [
    ("round_latency.py", ["--rounds", "3"]),
    ("transfer.py", ["--mb", "0.5", "--repeats", "1"]),
    ("secure_aggregation.py", ["--sites", "3", "--values", "1000", "--repeats", "1"]),
    ("glm.py", ["--rows", "3000", "--covariates", "3"]),
    ("cox.py", ["--rows", "3000", "--covariates", "3"]),
    ("gwas.py", ["--samples", "300", "--snps", "200"]),
    ("gwas.py", ["--samples", "300", "--snps", "200", "--test", "logistic"]),
    ("gwas.py", ["--samples", "300", "--snps", "200", "--test", "logistic-score"]),
    ("pca.py", ["--samples", "300", "--snps", "500"]),
    ("gwas_memory.py", ["--samples", "200", "--snps", "300", "--batch-size", "100"]),
    ("psi.py", ["--sizes", "8"]),
    ("vertical.py", ["--rows", "3000", "--label", "3", "--features", "3"]),
    ("paillier.py", ["--rows", "2000", "--label-columns", "3", "--feature-columns", "3", "--samples", "4"]),
    pytest.param("fl.py", ["--sites", "3", "--rows", "200", "--features", "5", "--hidden", "16", "--rounds", "2",
                           "--no-flower"],
                 marks=pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                          reason="the FL benchmark needs torch (the ml extra)")),
    ("pir.py", ["--records", "5000", "--keyword-cols", "64", "--repeats", "1"]),
])
def test_benchmark_runs(script, args):
    completed = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.strip()
