"""Red-team tests of federated training (fl_train): a hostile researcher tries to make a site run
a model it has not installed or the study has not approved, an image model on features or a
tabular one on images, to push hyperparameters and the DP, validation and sampling fields out
of bounds, to train without DP in a study that releases only DP results, to replay the DP
noise from its own seed, to feed the sites malformed or non-initial weights or extra rounds;
and the hub tries to read one site's own trained weights or validation sums from the traffic
it relays.

Raw steps (signed with the researcher's real key, bypassing the client's validation) go to a
second, plain study (secure aggregation off) approved the ordinary way; the traffic test runs
the ordinary API on the secure study and searches the hub's recorded bytes for each site's
locally trained weights and validation sums, computed here with medveil.models.train_local and
evaluate from the same broadcast on the site's own training and validation rows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import medveil as mv
from medveil.analyses.fl import round_seed, split_rows
from medveil.crypto.secagg import encode_fixed
from medveil.runtime.grid import RefusedError
from medveil.runtime.wire import pack_body
from raw_tasks import refusal_rules, send_raw

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.e2e

FEATURES = ["x1", "x2", "x3"]
APPROVED = ["logistic@1"]  # mlp@1 is installed at every site but not approved for these studies
BASE = {"model": "logistic", "version": "1", "features": FEATURES, "target": "y", "rounds": 2, "lr": 0.5,
        "seed": 3}


def _site(seed: int, n: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(size=(n, len(FEATURES))), columns=FEATURES)
    frame["y"] = (rng.random(n) < 1 / (1 + np.exp(-frame["x1"]))).astype(int)
    return frame


SITES = {"site_a": _site(1, 40), "site_b": _site(2, 65), "site_c": _site(3, 150)}
DP = {"noise_multiplier": 5.0, "max_grad_norm": 1.0, "delta": 1e-3}


@pytest.fixture(scope="module")
def fed():
    with mv.Federation.simulate(SITES, record_hub_traffic=True, timeout=60, models=APPROVED) as federation:
        federation.network.add_study("plain", {"default": [*FEATURES, "y"]}, secure_aggregation=False,
                                     models=APPROVED)
        federation.network.add_study("dp-only", {"default": [*FEATURES, "y"]}, secure_aggregation=False,
                                     models=APPROVED, dp_rho_per_release=0.01)
        yield federation


def _send(fed, task: str, step: int, round_no: int, params: dict, broadcast: dict | None = None,
          study: str = "plain") -> dict:
    return send_raw(fed, study, task, step, round_no, "fl_train", params, broadcast)


def _initial(params: dict) -> np.ndarray:
    from medveil.models import get_model, init_weights

    return init_weights(get_model(params["model"], params["version"]), len(params["features"]),
                        params.get("hyper", {}), params["seed"])


def _own_release(site: str, frame: pd.DataFrame, weights: np.ndarray, params: dict) -> tuple[np.ndarray, int, dict]:
    """What one site computes from `weights` in round 1: its own trained weights and training
    rows, and its own validation sums, on its seeded training / validation split."""
    from medveil.models import evaluate, get_model, train_local

    train, held = split_rows(len(frame), 0.2, params["seed"])
    x, y = frame[FEATURES].to_numpy(np.float32), frame["y"].to_numpy(np.float32)
    recipe = get_model("logistic", "1")
    update = train_local(recipe, {}, weights, x[train], y[train], epochs=1, batch_size=None,
                         lr=params["lr"], algorithm="fedavg", mu=0.0, seed=round_seed(params["seed"], 1))
    return update.weights, update.rows, evaluate(recipe, {}, weights, x[held], y[held], bins=20)


def _words(sums: dict) -> list[bytes]:
    """The byte strings of a site's own validation sums a relay could match: the loss sum, each
    probability sum, and each histogram as a whole (int64 counts alone are too common a word)."""
    return [np.float64(sums["loss"][0]).tobytes(), sums["hist_pos"].tobytes(), sums["hist_neg"].tobytes(),
            *(np.float64(v).tobytes() for v in sums["prob_sum"].ravel() if v != 0)]


def _found(values: np.ndarray, blob: bytes) -> list[bytes]:
    """The 8-byte words of `values` (each coefficient alone) that occur in `blob`."""
    return [word for word in (np.float64(v).tobytes() for v in np.ravel(values)) if word in blob]


def test_an_unregistered_model_is_refused(fed):
    answers = _send(fed, "fl-unknown", 0, 0, dict(BASE, model="backdoor"))
    assert refusal_rules(answers) == {"unknown_model"} and all(s != "ok" for s, _ in answers.values())
    answers = _send(fed, "fl-unknown-version", 0, 0, dict(BASE, version="9"))
    assert refusal_rules(answers) == {"unknown_model"}


def test_a_model_the_study_does_not_approve_is_refused(fed):
    answers = _send(fed, "fl-unapproved", 0, 0, dict(BASE, model="mlp", hyper={"hidden": [4]}))
    assert refusal_rules(answers) == {"model_not_approved"} and all(s != "ok" for s, _ in answers.values())
    with pytest.raises(RefusedError) as refused:
        fed.train("mlp", target="y", features=FEATURES, rounds=1, hyper={"hidden": [4]})
    assert refused.value.rule == "model_not_approved"


@pytest.mark.parametrize("number,change", list(enumerate([
    {"model": "mlp", "hyper": {"hidden": [100_000]}},
    {"model": "mlp", "hyper": {"hidden": [4] * 5}},
    {"model": "mlp", "hyper": {"dropout": 0.95}},
    {"model": "mlp", "hyper": {"hidden": [4], "code": "__import__('os')"}},
    {"hyper": {"hidden": [4]}},  # logistic has no hyperparameters
    {"lr": 1e6}, {"rounds": 10_000}, {"local_epochs": 0}, {"batch_size": 0}, {"mu": -1.0},
    {"algorithm": "scaffold"}, {"features": []}, {"features": ["x1", "x1"]}, {"features": ["x1", "y"]},
])))
def test_out_of_bounds_parameters_are_refused(fed, number, change):
    answers = _send(fed, f"fl-bounds-{number}", 0, 0, dict(BASE, **change))
    assert refusal_rules(answers) == {"invalid_parameters"} and all(s != "ok" for s, _ in answers.values())


@pytest.mark.parametrize("name,weights", [
    ("short", lambda w: w[:-1]), ("long", lambda w: np.append(w, 0.0)), ("nan", lambda w: np.where(w == w[0], np.nan, w)),
    ("inf", lambda w: np.full_like(w, np.inf)), ("text", lambda w: ["0.1"] * len(w)), ("matrix", lambda w: np.outer(w, w)),
])
def test_malformed_weights_are_refused(fed, name, weights):
    task = f"fl-malformed-{name}"
    answers = _send(fed, task, 0, 0, BASE)
    assert all(status == "ok" for status, _ in answers.values()), answers
    answers = _send(fed, task, 1, 1, BASE, {"weights": weights(_initial(BASE))})
    assert refusal_rules(answers) == {"broadcast_malformed"} and all(s != "ok" for s, _ in answers.values())


def test_round_one_accepts_only_the_agreed_initial_weights(fed):
    task = "fl-crafted-start"
    assert all(status == "ok" for status, _ in _send(fed, task, 0, 0, BASE).values())
    crafted = _initial(BASE) + 1e-3
    answers = _send(fed, task, 1, 1, BASE, {"weights": crafted})
    assert refusal_rules(answers) == {"broadcast_not_initial"}
    answers = _send(fed, "fl-extra-key", 0, 0, BASE)
    answers = _send(fed, "fl-extra-key", 1, 1, BASE, {"weights": _initial(BASE), "hook": 1})
    assert refusal_rules(answers) == {"broadcast_malformed"}


def test_the_hub_never_sees_a_sites_own_weights_or_validation_sums(fed):
    params = dict(BASE, rounds=1)
    result = fed.train("logistic", target="y", features=FEATURES, rounds=1, lr=params["lr"], seed=params["seed"])
    traffic = fed.hub_traffic()
    secure = b"".join(pack_body(body) for body in traffic[traffic["task"] == result.provenance["task"]]["body"])
    initial = _initial(params)
    owns = {site: _own_release(site, frame, initial, params) for site, frame in SITES.items()}
    pooled = sum(rows * trained for trained, rows, _ in owns.values()) / sum(rows for _, rows, _ in owns.values())
    np.testing.assert_allclose(result.weights, pooled, atol=1e-12)  # the sites did release these
    assert result.history["val_rows"].iloc[0] == sum(int(v["rows"][0]) for _, _, v in owns.values())
    for site, (trained, rows, validation) in owns.items():
        assert not _found(trained, secure) and not _found(rows * trained, secure), site
        assert encode_fixed(rows * trained).tobytes() not in secure, site
        assert not [word for word in _words(validation) if word in secure], site
        assert encode_fixed(validation["loss"]).tobytes() not in secure, site

    # The search works: with secure aggregation off the same round's replies hold every site's release.
    assert all(status == "ok" for status, _ in _send(fed, "fl-plain-control", 0, 0, params).values())
    answers = _send(fed, "fl-plain-control", 1, 1, params, {"weights": initial})
    plain = b"".join(pack_body(body) for _, body in answers.values())
    for site, (trained, rows, validation) in owns.items():
        assert len(_found(rows * trained, plain)) == trained.size, site
        assert all(word in plain for word in _words(validation)), site


@pytest.mark.parametrize("number,change", list(enumerate([
    {"dp": {**DP, "noise_multiplier": 0.01}}, {"dp": {**DP, "noise_multiplier": 1e4}},
    {"dp": {**DP, "noise_multiplier": float("nan")}}, {"dp": {**DP, "max_grad_norm": 0.0}},
    {"dp": {**DP, "max_grad_norm": 1e3}}, {"dp": {**DP, "delta": 0.0}}, {"dp": {**DP, "delta": 0.5}},
    {"dp": {**DP, "accountant": "none"}}, {"dp": {"noise_multiplier": 1.0}}, {"dp": "off"},
    {"dp": DP, "algorithm": "fedprox", "mu": 0.1},
    {"validation_fraction": -0.1}, {"validation_fraction": 0.9}, {"validation_fraction": float("inf")},
    {"sample_fraction": 0.0}, {"sample_fraction": 1.5}, {"classes": 1}, {"classes": 10**6},
    {"image": "x1"}, {"image": "y", "features": []}, {"features": []},
])))
def test_hostile_dp_validation_and_sampling_fields_are_refused(fed, number, change):
    answers = _send(fed, f"fl-fields-{number}", 0, 0, dict(BASE, **change))
    assert refusal_rules(answers) == {"invalid_parameters"} and all(s != "ok" for s, _ in answers.values())


@pytest.mark.parametrize("change", [
    {"model": "cnn", "hyper": {"image_size": 8}},  # an image model on tabular features
    {"image": "x1", "features": []},  # a tabular model on an image column
])
def test_a_model_that_reads_other_inputs_is_refused(fed, change):
    answers = _send(fed, f"fl-inputs-{change.get('model', 'logistic')}", 0, 0, dict(BASE, **change))
    assert refusal_rules(answers) == {"model_input_mismatch"} and all(s != "ok" for s, _ in answers.values())


def test_a_delta_not_below_one_over_the_training_rows_is_refused(fed):
    answers = _send(fed, "fl-delta", 0, 0, dict(BASE, dp=dict(DP, delta=1e-2)))
    # site_c trains on 120 rows (1/120 < 1e-2); the smaller sites' 1/rows stay above it
    assert {site for site, (status, _) in answers.items() if status != "ok"} == {"site_c"}
    assert refusal_rules(answers) == {"dp_delta_too_large"}


def test_sample_fraction_below_one_without_dp_is_refused(fed):
    answers = _send(fed, "fl-sampled", 0, 0, dict(BASE, sample_fraction=0.5))
    assert refusal_rules(answers) == {"sample_fraction_needs_dp"} and all(s != "ok" for s, _ in answers.values())
    answers = _send(fed, "fl-sampled-dp", 0, 0, dict(BASE, sample_fraction=0.5, dp=DP))
    assert all(status == "ok" for status, _ in answers.values()), answers


def test_a_study_that_releases_only_dp_results_refuses_a_training_without_dp(fed):
    answers = _send(fed, "fl-dp-required", 0, 0, BASE, study="dp-only")
    assert refusal_rules(answers) == {"dp_required"} and all(s != "ok" for s, _ in answers.values())
    answers = _send(fed, "fl-dp-given", 0, 0, dict(BASE, dp=DP), study="dp-only")
    assert all(status == "ok" for status, _ in answers.values()), answers


def test_no_round_beyond_the_last_is_answered(fed):
    params = dict(BASE, rounds=1, validation_fraction=0.0)
    assert all(status == "ok" for status, _ in _send(fed, "fl-extra-round", 0, 0, params).values())
    answers = _send(fed, "fl-extra-round", 1, 1, params, {"weights": _initial(params)})
    assert all(status == "ok" for status, _ in answers.values()), answers
    answers = _send(fed, "fl-extra-round", 2, 2, params, {"weights": _initial(params)})
    assert refusal_rules(answers) == {"rounds_exceeded"} and all(s != "ok" for s, _ in answers.values())


def test_the_dp_noise_is_not_replayable_from_the_researchers_seed(fed):
    """Two DP trainings with the same parameters and seed give different weights: the sites
    draw DP-SGD's noise and sample from their own secret seed (a replayable noise could be
    subtracted), while without DP the same seed gives the same weights."""
    common = dict(target="y", features=FEATURES, rounds=1, lr=0.5, seed=3, validation_fraction=0.0)
    first, second = (fed.train("logistic", dp=DP, **common) for _ in range(2))
    assert not np.array_equal(first.weights, second.weights)
    np.testing.assert_array_equal(fed.train("logistic", **common).weights, fed.train("logistic", **common).weights)
