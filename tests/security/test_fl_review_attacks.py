"""Red-team review of federated training, second part (validation sums, DP-SGD accounting,
sample_fraction, image folders).

A hostile researcher controls every field of the parameters and of the broadcast from round 2
on (it runs the researcher's side of the session, so `FederatedTraining.global_step` is its own
code: the tests patch it there, the sites never call it), the seed, the rounds, and may run many
tasks; a hostile hub may drop a reply. Each test asserts the defence, against an attack that
succeeds without it.

Findings and their defences (see each test): the sample_fraction draws let three rounds at one
broadcast solve for each site's own update (sample_fraction below 1 needs dp); nested
validation splits of the researcher's seed and fractions differ by one row, whose label and
features then fall out of two tasks' pooled validation sums (the split's row sets go to the
differencing guard); a finite broadcast whose logits overflow made a validation loss NaN, which
OpenDP's Gaussian takes as 0, or a probability NaN, which refused the round unpaid at one site
only (evaluate clamps logits, broadcast weights are bounded, a DP round is charged before it
computes anything); DP-SGD's secret seed had 31 bits (now 63); image errors quoted the file name
(now only the labels line, the name is logged at the site); round 0 of a DP-only study published
exact row counts unpaid (now noisy and charged, and FedAvg weights by the noisy count). One
documented, generic risk stays a strict xfail: differencing two sums over different survivor
sets (a dropped reply), against which DP is the defence.
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import pandas as pd
import pytest

import medveil as mv
from medveil.analyses import fl
from medveil.analyses.base import NextRound, SiteContext
from medveil.privacy.disclosure import DisclosurePolicy, DisclosureRefused

torch = pytest.importorskip("torch")
pytest.importorskip("opacus")

FEATURES = ["x1", "x2", "x3"]
MODELS = ["logistic@1", "cnn@1"]
DP = {"noise_multiplier": 5.0, "max_grad_norm": 1.0, "delta": 1e-4}


def _site(seed: int, n: int, balanced: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(size=(n, len(FEATURES))), columns=FEATURES)
    frame["y"] = np.tile([0, 1], n // 2) if balanced else (rng.random(n) < 1 / (1 + np.exp(-frame["x1"]))).astype(int)
    return frame


def _params(**change) -> fl.FLParams:
    base = {"model": "logistic", "features": FEATURES, "target": "y", "rounds": 1, "lr": 0.5, "seed": 3}
    return fl.FLParams.model_validate({**base, **change})


class _Budget:
    """A site's privacy charger for direct calls of `local`: what was charged."""

    def __init__(self) -> None:
        self.charged: list[float] = []

    def __call__(self, rho: float) -> None:
        self.charged.append(rho)


def _context(frame: pd.DataFrame, params: fl.FLParams, *, site: str = "site_a", dp_required: bool = False,
             budget: _Budget | None = None, remaining: float | None = None, noise=None,
             memory: dict | None = None) -> SiteContext:
    return SiteContext(site, frame, DisclosurePolicy(), {},
                       {"fl_size": int(fl.initial_weights(params).size), **(memory or {})}, noise=noise,
                       data_sites=("site_a", "site_b"), study_models=tuple(MODELS),
                       charge_privacy=budget if budget is not None else _Budget(), dp_required=dp_required,
                       privacy_remaining=remaining)


@pytest.fixture
def hostile_researcher(monkeypatch):
    """Patch the researcher's global step: record every round's decoded sums and broadcast
    `choose(params, round_no, honest_weights)` instead of the honest weights."""
    recorded: list[tuple[fl.FLParams, int, dict[str, np.ndarray]]] = []
    choices = {}
    honest = fl.FederatedTraining.global_step

    def hostile(self, params, round_no, aggregated, state):
        out = honest(self, params, round_no, aggregated, state)
        recorded.append((params, round_no, {k: np.asarray(v, dtype=np.float64) for k, v in aggregated.sums.items()}))
        if isinstance(out, NextRound) and round_no >= 1 and "choose" in choices:
            return NextRound({"weights": choices["choose"](params, round_no, out.broadcast["weights"])}, out.state)
        return out

    monkeypatch.setattr(fl.FederatedTraining, "global_step", hostile)
    return recorded, choices


def _own_update(frame: pd.DataFrame, weights: np.ndarray, lr: float) -> np.ndarray:
    from medveil.models import get_model, train_local

    x, y = frame[FEATURES].to_numpy(np.float32), frame["y"].to_numpy(np.float32)
    update = train_local(get_model("logistic", "1"), {}, weights, x, y, epochs=1, batch_size=None, lr=lr,
                         algorithm="fedavg", mu=0.0, seed=0)
    return np.asarray(update.weights)


# --- sample_fraction: no round's sum is one site's own update -------------------------------


@pytest.mark.e2e
def test_sample_fraction_below_one_without_dp_is_refused_at_every_site():
    """The attack: sample_fraction 0.5 draws pairs from the researcher's seed, and from round 2
    the researcher re-broadcasts the same weights, so rounds {a,b}, {b,c}, {a,c} at one weight
    vector solve for each site's own n_k w_k. Each site refuses such a task in round 0, sent raw
    (bypassing the researcher's own parameter check) or called directly; with dp it runs."""
    sites = {"site_a": _site(1, 40), "site_b": _site(2, 50), "site_c": _site(3, 60)}
    raw = {"model": "logistic", "version": "1", "features": FEATURES, "target": "y", "rounds": 3, "lr": 0.5,
           "seed": 4, "validation_fraction": 0.0, "sample_fraction": 0.5}
    with mv.Federation.in_process(sites, models=MODELS, secure_aggregation=False, timeout=120) as fed:

        def send(task: str, params: dict) -> dict[str, tuple[str, dict]]:  # a raw round 0, signed by the researcher
            envelope = fed.network.grid.seal("task", {"params": params, "broadcast": {}}, study=fed.study.id,
                                             task=task, step=0, phase="compute", round=0, analysis="fl_train",
                                             dataset="default", recipients=sorted(sites))
            replies = {site: node.handle(envelope.encode()) for site, node in fed.network.nodes.items()}
            return {site: (reply.header["status"], reply.body()) for site, reply in replies.items()}

        answers = send("fl-sampled-no-dp", raw)
        assert {body.get("rule") for _, body in answers.values()} == {"sample_fraction_needs_dp"}
        assert all(status != "ok" for status, _ in answers.values())
        with pytest.raises(DisclosureRefused) as refused:  # the honest client refuses it before sending
            fed.train("logistic", target="y", features=FEATURES, rounds=3, lr=0.5, seed=4, sample_fraction=0.5,
                      validation_fraction=0.0)
        assert refused.value.rule == "sample_fraction_needs_dp"
        answers = send("fl-sampled-dp", {**raw, "dp": DP})
        assert all(status == "ok" for status, _ in answers.values()), answers
    params = _params(sample_fraction=0.5, rounds=3)
    with pytest.raises(DisclosureRefused) as refused:
        fl.FederatedTraining().local(params, 1, {"weights": fl.initial_weights(params)}, _context(sites["site_a"], params))
    assert refused.value.rule == "sample_fraction_needs_dp"


@pytest.mark.e2e
@pytest.mark.xfail(strict=True, reason=(
    "KNOWN GENERIC RISK (documented in fl.py and docs/fl.md, not a bug to fix here): a hostile hub "
    "drops one site's reply in round 1 of one task (dropouts allowed), so the sites agree to a sum "
    "over the survivors; a second task with the same parameters sums every site at the same initial "
    "weights; the difference of the two sums is the dropped site's own n_k w_k. Secure aggregation "
    "keeps each sum over at least secagg_threshold sites, but cannot stop two sums over different "
    "survivor sets being differenced. DP-SGD is the defence: the dropped site's update is then "
    "private on its own"))
def test_two_sums_over_different_survivors_do_not_give_one_sites_update(monkeypatch):
    from medveil.runtime import secure_aggregation
    from medveil.runtime.wire import open_envelope

    sites = {"site_a": _site(1, 40), "site_b": _site(2, 50), "site_c": _site(3, 60)}
    recovered: list[dict] = []
    combine = secure_aggregation.CoordinatorState.combine

    def spy(self, *args, **kwargs):  # the researcher keeps what it decoded, whatever its session then says
        out = combine(self, *args, **kwargs)
        recovered.append({k: np.asarray(v, dtype=np.float64) for k, v in out.items()})
        return out

    monkeypatch.setattr(secure_aggregation.CoordinatorState, "combine", spy)
    common = dict(target="y", features=FEATURES, rounds=1, lr=0.5, seed=3, validation_fraction=0.0)
    with mv.Federation.in_process(sites, models=MODELS, allow_dropouts=True, timeout=3) as fed:
        node = fed.network.nodes["site_c"]
        handle = node.handle
        dropped: list[int] = []

        def silent_once(raw, handle=handle):  # the hub drops site_c's first round-1 reply
            header = open_envelope(raw).header
            if header.get("phase") == "compute" and header.get("round") == 1 and not dropped:
                dropped.append(1)
                return None
            return handle(raw)

        node.handle = silent_once
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            try:
                fed.train("logistic", **common)
            except mv.FederationError:
                pass  # the researcher decoded the survivors' sum before its session gave up
            fed.train("logistic", **common)
    initial = fl.initial_weights(_params(rounds=1, validation_fraction=0.0))
    own = 60 * _own_update(sites["site_c"], initial, 0.5)
    survivors = [s for s in recovered if s["rows"][0] == 90]
    everyone = [s for s in recovered if s["rows"][0] == 150]
    assert survivors and everyone, "both sums were decoded"
    difference = everyone[0]["weighted"] - survivors[0]["weighted"]
    assert not np.allclose(difference, own, atol=1e-9), "site_c's own update read as a difference of two sums"


# --- validation splits: the researcher cannot difference two splits down to one row ----------


@pytest.mark.e2e
def test_two_nested_validation_splits_do_not_reveal_one_row(hostile_researcher):
    """The attack: for one seed the hold-outs of fractions 0.25 and 0.28 are nested (site_b's is
    kept, one row is added at site_a), so two tasks' pooled validation sums at weights of the
    researcher's choosing give that row's label and x1. FederatedTraining.row_sets hands the
    training and validation rows to the differencing guard, which refuses the second task in
    round 0, before anything of it is computed."""
    from medveil.runtime.grid import RefusedError

    recorded, choices = hostile_researcher
    sites = {"site_a": _site(1, 24, balanced=True), "site_b": _site(2, 30, balanced=True)}
    seed, small, large = 5, 0.25, 0.28
    assert [round(small * len(f)) for f in sites.values()] == [6, 8]
    assert [round(large * len(f)) for f in sites.values()] == [7, 8]
    _, held_small = fl.split_rows(24, small, seed)
    _, held_large = fl.split_rows(24, large, seed)
    assert set(held_small) < set(held_large)  # nested: the attack's premise holds
    probe = np.array([0.5, 0.0, 0.0, 0.0])  # logit = x1 / 2
    choices["choose"] = lambda params, round_no, honest: probe
    with mv.Federation.in_process(sites, models=MODELS, timeout=120) as fed:
        fed.train("logistic", target="y", features=FEATURES, rounds=1, lr=0.5, seed=seed, validation_fraction=small)
        with pytest.raises(RefusedError) as refused:
            fed.train("logistic", target="y", features=FEATURES, rounds=1, lr=0.5, seed=seed,
                      validation_fraction=large)
    assert refused.value.rule == "differencing"
    assert [params.validation_fraction for params, round_no, _ in recorded if round_no == 2] == [small]
    assert all(round_no == 0 for params, round_no, _ in recorded if params.validation_fraction == large)


@pytest.mark.e2e
def test_ordinary_repeated_trainings_pass_the_differencing_guard():
    """The guard refuses only splits a few rows apart: the same training again, another
    validation fraction (0 and 0.2: many rows apart) or another seed all run."""
    sites = {"site_a": _site(1, 60), "site_b": _site(2, 80)}
    common = dict(target="y", features=FEATURES, rounds=1, lr=0.5)
    with mv.Federation.in_process(sites, models=MODELS, timeout=120) as fed:
        first = fed.train("logistic", seed=5, validation_fraction=0.2, **common)
        again = fed.train("logistic", seed=5, validation_fraction=0.2, **common)
        fed.train("logistic", seed=5, validation_fraction=0.0, **common)
        fed.train("logistic", seed=6, validation_fraction=0.2, **common)
    np.testing.assert_array_equal(first.weights, again.weights)


def test_row_sets_are_the_split_site_rows_trains_and_validates_on():
    frame = _site(4, 50)
    frame.loc[[3, 17], "x2"] = np.nan
    params = _params(validation_fraction=0.3, seed=8)
    complete, train, val = fl.FederatedTraining().row_sets(params, frame, 0, {}, DisclosurePolicy())
    assert complete.sum() == 48 and not (train & val).any() and ((train | val) == complete).all()
    rows = fl.site_rows(params, _context(frame, params))
    clean = frame.dropna()
    np.testing.assert_array_equal(rows.X_val, frame.loc[val, FEATURES].to_numpy(np.float32))
    np.testing.assert_array_equal(rows.X_train, frame.loc[train, FEATURES].to_numpy(np.float32))
    assert len(rows.y_val) == round(0.3 * len(clean))
    assert fl.FederatedTraining().row_sets(params, frame, 1, {"weights": []}, DisclosurePolicy()) == []


def test_a_validation_split_steered_below_the_minimum_count_is_refused():
    frame = _site(4, 40)
    for fraction in (0.01, 0.03, 0.1):  # 0, 1 and 4 held-out rows
        params = _params(validation_fraction=fraction)
        with pytest.raises(DisclosureRefused) as refused:
            fl.FederatedTraining().local(params, 0, {}, _context(frame, params))
        assert refused.value.rule == "min_cell_count"


# --- DP: every release moves by at most its sensitivity, and is paid for --------------------


def _outlier_site(seed: int, params: fl.FLParams, n: int = 200) -> tuple[pd.DataFrame, int]:
    """Features in [0.5, 1], labels 0, and one held-out patient with x1 = 5 and label 1."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.uniform(0.5, 1.0, size=(n, 3)), columns=FEATURES)
    frame["y"] = np.tile([0, 1], n // 2)
    _, held = fl.split_rows(n, params.validation_fraction, params.seed)
    frame.loc[held, "y"] = 0
    frame.loc[held[0], ["x1", "y"]] = [5.0, 1]
    return frame, int(held[0])


def test_a_dp_validation_loss_moves_by_at_most_its_sensitivity():
    """The attack: a finite broadcast (w_x1 = 1e38) overflowed one row's float32 logit to inf,
    its loss was NaN, and OpenDP's Gaussian returned noise around 0 for it, so the noisy
    validation loss jumped from 20 * rows to 0 because of one patient. Neighbouring tables here
    replace that patient by an ordinary row (same size: the seeded split depends on the row
    count, so the other rows stay where they are)."""
    params = _params(dp=DP, rounds=1)
    with_patient, row = _outlier_site(11, params)
    without = with_patient.copy()
    without.loc[row, ["x1", "y"]] = [0.75, 0]
    probe = np.array([1e38, 0.0, 0.0, 0.0])
    from medveil.models import evaluate, get_model

    recipe = get_model("logistic", "1")
    means = []
    for frame in (with_patient, without):
        rows = fl.site_rows(params, _context(frame, params))
        exact = evaluate(recipe, {}, probe, rows.X_val, rows.y_val, classes=2, bins=fl.BINS)
        draws = [fl.noised_validation(exact, DP["noise_multiplier"])[0]["loss"][0] for _ in range(40)]
        means.append(float(np.mean(draws)))
    # one row moves the true loss sum by at most MAX_ROW_LOSS; 40 draws of sd 5*sqrt(5)*20 average to sd ~35
    assert abs(means[0] - means[1]) < 20 + 6 * 35


def test_evaluate_gives_finite_bounded_sums_for_overflowing_weights():
    """Weights whose float32 logits overflow to +-inf, or give inf - inf = NaN for one row, still
    give every row a finite loss of at most MAX_ROW_LOSS and probabilities in [0, 1]."""
    from medveil.models import evaluate, get_model
    from medveil.models.training import MAX_ROW_LOSS

    X = np.array([[5.0, 5.0, 0.0], [1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    y = np.array([1.0, 0.0, 1.0, 0.0], dtype=np.float32)
    for probe in ([3e38, -3e38, 0.0, 0.0], [1e38, 0.0, 0.0, 0.0], [-1e38, 1e38, 0.0, 0.0]):
        sums = evaluate(get_model("logistic", "1"), {}, np.array(probe), X, y, classes=2, bins=fl.BINS)
        assert all(np.all(np.isfinite(np.asarray(v, dtype=np.float64))) for v in sums.values()), probe
        assert 0 <= sums["loss"][0] <= len(y) * MAX_ROW_LOSS
        assert sums["hist_pos"].sum() + sums["hist_neg"].sum() == len(y)
        assert 0 <= sums["prob_sum"].sum() <= len(y)


def test_a_broadcast_weight_beyond_the_bound_is_refused_and_honest_trainings_stay_far_below():
    params = _params(rounds=3)
    memory = {"fl_size": int(fl.initial_weights(params).size)}
    analysis = fl.FederatedTraining()
    for value in (1e38, -2 * fl.MAX_WEIGHT):
        probe = fl.initial_weights(params).copy()
        probe[0] = value
        with pytest.raises(fl.BroadcastRefused) as refused:
            analysis.check_broadcast(params, 2, {"weights": probe}, memory)
        assert refused.value.rule == "broadcast_malformed" and "magnitude" in refused.value.detail
    with pytest.raises(fl.AnalysisError, match="not finite"):
        fl.noised_validation({"rows": np.array([3]), "loss": np.array([np.nan]), "correct": np.array([1]),
                              "hist_pos": np.zeros((1, fl.BINS)), "hist_neg": np.zeros((1, fl.BINS)),
                              "prob_sum": np.zeros((1, fl.BINS))}, 5.0)
    sites = {"site_a": _site(1, 60), "site_b": _site(2, 80)}
    with mv.Federation.in_process(sites, models=MODELS, timeout=120) as fed:
        result = fed.train("logistic", target="y", features=FEATURES, rounds=5, lr=5.0, seed=1)
    assert np.max(np.abs(result.weights)) < 1e-3 * fl.MAX_WEIGHT


def test_a_crafted_broadcast_is_no_unpaid_oracle_on_one_patient(monkeypatch):
    """The attack: a broadcast whose logit is inf - inf (w_x1 = 3e38, w_x2 = -3e38) for one
    patient only made its probability NaN, and the site refused the round before charging, so
    whether one row has x1, x2 > 1.13 was read for free. Now the round's whole rho is charged
    before anything is computed from the rows, the evaluation of such weights does not fail,
    and the node never lets them reach `local` (check_broadcast bounds the weights)."""
    from medveil.models import evaluate

    params = _params(dp=DP, rounds=1)
    frame, row = _outlier_site(12, params)
    frame.loc[row, "x2"] = 5.0
    probe = np.array([3e38, -3e38, 0.0, 0.0])
    budget = _Budget()
    charged_when_evaluated = []

    def spy(*args, **kwargs):
        charged_when_evaluated.append(sum(budget.charged))
        return evaluate(*args, **kwargs)

    monkeypatch.setattr("medveil.models.evaluate", spy)
    context = _context(frame, params, budget=budget)
    train_rows = len(fl.site_rows(params, context).y_train)
    planned = fl.round_rho(params, 1, "site_a", ("site_a", "site_b"), train_rows)
    try:
        fl.FederatedTraining().local(params, 1, {"weights": probe}, context)
    except fl.AnalysisError as exc:  # a diverged training may be refused: after the charge, never inside evaluate
        assert "diverged" in str(exc)
    assert charged_when_evaluated == [pytest.approx(planned, rel=1e-12)]
    assert sum(budget.charged) == pytest.approx(planned, rel=1e-12)
    with pytest.raises(fl.BroadcastRefused):
        fl.FederatedTraining().check_broadcast(params, 2, {"weights": probe}, {"fl_size": probe.size})


def test_a_dp_round_charges_its_steps_and_evaluation_before_releasing(monkeypatch):
    """The rho charged in a DP round equals dpsgd_rho(z, steps Opacus took) plus one evaluation, and
    the steps the site publishes equal the noise draws Opacus made."""
    from opacus.optimizers import optimizer as opacus_optimizer

    from medveil.privacy.dpsgd import dpsgd_rho

    params = _params(dp=DP, rounds=1, batch_size=16, local_epochs=2)
    frame = _site(5, 120)
    draws = []
    generate = opacus_optimizer._generate_noise

    def counted(*args, **kwargs):
        draws.append(1)
        return generate(*args, **kwargs)

    monkeypatch.setattr(opacus_optimizer, "_generate_noise", counted)
    budget = _Budget()
    release = fl.FederatedTraining().local(params, 1, {"weights": fl.initial_weights(params)},
                                           _context(frame, params, budget=budget))
    steps = release.public["dp_steps"]
    n_params = len(list(torch.nn.Linear(3, 1).parameters()))
    assert len(draws) == steps * n_params
    assert steps == 2 * math.ceil(96 / 16)
    z = DP["noise_multiplier"]
    assert math.isclose(sum(budget.charged), dpsgd_rho(z, steps) + 1 / (2 * z * z), rel_tol=1e-12)
    assert "loss" not in release.sums  # no training loss under DP


def test_the_dp_sgd_seed_is_not_brute_forceable(monkeypatch):
    from medveil import models

    seeds = []
    real = models.train_local

    def spy(*args, **kwargs):
        seeds.append(kwargs["seed"])
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "train_local", spy)
    params = _params(dp=DP, rounds=1, validation_fraction=0.0)
    frame = _site(6, 60)
    for _ in range(12):
        fl.FederatedTraining().local(params, 1, {"weights": fl.initial_weights(params)}, _context(frame, params))
    assert max(seeds) >= 2**40  # 12 draws of a 63-bit seed all below 2**40: probability 2**-276


def test_round_zero_of_a_dp_only_study_publishes_no_unpaid_exact_count():
    """The attack: a round-0-only task of a DP-only study read each site's exact training and
    validation row counts of the complete rows in researcher-chosen columns, charged nothing.
    There the counts now go through the node's (charged) count noise, and each site weights its
    FedAvg update by its own noisy training count, read back from round 0's release."""
    from medveil.privacy.dp import gaussian_count_noise

    params = _params(dp=DP)
    frame = _site(7, 90)
    frame.loc[:6, "x3"] = np.nan
    budget = _Budget()
    gaussian = gaussian_count_noise(0.01)
    noised: list[np.ndarray] = []

    def noise(counts: np.ndarray) -> np.ndarray:  # the node's ChargedNoise: charge, then noise
        budget(0.01)
        noised.append(np.asarray(counts).copy())
        return gaussian(counts)

    release = fl.FederatedTraining().local(params, 0, {}, _context(frame, params, dp_required=True, budget=budget,
                                                                      noise=noise))
    assert budget.charged == [0.01]
    np.testing.assert_array_equal(noised, [[66, 17, 7]])  # training, validation, dropped: one noisy vector
    assert {"rows", "validation_rows", "rows_dropped"} <= set(release.public)
    noisy_rows = release.public["rows"]
    memory = {"released": {0: release.public}}
    update = fl.FederatedTraining().local(params, 1, {"weights": fl.initial_weights(params)},
                                          _context(frame, params, dp_required=True, budget=budget, noise=noise,
                                                   memory=memory))
    assert update.sums["rows"].tolist() == [max(noisy_rows, 1)]
    assert len(noised) == 1  # later rounds reuse round 0's noisy count: no new count is drawn


def test_noisy_counts_of_a_dp_only_study_vary_and_the_exact_counts_stay_outside_it():
    from medveil.privacy.dp import gaussian_count_noise

    params = _params(dp=DP)
    frame = _site(7, 90)
    seen = {fl.FederatedTraining().local(params, 0, {}, _context(frame, params, dp_required=True,
                                                                   noise=gaussian_count_noise(0.01))).public["rows"]
            for _ in range(8)}
    assert len(seen) > 1  # noise of sd ~7 over 8 draws
    exact = fl.FederatedTraining().local(params, 0, {}, _context(frame, params)).public
    assert (exact["rows"], exact["validation_rows"]) == (72, 18)


def test_a_planned_dp_training_beyond_the_remaining_budget_is_refused_in_round_zero_unpaid():
    params = _params(dp=DP, rounds=20, batch_size=8, local_epochs=3)
    budget = _Budget()
    with pytest.raises(DisclosureRefused) as refused:
        fl.FederatedTraining().local(params, 0, {}, _context(_site(8, 80), params, budget=budget, remaining=0.5))
    assert refused.value.rule == "dp_budget_exhausted" and not budget.charged


def test_noisy_validation_sums_keep_their_sensitivity_for_finite_logits():
    """Adding one row moves each of the five groups, divided by its scale, by at most 1 in L2
    (binary and three classes, crafted weights that saturate the probabilities included);
    noised_validation charges rho = 1 / (2 z^2)."""
    from medveil.models import evaluate, get_model
    from medveil.models.training import MAX_ROW_LOSS

    rng = np.random.default_rng(9)
    recipe = get_model("logistic", "1")
    for classes in (2, 3):
        outputs = 1 if classes == 2 else classes
        for scale in (0.1, 3.0, 1e4):
            weights = rng.normal(size=4 * outputs) * scale
            X = rng.normal(size=(31, 3)).astype(np.float32)
            y = rng.integers(0, classes, 31).astype(np.float32)
            whole = evaluate(recipe, {}, weights, X, y, classes=classes, bins=fl.BINS)
            less = evaluate(recipe, {}, weights, X[1:], y[1:], classes=classes, bins=fl.BINS)
            groups = {"rows": ["rows"], "loss": ["loss"], "correct": ["correct"], "hist": ["hist_pos", "hist_neg"],
                      "prob": ["prob_sum"]}
            scales = {"rows": 1, "loss": MAX_ROW_LOSS, "correct": 1, "hist": math.sqrt(outputs), "prob": 1}
            for group, keys in groups.items():
                moved = np.concatenate([(np.asarray(whole[k], float) - np.asarray(less[k], float)).ravel() for k in keys])
                assert np.linalg.norm(moved) / scales[group] <= 1 + 1e-9, (classes, scale, group)
            _, rho = fl.noised_validation(whole, 5.0)
            assert math.isclose(rho, 1 / (2 * 25.0), rel_tol=1e-9)


def test_noisy_negative_counts_give_finite_metrics():
    sums = {f"{fl.VALIDATION_PREFIX}{k}": v for k, v in {
        "rows": np.array([-3.2]), "loss": np.array([-50.0]), "correct": np.array([-7.0]),
        "hist_pos": -np.ones((1, fl.BINS)), "hist_neg": np.full((1, fl.BINS), -2.0),
        "prob_sum": -np.ones((1, fl.BINS))}.items()}
    metrics = fl.validation_metrics(sums, noisy=True)
    assert metrics is not None and math.isfinite(float(metrics["loss"])) and 0 <= float(metrics["accuracy"]) <= 1


# --- the zCDP -> (epsilon, delta) conversion never under-reports epsilon ---------------------


def _gaussian_delta(epsilon: float, mu: float) -> float:
    """Exact delta(epsilon) of the Gaussian mechanism with sensitivity / sigma = mu (Balle and Wang 2018)."""
    from scipy.stats import norm

    return norm.cdf(mu / 2 - epsilon / mu) - math.exp(epsilon) * norm.cdf(-mu / 2 - epsilon / mu)


@pytest.mark.parametrize("rho", [1e-4, 0.01, 0.5, 4.0])
@pytest.mark.parametrize("delta", [1e-3, 1e-6])
def test_rho_epsilon_is_at_least_the_gaussians_exact_epsilon(rho, delta):
    """A Gaussian mechanism of rho-zCDP (mu = sqrt(2 rho)) is one rho-zCDP mechanism, so a valid
    conversion can never report less than its exact epsilon; nor more than Bun-Steinke's bound."""
    from scipy.optimize import brentq

    from medveil.privacy.dpsgd import epsilon_rho, rho_epsilon

    mu = math.sqrt(2 * rho)
    bun_steinke = rho + 2 * math.sqrt(rho * math.log(1 / delta))  # never below the exact epsilon
    exact = brentq(lambda e: _gaussian_delta(e, mu) - delta, 0.0, bun_steinke) \
        if _gaussian_delta(0.0, mu) > delta else 0.0
    reported = rho_epsilon(rho, delta)
    assert reported >= exact * (1 - 1e-9)
    assert reported <= bun_steinke + 1e-9
    assert rho_epsilon(epsilon_rho(reported, delta), delta) <= reported * (1 + 1e-12)


# --- replays, repeated rounds and second tasks ----------------------------------------------


@pytest.mark.e2e
def test_a_dp_round_is_computed_and_charged_once_per_task():
    """A replayed or re-sent round (new nonce, later step, same round) is refused `round_order` or
    `replay`, unpaid; a second task with the same parameters pays again."""
    sites = {"site_a": _site(1, 60), "site_b": _site(2, 60)}
    params = {"model": "logistic", "version": "1", "features": FEATURES, "target": "y", "rounds": 1, "lr": 0.5,
              "seed": 3, "validation_fraction": 0.0, "dp": DP}
    with mv.Federation.in_process(sites, models=MODELS, secure_aggregation=False, timeout=120) as fed:
        grid, study = fed.network.grid, fed.study
        node = fed.network.nodes["site_a"]

        def spent() -> float:
            return node.store.budget_spent(node.dp_account(study))

        def send(task: str, step: int, round_no: int, broadcast: dict, nonce_from=None):
            envelope = nonce_from or grid.seal("task", {"params": params, "broadcast": broadcast}, study=study.id,
                                               task=task, step=step, phase="compute", round=round_no,
                                               analysis="fl_train", dataset="default", recipients=sorted(sites))
            reply = node.handle(envelope.encode())
            return envelope, reply.header["status"], reply.body()

        initial = {"weights": fl.initial_weights(fl.FLParams.model_validate(params))}
        assert send("dp-once", 0, 0, {})[1] == "ok"
        before = spent()
        first, status, body = send("dp-once", 1, 1, initial)
        assert status == "ok" and body["public"]["dp_rho"] > 0
        paid = spent() - before
        assert math.isclose(paid, body["public"]["dp_rho"], rel_tol=1e-12)
        _, status, body = send("dp-once", 1, 1, initial, nonce_from=first)  # the same envelope again
        assert status != "ok" and body["rule"] == "replay"
        _, status, body = send("dp-once", 2, 1, initial)  # a fresh step re-running round 1
        assert status != "ok" and body["rule"] == "round_order"
        _, status, body = send("dp-once", 3, 2, initial)  # a round after the last
        assert status != "ok" and body["rule"] in {"rounds_exceeded", "round_order"}
        assert math.isclose(spent() - before, paid, rel_tol=1e-12)
        assert send("dp-twice", 0, 0, {})[1] == "ok"
        assert send("dp-twice", 1, 1, initial)[1] == "ok"
        assert math.isclose(spent() - before, 2 * paid, rel_tol=1e-12)


# --- image folders: no escape, no header, no file name --------------------------------------


def _image_site(folder, seed: int, n: int = 24):
    from image_fixtures import write_digits_folder

    rng = np.random.default_rng(seed)
    return write_digits_folder(folder, rng.integers(0, 256, (n, 8, 8)).astype(np.uint8), list(np.tile([0, 1], n // 2)))


@pytest.mark.parametrize("entry", ["../outside.png", "/etc/passwd.png", "img/../../outside.png", "link.png",
                                   "img/00000.txt", "C:/x.png"])
def test_a_labels_entry_outside_the_folder_is_refused(tmp_path, entry):
    from PIL import Image

    from medveil.data.images import ImageFolder
    from medveil.data.sources import DataError, DatasetConfig

    folder = _image_site(tmp_path / "site", 1)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "outside.png")
    (folder / "link.png").symlink_to(tmp_path / "outside.png")
    labels = pd.read_csv(folder / "labels.csv")
    labels.loc[0, "file"] = entry
    labels.to_csv(folder / "labels.csv", index=False)
    with pytest.raises(DataError):
        ImageFolder.from_config("scans", DatasetConfig(kind="images", path=folder))


@pytest.mark.e2e
def test_a_refused_image_is_not_named_to_the_researcher(tmp_path, caplog):
    """An image the site refuses (here BurnedInAnnotation YES) whose file name identifies the
    patient: the refusal names the dataset, the labels file and line; the file name is logged
    at the site (the module's logger, warning), never sent."""
    from image_fixtures import write_dicom

    from medveil.runtime.grid import RefusedError

    sites = {"site_a": _image_site(tmp_path / "a", 1), "site_b": _image_site(tmp_path / "b", 2)}
    labels = pd.read_csv(sites["site_a"] / "labels.csv")  # the burnt-in scan replaces row 0, in either split
    write_dicom(sites["site_a"] / "Doe_Jane_MRN-123456.dcm", np.full((8, 8), 200, np.uint16), BurnedInAnnotation="YES")
    labels.loc[0, "file"] = "Doe_Jane_MRN-123456.dcm"
    labels.to_csv(sites["site_a"] / "labels.csv", index=False)
    with caplog.at_level(logging.WARNING, logger="medveil.data.images"):
        with mv.Federation.in_process(sites, models=MODELS, timeout=120) as fed, \
                pytest.raises(RefusedError) as refused:
            fed.train("cnn", target="label", image="file", rounds=1, hyper={"image_size": 8, "widths": [2]},
                      validation_fraction=0.2)
    assert refused.value.rule == "data_error"
    assert "Doe_Jane" not in str(refused.value) and "123456" not in str(refused.value)
    assert "line 2" in str(refused.value) and "BurnedInAnnotation YES" in str(refused.value)
    assert any("Doe_Jane_MRN-123456.dcm" in record.getMessage() and record.levelno == logging.WARNING
               for record in caplog.records if record.name == "medveil.data.images")
