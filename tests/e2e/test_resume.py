"""A researcher process killed mid-run resumes its task from the checkpoint with the same result.

The hub and nodes run in this test process (loopback HTTP, secure aggregation on); the researcher
is a real subprocess using `mv.connect`, which dies with `os._exit` at a chosen point. This
process then connects with the same identity and runs directory and calls `fed.resume(task)`.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

import medveil as mv
from medveil.analyses.glm_results import GLMResults
from medveil.runtime.config import write_private_key

pytestmark = pytest.mark.e2e

FORMULA = "death ~ age + C(stage) + sex"
KILLED = 17

RESEARCHER = textwrap.dedent('''
    import os, sys
    import medveil as mv

    url, key, study, runs, where = sys.argv[1:]
    fed = mv.connect(url, key, study, runs_dir=runs, timeout=60)
    params = {"formula": "%s", "family": "binomial"}
    if where == "after_round_2":
        def progress(round_no, done):
            if round_no == 1:  # rounds 0 and 1 are done and checkpointed
                os._exit(%d)
        fed.session.run("glm", params, "default", progress=progress)
    else:  # between the compute and the unmask step of round 2
        exchange = fed.session.grid.exchange
        def dying(step, **options):
            if step.phase == "unmask" and step.round == 2:
                os._exit(%d)
            return exchange(step, **options)
        fed.session.grid.exchange = dying
        fed.session.run("glm", params, "default")
    os._exit(0)
''') % (FORMULA, KILLED, KILLED)


def _frame(seed: int, n: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    age = rng.normal(62, 10, n)
    stage = rng.choice(["I", "II", "III", "IV"], n, p=[0.3, 0.35, 0.25, 0.1])
    sex = rng.choice(["f", "m"], n)
    logit = -7 + 0.1 * age + np.select([stage == "III", stage == "IV"], [0.7, 1.5], 0.0) + 0.3 * (sex == "m")
    return pd.DataFrame({"age": age, "stage": stage, "sex": sex,
                         "death": (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)})


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("resume")
    frames = {"site_a": _frame(1, 400), "site_b": _frame(2, 300), "site_c": _frame(3, 250)}
    with mv.Federation.simulate(frames, workdir=workdir / "federation", timeout=60) as fed:
        key = workdir / "researcher.key"
        write_private_key(key, fed.network.researcher.key)
        yield fed, key, workdir


def _kill_researcher(fed, key, runs, where: str) -> None:
    done = subprocess.run([sys.executable, "-c", RESEARCHER, fed.network.hub.url, str(key), fed.study.id,
                           str(runs), where], capture_output=True, text=True, timeout=300)
    assert done.returncode == KILLED, done.stderr


def _assert_same_fit(resumed: GLMResults, uninterrupted: GLMResults) -> None:
    for item in dataclasses.fields(GLMResults):
        if item.name == "provenance":
            continue
        a, b = getattr(resumed, item.name), getattr(uninterrupted, item.name)
        if isinstance(a, pd.Series):
            pd.testing.assert_series_equal(a, b, check_exact=True, obj=item.name)
        elif isinstance(a, pd.DataFrame):
            pd.testing.assert_frame_equal(a, b, check_exact=True, obj=item.name)
        elif isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b, err_msg=item.name)
        elif isinstance(a, float) and np.isnan(a):
            assert np.isnan(b), item.name
        else:
            assert a == b, item.name


@pytest.mark.filterwarnings("ignore:private key .* is not encrypted")
@pytest.mark.parametrize("where", ["after_round_2", "between_compute_and_unmask"])
def test_a_killed_glm_resumes_to_the_uninterrupted_fit(network, where):
    fed, key, workdir = network
    runs = workdir / f"runs-{where}"
    uninterrupted = fed.glm(FORMULA, family="binomial")
    assert uninterrupted.provenance["rounds"] > 3  # the kill falls mid-run
    _kill_researcher(fed, key, runs, where)
    with mv.connect(fed.network.hub.url, key, fed.study.id, runs_dir=runs, timeout=60) as again:
        unfinished = again.runs()
        assert list(unfinished["analysis"]) == ["glm"]
        assert list(unfinished["round"]) == [2]
        task = unfinished["task"].iloc[0]
        resumed = again.resume(task)
        assert again.runs().empty  # the checkpoint is gone once the run finished
    assert isinstance(resumed, GLMResults)
    assert resumed.provenance["task"] == task
    assert resumed.provenance["rounds"] == uninterrupted.provenance["rounds"]
    assert resumed.provenance["rows"] == uninterrupted.provenance["rows"]
    _assert_same_fit(resumed, uninterrupted)
    np.testing.assert_array_equal(resumed.params.to_numpy(), uninterrupted.params.to_numpy())
