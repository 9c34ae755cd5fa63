"""Red-team tests of federated training (fl_train): a hostile researcher tries to make a site run
a model it has not installed or the study has not approved, to push hyperparameters out of
bounds, to feed the sites malformed or non-initial weights, and the hub tries to read one site's
own trained weights from the traffic it relays.

Raw steps (signed with the researcher's real key, bypassing the client's validation) go to a
second, plain study (secure aggregation off) approved the ordinary way; the traffic test runs
the ordinary API on the secure study and searches the hub's recorded bytes for each site's
locally trained weights, computed here with medveil.models.train_local from the same broadcast.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import medveil as mv
from medveil.analyses.fl import round_seed
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


SITES = {"site_a": _site(1, 40), "site_b": _site(2, 65), "site_c": _site(3, 90)}


@pytest.fixture(scope="module")
def fed():
    with mv.Federation.simulate(SITES, record_hub_traffic=True, timeout=60, models=APPROVED) as federation:
        federation.network.add_study("plain", {"default": [*FEATURES, "y"]}, secure_aggregation=False,
                                     models=APPROVED)
        yield federation


def _send(fed, task: str, step: int, round_no: int, params: dict, broadcast: dict | None = None) -> dict:
    return send_raw(fed, "plain", task, step, round_no, "fl_train", params, broadcast)


def _initial(params: dict) -> np.ndarray:
    from medveil.models import get_model, init_weights

    return init_weights(get_model(params["model"], params["version"]), len(params["features"]),
                        params.get("hyper", {}), params["seed"])


def _own_release(frame: pd.DataFrame, weights: np.ndarray, params: dict) -> tuple[np.ndarray, int]:
    """What one site trains from `weights` in round 1 (its own weights, and its row count)."""
    from medveil.models import get_model, train_local

    trained, _, rows = train_local(get_model("logistic", "1"), {}, weights, frame[FEATURES].to_numpy(np.float32),
                                   frame["y"].to_numpy(np.float32), epochs=1, batch_size=None, lr=params["lr"],
                                   algorithm="fedavg", mu=0.0, seed=round_seed(params["seed"], 1))
    return trained, rows


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


def test_the_hub_never_sees_a_sites_own_weights(fed):
    params = dict(BASE, rounds=1)
    result = fed.train("logistic", target="y", features=FEATURES, rounds=1, lr=params["lr"], seed=params["seed"])
    traffic = fed.hub_traffic()
    secure = b"".join(pack_body(body) for body in traffic[traffic["task"] == result.provenance["task"]]["body"])
    initial = _initial(params)
    owns = {site: _own_release(frame, initial, params) for site, frame in SITES.items()}
    pooled = sum(rows * trained for trained, rows in owns.values()) / sum(rows for _, rows in owns.values())
    np.testing.assert_allclose(result.weights, pooled, atol=1e-12)  # the sites did release these
    for site, (trained, rows) in owns.items():
        assert not _found(trained, secure) and not _found(rows * trained, secure), site
        assert encode_fixed(rows * trained).tobytes() not in secure, site

    # The search works: with secure aggregation off the same round's replies hold every site's release.
    assert all(status == "ok" for status, _ in _send(fed, "fl-plain-control", 0, 0, params).values())
    answers = _send(fed, "fl-plain-control", 1, 1, params, {"weights": initial})
    plain = b"".join(pack_body(body) for _, body in answers.values())
    for site, (trained, rows) in owns.items():
        assert len(_found(rows * trained, plain)) == trained.size, site
