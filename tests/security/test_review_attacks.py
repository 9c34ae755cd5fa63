"""Red-team review of issue 10: attacks that got past the first round of guards.

Each test tries to read one patient or one site through the attack and asserts that it is
refused with a named rule and that nothing was extracted.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from medveil.analyses.base import get_analysis
from medveil.crypto import secagg
from medveil.crypto.signing import SigningKey
from medveil.privacy.disclosure import DisclosurePolicy, DisclosureRefused
from medveil.runtime.client import new_nonce
from medveil.runtime.secure_aggregation import (
    CoordinatorState,
    MemoryStore,
    SecureAggregationAborted,
    SecureAggregationRefused,
    SiteSecureAggregation,
)
from medveil.runtime.study import StudySpec
from medveil.runtime.wire import seal

TASK = "task-review-0001"
KEYSET = "keyset-review-01"


def _secure_sites(sites: list[str], threshold: int | None = None):
    """Agents of `sites` with a key set made; the hub (colluding) says it holds no vector at all."""
    identities = {site: SigningKey.generate() for site in sites}
    researcher = SigningKey.generate()
    spec = StudySpec(id="study-review", researcher="r", researcher_key=researcher.verify_key.to_text(),
                     sites=sites, site_keys={s: k.verify_key.to_text() for s, k in identities.items()},
                     datasets={"d": ["x"]}, analyses=["describe"], secagg_threshold=threshold)
    agents = {site: SiteSecureAggregation(site, MemoryStore(), senders=lambda task, step: set()) for site in sites}
    coordinator = CoordinatorState(KEYSET, spec.id, sites, spec.threshold())
    replies = {}
    for site in sites:
        public = agents[site].new_keys(spec, {"keyset": KEYSET})
        header = {"kind": "reply", "sender": site, "nonce": new_nonce(), "issued_at": time.time(),
                  "study": spec.id, "task": TASK, "step": 0, "status": "ok"}
        replies[site] = (seal(identities[site], header, {"public": public}), {"public": public})
    coordinator.record_keys(replies)
    return spec, agents, coordinator


def test_inconsistent_dropout_claims_from_hub_and_researcher_do_not_open_a_site():
    """Every site submits. The hub and researcher tell a that c dropped, b that a dropped, and c
    that b dropped: from each site's own view an ordinary single dropout. a then reveals its own
    self-mask share and its seed with c, c a share of a's self mask, b its seed with a: with the
    default threshold of 2 of 3 that is everything that opens a's vector. Refused: a site helps
    recover a dropout only while the claimed dropouts are at most threshold - 2."""
    sites = ["a", "b", "c"]
    spec, agents, coordinator = _secure_sites(sites)
    rng = np.random.default_rng(1)
    sums = {site: {"v": rng.normal(50, 10, 4)} for site in sites}
    masked = {site: agents[site].mask(spec, TASK, 0, coordinator.compute_request(sites), sums[site])
              for site in sites}
    told = {"a": ["c"], "b": ["a"], "c": ["b"]}
    revealed, refusals = {}, []
    for site, dropped in told.items():
        submitted = {q: masked[q] for q in sites if q not in dropped}
        request = coordinator.unmask_request(0, sites, submitted)
        try:
            revealed[site] = agents[site].unmask(spec, TASK, request)
        except SecureAggregationRefused as exc:
            refusals.append(exc.rule)
    assert refusals == ["secagg_unmask_refused"] * 3
    # Nothing came back, so a's vector stays under its masks.
    shares = {sites.index(v) + 1: int(body["self_mask_shares"]["a"], 16)
              for v, body in revealed.items() if "a" in body["self_mask_shares"]}
    assert len(shares) < spec.threshold()
    plain = secagg.encode_fixed(secagg.flatten(sums["a"])[0]).ravel()
    assert not np.array_equal(np.asarray(masked["a"]["masked"], dtype=np.uint64), plain)


def test_a_single_dropout_is_still_recovered_where_the_threshold_allows_it():
    """Honest dropout recovery stays: 4 sites, threshold 3, one site silent."""
    sites = ["a", "b", "c", "d"]
    spec, agents, coordinator = _secure_sites(sites)
    sums = {site: {"v": np.arange(4.0) + i} for i, site in enumerate(sites)}
    masked = {site: agents[site].mask(spec, TASK, 0, coordinator.compute_request(sites), sums[site])
              for site in sites[:3]}
    request = coordinator.unmask_request(0, sites, masked)
    revealed = {site: agents[site].unmask(spec, TASK, request) for site in masked}
    total = coordinator.combine(sites, masked, revealed)
    assert np.allclose(total["v"], sum(sums[s]["v"] for s in sites[:3]))


@pytest.mark.parametrize("threshold, dropped", [(2, ["b"]), (2, ["b", "d"]), (3, ["b", "d"])])
def test_more_claimed_dropouts_than_threshold_minus_two_are_refused(threshold, dropped):
    """4 sites: with threshold 2 no dropout, with threshold 3 one at most, can be recovered
    without the inconsistent-view attack above; nothing is revealed."""
    sites = ["a", "b", "c", "d"]
    spec, agents, coordinator = _secure_sites(sites, threshold)
    survivors = [s for s in sites if s not in dropped]
    masked = {site: agents[site].mask(spec, TASK, 0, coordinator.compute_request(sites), {"v": np.ones(3)})
              for site in survivors}
    request = coordinator.unmask_request(0, sites, masked)
    for site in survivors:
        with pytest.raises(SecureAggregationRefused) as error:
            agents[site].unmask(spec, TASK, request)
        assert error.value.rule == "secagg_unmask_refused"


def test_a_dropout_needs_every_submitter_in_the_unmask_step():
    """(Moved from test_secure_aggregation_protocol.py: it needs 5 sites now.) A dropout's
    pairwise masks go only when every submitter answers, even with threshold answers."""
    sites = ["a", "b", "c", "d", "e"]
    spec, agents, coordinator = _secure_sites(sites)
    assert spec.threshold() == 3
    masked = {site: agents[site].mask(spec, TASK, 0, coordinator.compute_request(sites), {"v": np.ones(3)})
              for site in sites[:4]}
    request = coordinator.unmask_request(0, sites, masked)
    revealed = {site: agents[site].unmask(spec, TASK, request) for site in masked}
    with pytest.raises(SecureAggregationAborted, match="every submitter"):
        coordinator.combine(sites, masked, {site: revealed[site] for site in sites[:3]})
    assert np.allclose(coordinator.combine(sites, masked, revealed)["v"], 4.0)


# --- small per-site counts and models over a handful of rows -------------------------------

def _few_rows(n_complete: int, n: int = 40) -> pd.DataFrame:
    """A site where only `n_complete` rows have a duration (the rest are missing)."""
    rng = np.random.default_rng(3)
    frame = pd.DataFrame({"time": rng.integers(1, 100, n).astype(float), "event": rng.integers(0, 2, n),
                          "x": rng.normal(size=n), "y": rng.normal(60, 10, n)})
    frame.loc[n_complete:, ["time", "y"]] = np.nan
    return frame


def test_survival_does_not_publish_a_small_exact_row_count():
    """Round 0 of km named the site's complete rows exactly, 3 here: a small cell in disguise."""
    km = get_analysis("kaplan_meier")
    release = km.local(km.parse_params({"duration": "time", "event": "event"}), 0, {}, _few_rows(3),
                       DisclosurePolicy())
    assert "rows" not in release.public
    release = km.local(km.parse_params({"duration": "time", "event": "event"}), 0, {}, _few_rows(20),
                       DisclosurePolicy())
    assert release.public["rows"] == 20


def test_cox_does_not_publish_a_small_exact_row_count():
    cox = get_analysis("coxph")
    params = cox.parse_params({"duration": "time", "event": "event", "covariates": ["x"]})
    release = cox.local(params, 0, {}, _few_rows(4), DisclosurePolicy())
    assert "rows" not in release.public


def test_a_glm_over_fewer_than_min_cell_count_rows_is_refused():
    """y ~ 1 passes the saturation guard with 4 rows (1 parameter <= 0.33 * 4) and released
    the sum of y over 4 patients and `rows` = 4."""
    glm = get_analysis("glm")
    params = glm.parse_params({"formula": "y ~ 1"})
    with pytest.raises(DisclosureRefused) as error:
        glm.local(params, 1, {"levels": {}}, _few_rows(4), DisclosurePolicy(), scratch={})
    assert error.value.rule == "min_cell_count"


# --- the hub ---------------------------------------------------------------------------------

@pytest.mark.e2e
def test_a_task_record_is_read_only_by_its_researcher():
    """GET /v1/tasks/{id} answered any enrolled party with the task's result summary (the
    provenance: sites, each site's rows, DP spent), e.g. a site reading another site's rows."""
    import medveil as mv
    from medveil.runtime.client import HubError

    rng = np.random.default_rng(5)
    frames = {f"s{i}": pd.DataFrame({"x": rng.normal(size=40)}) for i in range(2)}
    with mv.Federation.simulate(frames, timeout=30) as fed:
        result = fed.describe("x")
        path = f"/v1/tasks/{result.attrs['provenance']['task']}"
        deadline = time.monotonic() + 30
        while fed.session.client.get_json(path)["status"] != "done" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert fed.session.client.get_json(path)["result"]  # the researcher reads its own record
        with pytest.raises(HubError) as error:
            fed.network.nodes["s0"].node.client.get_json(path)
        assert "404" in str(error.value) or getattr(error.value, "status", None) == 404


# --- designs and coefficients that single out one row ----------------------------------------

def test_a_smooth_indicator_does_not_read_one_patients_value():
    """exp(-100 * (age - 97) ** 2) is 1 for the one 97-year-old and below 1e-43 for everyone
    else: an indicator in all but name, so intercept + coefficient is that patient's response."""
    rng = np.random.default_rng(0)
    age = rng.integers(30, 90, 200).astype(float)
    age[17] = 97
    sbp = rng.normal(120, 15, 200)
    sbp[17] = 181.234
    frame = pd.DataFrame({"age": age, "sbp": sbp})
    glm = get_analysis("glm")
    params = glm.parse_params({"formula": "sbp ~ exp(-100 * (age - 97) ** 2)"})
    scratch: dict = {}
    with pytest.raises(DisclosureRefused) as error:
        glm.local(params, 1, {"levels": {}}, frame, DisclosurePolicy(), scratch=scratch)
        release = glm.local(params, 2, {"levels": {}, "ybar": 120.0, "ybar_weighted": 120.0}, frame,
                            DisclosurePolicy(), scratch=scratch)
        beta = np.linalg.solve(release.sums["xtwx"], release.sums["xtwz"])
        assert not np.isclose(beta.sum(), 181.234)
    assert error.value.rule == "leverage"


@pytest.mark.parametrize("formula", ["sbp ~ I(1 / ((age - 97) ** 2 + 0.000001))",
                                     "sbp ~ age + exp(-100 * (age - 97) ** 2)"])
def test_other_smooth_spikes_are_refused_by_the_leverage_guard(formula):
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({"age": rng.integers(30, 90, 200).astype(float), "sbp": rng.normal(120, 15, 200)})
    frame.loc[17, "age"] = 97
    glm = get_analysis("glm")
    with pytest.raises(DisclosureRefused) as error:
        glm.local(glm.parse_params({"formula": formula}), 1, {"levels": {}}, frame, DisclosurePolicy(), scratch={})
    assert error.value.rule == "leverage"


def test_coefficients_that_cut_the_data_are_refused():
    """A researcher-chosen steep slope K * (age - a) makes mu 0 below age a and 1 above, so the
    round's deviance would count the patients on each side of a cut of the researcher's choosing."""
    rng = np.random.default_rng(2)
    frame = pd.DataFrame({"age": rng.integers(30, 90, 300).astype(float), "y": rng.integers(0, 2, 300)})
    glm = get_analysis("glm")
    params = glm.parse_params({"formula": "y ~ age", "family": "binomial"})
    scratch: dict = {}
    glm.local(params, 1, {"levels": {}}, frame, DisclosurePolicy(), scratch=scratch)
    honest = glm.local(params, 2, {"levels": {}, "beta": np.array([-0.2, 0.003])}, frame, DisclosurePolicy(),
                       scratch=scratch)
    assert honest.sums["xtwx"].shape == (2, 2)
    steep = np.array([-1000.0 * 61.5, 1000.0])
    with pytest.raises(DisclosureRefused) as error:
        glm.local(params, 3, {"levels": {}, "beta": steep}, frame, DisclosurePolicy(), scratch=scratch)
    assert error.value.rule == "weight_dominance"


def test_poisson_coefficients_that_put_the_weight_on_one_row_are_refused():
    rng = np.random.default_rng(3)
    frame = pd.DataFrame({"age": rng.normal(60, 10, 300), "y": rng.poisson(2.0, 300)})
    glm = get_analysis("glm")
    params = glm.parse_params({"formula": "y ~ age", "family": "poisson"})
    scratch: dict = {}
    glm.local(params, 1, {"levels": {}}, frame, DisclosurePolicy(), scratch=scratch)
    oldest = float(frame["age"].max())
    with pytest.raises(DisclosureRefused) as error:
        glm.local(params, 2, {"levels": {}, "beta": np.array([-5.0 * oldest, 5.0])}, frame, DisclosurePolicy(),
                  scratch=scratch)
    assert error.value.rule == "weight_dominance"
