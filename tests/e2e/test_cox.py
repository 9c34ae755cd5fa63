"""Federated Cox PH against lifelines (Efron) and statsmodels PHReg (Breslow) on pooled real data.

Each site coarsens its own times before anything leaves it (no step, risk set or set of tied
events of fewer than min_cell_count patients, no maximum time), so the reference fits the pooled
rows with each row's time as its site releases it (`released_durations`)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import medveil as mv
from medveil.analyses.survival import released_durations
from medveil.privacy.disclosure import DisclosurePolicy
from tests.conftest import split_uneven

lifelines = pytest.importorskip("lifelines")
from lifelines import CoxPHFitter  # noqa: E402
from lifelines.datasets import load_rossi  # noqa: E402
from statsmodels.duration.hazard_regression import PHReg  # noqa: E402

pytestmark = pytest.mark.e2e
ROSSI = ["fin", "age", "race", "wexp", "mar", "paro", "prio"]
GBSG2 = ["age", "tsize", "pnodes", "progrec", "estrec"]


def _released(sites: dict[str, pd.DataFrame], duration: str, event: str, strata: str | None = None) -> pd.DataFrame:
    """The pooled rows with each row's time as its site coarsens it, per stratum (left-out rows dropped)."""
    frames = [released_durations(frame, duration, event, DisclosurePolicy().min_cell_count, by=strata)
              for frame in sites.values()]
    return pd.concat(frames, ignore_index=True).dropna(subset=[duration])


@pytest.mark.parametrize("dataset", ["rossi", "gbsg2"])
def test_efron_equals_lifelines(dataset, gbsg2):
    frame, duration, event, covariates = ((load_rossi(), "week", "arrest", ROSSI) if dataset == "rossi"
                                          else (gbsg2, "time", "cens", GBSG2))
    sites = split_uneven(frame)
    with mv.Federation.simulate(sites) as fed:
        result = fed.coxph(duration, event, covariates)
    released = _released(sites, duration, event)
    reference = CoxPHFitter().fit(released[[*covariates, duration, event]], duration, event)
    np.testing.assert_allclose(result.params, reference.params_, rtol=1e-5)
    np.testing.assert_allclose(result.standard_errors, reference.standard_errors_, rtol=1e-5)
    np.testing.assert_allclose(result.hazard_ratios, reference.hazard_ratios_, rtol=1e-5)
    np.testing.assert_allclose(result.p_values, reference.summary["p"], rtol=1e-4, atol=1e-10)
    assert result.log_likelihood == pytest.approx(reference.log_likelihood_, rel=1e-9)
    assert result.converged and result.provenance["secure_aggregation"] is True
    # Sites withhold each time's risk-bin cells where one is small, so the bound is wide on data this size.
    assert 0 < result.concordance_error_bound <= 0.5
    assert abs(result.concordance - reference.concordance_index_) <= result.concordance_error_bound + 1e-12
    assert "Efron".lower() in result.summary()


def test_breslow_equals_statsmodels_phreg():
    sites = split_uneven(load_rossi())
    with mv.Federation.simulate(sites) as fed:
        result = fed.coxph("week", "arrest", ROSSI, ties="breslow")
    released = _released(sites, "week", "arrest")
    reference = PHReg(released["week"], released[ROSSI], status=released["arrest"], ties="breslow").fit()
    np.testing.assert_allclose(result.params, reference.params, rtol=1e-8)
    np.testing.assert_allclose(result.standard_errors, reference.bse, rtol=1e-8)
    assert result.log_likelihood == pytest.approx(reference.llf, rel=1e-10)


def test_stratified_equals_lifelines():
    sites = split_uneven(load_rossi())
    covariates = ["fin", "age", "prio"]
    with mv.Federation.simulate(sites) as fed:
        result = fed.coxph("week", "arrest", covariates, strata="race")
    released = _released(sites, "week", "arrest", strata="race")
    reference = CoxPHFitter().fit(released[[*covariates, "race", "week", "arrest"]], "week", "arrest",
                                  strata=["race"])
    np.testing.assert_allclose(result.params, reference.params_, rtol=1e-5)
    np.testing.assert_allclose(result.standard_errors, reference.standard_errors_, rtol=1e-5)


def test_collinear_covariates_are_named():
    frame = load_rossi().assign(age2=lambda f: f["age"] * 2)
    with mv.Federation.simulate(split_uneven(frame)) as fed:
        with pytest.raises(mv.FederationError, match=r"collinear.*age.*age2"):
            fed.coxph("week", "arrest", ["age", "age2", "prio"])


def test_hub_sees_only_masked_risk_set_sums():
    with mv.Federation.simulate(split_uneven(load_rossi()), record_hub_traffic=True) as fed:
        fed.coxph("week", "arrest", ["age", "prio"])
        bodies = list(fed.hub_traffic()["body"])
    assert all(not body.get("sums") for body in bodies)
    assert sum("masked" in body for body in bodies) >= 3 * 4
