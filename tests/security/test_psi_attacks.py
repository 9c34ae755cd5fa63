"""Red-team tests of private set intersection and the registry count.

The researcher (who relays every payload and signs every step) and sites that collude with it try
to learn one patient's membership or one site's IDs: naming a site outside the study, a colluding
party holding a single ID (so the intersection size answers "is this patient at the other site?"),
forged, replayed, stale and cross-task payloads, a peer's hostile points (off the curve, on the
twist, of small order, malformed arrays), parameters that differ between the two parties so the
right party learns what only the left should, a ring that leaves a site out, and an alignment of
one study reused in another. Each is refused with its named rule, and no ID is in any message.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
from node_harness import NodeHarness

import medveil as mv
from medveil.analyses import base
from medveil.analyses.base import (
    Aggregated,
    Analysis,
    BroadcastRefused,
    Finished,
    Params,
    Release,
    SiteContext,
    get_analysis,
)
from medveil.crypto.psi import hash_and_blind, hash_to_group, new_key
from medveil.crypto.sealed import seal_payload
from medveil.privacy.disclosure import DisclosurePolicy
from medveil.runtime.session import ResearcherSession

NO_GUARD = DisclosurePolicy(differencing_guard=False)
FIELD_PRIME = 2**255 - 19


def _ids(prefix: str, start: int, stop: int) -> pd.DataFrame:
    return pd.DataFrame({"patient_id": [f"{prefix}{i:04d}" for i in range(start, stop)]})


# --- through the federation ------------------------------------------------------------------

def test_a_party_outside_the_study_is_refused():
    with mv.Federation.in_process({"a": _ids("p", 0, 30), "b": _ids("p", 10, 40)}, policy=NO_GUARD) as fed:
        with pytest.raises(mv.RefusedError) as error:
            fed.psi("a", "outsider", on="patient_id")
        assert error.value.rule == "site_not_in_study"
        with pytest.raises(mv.RefusedError) as error:
            fed.run("distinct_patients", on="patient_id", sites=["a", "b", "outsider"])
        assert error.value.rule == "site_not_in_study"


def test_a_site_without_the_column_cannot_be_made_a_party():
    """A dealer site holds no table: naming it as a PSI party is refused, nothing read."""
    sites = {"a": _ids("p", 0, 30), "b": _ids("p", 10, 40), "dealer": {}}
    with mv.Federation.in_process(sites, policy=NO_GUARD, roles={"dealer": "dealer"}) as fed:
        with pytest.raises(mv.RefusedError) as error:
            fed.psi("a", "dealer", on="patient_id")
        assert (error.value.site, error.value.rule) == ("dealer", "dataset_not_approved")


@pytest.mark.parametrize("reveal", ["both", "left", "size"])
def test_a_colluding_party_with_one_id_is_refused_by_its_peer(reveal):
    """b's steward lowers its own minimum to 1 and holds one ID (the patient the researcher asks
    about); a, the honest party, refuses to blind against a set that small."""
    policies = {"a": NO_GUARD, "b": DisclosurePolicy(min_cell_count=1, differencing_guard=False)}
    frames = {"a": _ids("p", 0, 30), "b": _ids("p", 7, 8)}
    with mv.Federation.in_process(frames, policy=policies) as fed, pytest.raises(mv.RefusedError) as error:
        fed.psi("a", "b", on="patient_id", reveal=reveal)
    assert (error.value.site, error.value.rule) == ("a", "psi_set_too_small")
    assert "p0007" not in str(error.value)


def test_a_colluding_counter_gets_no_tiny_batch():
    """The counter lowers its minimum; a site of one ID still refuses at its own node, and the
    counter refuses a complete batch smaller than its minimum from anyone else."""
    policies = {"a": DisclosurePolicy(min_cell_count=1, differencing_guard=False), "b": NO_GUARD, "c": NO_GUARD}
    frames = {"a": _ids("p", 0, 30), "b": _ids("p", 10, 40), "c": _ids("p", 3, 4)}
    with mv.Federation.in_process(frames, policy=policies) as fed, pytest.raises(mv.RefusedError) as error:
        fed.distinct_patients(on="patient_id", counter="a")
    assert (error.value.site, error.value.rule) == ("c", "psi_set_too_small")


def test_a_ring_that_leaves_a_study_site_out_is_refused_by_every_site():
    """A count over a subset of the study (to difference against the full count) is refused by
    the sites in the ring too: each checks the ring against the approved study's sites."""
    frames = {"a": _ids("p", 0, 30), "b": _ids("p", 10, 40), "c": _ids("p", 20, 50)}
    with mv.Federation.in_process(frames, policy=NO_GUARD) as fed, pytest.raises(mv.RefusedError) as error:
        fed.run("distinct_patients", on="patient_id", sites=["a", "b"])
    assert sorted((site, rule) for site, rule, _ in error.value.refusals) == [
        ("a", "ring_incomplete"), ("b", "ring_incomplete"), ("c", "ring_incomplete")]


class ReaderParams(Params):
    aligned: str
    column: str = "patient_id"


class AlignedReader(Analysis[ReaderParams]):
    """Test-only: every site reports how many rows the alignment `aligned` gives it."""

    name = "aligned_reader"
    Params = ReaderParams
    releases_sums = False

    def variables(self, params: ReaderParams) -> list[str]:
        return [params.column]

    def alignment(self, params: ReaderParams) -> str | None:
        return params.aligned

    def local(self, params: ReaderParams, round_no: int, broadcast: dict[str, Any], context: SiteContext) -> Release:
        return Release(public={"aligned_rows": len(context.data)})

    def global_step(self, params: ReaderParams, round_no: int, aggregated: Aggregated,
                    state: dict[str, Any]) -> Finished:
        return Finished(aggregated.public)


def test_an_alignment_of_one_study_is_unknown_in_another():
    base.register(AlignedReader)
    try:
        frames = {"a": _ids("p", 0, 30), "b": _ids("p", 10, 40)}
        with mv.Federation.simulate(frames, policy=NO_GUARD, timeout=120) as fed:
            kept = fed.psi("a", "b", on="patient_id")
            same_study = fed.run("aligned_reader", aligned=kept.alignment).result
            assert {site: facts["aligned_rows"] for site, facts in same_study.items()} == {"a": 20, "b": 20}
            other = fed.network.add_study("other-study", {"default": ["patient_id"]})
            session = ResearcherSession(fed.network.researcher, other, timeout=120)
            try:
                with pytest.raises(mv.RefusedError) as error:
                    session.run("aligned_reader", {"aligned": kept.alignment}, "default")
            finally:
                session.close()
        assert error.value.rule == "alignment_unknown"
    finally:
        base._REGISTRY.pop(AlignedReader.name, None)


# --- at the node, with hand-made steps --------------------------------------------------------

PSI = "psi"


@pytest.fixture()
def harness(tmp_path):
    frames = {"a": _ids("p", 0, 30), "b": _ids("p", 10, 40), "c": _ids("p", 0, 40)}
    harness = NodeHarness(tmp_path, frames, [PSI, "distinct_patients"], policy=NO_GUARD)
    yield harness
    harness.close()


def _params(reveal: str = "both") -> dict[str, Any]:
    return {"left": "a", "right": "b", "on": "patient_id", "reveal": reveal}


def _round0(harness: NodeHarness, task: str, params_a: dict, params_b: dict) -> dict[str, dict]:
    """Round 0 at a and b; each one's sealed payload for the other."""
    sealed = {}
    for site, peer, params in (("a", "b", params_a), ("b", "a", params_b)):
        status, body = harness.send(site, task, 0, 0, PSI, params)
        assert status == "ok", body
        assert set(body["payloads"]) == {peer}
        sealed[site] = body["payloads"][peer]
    return sealed


def test_parameters_that_differ_between_the_parties_let_right_learn_nothing(harness):
    """The researcher tells a "left" (a alone learns the intersection) and b "both": each payload
    carries a digest of its sender's parameters, so both refuse in round 1 and keep nothing."""
    left_only, both = _params("left"), _params("both")
    sealed = _round0(harness, "t-mixed", left_only, both)
    status, a1 = harness.send("a", "t-mixed", 1, 1, PSI, left_only, messages=[sealed["b"]])
    assert (status, a1["rule"]) == ("refused", "psi_params_mismatch")
    status, b1 = harness.send("b", "t-mixed", 1, 1, PSI, both, messages=[sealed["a"]])
    assert (status, b1["rule"]) == ("refused", "psi_params_mismatch")
    for site in ("a", "b"):
        assert harness.nodes[site].alignments.load(harness.spec.id, "t-mixed") is None


def test_a_researcher_forging_the_peers_points_is_refused(harness):
    """The researcher hashes guessed IDs itself and seals them to b as if a sent them, so that b
    would blind them; b checks a's pinned signature."""
    _round0(harness, "t-forged", _params(), _params())
    guesses = hash_to_group([f"p{i:04d}" for i in range(30)], harness.spec.study_salt())
    forged = seal_payload({"points": guesses, "min_cell_count": 5}, sender="a", recipient="b",
                          context={"study": harness.spec.id, "task": "t-forged", "step": 0, "round": 0},
                          recipient_key=harness.encryption["b"], signer=harness.researcher)
    status, body = harness.send("b", "t-forged", 1, 1, PSI, _params(), messages=[forged])
    assert (status, body["rule"]) == ("refused", "payload_forged")


def test_replayed_stale_and_cross_task_payloads_are_refused(harness):
    sealed = _round0(harness, "t-one", _params(), _params())
    status, body = harness.send("b", "t-one", 1, 1, PSI, _params(), messages=[sealed["a"]])
    assert status == "ok"
    status, body = harness.send("b", "t-one", 2, 2, PSI, _params(), messages=[sealed["a"]])
    assert (status, body["rule"]) == ("refused", "payload_replayed")
    other = _round0(harness, "t-two", _params(), _params())
    status, body = harness.send("b", "t-three", 0, 0, PSI, _params(), messages=[other["a"]])
    assert (status, body["rule"]) == ("refused", "payload_misaddressed")
    status, body = harness.send("b", "t-two", 1, 1, PSI, _params())  # a's points withheld
    assert (status, body["rule"]) == ("refused", "psi_payload_missing")


def test_a_bystander_refuses_any_payload_and_reads_no_data(harness):
    status, body = harness.send("c", "t-by", 0, 0, PSI, _params())
    assert status == "ok" and body["public"] == {} and "payloads" not in body


# --- the analysis' own checks of a peer's points ----------------------------------------------

def _hostile(u: int, top_bit: bool = False) -> np.ndarray:
    raw = bytearray(u.to_bytes(32, "little"))
    if top_bit:
        raw[31] |= 0x80
    return np.frombuffer(bytes(raw), dtype=np.uint8)


def _twist_u() -> int:
    """The smallest u whose curve equation has no square root: a point of the twist."""
    return next(u for u in range(2, 1000)
                if pow((u**3 + 486662 * u * u + u) % FIELD_PRIME, (FIELD_PRIME - 1) // 2, FIELD_PRIME)
                == FIELD_PRIME - 1)


def _context(site: str, messages: dict[str, Any], scratch: dict[str, Any] | None = None) -> SiteContext:
    return SiteContext(site=site, data=_ids("p", 0, 30), policy=NO_GUARD, scratch=scratch if scratch else {},
                       memory={"released": {}}, messages=messages, study_salt=b"s" * 32)


@pytest.mark.parametrize("point", ["zero", "one", "p", "top_bit", "twist"])
def test_a_peers_invalid_point_is_refused_before_it_is_blinded(point):
    hostile = {"zero": _hostile(0), "one": _hostile(1), "p": _hostile(FIELD_PRIME),
               "top_bit": _hostile(9, top_bit=True), "twist": _hostile(_twist_u())}[point]
    points = hash_and_blind([f"x{i}" for i in range(10)], b"s" * 32, new_key()).copy()
    points[4] = hostile
    analysis = get_analysis(PSI)
    params = analysis.parse_params(_params())
    context = _context("a", {"b": {"points": points, "min_cell_count": 5}}, {"key": new_key()})
    with pytest.raises(BroadcastRefused) as error:
        analysis.local(params, 1, {}, context)
    assert error.value.rule == "psi_malformed" and "point 4" in error.value.detail


@pytest.mark.parametrize("payload", [
    {"points": np.zeros((10, 31), np.uint8), "min_cell_count": 5},
    {"points": np.zeros((10, 32), np.float64), "min_cell_count": 5},
    {"points": np.zeros(320, np.uint8), "min_cell_count": 5},
    {"points": [b"\x00" * 32] * 10, "min_cell_count": 5},
    {"points": hash_to_group([f"x{i}" for i in range(10)], b"s" * 32), "min_cell_count": 0},
    {"points": hash_to_group([f"x{i}" for i in range(10)], b"s" * 32), "min_cell_count": True},
    "not a map",
])
def test_malformed_peer_payloads_are_refused(payload):
    analysis = get_analysis(PSI)
    context = _context("a", {"b": payload}, {"key": new_key()})
    with pytest.raises(BroadcastRefused) as error:
        analysis.local(analysis.parse_params(_params()), 1, {}, context)
    assert error.value.rule == "psi_malformed"


def test_a_payload_from_a_third_site_is_refused():
    analysis = get_analysis(PSI)
    points = hash_to_group([f"x{i}" for i in range(10)], b"s" * 32)
    context = _context("a", {"b": {"points": points, "min_cell_count": 5},
                             "c": {"points": points, "min_cell_count": 5}}, {"key": new_key()})
    with pytest.raises(BroadcastRefused) as error:
        analysis.local(analysis.parse_params(_params()), 1, {}, context)
    assert error.value.rule == "psi_payload_unexpected"


def test_a_counter_refuses_a_batch_with_repeated_points():
    """A hop that duplicates points would inflate the count of patients seen at several sites."""
    analysis = get_analysis("distinct_patients")
    params = analysis.parse_params({"on": "patient_id", "sites": ["a", "b"]})
    batch = hash_to_group([f"x{i}" for i in range(10)], b"s" * 32)
    repeated = np.vstack([batch, batch[:3]])
    context = _context("a", {"b": {"batch": repeated, "min_cell_count": 5}},
                       {"key": new_key(), "complete": {"batch": batch, "min_cell_count": 5}})
    with pytest.raises(BroadcastRefused) as error:
        analysis.local(params, 2, {}, context)
    assert error.value.rule == "psi_malformed"


def test_lost_working_memory_is_a_named_refusal():
    analysis = get_analysis(PSI)
    points = hash_to_group([f"x{i}" for i in range(10)], b"s" * 32)
    context = _context("a", {"b": {"points": points, "min_cell_count": 5}})
    with pytest.raises(BroadcastRefused) as error:
        analysis.local(analysis.parse_params(_params()), 1, {}, context)
    assert error.value.rule == "psi_state_lost"
