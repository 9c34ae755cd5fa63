"""Federated Cox PH against lifelines (Efron) and statsmodels PHReg (Breslow) on pooled real data."""

from __future__ import annotations

import numpy as np
import pytest

import medveil as mv
from tests.conftest import split_uneven

lifelines = pytest.importorskip("lifelines")
from lifelines import CoxPHFitter  # noqa: E402
from lifelines.datasets import load_rossi  # noqa: E402
from statsmodels.duration.hazard_regression import PHReg  # noqa: E402

pytestmark = pytest.mark.e2e
ROSSI = ["fin", "age", "race", "wexp", "mar", "paro", "prio"]
GBSG2 = ["age", "tsize", "pnodes", "progrec", "estrec"]


@pytest.mark.parametrize("dataset", ["rossi", "gbsg2"])
def test_efron_equals_lifelines(dataset, gbsg2):
    frame, duration, event, covariates = ((load_rossi(), "week", "arrest", ROSSI) if dataset == "rossi"
                                          else (gbsg2, "time", "cens", GBSG2))
    with mv.Federation.simulate(split_uneven(frame)) as fed:
        result = fed.coxph(duration, event, covariates)
    reference = CoxPHFitter().fit(frame[[*covariates, duration, event]], duration, event)
    np.testing.assert_allclose(result.params, reference.params_, rtol=1e-5)
    np.testing.assert_allclose(result.standard_errors, reference.standard_errors_, rtol=1e-5)
    np.testing.assert_allclose(result.hazard_ratios, reference.hazard_ratios_, rtol=1e-5)
    np.testing.assert_allclose(result.p_values, reference.summary["p"], rtol=1e-4, atol=1e-10)
    assert result.log_likelihood == pytest.approx(reference.log_likelihood_, rel=1e-9)
    assert result.converged and result.provenance["secure_aggregation"] is True
    assert 0 < result.concordance_error_bound < 0.01
    assert abs(result.concordance - reference.concordance_index_) <= result.concordance_error_bound
    assert "Efron".lower() in result.summary()


def test_breslow_equals_statsmodels_phreg():
    frame = load_rossi()
    with mv.Federation.simulate(split_uneven(frame)) as fed:
        result = fed.coxph("week", "arrest", ROSSI, ties="breslow")
    reference = PHReg(frame["week"], frame[ROSSI], status=frame["arrest"], ties="breslow").fit()
    np.testing.assert_allclose(result.params, reference.params, rtol=1e-8)
    np.testing.assert_allclose(result.standard_errors, reference.bse, rtol=1e-8)
    assert result.log_likelihood == pytest.approx(reference.llf, rel=1e-10)


def test_stratified_equals_lifelines():
    frame = load_rossi()
    covariates = ["fin", "age", "prio"]
    with mv.Federation.simulate(split_uneven(frame)) as fed:
        result = fed.coxph("week", "arrest", covariates, strata="race")
    reference = CoxPHFitter().fit(frame[[*covariates, "race", "week", "arrest"]], "week", "arrest", strata=["race"])
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
