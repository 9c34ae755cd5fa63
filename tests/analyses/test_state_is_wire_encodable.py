"""Every analysis' global state survives the wire encoding a checkpoint uses, and a run that
continues from the decoded state after every round ends with exactly the uninterrupted result.

The rounds are driven here by a small loop over SiteContexts (no nodes, no transport): each site
checks the broadcast and runs its LOCAL step as its node would, sums are added up, and the
GLOBAL step's NextRound.state goes through pack_body/unpack_body before the next round."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import pytest

from medveil.analyses.base import (
    Aggregated,
    Finished,
    SiteContext,
    get_analysis,
    registered_names,
)
from medveil.data.genotypes import GenotypeFile
from medveil.privacy.disclosure import DisclosurePolicy
from medveil.runtime.wire import pack_body, unpack_body
from tests.analyses.every_analysis import assert_identical, clinical_and_genotype_sites

pytest.importorskip("bed_reader")

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
    sites = clinical_and_genotype_sites(tmp_path_factory.mktemp("genotypes"), seed=23)
    return {site: (frame, GenotypeFile("geno", bed)) for site, (frame, bed) in sites.items()}


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


def test_every_registered_analysis_is_covered():
    builtin = {"coxph", "crosstab", "describe", "glm", "gwas", "histogram", "kaplan_meier", "logrank", "pca", "ping"}
    assert builtin <= set(registered_names())
    assert {name.split("-")[0] for name in PARAMS} == builtin


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_a_run_continuing_from_decoded_state_equals_the_uninterrupted_run(sites, name):
    checkpointed, rounds = _run(name, sites, checkpoint=True)
    uninterrupted, same_rounds = _run(name, sites, checkpoint=False)
    assert rounds == same_rounds
    assert_identical(checkpointed, uninterrupted, name)
    if name in ("glm", "coxph", "gwas", "gwas-linear", "pca"):
        assert rounds > 2  # multi-round: the state went through the wire more than once
