"""A federated run without HTTP: each site's LOCAL step, the `aggregate` seam, the GLOBAL step.

The `run_federated` fixture mirrors the loop of `medveil.runtime.session.ResearcherSession.run`
and what a node does with a task: parameters and broadcasts reach the sites, and releases reach
the researcher, through the real wire framing (`pack_body`/`unpack_body`) and
a float64 conversion as at the node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pandas as pd
import pytest

from medveil.analyses.base import Aggregated, Finished, get_analysis
from medveil.privacy.disclosure import DisclosurePolicy
from medveil.runtime.aggregation import aggregate
from medveil.runtime.wire import pack_body, unpack_body
from tests.conftest import split_uneven

MAX_ROUNDS = 20


@dataclass
class Run:
    result: Any
    rounds: list[Aggregated]  # what the GLOBAL step saw in each round


def _run_federated(name: str, params: dict[str, Any], sites: Mapping[str, pd.DataFrame],
                  policy: DisclosurePolicy | Mapping[str, DisclosurePolicy] | None = None) -> Run:
    analysis = get_analysis(name)
    typed = analysis.parse_params(params)
    policies = policy if isinstance(policy, Mapping) else {site: policy or DisclosurePolicy() for site in sites}
    broadcast: dict[str, Any] = {}
    state: dict[str, Any] = {}
    rounds: list[Aggregated] = []
    for round_no in range(MAX_ROUNDS):
        task = unpack_body(pack_body({"params": typed.model_dump(), "broadcast": broadcast}))
        contributions, public = {}, {}
        for site, frame in sites.items():
            release = analysis.local(analysis.parse_params(task["params"]), round_no, task["broadcast"], frame,
                                     policies[site])
            reply = unpack_body(pack_body({"sums": {k: np.asarray(v, dtype=np.float64) for k, v in release.sums.items()}, "public": release.public}))
            contributions[site], public[site] = reply["sums"], reply["public"]
        aggregated = Aggregated(sums=aggregate(contributions), public=public)
        rounds.append(aggregated)
        outcome = analysis.global_step(typed, round_no, aggregated, state)
        if isinstance(outcome, Finished):
            return Run(outcome.result, rounds)
        broadcast, state = outcome.broadcast, outcome.state
    raise AssertionError(f"{name} did not finish within {MAX_ROUNDS} rounds")


def split(frame: pd.DataFrame, shares=(0.45, 0.35, 0.20), seed: int = 11) -> dict[str, pd.DataFrame]:
    """Shuffle and cut a frame into uneven sites (each keeps its own default index)."""
    return split_uneven(frame, shares, seed)


def make_synthetic(n: int = 3000, seed: int = 20240611) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(50.0, 10.0, n)
    x[rng.random(n) < 0.02] = np.nan
    group = rng.choice(["A", "B", "C", "D", "rare1", "rare2"], size=n, p=[0.45, 0.33, 0.15, 0.064, 0.004, 0.002])
    group = pd.Series(group, dtype=object)
    group[rng.random(n) < 0.03] = np.nan
    return pd.DataFrame({
        "x": x,
        "y": rng.lognormal(1.0, 0.6, n) + 100.0,
        "count": rng.poisson(4.0, n),
        "flag": rng.random(n) < 0.3,
        "group": group,
        "sex": rng.choice(["f", "m"], size=n, p=[0.52, 0.48]),
        "stage": rng.choice(["I", "II", "III", "IV"], size=n, p=[0.3, 0.4, 0.27, 0.03]),
        "code": rng.integers(0, 60, n),
    })


@pytest.fixture(scope="session")
def run_federated():
    """The in-test federated driver (a fixture, so test modules need no imports from here)."""
    return _run_federated


@pytest.fixture(scope="session")
def synthetic_sites() -> dict[str, pd.DataFrame]:
    return split(make_synthetic())


@pytest.fixture(scope="session")
def gbsg2_sites(gbsg2) -> dict[str, pd.DataFrame]:
    return split(gbsg2)


@pytest.fixture(params=["synthetic", "gbsg2"])
def dataset(request) -> tuple[str, dict[str, pd.DataFrame]]:
    return request.param, request.getfixturevalue(f"{request.param}_sites")
