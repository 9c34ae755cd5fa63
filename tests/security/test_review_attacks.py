"""Red-team review of issue 10: attacks that got past the first round of guards.

Each test tries to read one patient or one site through the attack and asserts that it is
refused with a named rule and that nothing was extracted.
"""

from __future__ import annotations

import base64
import time

import numpy as np
import pandas as pd
import pytest

from medveil.analyses.base import SiteContext, get_analysis
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
    consistency_statement,
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
    agents = {site: SiteSecureAggregation(site, MemoryStore(), senders=lambda task, step: set(),
                                          sign=identities[site].sign) for site in sites}
    coordinator = CoordinatorState(KEYSET, spec.id, sites, spec.threshold())
    replies = {}
    for site in sites:
        public = agents[site].new_keys(spec, {"keyset": KEYSET})
        header = {"kind": "reply", "sender": site, "nonce": new_nonce(), "issued_at": time.time(),
                  "study": spec.id, "task": TASK, "step": 0, "status": "ok"}
        replies[site] = (seal(identities[site], header, {"public": public}), {"public": public})
    coordinator.record_keys(replies)
    return spec, agents, coordinator


def _honest_unmask(spec, agents, coordinator, sites, masked) -> dict[str, dict]:
    """The session's steps after a compute step: consistency (if some site dropped), then unmask."""
    consistency = coordinator.consistency_request(0, sites, masked)
    signatures = None
    if consistency["dropped"]:
        signatures = {site: agents[site].consistency(spec, TASK, consistency)["signature"] for site in masked}
    request = coordinator.unmask_request(0, sites, masked, signatures)
    return {site: agents[site].unmask(spec, TASK, request) for site in masked}


def _show_each_site_its_own_dropouts(spec, agents, coordinator, sites, masked, told, colluders=()):
    """The hub and researcher run a consistency step per site with the dropouts `told[site]`, the
    colluders signing whatever is asked, and then ask each honest site to unmask with the
    signatures gathered for its view. Returns what came back and the refusals' rules."""
    signed: dict[tuple, dict[str, str]] = {}
    refusals = []
    for site, dropped in told.items():
        request = coordinator.consistency_request(0, sites, {q: masked[q] for q in sites if q not in dropped})
        key = tuple(request["dropped"])
        signed[key] = {site: agents[site].consistency(spec, TASK, request)["signature"]}
        for colluder in colluders:
            statement = consistency_statement(spec.id, KEYSET, TASK, 0, request["dropped"], request["submitters"])
            signed[key][colluder] = base64.b64encode(agents[colluder].sign(statement)).decode()  # its own key
    for site, dropped in told.items():
        submitters = [q for q in sites if q not in dropped]
        # the signature each other submitter gave, on whichever dropouts it was shown
        signatures = {q: next(s[q] for s in signed.values() if q in s) for q in submitters}
        signatures.update(signed[tuple(sorted(dropped))])
        for q in submitters:  # ask the other honest submitters to sign this view too
            if q not in signed[tuple(sorted(dropped))] and q not in colluders:
                request = coordinator.consistency_request(0, sites, {p: masked[p] for p in submitters})
                try:
                    agents[q].consistency(spec, TASK, request)
                except SecureAggregationRefused as exc:
                    refusals.append(exc.rule)
        request = coordinator.unmask_request(0, sites, {q: masked[q] for q in submitters}, signatures)
        try:
            agents[site].unmask(spec, TASK, request)
        except SecureAggregationRefused as exc:
            refusals.append(exc.rule)
    return refusals


def _still_masked(spec, agents, masked, sums, site) -> None:
    """The site's vector is not its plain release, and its own self-mask share was never revealed."""
    plain = secagg.encode_fixed(secagg.flatten(sums[site])[0]).ravel()
    assert not np.array_equal(np.asarray(masked[site]["masked"], dtype=np.uint64), plain)
    for agent in agents.values():
        record = agent.store.get(agent._task_key(TASK))
        assert record["steps"]["0"]["unmasked"] is False and record["steps"]["0"]["own_share"]


def test_inconsistent_dropout_claims_from_hub_and_researcher_do_not_open_a_site():
    """Every site submits. The hub and researcher tell a that c dropped, b that a dropped, and c
    that b dropped: from each site's own view an ordinary single dropout. Without a consistency
    check, a would reveal its own self-mask share and its seed with c, c a share of a's self
    mask, b its seed with a: with threshold 2 of 3 everything that opens a's vector. Refused: a
    site signs one dropout set per step, and unmasks only against every submitter's signature
    on the set it signed, which the others, shown other sets, never gave."""
    sites = ["a", "b", "c"]
    spec, agents, coordinator = _secure_sites(sites)
    assert spec.threshold() == 2
    rng = np.random.default_rng(1)
    sums = {site: {"v": rng.normal(50, 10, 4)} for site in sites}
    masked = {site: agents[site].mask(spec, TASK, 0, coordinator.compute_request(sites), sums[site])
              for site in sites}
    refusals = _show_each_site_its_own_dropouts(spec, agents, coordinator, sites, masked,
                                                {"a": ["c"], "b": ["a"], "c": ["b"]})
    assert refusals and set(refusals) == {"secagg_inconsistent_dropouts"}
    assert len(refusals) == 6  # each other submitter refuses to sign a second view; each site to unmask
    for site in sites:
        _still_masked(spec, agents, masked, sums, site)


def test_inconsistent_dropout_claims_with_a_colluding_site_do_not_open_a_site():
    """4 sites, threshold 3, d colluding (it signs anything and hands over its key material).
    Told: a that b dropped, b that c dropped, c that a dropped. Without a consistency check a
    would reveal its share of its own self mask and its seed with b, b a share of a's self
    mask, c its seed with a, d the rest: 3 shares of a's self mask and every pairwise seed of
    a's, under the old limit of threshold - 2 claimed dropouts too. Refused as above."""
    sites = ["a", "b", "c", "d"]
    spec, agents, coordinator = _secure_sites(sites, threshold=3)
    rng = np.random.default_rng(2)
    sums = {site: {"v": rng.normal(50, 10, 4)} for site in sites}
    masked = {site: agents[site].mask(spec, TASK, 0, coordinator.compute_request(sites), sums[site])
              for site in sites}
    refusals = _show_each_site_its_own_dropouts(spec, agents, coordinator, sites, masked,
                                                {"a": ["b"], "b": ["c"], "c": ["a"]}, colluders=["d"])
    assert refusals and set(refusals) == {"secagg_inconsistent_dropouts"}
    for site in "abc":
        _still_masked(spec, {s: agents[s] for s in "abc"}, masked, sums, site)


def test_a_single_dropout_is_still_recovered_where_the_threshold_allows_it():
    """Honest dropout recovery stays: 4 sites, threshold 3, one site silent."""
    sites = ["a", "b", "c", "d"]
    spec, agents, coordinator = _secure_sites(sites)
    sums = {site: {"v": np.arange(4.0) + i} for i, site in enumerate(sites)}
    masked = {site: agents[site].mask(spec, TASK, 0, coordinator.compute_request(sites), sums[site])
              for site in sites[:3]}
    revealed = _honest_unmask(spec, agents, coordinator, sites, masked)
    total = coordinator.combine(sites, masked, revealed)
    assert np.allclose(total["v"], sum(sums[s]["v"] for s in sites[:3]))


def test_three_sites_with_threshold_two_recover_one_dropout():
    """The limit of threshold - 2 claimed dropouts made a 3-site study unable to survive any."""
    sites = ["a", "b", "c"]
    spec, agents, coordinator = _secure_sites(sites)
    assert spec.threshold() == 2
    sums = {site: {"v": np.arange(3.0) * (i + 1)} for i, site in enumerate(sites)}
    masked = {site: agents[site].mask(spec, TASK, 0, coordinator.compute_request(sites), sums[site])
              for site in ["a", "c"]}
    revealed = _honest_unmask(spec, agents, coordinator, sites, masked)
    assert all(list(body["dropped_seeds"]) == ["b"] for body in revealed.values())
    assert np.allclose(coordinator.combine(sites, masked, revealed)["v"], sums["a"]["v"] + sums["c"]["v"])


@pytest.mark.parametrize("threshold, dropped", [(3, ["b", "d"]), (2, ["b", "c", "d"])])
def test_fewer_submitters_than_the_threshold_are_refused(threshold, dropped):
    """4 sites: a dropout is recovered only while at least max(threshold, 2) sites submitted;
    neither the consistency step nor the unmask step reveals anything below that."""
    sites = ["a", "b", "c", "d"]
    spec, agents, coordinator = _secure_sites(sites, threshold)
    survivors = [s for s in sites if s not in dropped]
    masked = {site: agents[site].mask(spec, TASK, 0, coordinator.compute_request(sites), {"v": np.ones(3)})
              for site in survivors}
    consistency = coordinator.consistency_request(0, sites, masked)
    unmask = coordinator.unmask_request(0, sites, masked)
    for site in survivors:
        for step, request in ((agents[site].consistency, consistency), (agents[site].unmask, unmask)):
            with pytest.raises(SecureAggregationRefused) as error:
                step(spec, TASK, request)
            assert error.value.rule == "secagg_unmask_refused"


@pytest.mark.parametrize("threshold, dropped", [(2, ["b"]), (2, ["b", "d"]), (3, ["b"])])
def test_dropouts_are_recovered_down_to_the_threshold(threshold, dropped):
    """4 sites: with threshold 2 two dropouts, with threshold 3 one, are recovered exactly."""
    sites = ["a", "b", "c", "d"]
    spec, agents, coordinator = _secure_sites(sites, threshold)
    survivors = [s for s in sites if s not in dropped]
    sums = {site: {"v": np.arange(3.0) + i} for i, site in enumerate(sites)}
    masked = {site: agents[site].mask(spec, TASK, 0, coordinator.compute_request(sites), sums[site])
              for site in survivors}
    revealed = _honest_unmask(spec, agents, coordinator, sites, masked)
    assert np.allclose(coordinator.combine(sites, masked, revealed)["v"], sum(sums[s]["v"] for s in survivors))


def test_a_dropout_needs_every_submitter_in_the_unmask_step():
    """(Moved from test_secure_aggregation_protocol.py: it needs 5 sites now.) A dropout's
    pairwise masks go only when every submitter answers, even with threshold answers."""
    sites = ["a", "b", "c", "d", "e"]
    spec, agents, coordinator = _secure_sites(sites)
    assert spec.threshold() == 3
    masked = {site: agents[site].mask(spec, TASK, 0, coordinator.compute_request(sites), {"v": np.ones(3)})
              for site in sites[:4]}
    revealed = _honest_unmask(spec, agents, coordinator, sites, masked)
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
    release = km.local(km.parse_params({"duration": "time", "event": "event"}), 0, {},
                       SiteContext("s", _few_rows(3), DisclosurePolicy(), {}, {}))
    assert "rows" not in release.public
    release = km.local(km.parse_params({"duration": "time", "event": "event"}), 0, {},
                       SiteContext("s", _few_rows(20), DisclosurePolicy(), {}, {}))
    assert release.public["rows"] == 20


def test_cox_does_not_publish_a_small_exact_row_count():
    cox = get_analysis("coxph")
    params = cox.parse_params({"duration": "time", "event": "event", "covariates": ["x"]})
    release = cox.local(params, 0, {}, SiteContext("s", _few_rows(4), DisclosurePolicy(), {}, {}))
    assert "rows" not in release.public


def test_a_glm_over_fewer_than_min_cell_count_rows_is_refused():
    """y ~ 1 passes the saturation guard with 4 rows (1 parameter <= 0.33 * 4) and released
    the sum of y over 4 patients and `rows` = 4."""
    glm = get_analysis("glm")
    params = glm.parse_params({"formula": "y ~ 1"})
    with pytest.raises(DisclosureRefused) as error:
        glm.local(params, 1, {"levels": {}}, SiteContext("s", _few_rows(4), DisclosurePolicy(), {}, {}))
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
        task = result.attrs["provenance"]["task"]
        deadline = time.monotonic() + 30
        while fed.session.grid.client.task_record(task)["status"] != "done" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert fed.session.grid.client.task_record(task)["result"]  # the researcher reads its own record
        with pytest.raises(HubError) as error:
            fed.network.nodes["s0"].node.client.task_record(task)
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
        glm.local(params, 1, {"levels": {}}, SiteContext("s", frame, DisclosurePolicy(), scratch, {}))
        release = glm.local(params, 2, {"levels": {}, "ybar": 120.0, "ybar_weighted": 120.0},
                            SiteContext("s", frame, DisclosurePolicy(), scratch, {}))
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
        glm.local(glm.parse_params({"formula": formula}), 1, {"levels": {}},
                  SiteContext("s", frame, DisclosurePolicy(), {}, {}))
    assert error.value.rule == "leverage"


def test_coefficients_that_cut_the_data_are_refused():
    """A researcher-chosen steep slope K * (age - a) makes mu 0 below age a and 1 above, so the
    round's deviance would count the patients on each side of a cut of the researcher's choosing."""
    rng = np.random.default_rng(2)
    frame = pd.DataFrame({"age": rng.integers(30, 90, 300).astype(float), "y": rng.integers(0, 2, 300)})
    glm = get_analysis("glm")
    params = glm.parse_params({"formula": "y ~ age", "family": "binomial"})
    scratch: dict = {}
    glm.local(params, 1, {"levels": {}}, SiteContext("s", frame, DisclosurePolicy(), scratch, {}))
    honest = glm.local(params, 2, {"levels": {}, "beta": np.array([-0.2, 0.003])},
                       SiteContext("s", frame, DisclosurePolicy(), scratch, {}))
    assert honest.sums["xtwx"].shape == (2, 2)
    steep = np.array([-1000.0 * 61.5, 1000.0])
    with pytest.raises(DisclosureRefused) as error:
        glm.local(params, 3, {"levels": {}, "beta": steep}, SiteContext("s", frame, DisclosurePolicy(), scratch, {}))
    assert error.value.rule == "weight_dominance"


def test_poisson_coefficients_that_put_the_weight_on_one_row_are_refused():
    rng = np.random.default_rng(3)
    frame = pd.DataFrame({"age": rng.normal(60, 10, 300), "y": rng.poisson(2.0, 300)})
    glm = get_analysis("glm")
    params = glm.parse_params({"formula": "y ~ age", "family": "poisson"})
    scratch: dict = {}
    glm.local(params, 1, {"levels": {}}, SiteContext("s", frame, DisclosurePolicy(), scratch, {}))
    oldest = float(frame["age"].max())
    with pytest.raises(DisclosureRefused) as error:
        glm.local(params, 2, {"levels": {}, "beta": np.array([-5.0 * oldest, 5.0])},
                  SiteContext("s", frame, DisclosurePolicy(), scratch, {}))
    assert error.value.rule == "weight_dominance"
