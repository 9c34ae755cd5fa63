"""A federated run without HTTP: the real researcher session over the InProcessGrid, real nodes.

The `run_federated` fixture sets up an in-process federation (`Federation.in_process`: the
sites' keys, stewards' approvals and every node guard, as in a deployment) and runs the
analysis through `ResearcherSession.run`; each site's LOCAL step runs in its node, behind its
policy (one for all sites, or one per site), and the wire framing carries every body.
Secure aggregation is off here (the researcher adds the sites' arrays, as the plain path does);
tests/analyses/test_in_process_grid.py runs every analysis with it on, over both grids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pandas as pd
import pytest

import medveil as mv
from medveil.analyses.base import Aggregated, AnalysisError
from medveil.privacy.disclosure import DisclosurePolicy, DisclosureRefused
from medveil.runtime.session import AnalysisFailed, RefusedError
from tests.conftest import split_uneven


@dataclass
class Run:
    result: Any
    rounds: list[Aggregated]  # what the GLOBAL step saw in each round


def _run_federated(name: str, params: dict[str, Any], sites: Mapping[str, pd.DataFrame],
                   policy: DisclosurePolicy | Mapping[str, DisclosurePolicy] | None = None) -> Run:
    """Run `name` over the sites; a site's refusal is raised as the analysis raised it at the node
    (DisclosureRefused with its rule, or AnalysisError), a failing global step as AnalysisError."""
    rounds: list[Aggregated] = []
    with mv.Federation.in_process(dict(sites), policy=policy, secure_aggregation=False) as fed:
        try:
            outcome = fed.session.run(name, params, "default",
                                      observe=lambda _, aggregated: rounds.append(aggregated))
        except RefusedError as error:
            if error.rule in ("analysis_error", "internal_error"):
                raise AnalysisError(error.detail) from error
            raise DisclosureRefused(error.rule, error.detail) from error
        except AnalysisFailed as error:
            raise AnalysisError(str(error)) from error
    return Run(outcome.result, rounds)


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
