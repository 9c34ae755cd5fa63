"""A researcher process killed after round 3 of a federated training resumes to the same final
weights, bit for bit, as an uninterrupted training with the same seed.

As in tests/e2e/test_resume.py: the hub and nodes run in this test process (loopback HTTP,
secure aggregation on); the researcher is a real subprocess using `mv.connect`, which dies with
`os._exit` once round 3 is checkpointed. This process then connects with the same identity and
runs directory and calls `fed.resume(task)`. Minibatches, dropout and a validation hold-out make
every round draw from the seed, so a resume that re-seeded anything differently would differ.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

import medveil as mv
from medveil.analyses.fl import FLResult
from medveil.runtime.config import write_private_key

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.e2e

FEATURES = ["x1", "x2", "x3"]
KILLED = 17
PARAMS = {"model": "mlp", "version": "1", "features": FEATURES, "target": "y", "rounds": 6, "local_epochs": 2,
          "batch_size": 16, "lr": 0.2, "hyper": {"hidden": [8], "dropout": 0.2}, "validation_fraction": 0.2,
          "seed": 13}

RESEARCHER = textwrap.dedent('''
    import json, os, sys
    import medveil as mv

    url, key, study, runs, params = sys.argv[1:]
    fed = mv.connect(url, key, study, runs_dir=runs, timeout=60)
    def progress(round_no, done):
        if round_no == 3:  # rounds 0..3 are done and checkpointed
            os._exit(%d)
    fed.session.run("fl_train", json.loads(params), "default", progress=progress)
    os._exit(0)
''') % KILLED


def _frame(seed: int, n: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(size=(n, len(FEATURES))), columns=FEATURES)
    frame["y"] = (rng.random(n) < 1 / (1 + np.exp(-(frame["x1"] - 0.5 * frame["x2"])))).astype(int)
    return frame


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fl-resume")
    frames = {"site_a": _frame(1, 120), "site_b": _frame(2, 90), "site_c": _frame(3, 150)}
    with mv.Federation.simulate(frames, workdir=workdir / "federation", timeout=60) as fed:
        key = workdir / "researcher.key"
        write_private_key(key, fed.network.researcher.key)
        yield fed, key, workdir


@pytest.mark.filterwarnings("ignore:private key .* is not encrypted")
def test_a_killed_training_resumes_to_the_uninterrupted_weights(network):
    fed, key, workdir = network
    runs = workdir / "runs"
    options = {k: v for k, v in PARAMS.items() if k not in ("model",)}
    uninterrupted = fed.train(PARAMS["model"], **options)
    assert len(uninterrupted.history) == PARAMS["rounds"] + 1
    done = subprocess.run([sys.executable, "-c", RESEARCHER, fed.network.hub.url, str(key), fed.study.id, str(runs),
                           json.dumps(PARAMS)], capture_output=True, text=True, timeout=600)
    assert done.returncode == KILLED, done.stderr
    with mv.connect(fed.network.hub.url, key, fed.study.id, runs_dir=runs, timeout=60) as again:
        unfinished = again.runs()
        assert list(unfinished["analysis"]) == ["fl_train"] and list(unfinished["round"]) == [4]
        task = unfinished["task"].iloc[0]
        resumed = again.resume(task)
        assert again.runs().empty
    assert isinstance(resumed, FLResult) and resumed.provenance["task"] == task
    assert resumed.provenance["rows"] == uninterrupted.provenance["rows"]
    np.testing.assert_array_equal(resumed.weights, uninterrupted.weights)
    pd.testing.assert_frame_equal(resumed.history, uninterrupted.history, check_exact=True)
    pd.testing.assert_frame_equal(resumed.calibration, uninterrupted.calibration, check_exact=True)
