"""Red team for vertical_glm: a researcher (perhaps with one site) trying to read the other site's
columns or one patient's label.

- the feature holder asked to read the label column (the researcher lies about who holds what);
- a site named with another's role, a site outside the study;
- researcher-chosen coefficients that put the fit's weight on a few patients, refused at the
  label holder before anything is computed from them;
- a malformed beta; the sizes changed mid-task;
- nothing the hub relays holds a column value (raw, scaled or fixed-point encoded).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import medveil as mv
from medveil.crypto import shares
from medveil.privacy.disclosure import DisclosurePolicy

ROLES = {"hospital": "label_holder", "lab": "feature_holder", "dealer": "dealer"}
FORMULA = "target ~ mean_texture + mean_smoothness + mean_symmetry + mean_fractal_dimension"
LABEL = ["target", "mean_texture", "mean_smoothness"]
FEATURE = ["mean_symmetry", "mean_fractal_dimension"]


@pytest.fixture(scope="module")
def cancer() -> pd.DataFrame:
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame
    frame.columns = [c.replace(" ", "_") for c in frame.columns]
    return frame


@pytest.fixture()
def fed(cancer):
    sites = {"hospital": cancer[LABEL], "lab": cancer[FEATURE], "dealer": {}}
    with mv.Federation.in_process(sites, roles=ROLES, secure_aggregation=False,
                                  policy=DisclosurePolicy(differencing_guard=False)) as federation:
        yield federation


def _params(**changes):
    params = dict(formula=FORMULA, family="binomial", label_site="hospital", feature_site="lab", dealer_site="dealer",
                  columns={"hospital": LABEL, "lab": FEATURE})
    params.update(changes)
    return params


def test_the_feature_holder_asked_for_the_label_column_is_refused(fed):
    lying = {"hospital": ["mean_texture", "mean_smoothness"], "lab": FEATURE + ["target"]}
    with pytest.raises(mv.RefusedError, match="variable_not_approved") as error:
        fed.run("vertical_glm", **_params(formula="mean_texture ~ mean_smoothness + target + mean_symmetry",
                                          family="gaussian", columns=lying))
    assert error.value.site == "lab"


def test_a_site_named_with_another_sites_role_is_refused(fed):
    with pytest.raises(mv.RefusedError, match="role_mismatch"):
        fed.run("vertical_glm", **_params(label_site="lab", feature_site="hospital",
                                          columns={"lab": LABEL, "hospital": FEATURE}))
    with pytest.raises(mv.RefusedError, match="role_mismatch"):
        fed.run("vertical_glm", **_params(feature_site="dealer", dealer_site="lab",
                                          columns={"hospital": LABEL, "dealer": FEATURE}))


def test_a_site_outside_the_study_is_refused(fed):
    with pytest.raises(mv.RefusedError, match="site_not_in_study"):
        fed.run("vertical_glm", **_params(dealer_site="elsewhere"))


def _tampering(fed, monkeypatch, site: str, change):
    """Let the researcher rewrite `site`'s broadcast of every step that carries a beta."""
    grid = fed.session.grid
    exchange = grid.exchange

    def rewritten(step, **options):
        body = step.bodies.get(site)
        if body is not None and "beta" in body.get("broadcast", {}):
            change(body["broadcast"])
        return exchange(step, **options)

    monkeypatch.setattr(grid, "exchange", rewritten)


def test_a_steep_researcher_chosen_beta_is_refused_at_the_label_holder(fed, monkeypatch):
    """beta = 1000 on one column: fitted values at 0 or 1 on either side of a cut through the
    column, so the weights sit on the few patients near it (and the deviance would count each side)."""
    def steep(broadcast):
        beta = np.zeros(len(broadcast["beta"]))
        beta[1] = 1000.0
        broadcast["beta"] = beta
    _tampering(fed, monkeypatch, "hospital", steep)
    with pytest.raises(mv.RefusedError, match="weight_dominance") as error:
        fed.run("vertical_glm", **_params())
    assert error.value.site == "hospital"


def test_a_malformed_beta_is_refused(fed, monkeypatch):
    _tampering(fed, monkeypatch, "lab", lambda broadcast: broadcast.update(beta=[float("nan")] * len(broadcast["beta"])))
    with pytest.raises(mv.RefusedError, match="broadcast_malformed"):
        fed.run("vertical_glm", **_params())


def test_sizes_changed_mid_task_are_refused(fed, monkeypatch):
    grid = fed.session.grid
    exchange = grid.exchange

    def changed(step, **options):
        body = step.bodies.get("dealer")
        if body is not None and step.round >= 2 and "n" in body.get("broadcast", {}):
            body["broadcast"]["n"] += 1
        return exchange(step, **options)

    monkeypatch.setattr(grid, "exchange", changed)
    with pytest.raises(mv.RefusedError, match="broadcast_changed"):
        fed.run("vertical_glm", **_params())


def test_the_hub_relays_no_column_value(cancer):
    """Over loopback HTTP: every numeric value of both sites, as float64, scaled by its public
    power of two, and fixed-point encoded, is absent from everything the hub relayed."""
    sites = {"hospital": cancer[LABEL], "lab": cancer[FEATURE], "dealer": {}}
    with mv.Federation.simulate(sites, roles=ROLES, record_hub_traffic=True, timeout=60,
                                secure_aggregation=False) as fed:
        fit = fed.vertical_glm(FORMULA)
        traffic = b"".join(envelope.encode() for envelope in fed.session.grid.relayed())
    assert fit.converged
    bits = shares.fraction_bits(len(cancer))
    rng = np.random.default_rng(5)
    for column in LABEL[1:] + FEATURE:
        values = cancer[column].to_numpy(np.float64)
        scaled = np.ldexp(values, -shares.scale_exponent(values))
        for row in rng.choice(len(values), 40, replace=False):
            for form in (values[row:row + 1], scaled[row:row + 1], shares.encode(scaled[row:row + 1], bits)):
                assert form.tobytes() not in traffic, (column, row)
