"""Secure aggregation between nodes and the coordinator, without HTTP: the sum and nothing else.

(Named *_protocol so that it does not collide with tests/e2e/test_secure_aggregation.py: the test
folders have no __init__.py, so two test modules with one basename break collection.)
"""

from __future__ import annotations

import base64
import math
import time
from contextlib import contextmanager

import numpy as np
import pytest

from medveil.crypto import secagg
from medveil.crypto.signing import SigningKey
from medveil.runtime.client import new_nonce
from medveil.runtime.grid import Reply
from medveil.runtime.secure_aggregation import (
    KEYSET_LIFETIME_S,
    RULES,
    TASK_IDLE_S,
    CoordinatorState,
    MemoryStore,
    SecureAggregationAborted,
    SecureAggregationRefused,
    SiteSecureAggregation,
    consistency_statement,
    mask_context,
)
from medveil.runtime.study import StudySpec
from medveil.runtime.wire import seal

SITES = ["site_a", "site_b", "site_c", "site_d"]
TASK = "task-0123"
KEYSET = "keyset-0001"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_spec(identities, study="study-1", threshold=None) -> StudySpec:
    researcher = SigningKey.generate()
    return StudySpec(id=study, researcher="r", researcher_key=researcher.verify_key.to_text(), sites=list(identities),
                     site_keys={s: k.verify_key.to_text() for s, k in identities.items()},
                     datasets={"d": ["x"]}, analyses=["describe"], secagg_threshold=threshold)


def reply_header(site: str, study: str) -> dict:
    return {"kind": "reply", "sender": site, "nonce": new_nonce(), "issued_at": time.time(), "study": study,
            "task": TASK, "step": 0, "status": "ok"}


class Harness:
    """Four sites and a coordinator; `held[step]` is what the hub says it holds for a step."""

    def __init__(self, threshold=None, study="study-1"):
        self.identities = {site: SigningKey.generate() for site in SITES}
        self.spec = make_spec(self.identities, study, threshold)
        self.clock = Clock()
        self.held: dict[int, set[str]] = {}
        self.stores = {site: MemoryStore() for site in SITES}
        self.agents = {site: SiteSecureAggregation(site, self.stores[site], senders=self.senders, clock=self.clock,
                                                   sign=self.identities[site].sign)
                       for site in SITES}
        self.coordinator = CoordinatorState(KEYSET, self.spec.id, SITES, self.spec.threshold())

    def senders(self, task: str, step: int) -> set[str]:
        return self.held.get(step, set())

    def keys(self) -> None:
        replies = {}
        for site in SITES:
            public = self.agents[site].new_keys(self.spec, {"keyset": KEYSET})
            envelope = seal(self.identities[site], reply_header(site, self.spec.id), {"public": public})
            replies[site] = Reply(site, envelope, {"public": public})
        self.coordinator.record_keys(replies)

    def compute(self, step: int, sums: dict[str, dict], sites=None, participants=None) -> dict[str, dict]:
        participants = participants or SITES
        request = self.coordinator.compute_request(participants)
        masked = {site: self.agents[site].mask(self.spec, TASK, step, request, sums[site])
                  for site in (sites or participants)}
        self.held[step] = set(masked)
        return masked

    def consistency(self, step: int, masked: dict[str, dict], participants=None) -> dict[str, str] | None:
        """Every submitter's signature on the dropouts (None when nobody dropped: no consistency step)."""
        request = self.coordinator.consistency_request(step, participants or SITES, masked)
        if not request["dropped"]:
            return None
        return {site: self.agents[site].consistency(self.spec, TASK, request)["signature"] for site in sorted(masked)}

    def unmask(self, step: int, masked: dict[str, dict], participants=None, responders=None) -> dict[str, dict]:
        signatures = self.consistency(step, masked, participants)
        request = self.coordinator.unmask_request(step, participants or SITES, masked, signatures)
        return {site: self.agents[site].unmask(self.spec, TASK, request) for site in (responders or sorted(masked))}


def site_sums(seed: int) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = {}
    for site in SITES:
        x = rng.normal(size=(50, 4))
        out[site] = {"xtwx": x.T @ x * 1e3, "xtwz": x.T @ rng.normal(size=50), "n": np.array(50.0),
                     "empty": np.zeros((0, 3))}
    return out


def reference(sums: dict[str, dict[str, np.ndarray]], sites: list[str]) -> dict[str, np.ndarray]:
    """Correctly rounded float sums (math.fsum), the exact reference the fixed-point total must match."""
    first = sums[sites[0]]
    return {name: np.array([math.fsum(sums[s][name].flat[i] for s in sites)
                            for i in range(first[name].size)]).reshape(first[name].shape) for name in first}


def assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], parties: int) -> None:
    assert set(got) == set(want)
    for name in want:
        assert got[name].shape == want[name].shape
        error = np.abs(got[name] - want[name])
        assert np.all(error <= 1e-12 * np.abs(want[name]) + parties * 2.0**-53), name


@contextmanager
def refused(rule: str):
    """Expect a SecureAggregationRefused naming `rule` (one of the documented RULES)."""
    assert rule in RULES
    with pytest.raises(SecureAggregationRefused) as info:
        yield info
    assert info.value.rule == rule, str(info.value)


@pytest.fixture
def harness() -> Harness:
    h = Harness()
    h.keys()
    return h


def pairwise_total(h: Harness, site: str, step: int, participants: list[str], size: int) -> np.ndarray:
    """The pairwise masks a site added, computed with every private key (what colluders holding
    all key material except the self-mask seed would know)."""
    private = {s: base64.b64decode(h.stores[s].get(h.agents[s]._keyset_key(KEYSET))["private"]) for s in SITES}
    publics = {s: secagg.public_key(private[s]) for s in SITES}
    context = mask_context(h.spec.id, KEYSET, TASK, step)
    seeds = {p: secagg.mask_seed(secagg.shared_secret(private[site], publics[p]), context)
             for p in participants if p != site}
    return secagg.apply_masks(np.zeros(size, dtype=np.uint64), site, seeds)


# --- the sum ---------------------------------------------------------------------------

def test_combine_returns_the_exact_sum(harness):
    sums = site_sums(1)
    masked = harness.compute(3, sums)
    for site, body in masked.items():
        plain = secagg.encode_fixed(secagg.flatten(sums[site])[0]).ravel()
        assert body["masked"].shape == plain.shape
        assert not np.any(body["masked"] == plain)  # no site's vector travels in the clear
        assert body["layout"] == [["empty", [0, 3]], ["n", []], ["xtwx", [4, 4]], ["xtwz", [4]]]
        assert sorted(body["self_shares"]) == sorted(set(SITES) - {site})
    revealed = harness.unmask(3, masked)
    assert all(body["dropped_seeds"] == {} for body in revealed.values())
    total = harness.coordinator.combine(SITES, masked, revealed)
    assert_close(total, reference(sums, SITES), len(SITES))
    assert total["n"] == 200.0


def test_a_vector_stays_hidden_under_its_self_mask_when_every_pairwise_mask_is_known(harness):
    sums = site_sums(2)
    masked = harness.compute(0, sums)
    plain = secagg.encode_fixed(secagg.flatten(sums["site_b"])[0]).ravel()
    without_pairwise = masked["site_b"]["masked"] - pairwise_total(harness, "site_b", 0, SITES, plain.size)
    assert not np.any(without_pairwise == plain)
    # What still hides it is exactly the PRG stream of the self-mask seed the site shared out:
    # threshold shares rebuild the seed, and removing its stream leaves the plain encoding.
    revealed = harness.unmask(0, masked)
    shares = {SITES.index(site) + 1: int(revealed[site]["self_mask_shares"]["site_b"], 16) for site in SITES[:3]}
    self_seed = secagg.combine_secret(shares, harness.spec.threshold())
    assert np.array_equal(without_pairwise - secagg.expand(self_seed, plain.size), plain)


def test_masks_are_fresh_every_step(harness):
    sums = site_sums(3)
    first, second = harness.compute(0, sums), harness.compute(1, sums)
    for site in SITES:
        assert not np.array_equal(first[site]["masked"], second[site]["masked"])


@pytest.mark.parametrize("threshold, dropped", [(3, ["site_c"]), (3, ["site_a"])])
def test_a_dropout_is_removed_with_the_survivors_pairwise_seeds(threshold, dropped):
    h = Harness(threshold)
    h.keys()
    sums = site_sums(4)
    survivors = [site for site in SITES if site not in dropped]
    masked = h.compute(5, sums, sites=survivors)
    with pytest.raises(SecureAggregationAborted):
        h.coordinator.combine(SITES, masked, {})  # no self-mask shares: nothing recovered
    revealed = h.unmask(5, masked)
    for body in revealed.values():
        assert sorted(body["dropped_seeds"]) == dropped
        assert set(body["self_mask_shares"]) == set(survivors)  # never a share of a dropout's seed
    assert_close(h.coordinator.combine(SITES, masked, revealed), reference(sums, survivors), len(survivors))


def test_self_masks_need_threshold_answers(harness):
    sums = site_sums(5)
    masked = harness.compute(0, sums)
    revealed = harness.unmask(0, masked)
    enough = {site: revealed[site] for site in SITES[:3]}  # threshold 3 of 4
    assert_close(harness.coordinator.combine(SITES, masked, enough), reference(sums, SITES), 4)
    with pytest.raises(SecureAggregationAborted, match="threshold 3"):
        harness.coordinator.combine(SITES, masked, {site: revealed[site] for site in SITES[:2]})


def test_combine_refuses_mixed_or_mismatched_bodies(harness):
    sums = site_sums(7)
    masked = harness.compute(0, sums)
    with pytest.raises(ValueError, match="some sites"):
        harness.coordinator.combine(SITES, {**masked, "site_d": {"public": {}}}, {})
    other = dict(masked["site_d"], layout=[["other", [4]]])
    with pytest.raises(ValueError, match="layouts"):
        harness.coordinator.combine(SITES, {**masked, "site_d": other}, {})
    assert harness.coordinator.combine(SITES, {site: {} for site in SITES}, {}) == {}


def test_contexts_separate_studies_key_sets_tasks_and_steps():
    contexts = {mask_context("s", "k", TASK, 0), mask_context("s", "k", TASK, 1), mask_context("s", "k", "t2", 0),
                mask_context("s2", "k", TASK, 0), mask_context("s", "k2", TASK, 0)}
    assert len(contexts) == 5


# --- what a node refuses ----------------------------------------------------------------

def test_participants_must_be_the_key_sets_sites(harness):
    request = harness.coordinator.compute_request(SITES[:3])
    with refused("secagg_participants"):
        harness.agents["site_a"].mask(harness.spec, TASK, 0, request, {"v": np.ones(3)})
    with refused("secagg_participants"):
        harness.agents["site_a"].check_compute(harness.spec, TASK, harness.coordinator.compute_request(SITES),
                                               recipients=["site_a"])


def test_a_key_set_must_cover_the_studys_sites():
    h = Harness()
    h.keys()
    request = h.coordinator.compute_request(SITES)
    del request["key_envelopes"]["site_d"]
    with refused("secagg_participants"):
        h.agents["site_a"].mask(h.spec, TASK, 0, request, {"v": np.ones(3)})


def test_a_key_reply_must_verify_against_the_pinned_identity():
    h = Harness()
    h.keys()
    request = h.coordinator.compute_request(SITES)
    impostor = SigningKey.generate()  # e.g. the key a hostile hub serves for site_b
    public = {"keyset": KEYSET, "study": h.spec.id, "secagg_public": "A" * 43 + "="}
    request["key_envelopes"]["site_b"] = seal(impostor, reply_header("site_b", h.spec.id), {"public": public}).encode()
    with refused("secagg_peer_key"):
        h.agents["site_a"].mask(h.spec, TASK, 0, request, {"v": np.ones(3)})


def test_a_key_set_of_another_study_is_refused(harness):
    other = make_spec(harness.identities, study="study-2")
    with refused("secagg_wrong_study"):
        harness.agents["site_a"].mask(other, TASK, 0, harness.coordinator.compute_request(SITES), {"v": np.ones(3)})
    with refused("secagg_keyset_exists"):
        harness.agents["site_a"].new_keys(harness.spec, {"keyset": KEYSET})
    with refused("secagg_malformed"):
        harness.agents["site_a"].new_keys(harness.spec, {"keyset": "../x"})


def test_unmask_only_a_step_this_site_masked_and_only_once(harness):
    masked = harness.compute(2, site_sums(8))
    request = harness.coordinator.unmask_request(2, SITES, masked)
    with refused("secagg_unmask_refused"):
        harness.agents["site_a"].unmask(harness.spec, TASK, dict(request, of_step=1))
    harness.agents["site_a"].unmask(harness.spec, TASK, request)
    with refused("secagg_unmask_refused"):
        harness.agents["site_a"].unmask(harness.spec, TASK, request)


def test_unmask_refuses_a_dropout_claim_for_a_site_the_hub_holds(harness):
    masked = harness.compute(0, site_sums(9))
    request = harness.coordinator.unmask_request(0, SITES, {s: masked[s] for s in SITES[:3]})
    with refused("secagg_unmask_refused"):
        harness.agents["site_a"].unmask(harness.spec, TASK, request)


@pytest.mark.parametrize("dropped", [["site_a"], ["site_x"], ["site_b", "site_c"]])
def test_unmask_refuses_dropouts_outside_the_step_or_too_many(harness, dropped):
    masked = harness.compute(0, site_sums(10))
    harness.held[0] = set(SITES) - set(dropped)
    request = harness.coordinator.unmask_request(0, SITES, masked)
    request["dropped"] = dropped
    with refused("secagg_unmask_refused"):
        harness.agents["site_a"].unmask(harness.spec, TASK, request)


def test_unmask_refuses_when_the_hub_does_not_answer(harness):
    masked = harness.compute(0, site_sums(11))

    def down(task, step):
        raise ConnectionError("hub away")

    harness.agents["site_a"].senders = down
    with refused("secagg_unmask_refused"):
        harness.agents["site_a"].unmask(harness.spec, TASK, harness.coordinator.unmask_request(0, SITES, masked))


def test_a_misaddressed_share_is_refused(harness):
    masked = harness.compute(0, site_sums(12))
    request = harness.coordinator.unmask_request(0, SITES, masked)
    request["self_shares"]["site_a"]["site_b"] = request["self_shares"]["site_c"]["site_b"]
    with refused("secagg_unmask_refused"):
        harness.agents["site_a"].unmask(harness.spec, TASK, request)


def test_after_a_recorded_dropout_the_task_continues_with_its_survivors(harness):
    sums = site_sums(13)
    masked = harness.compute(0, sums, sites=SITES[:3])
    harness.unmask(0, masked)
    with refused("secagg_participants"):  # the dropout is in this site's record: the full set no longer fits
        harness.agents["site_a"].mask(harness.spec, TASK, 2, harness.coordinator.compute_request(SITES), sums["site_a"])
    survivors = SITES[:3]
    masked = harness.compute(2, sums, participants=survivors)
    total = harness.coordinator.combine(survivors, masked, harness.unmask(2, masked, participants=survivors))
    assert_close(total, reference(sums, survivors), 3)
    # another task starts again from the key set's sites
    request = harness.coordinator.compute_request(SITES)
    assert "masked" in harness.agents["site_a"].mask(harness.spec, "task-2", 0, request, sums["site_a"])


# --- the consistency step ----------------------------------------------------------------

def _one_dropout(h: Harness, step: int = 0) -> tuple[dict[str, dict], dict]:
    """site_d silent in a compute step; the consistency request naming it."""
    masked = h.compute(step, site_sums(20), sites=SITES[:3])
    return masked, h.coordinator.consistency_request(step, SITES, masked)


def test_no_consistency_step_without_dropouts(harness):
    masked = harness.compute(0, site_sums(21))
    assert harness.consistency(0, masked) is None
    assert "signatures" not in harness.coordinator.unmask_request(0, SITES, masked)
    with refused("secagg_malformed"):
        harness.agents["site_a"].consistency(harness.spec, TASK,
                                             harness.coordinator.consistency_request(0, SITES, masked))


def test_a_consistency_signature_binds_study_key_set_task_step_dropouts_and_submitters(harness):
    _, request = _one_dropout(harness)
    answer = harness.agents["site_a"].consistency(harness.spec, TASK, request)
    assert answer["dropped"] == ["site_d"] and answer["of_step"] == 0
    statement = consistency_statement(harness.spec.id, KEYSET, TASK, 0, ["site_d"], SITES[:3])
    harness.identities["site_a"].verify_key.verify(base64.b64decode(answer["signature"]), statement)
    others = {consistency_statement("study-2", KEYSET, TASK, 0, ["site_d"], SITES[:3]),
              consistency_statement(harness.spec.id, "keyset-0002", TASK, 0, ["site_d"], SITES[:3]),
              consistency_statement(harness.spec.id, KEYSET, "task-2", 0, ["site_d"], SITES[:3]),
              consistency_statement(harness.spec.id, KEYSET, TASK, 1, ["site_d"], SITES[:3]),
              consistency_statement(harness.spec.id, KEYSET, TASK, 0, ["site_c"], SITES[:3]),
              consistency_statement(harness.spec.id, KEYSET, TASK, 0, ["site_d"], SITES[:2])}
    assert statement not in others and len(others) == 6


def test_an_unmask_step_naming_dropouts_needs_the_consistency_step(harness):
    masked, _ = _one_dropout(harness)
    request = harness.coordinator.unmask_request(0, SITES, masked)
    with refused("secagg_inconsistent_dropouts"):
        harness.agents["site_a"].unmask(harness.spec, TASK, request)
    assert harness.stores["site_a"].get(harness.agents["site_a"]._task_key(TASK))["steps"]["0"]["own_share"]


def test_a_site_agrees_to_one_dropout_set_per_step_and_not_after_unmasking(harness):
    masked, request = _one_dropout(harness)
    agent = harness.agents["site_a"]
    first = agent.consistency(harness.spec, TASK, request)
    assert agent.consistency(harness.spec, TASK, request) == first  # the same set again: the same signature
    harness.held[0] = {"site_a", "site_b"}  # a colluding hub now hides site_c's vector instead
    with refused("secagg_inconsistent_dropouts"):
        agent.consistency(harness.spec, TASK, dict(request, dropped=["site_c"], submitters=["site_a", "site_b",
                                                                                               "site_d"]))
    harness.held[0] = set(masked)
    harness.unmask(0, masked)
    with refused("secagg_inconsistent_dropouts"):
        harness.agents["site_b"].consistency(harness.spec, TASK, request)


def test_an_unmask_step_needs_every_submitters_signature_on_the_same_dropouts(harness):
    masked, request = _one_dropout(harness)
    signatures = {site: harness.agents[site].consistency(harness.spec, TASK, request)["signature"]
                  for site in SITES[:3]}
    other_statement = consistency_statement(harness.spec.id, KEYSET, TASK, 1, ["site_d"], SITES[:3])
    forged = base64.b64encode(harness.identities["site_b"].sign(other_statement)).decode()
    bad = [{site: signatures[site] for site in SITES[:2]},  # one missing
           dict(signatures, site_b=signatures["site_c"]),  # another site's signature
           dict(signatures, site_b=forged),  # the right signer on another statement
           dict(signatures, site_b="not base64")]
    for candidate in bad:
        with refused("secagg_inconsistent_dropouts"):
            harness.agents["site_a"].unmask(harness.spec, TASK,
                                            harness.coordinator.unmask_request(0, SITES, masked, candidate))
    with refused("secagg_inconsistent_dropouts"):  # agreed to a dropout, then told that nobody dropped
        harness.agents["site_a"].unmask(harness.spec, TASK, harness.coordinator.unmask_request(0, SITES, masked))
    record = harness.stores["site_a"].get(harness.agents["site_a"]._task_key(TASK))["steps"]["0"]
    assert record["unmasked"] is False and record["own_share"]
    revealed = {site: harness.agents[site].unmask(
        harness.spec, TASK, harness.coordinator.unmask_request(0, SITES, masked, signatures)) for site in SITES[:3]}
    assert all(list(body["dropped_seeds"]) == ["site_d"] for body in revealed.values())


def test_a_consistency_request_must_name_the_steps_submitters(harness):
    _, request = _one_dropout(harness)
    with refused("secagg_unmask_refused"):
        harness.agents["site_a"].consistency(harness.spec, TASK, dict(request, submitters=SITES[:2]))
    with refused("secagg_unmask_refused"):  # the hub holds the claimed dropout's vector
        harness.agents["site_a"].consistency(harness.spec, TASK, dict(request, dropped=["site_c"],
                                                                      submitters=["site_a", "site_b", "site_d"]))


def test_a_task_cannot_switch_key_sets(harness):
    harness.compute(0, site_sums(14))
    request = dict(harness.coordinator.compute_request(SITES), keyset="keyset-0002")
    harness.agents["site_a"].new_keys(harness.spec, {"keyset": "keyset-0002"})
    with refused("secagg_wrong_keyset"):
        harness.agents["site_a"].check_compute(harness.spec, TASK, request)


# --- spent key material -----------------------------------------------------------------

def test_the_own_share_is_deleted_once_revealed_and_task_records_on_request(harness):
    masked = harness.compute(0, site_sums(15))
    agent, store = harness.agents["site_a"], harness.stores["site_a"]
    assert store.get(agent._task_key(TASK))["steps"]["0"]["own_share"]
    harness.unmask(0, masked)
    assert store.get(agent._task_key(TASK))["steps"]["0"]["own_share"] is None
    agent.forget_task(TASK)
    assert store.get(agent._task_key(TASK)) is None


def test_expired_key_sets_and_idle_tasks_are_deleted(harness):
    harness.compute(0, site_sums(16))
    agent, store = harness.agents["site_a"], harness.stores["site_a"]
    harness.clock.now += TASK_IDLE_S + 1
    agent.prune()
    assert store.get(agent._task_key(TASK)) is None
    assert store.get(agent._keyset_key(KEYSET)) is not None
    harness.clock.now += KEYSET_LIFETIME_S
    with refused("secagg_unknown_keyset"):
        agent.check_compute(harness.spec, TASK, harness.coordinator.compute_request(SITES))
    assert store.get(agent._keyset_key(KEYSET)) is None
    assert not any("private" in value for value in store.data.values())


def test_a_site_whose_policy_refuses_dropouts_reveals_no_pairwise_seed(harness):
    """With `secagg_dropouts: false` a sum over survivors is never recovered at that site's expense
    or with its help (the residual risk of a survivor sum compared with a full one)."""
    masked = harness.compute(0, site_sums(14), sites=SITES[:3])
    strict = SiteSecureAggregation("site_a", harness.stores["site_a"], senders=harness.senders,
                                   clock=harness.clock, allow_dropouts=False)
    request = harness.coordinator.unmask_request(0, SITES, masked)
    with refused("secagg_dropouts_refused"):
        strict.unmask(harness.spec, TASK, request)
    with refused("secagg_dropouts_refused"):
        strict.consistency(harness.spec, TASK, harness.coordinator.consistency_request(0, SITES, masked))
    unsigned = SiteSecureAggregation("site_a", harness.stores["site_a"], senders=harness.senders, clock=harness.clock)
    with refused("secagg_dropouts_refused"):  # no identity key to sign the dropouts with
        unsigned.consistency(harness.spec, TASK, harness.coordinator.consistency_request(0, SITES, masked))
    assert harness.stores["site_a"].get(harness.agents["site_a"]._task_key(TASK))["steps"]["0"]["unmasked"] is False
