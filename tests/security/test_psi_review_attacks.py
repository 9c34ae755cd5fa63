"""Review red-team tests of private set intersection, the registry count and alignments.

Attacks a hostile researcher mounts with what it legitimately sees (released totals, each site's
row count, sealed payload sizes) or with parameters that differ between sites of one task:
solving the registry's suppressed counts from the total and the set sizes, reading a small
intersection of two sites from distinct_patients where psi refuses it, giving the two parties
different reveal modes or ID kinds so a party keeps rows that are not the intersection, pairing
an alignment a site made with one peer with a later analysis of another, and IDs carrying
invisible format characters (a copy-paste zero-width space or byte-order mark) that the
normaliser refused or failed to match.
"""

from __future__ import annotations

import itertools
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
from medveil.analyses.base import params_digest
from medveil.crypto.ids import normalise_id, resident_id_valid
from medveil.crypto.psi import hash_and_blind, new_key
from medveil.privacy.disclosure import DisclosurePolicy

NO_GUARD = DisclosurePolicy(differencing_guard=False)  # min_cell_count 5
PSI = "psi"


def _ids(prefix: str, start: int, stop: int) -> pd.DataFrame:
    return pd.DataFrame({"patient_id": [f"{prefix}{i:04d}" for i in range(start, stop)]})


# --- the registry count ------------------------------------------------------------------------

def _candidates(released: list[int | None], distinct: int, set_sizes: list[int]) -> list[tuple[int, ...]]:
    """Every table of non-negative counts (patients seen at exactly 1..N sites) that agrees with
    what the researcher holds: the counts shown, the total, and the sites' set sizes (sum over j
    of j * count_j is the sum of the set sizes)."""
    hidden = [j for j, count in enumerate(released) if count is None]
    shown_total = sum(c for c in released if c is not None)
    shown_weighted = sum((j + 1) * c for j, c in enumerate(released) if c is not None)
    left_total, left_weighted = distinct - shown_total, sum(set_sizes) - shown_weighted
    found = []
    for values in itertools.product(range(left_total + 1), repeat=len(hidden)):
        if sum(values) == left_total and sum((j + 1) * v for j, v in zip(hidden, values)) == left_weighted:
            table = list(released)
            for j, v in zip(hidden, values):
                table[j] = v
            found.append(tuple(table))
    return found


def test_suppressed_registry_counts_cannot_be_solved_from_the_total_and_the_set_sizes():
    """80 patients at one site, 7 at two, 3 at all three. The counts 7 and 3 were hidden, but the
    total (90) and the set sizes (40 + 40 + 23, public as row counts and payload sizes) give two
    equations in the two hidden counts: h2 + h3 = 10, 2 h2 + 3 h3 = 23, so h3 = 3."""
    frames = {"a": _ids("id", 0, 40), "b": _ids("id", 30, 70),
              "c": pd.concat([_ids("id", 30, 33), _ids("id", 100, 120)], ignore_index=True)}
    with mv.Federation.in_process(frames, policy=NO_GUARD) as fed:
        outcome = fed.run("distinct_patients", on="patient_id", sites=sorted(frames), counter="c")
    table, rows = outcome.result, outcome.provenance["rows"]
    released = [None if pd.isna(c) else int(c) for c in table["count"]]
    assert table.attrs["distinct"] == 90 and any(c is None for c in released)
    candidates = _candidates(released, table.attrs["distinct"], [rows[s] for s in sorted(frames)])
    assert (80, 7, 3) in candidates
    for j, count in enumerate(released):
        if count is None:
            assert len({table_[j] for table_ in candidates}) > 1, f"the hidden count at {j + 1} sites is solvable"


def test_two_sites_registry_count_does_not_release_an_intersection_psi_refuses():
    """Two sites share 2 patients: psi refuses that size, and distinct_patients must not give it
    as |A| + |B| - distinct (30 + 30 - 58)."""
    frames = {"a": _ids("p", 0, 30), "b": _ids("p", 28, 58)}
    with mv.Federation.in_process(frames, policy=NO_GUARD) as fed:
        with pytest.raises(mv.RefusedError) as psi_refusal:
            fed.psi("a", "b", on="patient_id", reveal="size")
        assert psi_refusal.value.rule == "psi_intersection_too_small"
        with pytest.raises(mv.RefusedError) as refusal:
            fed.distinct_patients(on="patient_id")
    assert refusal.value.rule == "distinct_overlap_too_small"


def test_a_large_enough_overlap_is_still_counted_exactly():
    frames = {"a": _ids("p", 0, 30), "b": _ids("p", 20, 50)}
    with mv.Federation.in_process(frames, policy=NO_GUARD) as fed:
        counts = fed.distinct_patients(on="patient_id")
    assert counts.attrs["distinct"] == 50 and counts["count"].tolist() == [40, 10]


# --- parameters that differ between the parties of one task -----------------------------------

@pytest.fixture()
def harness(tmp_path):
    frames = {"a": _ids("p", 0, 30), "b": _ids("p", 10, 40), "c": _ids("p", 5, 35), "d": _ids("p", 0, 40)}
    harness = NodeHarness(tmp_path, frames, [PSI, "distinct_patients", "pair_reader"], policy=NO_GUARD)
    yield harness
    harness.close()


def _psi_params(left: str = "a", right: str = "b", **extra: Any) -> dict[str, Any]:
    return {"left": left, "right": right, "on": "patient_id", **extra}


def _drive_psi(harness: NodeHarness, task: str, params: dict[str, dict]) -> dict[str, list[tuple[str, dict]]]:
    """The three PSI rounds at each site in `params` (site -> its own parameters), each payload
    handed to its recipient in the next round as the researcher would; the replies by site."""
    replies: dict[str, list[tuple[str, dict]]] = {site: [] for site in params}
    inbox: dict[str, list[dict]] = {site: [] for site in params}
    for round_no in range(3):
        outbox: dict[str, list[dict]] = {site: [] for site in params}
        for site, own in params.items():
            if replies[site] and replies[site][-1][0] != "ok":
                continue
            status, body = harness.send(site, task, round_no, round_no, PSI, own, messages=inbox[site] or None)
            replies[site].append((status, body))
            for recipient, sealed in (body.get("payloads") or {}).items() if status == "ok" else ():
                outbox.setdefault(recipient, []).append(sealed)
        inbox = outbox
    return replies


def _shared_rows(harness: NodeHarness, site: str, peer: str) -> set[int]:
    mine, theirs = harness.frames[site]["patient_id"], set(harness.frames[peer]["patient_id"])
    return {row for row, value in enumerate(mine) if value in theirs}


@pytest.mark.parametrize("mismatch", [
    ({"reveal": "left"}, {"reveal": "size"}),  # right shuffles what it returns: left would keep random rows
    ({"reveal": "both"}, {"reveal": "size"}),
    ({"invalid": "error"}, {"invalid": "skip"}),
])
def test_parties_given_different_parameters_refuse_and_keep_no_wrong_rows(harness, mismatch):
    a_extra, b_extra = mismatch
    replies = _drive_psi(harness, "t-mixed", {"a": _psi_params(**a_extra), "b": _psi_params(**b_extra)})
    rules = {reply["rule"] for site in "ab" for status, reply in replies[site] if status == "refused"}
    assert rules == {"psi_params_mismatch"}
    for site, peer in (("a", "b"), ("b", "a")):
        kept = harness.nodes[site].alignments.load(harness.spec.id, "t-mixed")
        assert kept is None or set(kept.rows.tolist()) == _shared_rows(harness, site, peer)


def test_parties_given_different_id_kinds_refuse(tmp_path):
    """a normalises as plain IDs (check letter "x"), b as resident IDs ("X"): every patient whose
    ID ends in the check letter would silently drop out of the intersection."""
    ids = [_resident_id(f"1101051949123{i:04d}") for i in range(40)]
    assert any(value.endswith("X") for value in ids[10:30])
    frames = {"a": pd.DataFrame({"patient_id": ids[:30]}), "b": pd.DataFrame({"patient_id": ids[10:]})}
    harness = NodeHarness(tmp_path, frames, [PSI], policy=NO_GUARD)
    try:
        replies = _drive_psi(harness, "t-kinds", {"a": _psi_params(id_kind="plain"),
                                                  "b": _psi_params(id_kind="cn_resident_id")})
        rules = {reply["rule"] for site in "ab" for status, reply in replies[site] if status == "refused"}
        assert rules == {"psi_params_mismatch"}
        assert all(harness.nodes[site].alignments.load(harness.spec.id, "t-kinds") is None for site in "ab")
    finally:
        harness.close()


def test_both_sites_told_they_are_left_refuse(harness):
    replies = _drive_psi(harness, "t-two-lefts", {"a": _psi_params("a", "b"), "b": _psi_params("b", "a")})
    assert {reply["rule"] for site in "ab" for status, reply in replies[site] if status == "refused"} == {
        "psi_params_mismatch"}


def test_ring_sites_given_different_parameters_refuse(harness):
    """distinct_patients over a, b, c, d where d is told to skip invalid IDs and the rest not: the
    first site that gets a batch made under other parameters refuses it."""
    sites = ["a", "b", "c", "d"]
    params = {site: {"on": "patient_id", "sites": sites, "invalid": "skip" if site == "d" else "error"}
              for site in sites}
    inbox: dict[str, list[dict]] = {site: [] for site in sites}
    rules = set()
    for round_no in range(len(sites) + 1):
        outbox: dict[str, list[dict]] = {site: [] for site in sites}
        for site in sites:
            status, body = harness.send(site, "t-ring", round_no, round_no, "distinct_patients", params[site],
                                        messages=inbox[site] or None)
            if status != "ok":
                rules.add(body["rule"])
                continue
            for recipient, sealed in (body.get("payloads") or {}).items():
                outbox[recipient].append(sealed)
        inbox = outbox
        if rules:
            break
    assert rules == {"psi_params_mismatch"}


# --- an alignment made with one peer, used with another ----------------------------------------

class PairParams(Params):
    first: str
    second: str
    aligned: str


class PairReader(Analysis[PairParams]):
    """Test-only: a two-party analysis on an alignment; each party reports its aligned rows."""

    name = "pair_reader"
    Params = PairParams
    releases_sums = False

    def variables(self, params: PairParams) -> list[str]:
        return ["patient_id"]

    def parties(self, params: PairParams) -> dict[str, str | None]:
        return {params.first: None, params.second: None}

    def alignment(self, params: PairParams) -> str | None:
        return params.aligned

    def local(self, params: PairParams, round_no: int, broadcast: dict[str, Any], context: SiteContext) -> Release:
        return Release(public={"aligned_rows": len(context.data)})

    def global_step(self, params: PairParams, round_no: int, aggregated: Aggregated,
                    state: dict[str, Any]) -> Finished:
        return Finished(aggregated.public)


@pytest.fixture()
def pair_reader():
    base.register(PairReader)
    yield
    base._REGISTRY.pop(PairReader.name, None)


def test_an_alignment_made_with_one_peer_is_refused_for_an_analysis_with_another(harness, pair_reader):
    """One task id, two intersections: a with c, and b with d (each pair's parameters agree). A
    later two-party analysis of a and b on that id would pair a's rows (in a-c order) with b's
    (in b-d order): rows neither site agreed to join."""
    params_ac, params_bd = _psi_params("a", "c"), _psi_params("b", "d")
    replies = _drive_psi(harness, "t-split", {"a": params_ac, "c": params_ac, "b": params_bd, "d": params_bd})
    assert all(status == "ok" for site in replies for status, _ in replies[site])
    assert harness.nodes["a"].alignments.load(harness.spec.id, "t-split").peers == ("c",)
    reader = {"first": "a", "second": "b", "aligned": "t-split"}
    for site in ("a", "b"):
        status, body = harness.send(site, "t-read", 0, 0, "pair_reader", reader)
        assert (status, body.get("rule")) == ("refused", "alignment_peers"), body


def test_an_alignment_with_the_named_peer_is_used(harness, pair_reader):
    params_ab = _psi_params("a", "b")
    _drive_psi(harness, "t-ab", {"a": params_ab, "b": params_ab})
    for site in ("a", "b"):
        status, body = harness.send(site, "t-read-ab", 0, 0, "pair_reader",
                                    {"first": "a", "second": "b", "aligned": "t-ab"})
        assert (status, body["public"]) == ("ok", {"aligned_rows": 20})


# --- a peer's repeated points ---------------------------------------------------------------------

def test_a_peer_set_padded_with_repeated_points_is_refused():
    """Ten copies of one blinded point would pass the minimum set size while holding one ID."""
    analysis = get_analysis(PSI)
    params = analysis.parse_params(_psi_params())
    one = hash_and_blind(["p0007"], b"s" * 32, new_key())
    context = SiteContext(site="a", data=_ids("p", 0, 30), policy=NO_GUARD, scratch={"key": new_key()},
                          memory={"released": {}}, study_salt=b"s" * 32,
                          messages={"b": {"points": np.repeat(one, 10, axis=0), "min_cell_count": 5,
                                          "params": params_digest(params)}})
    with pytest.raises(BroadcastRefused) as error:
        analysis.local(params, 1, {}, context)
    assert error.value.rule == "psi_malformed"


# --- invisible characters in IDs ------------------------------------------------------------------

def _resident_id(body17: str) -> str:
    weights = [pow(2, 17 - i, 11) for i in range(17)]
    return body17 + "10X98765432"[sum(int(d) * w for d, w in zip(body17, weights)) % 11]


@pytest.mark.parametrize("invisible", ["\u200b", "\ufeff", "\u00ad", "\u200e", "\u2060"])
def test_invisible_format_characters_do_not_change_an_id(invisible):
    resident = _resident_id("11010519491231002")
    assert resident_id_valid(resident)
    assert normalise_id(invisible + resident + invisible, "cn_resident_id") == resident
    assert normalise_id(f"AB{invisible}12{invisible}") == normalise_id("ab12") == "ab12"


def test_an_id_of_format_characters_only_is_invalid():
    with pytest.raises(ValueError):
        normalise_id("\u200b\ufeff")
