"""Red-team tests of secure aggregation: a hostile researcher (alone, or with the hub) tries to
read one site's own sums by narrowing a compute step, rewinding or forging an unmask step,
reusing a key set across studies, claiming that a site which did submit dropped out, or showing
each site different dropouts.

Each attack is a raw task message signed with the researcher's real key, for a study the sites
approved the ordinary way. Each test asserts the named refusal and that the site's own sums
were not recovered from what came back.
"""

from __future__ import annotations

import uuid
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pytest

import medveil as mv
from medveil.analyses.base import SiteContext, get_analysis
from medveil.crypto import secagg
from medveil.privacy.disclosure import DisclosurePolicy
from medveil.runtime.grid import HubGrid, Step
from medveil.runtime.secure_aggregation import CoordinatorState
from medveil.runtime.study import StudySpec

pytestmark = pytest.mark.e2e

SITES = ["a", "b", "c"]
PARAMS = {"variables": ["x"]}


def _frame(seed: int, n: int = 60) -> pd.DataFrame:
    return pd.DataFrame({"x": np.random.default_rng(seed).normal(10, 3, n)})


FRAMES = {site: _frame(i + 1) for i, site in enumerate(SITES)}


@pytest.fixture(scope="module")
def fed():
    with mv.Federation.simulate(FRAMES, timeout=30) as federation:
        federation.describe("x")  # the session's key set, as an honest run makes it
        yield federation


def _own_sums(site: str) -> np.ndarray:
    """The site's round-0 release of describe(x) in the clear: what the attacks try to read."""
    describe = get_analysis("describe")
    release = describe.local(describe.parse_params(PARAMS), 0, {}, SiteContext(site, FRAMES[site], DisclosurePolicy(), {}, {}))
    return secagg.flatten({k: np.asarray(v, dtype=np.float64) for k, v in release.sums.items()})[0]


def _keyset(fed) -> CoordinatorState:
    """The key set the session's runs use, as the honest describe of the fixture made it."""
    keyset = fed.session.keysets.current
    assert keyset is not None and keyset.keyed
    return keyset


def _send(fed, task: str, step: int, phase: str, secure: dict, recipients: list[str],
          study: StudySpec | None = None, round_no: int = 0) -> dict[str, dict]:
    """Send one raw step (each recipient the same body) over a Grid of the researcher's hub client,
    under the study or `study`, and gather the verified replies ({site: body}); a refusal raises
    RefusedError, a silent site is only absent."""
    grid = fed.session.grid if study is None else HubGrid(fed.session.grid.client, study)
    step_ = Step(task, step, phase, round_no, "describe",
                 {site: {"params": PARAMS, "broadcast": {}, "secagg": secure} for site in recipients},
                 {site: "default" for site in recipients})
    replies = grid.exchange(step_, timeout=fed.session.timeout, tolerate_missing=True)
    return {site: reply.body for site, reply in replies.items()}


def _decoded(vector: np.ndarray) -> np.ndarray:
    return secagg.decode_fixed(np.asarray(vector, dtype=np.uint64).reshape(-1, secagg.LIMBS))


def _not_recovered(vector: np.ndarray, site: str) -> None:
    """Neither the vector nor its decoding is the site's own release."""
    own = _own_sums(site)
    assert not np.array_equal(np.asarray(vector, dtype=np.uint64), secagg.encode_fixed(own).ravel())
    assert not np.allclose(_decoded(vector), own, rtol=1e-6)


@pytest.mark.parametrize("recipients", [["a"], ["a", "b"]], ids=["single_site", "subset"])
def test_a_compute_step_addressed_to_fewer_sites_is_refused(fed, recipients):
    secure = _keyset(fed).compute_request(recipients)
    with pytest.raises(mv.RefusedError) as error:
        _send(fed, uuid.uuid4().hex, 0, "compute", secure, recipients)
    assert {rule for _, rule, _ in error.value.refusals} == {"secagg_participants"}
    assert {site for site, _, _ in error.value.refusals} == set(recipients)


def test_a_participant_list_that_omits_a_site_is_refused(fed):
    secure = _keyset(fed).compute_request(["a", "b"])
    with pytest.raises(mv.RefusedError) as error:
        _send(fed, uuid.uuid4().hex, 0, "compute", secure, SITES)
    assert {rule for _, rule, _ in error.value.refusals} == {"secagg_participants"}


def test_a_single_site_step_under_the_full_participant_list_cannot_be_unmasked(fed):
    """Told every site takes part but sent to one: it masks against all, and no unmask opens it."""
    task = uuid.uuid4().hex
    secure = _keyset(fed).compute_request(SITES)
    try:
        replies = _send(fed, task, 0, "compute", secure, ["a"])
    except mv.RefusedError as error:  # refused already because the step is not addressed to its participants
        assert error.rule == "secagg_participants"
        return
    _not_recovered(replies["a"]["masked"], "a")
    request = _keyset(fed).unmask_request(0, SITES, replies)
    with pytest.raises(mv.RefusedError) as error:
        _send(fed, task, 1, "unmask", request, ["a"])
    assert error.value.rule == "secagg_unmask_refused"


def _honest_compute(fed, task: str, step: int = 0) -> dict[str, dict]:
    return _send(fed, task, step, "compute", _keyset(fed).compute_request(SITES), SITES)


def test_an_unmask_step_for_a_site_that_submitted_is_refused(fed):
    task = uuid.uuid4().hex
    replies = _honest_compute(fed, task)
    request = _keyset(fed).unmask_request(0, SITES, {s: replies[s] for s in ["a", "b"]})  # claims c dropped
    with pytest.raises(mv.RefusedError) as error:
        _send(fed, task, 1, "unmask", request, ["a", "b"])
    assert {rule for _, rule, _ in error.value.refusals} == {"secagg_unmask_refused"}
    _not_recovered(replies["c"]["masked"], "c")


def test_a_rewound_or_repeated_unmask_step_is_refused(fed):
    task = uuid.uuid4().hex
    replies = _honest_compute(fed, task)
    request = _keyset(fed).unmask_request(0, SITES, replies)
    answers = _send(fed, task, 1, "unmask", request, SITES)
    assert all(body["public"]["dropped_seeds"] == {} for body in answers.values())
    with pytest.raises(mv.RefusedError) as error:  # the same step again, now claiming c dropped
        _send(fed, task, 2, "unmask", _keyset(fed).unmask_request(0, SITES, {s: replies[s] for s in ["a", "b"]}),
              ["a", "b"])
    assert {rule for _, rule, _ in error.value.refusals} == {"secagg_unmask_refused"}
    with pytest.raises(mv.RefusedError) as error:  # a step no site masked (the request's own earlier step)
        _send(fed, task, 3, "unmask", dict(request, of_step=2), SITES)
    assert {rule for _, rule, _ in error.value.refusals} == {"secagg_unmask_refused"}
    _not_recovered(replies["c"]["masked"], "c")


def test_a_key_set_of_another_study_is_refused(fed):
    other = fed.network.add_study(f"other-{uuid.uuid4().hex[:8]}", {"default": ["x"]})
    secure = _keyset(fed).compute_request(SITES)
    with pytest.raises(mv.RefusedError) as error:
        _send(fed, uuid.uuid4().hex, 0, "compute", secure, SITES, study=other)
    assert {rule for _, rule, _ in error.value.refusals} == {"secagg_wrong_study"}


@contextmanager
def _hub_says_it_holds(fed, held: set[str]):
    """A colluding hub: every node is told that the hub holds the vectors of `held` only."""
    agents = {site: fed.network.nodes[site].node._secure_aggregation() for site in SITES}
    honest = {site: agent.senders for site, agent in agents.items()}
    try:
        for agent in agents.values():
            agent.senders = lambda task, step: set(held)
        yield
    finally:
        for site, agent in agents.items():
            agent.senders = honest[site]


def test_a_false_dropout_claimed_by_hub_and_researcher_leaves_the_vector_hidden(fed):
    """Every site submits; the hub says c did not. Asked for c's seeds without every
    submitter's signature on that dropout, a and b refuse. With their signatures (they agree:
    from their view c did drop) they reveal their seeds with c, and c, told in its own unmask
    step that nobody dropped, reveals its own share of its self mask: one of the two needed,
    since a and b, who take c for a dropout, reveal no share of it."""
    task = uuid.uuid4().hex
    replies = _honest_compute(fed, task)
    ab = {s: replies[s] for s in ["a", "b"]}
    with _hub_says_it_holds(fed, {"a", "b"}):
        with pytest.raises(mv.RefusedError) as error:
            _send(fed, task, 1, "unmask", _keyset(fed).unmask_request(0, SITES, ab), ["a", "b"])
        assert {rule for _, rule, _ in error.value.refusals} == {"secagg_inconsistent_dropouts"}
        agreed = _send(fed, task, 2, "consistency", _keyset(fed).consistency_request(0, SITES, ab), ["a", "b"])
        signatures = {site: body["public"]["signature"] for site, body in agreed.items()}
        told_submitted = _send(fed, task, 3, "unmask", _keyset(fed).unmask_request(0, SITES, replies), ["c"])
        told_dropped = _send(fed, task, 4, "unmask", _keyset(fed).unmask_request(0, SITES, ab, signatures),
                             ["a", "b"])
    assert told_submitted["c"]["public"]["dropped_seeds"] == {}
    assert all(list(body["public"]["dropped_seeds"]) == ["c"] for body in told_dropped.values())
    shares_of_c = [body["public"]["self_mask_shares"] for body in [*told_submitted.values(), *told_dropped.values()]
                   if "c" in body["public"]["self_mask_shares"]]
    assert fed.study.threshold() == 2 and len(shares_of_c) == 1
    _not_recovered(replies["c"]["masked"], "c")


def test_different_dropouts_shown_to_each_site_are_refused(fed):
    """Every site submits. The hub and researcher tell a that c dropped, b that a dropped and c
    that b dropped, each in a consistency step of its own, then ask each to unmask with the
    signatures they gathered: no site holds its co-submitter's signature on its own view, and
    a site that signed one view refuses to sign another. Nothing of any vector is revealed."""
    task = uuid.uuid4().hex
    replies = _honest_compute(fed, task)
    told = {"a": ["c"], "b": ["a"], "c": ["b"]}
    with _hub_says_it_holds(fed, set()):
        views = {site: {q: replies[q] for q in SITES if q not in dropped} for site, dropped in told.items()}
        steps = iter(range(1, 10))  # the hub takes each step of a task once
        signed = {}
        for site, view in views.items():
            reply = _send(fed, task, next(steps), "consistency", _keyset(fed).consistency_request(0, SITES, view), [site])
            signed[site] = reply[site]["public"]["signature"]
        for site, view in views.items():
            other = next(q for q in view if q != site)
            with pytest.raises(mv.RefusedError) as error:  # the co-submitter will not sign this view too
                _send(fed, task, next(steps), "consistency", _keyset(fed).consistency_request(0, SITES, view), [other])
            assert error.value.rule == "secagg_inconsistent_dropouts"
        for site, view in views.items():
            request = _keyset(fed).unmask_request(0, SITES, view, {q: signed[q] for q in view})
            with pytest.raises(mv.RefusedError) as error:
                _send(fed, task, next(steps), "unmask", request, [site])
            assert error.value.rule == "secagg_inconsistent_dropouts"
    for site in SITES:
        _not_recovered(replies[site]["masked"], site)
