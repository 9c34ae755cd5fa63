"""vertical_glm equals statsmodels' GLM on the joined table (breast cancer data split by columns).

The label holder ("hospital") has the diagnosis and two measurements, the feature holder ("lab")
three others, and a dealer site holds no table. statsmodels is fitted in the test on the joined
rows with a tight tolerance (`tol=1e-12`): at its default tolerance (1e-8 on the deviance) its
own standard errors stop about 1e-6 short of its converged ones.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import statsmodels.formula.api as smf

import medveil as mv

ROLES = {"hospital": "label_holder", "lab": "feature_holder", "dealer": "dealer"}
LABEL_COLUMNS = ["pid", "target", "mean_texture", "mean_smoothness", "mean_radius"]
FEATURE_COLUMNS = ["pid", "mean_symmetry", "mean_fractal_dimension", "size_band", "worst_texture"]
BINOMIAL = "target ~ mean_texture + mean_smoothness + mean_symmetry + mean_fractal_dimension + C(size_band)"
GAUSSIAN = "mean_radius ~ mean_texture + mean_smoothness + mean_symmetry + worst_texture + C(size_band)"


@pytest.fixture(scope="module")
def cancer() -> pd.DataFrame:
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame
    frame.columns = [c.replace(" ", "_") for c in frame.columns]
    frame["size_band"] = pd.cut(frame["mean_area"], [0, 500, 800, np.inf], labels=["small", "mid", "large"]).astype(str)
    frame["pid"] = [f"P-{i:04d}" for i in range(len(frame))]
    return frame


def _statsmodels(formula: str, family: str, joined: pd.DataFrame):
    families = {"binomial": sm.families.Binomial(), "gaussian": sm.families.Gaussian()}
    return smf.glm(formula, joined, family=families[family]).fit(tol=1e-12)


def _assert_equal(fit, reference) -> None:
    names = list(fit.params.index)
    assert sorted(names) == sorted(reference.params.index)
    np.testing.assert_allclose(fit.params, reference.params[names], rtol=1e-6, atol=0)
    np.testing.assert_allclose(fit.bse, reference.bse[names], rtol=1e-6, atol=0)
    assert fit.nobs == reference.nobs
    assert fit.llf == pytest.approx(reference.llf, rel=1e-8)
    assert fit.deviance == pytest.approx(reference.deviance, rel=1e-8)
    assert fit.null_deviance == pytest.approx(reference.null_deviance, rel=1e-8)


@pytest.mark.parametrize(("formula", "family"), [(BINOMIAL, "binomial"), (GAUSSIAN, "gaussian")])
def test_pre_aligned_tables_equal_statsmodels_on_the_joined_rows(cancer, formula, family):
    sites = {"hospital": cancer[LABEL_COLUMNS], "lab": cancer[FEATURE_COLUMNS], "dealer": {}}
    with mv.Federation.in_process(sites, roles=ROLES, secure_aggregation=False) as fed:
        fit = fed.vertical_glm(formula, family=family)
    _assert_equal(fit, _statsmodels(formula, family, cancer))
    assert fit.owner["Intercept"] == "hospital" and fit.owner["mean_texture"] == "hospital"
    assert fit.owner["mean_symmetry"] == "lab" and fit.owner["C(size_band)[T.small]"] == "lab"
    assert fit.converged
    assert set(fit.conf_int().columns) == {0, 1}
    assert "Vertical GLM" in fit.summary()


@pytest.mark.skipif(not hasattr(mv.Federation, "psi"), reason="Federation.psi is not there yet")
@pytest.mark.parametrize(("formula", "family"), [(BINOMIAL, "binomial"), (GAUSSIAN, "gaussian")])
def test_tables_aligned_by_psi_equal_statsmodels_on_the_inner_join(cancer, formula, family):
    rng = np.random.default_rng(11)
    label_rows = rng.permutation(len(cancer))[:520]  # shuffled, and each site misses some patients
    feature_rows = rng.permutation(len(cancer))[:510]
    label = cancer[LABEL_COLUMNS].iloc[label_rows].reset_index(drop=True)
    feature = cancer[FEATURE_COLUMNS].iloc[feature_rows].reset_index(drop=True)
    joined = label.merge(feature, on="pid", how="inner")
    sites = {"hospital": label, "lab": feature, "dealer": {}}
    with mv.Federation.in_process(sites, roles=ROLES, secure_aggregation=False) as fed:
        aligned = fed.psi("hospital", "lab", on="pid", reveal="both")
        assert aligned.size == len(joined)
        fit = fed.vertical_glm(formula, family=family, aligned=aligned)
    _assert_equal(fit, _statsmodels(formula, family, joined))


def test_tables_of_different_lengths_need_an_alignment(cancer):
    sites = {"hospital": cancer[LABEL_COLUMNS], "lab": cancer[FEATURE_COLUMNS].iloc[:400], "dealer": {}}
    with mv.Federation.in_process(sites, roles=ROLES, secure_aggregation=False) as fed:
        with pytest.raises(Exception, match="align them first"):
            fed.vertical_glm(BINOMIAL)


def test_a_term_mixing_the_sites_columns_is_refused(cancer):
    sites = {"hospital": cancer[LABEL_COLUMNS], "lab": cancer[FEATURE_COLUMNS], "dealer": {}}
    with mv.Federation.in_process(sites, roles=ROLES, secure_aggregation=False) as fed:
        with pytest.raises(ValueError, match="wholly at one site"):
            fed.vertical_glm("target ~ mean_texture:mean_symmetry + mean_smoothness")
