"""Red team for vertical_glm: a researcher (perhaps with one site) trying to read the other site's
columns or one patient's label.

- the feature holder asked to read the label column (the researcher lies about who holds what);
- a site named with another's role, a site outside the study;
- researcher-chosen coefficients (steep, or nudged off the Newton path), refused at the label
  holder before anything is computed from them (`broadcast_not_newton`); coefficients sent to the
  feature holder, which takes only the label holder's; a malformed beta; the sizes changed mid-task;
- a fit whose honest path pushes fitted values to their bounds, refused at the dealer;
- what each party receives: the label holder nothing correlated with the feature holder's
  columns or partial linear predictor, the feature holder nothing correlated with y, mu, w or the
  residuals, the dealer only masked parts whose sum is the linear predictor in a shuffled order;
- nothing the hub relays holds a column value (raw, scaled or fixed-point encoded).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import medveil as mv
from medveil.analyses.vertical import ETA_BITS, VerticalGLM
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
    """beta = 1000 on one column would put the weights on the few patients near a cut through it:
    the label holder refuses any beta that is not its own Newton step."""
    def steep(broadcast):
        beta = np.zeros(len(broadcast["beta"]))
        beta[1] = 1000.0
        broadcast["beta"] = beta
    _tampering(fed, monkeypatch, "hospital", steep)
    with pytest.raises(mv.RefusedError, match="broadcast_not_newton") as error:
        fed.run("vertical_glm", **_params())
    assert error.value.site == "hospital"


def test_a_beta_nudged_off_the_newton_path_later_in_the_fit_is_refused(fed, monkeypatch):
    seen = []

    def nudged(broadcast):
        seen.append(1)
        if len(seen) == 3:  # the second Newton step
            broadcast["beta"] = np.asarray(broadcast["beta"]) * (1 + 1e-6)
    _tampering(fed, monkeypatch, "hospital", nudged)
    with pytest.raises(mv.RefusedError, match="broadcast_not_newton"):
        fed.run("vertical_glm", **_params())


def test_a_malformed_beta_is_refused(fed, monkeypatch):
    def malformed(broadcast):
        broadcast["beta"] = [float("nan")] * len(broadcast["beta"])
    _tampering(fed, monkeypatch, "hospital", malformed)
    with pytest.raises(mv.RefusedError, match="broadcast_malformed"):
        fed.run("vertical_glm", **_params())


def test_coefficients_sent_to_the_feature_holder_are_refused(fed, monkeypatch):
    """The feature holder takes beta_F only from the label holder's sealed Newton step."""
    grid = fed.session.grid
    exchange = grid.exchange

    def injected(step, **options):
        label, feature = step.bodies.get("hospital"), step.bodies.get("lab")
        if label is not None and feature is not None and "beta" in label.get("broadcast", {}):
            feature["broadcast"]["beta"] = np.ones(len(FEATURE))
        return exchange(step, **options)

    monkeypatch.setattr(grid, "exchange", injected)
    with pytest.raises(mv.RefusedError, match="broadcast_not_newton") as error:
        fed.run("vertical_glm", **_params())
    assert error.value.site == "lab"


def test_fitted_values_at_their_bounds_are_refused_at_the_dealer(cancer):
    """Near-separable columns: the honest Newton path drives some fitted values to 0 or 1, and the
    dealer (who alone sees the linear predictor, unordered) refuses the round."""
    label, feature = ["target", "worst_radius", "worst_texture"], ["worst_concave_points", "worst_smoothness",
                                                                  "worst_area", "mean_concavity"]
    sites = {"hospital": cancer[label], "lab": cancer[feature], "dealer": {}}
    formula = "target ~ " + " + ".join(label[1:] + feature)
    with mv.Federation.in_process(sites, roles=ROLES, secure_aggregation=False,
                                  policy=DisclosurePolicy(differencing_guard=False)) as federation, \
            pytest.raises(mv.RefusedError, match="weight_dominance") as error:
        federation.run("vertical_glm", **_params(formula=formula, columns={"hospital": label, "lab": feature}))
    assert error.value.site == "dealer"


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


def _received(cancer, monkeypatch):
    """Fit FORMULA in process, recording every payload each site receives (site, round, sender, key,
    value); also the fit and, at each site, the design it built."""
    log, designs = [], {}
    local = VerticalGLM.local

    def recording(self, params, round_no, broadcast, context):
        for sender, payload in context.messages.items():
            for key, value in payload.items():
                log.append((context.site, round_no, sender, key, value))
        release = local(self, params, round_no, broadcast, context)
        if "design" in context.scratch:
            designs[context.site] = context.scratch["design"]
        return release

    monkeypatch.setattr(VerticalGLM, "local", recording)
    sites = {"hospital": cancer[LABEL], "lab": cancer[FEATURE], "dealer": {}}
    with mv.Federation.in_process(sites, roles=ROLES, secure_aggregation=False,
                                  policy=DisclosurePolicy(differencing_guard=False)) as federation:
        fit = federation.vertical_glm(FORMULA)
    return log, designs, fit


def _rows_of(value, n):
    """Every length-n row of a received ring array (matrices travel as columns x n), as signed ints."""
    if isinstance(value, np.ndarray) and value.dtype == np.uint64 and value.shape[-1] == n:
        return value.reshape(-1, n).view(np.int64).astype(np.float64)
    return np.zeros((0, n))


def _max_correlation(rows, secrets):
    rows = rows[np.std(rows, axis=1) > 0]
    if not len(rows):
        return 0.0
    return float(np.max(np.abs(np.corrcoef(np.vstack([rows, secrets]))[:len(rows), len(rows):])))


def test_what_each_party_receives_reveals_no_row_of_the_other(cancer, monkeypatch):
    log, designs, fit = _received(cancer, monkeypatch)
    n = len(cancer)
    x_f, x_l, y = designs["lab"]["x"], designs["hospital"]["x"], designs["hospital"]["y"]
    coefficients = fit.params.to_numpy() * np.ldexp(1.0, np.asarray(designs["hospital"]["exponents"]
                                                                     + designs["lab"]["exponents"]))
    eta_l, eta_f = x_l @ coefficients[:x_l.shape[1]], x_f @ coefficients[x_l.shape[1]:]
    mu = 1 / (1 + np.exp(-(eta_l + eta_f)))
    label_secrets = np.vstack([x_f.T, eta_f])
    feature_secrets = np.vstack([y, mu, mu * (1 - mu), y - mu, eta_l])
    ring_values = {site: [value for s, _, _, _, value in log if s == site and isinstance(value, np.ndarray)
                          and value.dtype == np.uint64] for site in ("hospital", "lab", "dealer")}
    for site, secrets in (("hospital", label_secrets), ("lab", feature_secrets)):
        rows = np.vstack([_rows_of(value, n) for value in ring_values[site]])
        assert len(rows) > 50
        assert _max_correlation(rows, secrets) < 0.25, site
        for value in ring_values[site]:  # padded or shared: about half the bits are ones
            if value.size >= 2000:
                assert 0.45 < np.unpackbits(np.ascontiguousarray(value).view(np.uint8)).mean() < 0.55, site
    # all the feature holder gets in the clear is its own coefficients; the label holder nothing
    clear = [(s, key) for s, _, _, key, value in log
             if not isinstance(value, (np.ndarray, bytes, int)) and key != "params"]  # "params": a digest
    assert clear == []
    floats = {(s, key) for s, _, _, key, value in log if isinstance(value, np.ndarray) and value.dtype.kind == "f"}
    assert floats == {("lab", "beta")}
    # the dealer: two masked parts per iteration, each uniform; their sum is the linear predictor, shuffled
    last = max(r for s, r, _, key, _ in log if s == "dealer" and key == "eta")
    parts = {sender: value for s, r, sender, key, value in log if s == "dealer" and r == last and key == "eta"}
    assert set(parts) == {"hospital", "lab"}
    assert _max_correlation(_rows_of(parts["hospital"], n), np.vstack([eta_l, eta_f, y])) < 0.25
    assert _max_correlation(_rows_of(parts["lab"], n), np.vstack([eta_l, eta_f, y])) < 0.25
    seen = shares.decode(parts["hospital"] + parts["lab"], ETA_BITS)
    assert abs(np.corrcoef(seen, eta_l + eta_f)[0, 1]) < 0.25
    np.testing.assert_allclose(np.sort(seen), np.sort(eta_l + eta_f), atol=1e-6)


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
