"""Every analysis' global state survives the wire encoding a checkpoint uses, and a run that
continues from the decoded state after every round ends with exactly the uninterrupted result.

The rounds are driven here by a small loop over SiteContexts (no nodes, no transport): each site
checks the broadcast and runs its LOCAL step as its node would, sums are added up, and the
GLOBAL step's NextRound.state goes through pack_body/unpack_body before the next round."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pandas as pd
import pytest

from medveil.analyses.base import Aggregated, Finished, SiteContext, get_analysis, registered_names
from medveil.data.genotypes import GenotypeFile
from medveil.privacy.disclosure import DisclosurePolicy
from medveil.runtime.wire import pack_body, unpack_body

bed_reader = pytest.importorskip("bed_reader")

POLICY = DisclosurePolicy(differencing_guard=False)
PARAMS = {
    "describe": {"variables": ["age", "bmi"]},
    "crosstab": {"row": "stage", "col": "sex"},
    "histogram": {"variable": "age", "edges": [30, 50, 60, 70, 90]},
    "glm": {"formula": "death ~ age + C(stage) + sex", "family": "binomial"},
    "coxph": {"duration": "time", "event": "event", "covariates": ["age", "bmi"]},
    "kaplan_meier": {"duration": "time", "event": "event", "by": "sex"},
    "logrank": {"duration": "time", "event": "event", "by": "sex"},
    "gwas": {"genotypes": "geno", "iid": "IID", "phenotype": "case", "test": "logistic", "covariates": ["age"],
             "batch_size": 50},
    "gwas-linear": {"genotypes": "geno", "iid": "IID", "phenotype": "bmi", "test": "linear", "batch_size": 70},
    "pca": {"genotypes": "geno", "iid": "IID", "components": 2},
    "ping": {},
}


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> dict[str, tuple[pd.DataFrame, GenotypeFile]]:
    directory = tmp_path_factory.mktemp("genotypes")
    rng = np.random.default_rng(23)
    sites = {}
    for site, n in (("site_a", 240), ("site_b", 180), ("site_c", 150)):
        age = rng.normal(60, 9, n)
        stage = rng.choice(["I", "II", "III"], n, p=[0.4, 0.35, 0.25])
        iid = np.array([f"{site}-{i}" for i in range(n)])
        frame = pd.DataFrame({
            "IID": iid, "age": age, "bmi": rng.normal(26, 4, n), "stage": stage, "sex": rng.choice(["f", "m"], n),
            "death": (rng.random(n) < 1 / (1 + np.exp(6 - 0.09 * age))).astype(int),
            "time": np.ceil(rng.exponential(900, n)), "event": (rng.random(n) < 0.6).astype(int),
            "case": rng.integers(0, 2, n)})
        m = 120
        dosages = rng.binomial(2, rng.uniform(0.1, 0.5, m), (n, m)).astype(np.float32)
        props = dict(iid=iid, fid=iid, sid=[f"rs{j}" for j in range(m)], chromosome=np.repeat(["1"], m),
                     bp_position=np.arange(m) * 100 + 1000, allele_1=["A"] * m, allele_2=["G"] * m)
        bed_reader.to_bed(directory / f"{site}.bed", dosages, properties=props)
        sites[site] = (frame, GenotypeFile("geno", directory / f"{site}.bed"))
    return sites


def _structurally_equal(before: Any, after: Any, where: str = "state") -> None:
    """What a checkpoint gives back equals what went in (tuples come back as lists, nothing else changes)."""
    if isinstance(before, np.ndarray):
        assert isinstance(after, np.ndarray) and after.dtype == before.dtype, where
        np.testing.assert_array_equal(after, before, err_msg=where)
    elif isinstance(before, dict):
        assert isinstance(after, dict) and list(after) == list(before), where
        for key in before:
            _structurally_equal(before[key], after[key], f"{where}[{key!r}]")
    elif isinstance(before, (list, tuple)):
        assert isinstance(after, list) and len(after) == len(before), where
        for i, (x, y) in enumerate(zip(before, after)):
            _structurally_equal(x, y, f"{where}[{i}]")
    elif isinstance(before, float) and math.isnan(before):
        assert isinstance(after, float) and math.isnan(after), where
    else:
        assert type(after) is type(before) and after == before, where


def _run(name: str, sites: dict[str, tuple[pd.DataFrame, GenotypeFile]], checkpoint: bool) -> tuple[Any, int]:
    """The analysis' result over the sites, and how many rounds it took."""
    analysis = get_analysis(name.split("-")[0])
    params = analysis.parse_params(PARAMS[name])
    memory = {site: {"released": {}} for site in sites}
    scratch: dict[str, dict[str, Any]] = {site: {} for site in sites}
    broadcast: dict[str, Any] = {}
    state: dict[str, Any] = {}
    for round_no in range(200):
        sums: dict[str, np.ndarray] = {}
        public = {}
        for site, (frame, genotypes) in sites.items():
            analysis.check_broadcast(params, round_no, broadcast, memory[site])
            context = SiteContext(site, frame, POLICY, scratch[site], memory[site], genotypes=genotypes)
            release = analysis.local(params, round_no, broadcast, context)
            memory[site]["released"][round_no] = release.public
            public[site] = release.public
            for key, value in release.sums.items():
                sums[key] = sums[key] + value if key in sums else np.asarray(value)
        step = analysis.global_step(params, round_no, Aggregated(sums, public), state)
        if isinstance(step, Finished):
            return step.result, round_no + 1
        state = step.state
        if checkpoint:
            decoded = unpack_body(pack_body(state))
            _structurally_equal(state, decoded)
            state = decoded
        broadcast = step.broadcast
    raise AssertionError(f"{name} did not finish")


def _same(a: Any, b: Any, where: str) -> None:
    assert type(a) is type(b), where
    if isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=where)
        _same(dict(a.attrs), dict(b.attrs), f"{where}.attrs")
    elif isinstance(a, pd.Series):
        pd.testing.assert_series_equal(a, b, check_exact=True, obj=where)
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif dataclasses.is_dataclass(a):
        for item in dataclasses.fields(a):
            _same(getattr(a, item.name), getattr(b, item.name), f"{where}.{item.name}")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def test_every_registered_analysis_is_covered():
    builtin = {"coxph", "crosstab", "describe", "glm", "gwas", "histogram", "kaplan_meier", "logrank", "pca", "ping"}
    assert builtin <= set(registered_names())
    assert {name.split("-")[0] for name in PARAMS} == builtin


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_a_run_continuing_from_decoded_state_equals_the_uninterrupted_run(sites, name):
    checkpointed, rounds = _run(name, sites, checkpoint=True)
    uninterrupted, same_rounds = _run(name, sites, checkpoint=False)
    assert rounds == same_rounds
    _same(checkpointed, uninterrupted, name)
    if name in ("glm", "coxph", "gwas", "gwas-linear", "pca"):
        assert rounds > 2  # multi-round: the state went through the wire more than once
