"""psi and distinct_patients over an in-process federation (real nodes, every guard, no HTTP).

The reference is pandas on the pooled IDs, normalised here with the standard library (NFKC,
strip, casefold): intersection sizes, the rows each party keeps and the order both agree on,
and the registry's count of patients seen at 1, 2, ... sites.
"""

from __future__ import annotations

import unicodedata

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import medveil as mv
from medveil.analyses.base import (
    Aggregated,
    Finished,
    Release,
    SiteContext,
    get_analysis,
)
from medveil.privacy.disclosure import DisclosurePolicy, DisclosureRefused

POLICY = DisclosurePolicy(differencing_guard=False)  # several intersections of the same tables


def canonical(value: str) -> str:
    """The reference normalisation of a plain ID: NFKC, case-folded, stripped."""
    return unicodedata.normalize("NFKC", str(value)).casefold().strip()


def _tables(seed: int = 3) -> dict[str, pd.DataFrame]:
    """Three sites whose IDs overlap; b spells some of a's IDs in full-width or upper case, with
    padding, and repeats one patient (the first row counts)."""
    rng = np.random.default_rng(seed)
    a_ids = [f"pt{i:04d}" for i in range(120)] + ["张三-7"]
    b_ids = [f"PT{i:04d} " for i in range(60, 150)] + [f"ｐｔ０{i:03d}" for i in range(150, 170)] + ["pt0061", "张三-7"]
    c_ids = [f"pt{i:04d}" for i in range(100, 200)]
    order = {name: rng.permutation(len(ids)) for name, ids in (("a", a_ids), ("b", b_ids), ("c", c_ids))}
    return {name: pd.DataFrame({"patient_id": np.asarray(ids, dtype=object)[order[name]],
                                "x": rng.normal(size=len(ids))})
            for name, ids in (("a", a_ids), ("b", b_ids), ("c", c_ids))}


def _expected_pairs(left: pd.DataFrame, right: pd.DataFrame) -> pd.DataFrame:
    """pandas' inner join of the two tables on the canonical ID, each side's first row per ID."""
    firsts = []
    for frame in (left, right):
        keyed = frame.assign(key=frame["patient_id"].map(canonical)).reset_index(names="row")
        firsts.append(keyed.drop_duplicates("key", keep="first")[["key", "row"]])
    return firsts[0].merge(firsts[1], on="key", suffixes=("_left", "_right"))


def _alignment_rows(fed: mv.Federation, site: str, alignment: str) -> np.ndarray | None:
    kept = fed.network.nodes[site].alignments.load(fed.study.id, alignment)
    return None if kept is None else kept.rows


@pytest.fixture(scope="module")
def tables() -> dict[str, pd.DataFrame]:
    return _tables()


@pytest.fixture(scope="module")
def fed(tables):
    with mv.Federation.in_process(tables, policy=POLICY) as federation:
        yield federation


def test_reveal_both_equals_the_pandas_join_and_both_keep_the_same_order(fed, tables):
    result = fed.psi("a", "b", on="patient_id")
    expected = _expected_pairs(tables["a"], tables["b"])
    assert (result.size, result.left, result.right, result.reveal) == (len(expected), "a", "b", "both")
    assert result.size == 61  # pt0060..pt0119 and the Chinese ID
    assert result.alignment == result.provenance["task"]
    left_rows, right_rows = _alignment_rows(fed, "a", result.alignment), _alignment_rows(fed, "b", result.alignment)
    left_keys = tables["a"]["patient_id"].iloc[left_rows].map(canonical).tolist()
    right_keys = tables["b"]["patient_id"].iloc[right_rows].map(canonical).tolist()
    assert left_keys == right_keys  # the agreed row order is the same at both sites
    assert sorted(left_keys) == sorted(expected["key"])
    by_key = expected.set_index("key")
    assert left_rows.tolist() == by_key.loc[left_keys, "row_left"].tolist()
    assert right_rows.tolist() == by_key.loc[right_keys, "row_right"].tolist()  # duplicates: first row
    assert result.skipped == {"a": 0, "b": 0}


def test_reveal_left_keeps_rows_at_left_only(fed, tables):
    result = fed.psi("a", "b", on="patient_id", reveal="left")
    assert result.size == len(_expected_pairs(tables["a"], tables["b"]))
    rows = _alignment_rows(fed, "a", result.alignment)
    assert rows is not None and len(rows) == result.size
    assert _alignment_rows(fed, "b", result.alignment) is None


def test_reveal_size_keeps_nothing(fed, tables):
    result = fed.psi("b", "c", on="patient_id", reveal="size")
    assert result.size == len(_expected_pairs(tables["b"], tables["c"])) == 70
    assert result.alignment is None
    task = result.provenance["task"]
    assert all(_alignment_rows(fed, site, task) is None for site in ("a", "b", "c"))


def test_a_bystander_site_reads_no_data_and_releases_nothing(tables):
    sites = {"a": tables["a"], "b": tables["b"], "lab": pd.DataFrame({"other": np.arange(8.0)})}
    with mv.Federation.in_process(sites, policy=POLICY) as fed:
        result = fed.psi("a", "b", on="patient_id")
        assert result.size == 61
        assert "lab" not in result.provenance["rows"]


def test_the_registry_count_equals_pandas_on_the_pooled_ids(fed, tables):
    counts = fed.distinct_patients(on="patient_id")
    pooled = pd.concat([frame.assign(site=site) for site, frame in tables.items()])
    pooled["key"] = pooled["patient_id"].map(canonical)
    held_by = pooled.drop_duplicates(["key", "site"]).groupby("key")["site"].nunique()
    expected = held_by.value_counts().reindex([1, 2, 3], fill_value=0)
    assert counts.attrs["distinct"] == held_by.size
    assert counts.index.tolist() == [1, 2, 3]
    assert counts["count"].tolist() == expected.tolist()
    assert not counts["suppressed"].any()
    assert counts.attrs["counter"] == "a"


def test_small_registry_counts_are_suppressed_with_a_second_cell(tables):
    """Three patients at all three sites: that count is small, so every count is hidden (the total
    and the sites' set sizes, which the researcher knows, would otherwise solve for hidden ones)."""
    frames = {"a": pd.DataFrame({"patient_id": [f"id{i}" for i in range(40)]}),
              "b": pd.DataFrame({"patient_id": [f"id{i}" for i in range(30, 70)]}),
              "c": pd.DataFrame({"patient_id": ["id30", "id31", "id32"] + [f"id{i}" for i in range(100, 120)]})}
    with mv.Federation.in_process(frames, policy=POLICY) as fed:
        counts = fed.distinct_patients(on="patient_id", counter="c")
    assert counts.attrs["distinct"] == 90 and counts.attrs["counter"] == "c"
    # 80 patients at one site, 7 at two (id33..id39), 3 at all three (id30..id32)
    assert counts["suppressed"].tolist() == [True, True, True]
    assert counts["count"].isna().all()


def test_the_strictest_minimum_of_any_ring_site_governs_the_counters_suppression(tables):
    """The counter allows counts of 1; site c asks for 25: the count of 20 patients seen at all
    three sites (pt0100..pt0119) is small, so every count is hidden."""
    policies = {"a": DisclosurePolicy(min_cell_count=1, differencing_guard=False), "b": POLICY,
                "c": DisclosurePolicy(min_cell_count=25, differencing_guard=False)}
    with mv.Federation.in_process(tables, policy=policies) as fed:
        counts = fed.distinct_patients(on="patient_id", counter="a")
    assert counts["suppressed"].sum() == 3 and pd.isna(counts.loc[3, "count"])


@pytest.mark.parametrize("empty", ["left", "both"])
def test_an_empty_set_is_refused_as_too_small(tables, empty):
    frames = {"a": tables["a"].iloc[:0] if empty == "both" else tables["a"], "b": tables["b"].iloc[:0]}
    with mv.Federation.in_process(frames, policy=POLICY) as fed, pytest.raises(mv.RefusedError) as error:
        fed.psi("a", "b", on="patient_id")
    assert error.value.rule == "psi_set_too_small"
    assert error.value.site == "b" or {s for s, _, _ in error.value.refusals} == {"a", "b"}


def test_an_empty_intersection_is_released_as_zero(tables):
    frames = {"a": tables["a"], "b": pd.DataFrame({"patient_id": [f"zz{i}" for i in range(20)]})}
    with mv.Federation.in_process(frames, policy=POLICY) as fed:
        result = fed.psi("a", "b", on="patient_id")
        assert result.size == 0
        assert len(_alignment_rows(fed, "a", result.alignment)) == 0


def test_a_small_intersection_is_refused_and_nothing_is_kept(tables):
    frames = {"a": tables["a"], "b": pd.DataFrame({"patient_id": [f"zz{i}" for i in range(20)] + ["pt0003"]})}
    with mv.Federation.in_process(frames, policy=POLICY) as fed:
        with pytest.raises(mv.RefusedError) as error:
            fed.psi("a", "b", on="patient_id")
        assert error.value.rule == "psi_intersection_too_small"
        assert "pt0003" not in str(error.value)
        assert not any(list(node.alignments.folder.glob("*.alignment")) for node in fed.network.nodes.values())


def test_the_stricter_policy_of_the_two_parties_governs(tables):
    """a allows intersections of 1; b asks for 80; the 61 shared patients are refused at a too."""
    policies = {"a": DisclosurePolicy(min_cell_count=1, differencing_guard=False),
                "b": DisclosurePolicy(min_cell_count=80, differencing_guard=False)}
    frames = {"a": tables["a"], "b": tables["b"]}
    with mv.Federation.in_process(frames, policy=policies) as fed, pytest.raises(mv.RefusedError) as error:
        fed.psi("a", "b", on="patient_id", reveal="left")
    assert (error.value.site, error.value.rule) == ("a", "psi_intersection_too_small")


def _resident_id(body17: str) -> str:
    weights = [pow(2, 17 - i, 11) for i in range(17)]
    return body17 + "10X98765432"[sum(int(d) * w for d, w in zip(body17, weights)) % 11]


def test_resident_ids_match_across_spellings_and_an_invalid_one_is_refused_by_row():
    ids = [_resident_id(f"110105{1950 + i:04d}{1 + i % 12:02d}{1 + i % 28:02d}{i:03d}") for i in range(40)][:30]
    assert any(i.endswith("X") for i in ids)  # the X check digit is covered
    spelled = [f"{i[:6]} {i[6:14]} {i[14:].lower()}" for i in ids[10:]]  # spaces, lower-case x
    bad = ids[3][:17] + ("0" if ids[3][17] != "0" else "1")
    frames = {"a": pd.DataFrame({"rid": ids}), "b": pd.DataFrame({"rid": spelled + [bad]})}
    with mv.Federation.in_process(frames, policy=POLICY) as fed:
        with pytest.raises(mv.RefusedError) as error:
            fed.psi("a", "b", on="rid", id_kind="cn_resident_id")
        assert (error.value.site, error.value.rule) == ("b", "invalid_id")
        assert "row 20" in error.value.detail and bad not in str(error.value)
        result = fed.psi("a", "b", on="rid", id_kind="cn_resident_id", invalid="skip")
    assert result.size == 20 and result.skipped == {"a": 0, "b": 1}


def test_a_missing_id_is_an_invalid_id(tables):
    frames = {"a": tables["a"], "b": tables["b"].assign(patient_id=tables["b"]["patient_id"].where(
        tables["b"].index != 5, None))}
    with mv.Federation.in_process(frames, policy=POLICY) as fed, pytest.raises(mv.RefusedError) as error:
        fed.psi("a", "b", on="patient_id")
    assert error.value.rule == "invalid_id" and "row 5" in error.value.detail


def test_the_same_site_on_both_sides_is_refused_before_anything_runs(fed):
    with pytest.raises(ValidationError, match="two different sites"):
        fed.psi("a", "a", on="patient_id")


def test_a_skip_run_a_few_rows_smaller_than_a_full_run_is_refused_by_the_differencing_guard():
    """With the guard on: an invalid_id refusal records nothing, so the skip run goes ahead; a
    later run over all rows differs from it by one row (the one skipped) and is refused."""
    ids = [_resident_id(f"110105{1950 + i:04d}{1 + i % 12:02d}{1 + i % 28:02d}{i:03d}") for i in range(30)]
    bad = ids[3][:17] + ("0" if ids[3][17] != "0" else "1")
    frames = {"a": pd.DataFrame({"rid": ids}), "b": pd.DataFrame({"rid": ids[5:] + [bad]})}
    with mv.Federation.in_process(frames) as fed:
        with pytest.raises(mv.RefusedError, match="invalid_id"):
            fed.psi("a", "b", on="rid", id_kind="cn_resident_id")
        assert fed.psi("a", "b", on="rid", id_kind="cn_resident_id", invalid="skip").size == 25
        with pytest.raises(mv.RefusedError) as error:
            fed.psi("a", "b", on="rid")
        assert (error.value.site, error.value.rule) == ("b", "differencing")


# --- the protocol on its own, rounds driven here (no nodes), for any sets ---------------------

SMALL = DisclosurePolicy(min_cell_count=1, differencing_guard=False)
SALT = bytes(range(32))
ids_strategy = st.lists(st.sampled_from([f"id{i}" for i in range(40)] + ["ID3 ", "ｉｄ４", "Id5"]), max_size=30)


def _drive(name: str, params: dict, frames: dict[str, pd.DataFrame]) -> dict[str, Release]:
    """Run an analysis' rounds over SiteContexts, handing each payload the global step forwards
    to its recipient in the next round, as the nodes do; the last round's releases by site."""
    analysis = get_analysis(name)
    typed = analysis.parse_params(params)
    scratch: dict[str, dict] = {site: {} for site in frames}
    inbox: dict[str, dict] = {site: {} for site in frames}
    for round_no in range(len(frames) + 2):
        releases = {}
        for site, frame in frames.items():
            context = SiteContext(site, frame, SMALL, scratch[site], {"released": {}}, messages=inbox[site],
                                  study_salt=SALT)
            releases[site] = analysis.local(typed, round_no, {}, context)
        sealed = {sender: {recipient: {"sender": sender, "payload": payload}
                           for recipient, payload in release.payloads.items()}
                  for sender, release in releases.items()}
        aggregated = Aggregated({}, {site: release.public for site, release in releases.items()}, sealed)
        step = analysis.global_step(typed, round_no, aggregated, {})
        if isinstance(step, Finished):
            return releases
        inbox = {site: {item["sender"]: item["payload"] for item in step.messages.get(site, [])} for site in frames}
    raise AssertionError(f"{name} did not finish")


@settings(max_examples=25, deadline=None)
@given(left=ids_strategy, right=ids_strategy, reveal=st.sampled_from(["both", "left", "size"]))
def test_the_protocol_finds_exactly_the_shared_ids_in_one_order(left, right, reveal):
    frames = {"a": pd.DataFrame({"patient_id": left}, dtype=object),
              "b": pd.DataFrame({"patient_id": right}, dtype=object)}
    shared = {canonical(v) for v in left} & {canonical(v) for v in right}
    try:
        releases = _drive("psi", {"left": "a", "right": "b", "on": "patient_id", "reveal": reveal}, frames)
    except DisclosureRefused as refusal:
        assert refusal.rule == "psi_set_too_small" and (not left or not right)
        return
    assert releases["a"].public["size"] == len(shared)
    learners = {"both": ["a", "b"], "left": ["a"], "size": []}[reveal]
    orders = [frames[site]["patient_id"].iloc[releases[site].alignment["rows"]].map(canonical).tolist()
              for site in learners]
    assert all(order == orders[0] and set(order) == shared for order in orders)
    assert all(releases[site].alignment is None for site in {"a", "b"} - set(learners))


@settings(max_examples=15, deadline=None)
@given(sets=st.lists(ids_strategy.filter(bool), min_size=2, max_size=4))
def test_the_ring_counts_the_pooled_multiplicities(sets):
    frames = {f"s{i}": pd.DataFrame({"patient_id": values}, dtype=object) for i, values in enumerate(sets)}
    releases = _drive("distinct_patients", {"on": "patient_id", "sites": sorted(frames)}, frames)
    held_by = pd.Series([key for values in sets for key in {canonical(v) for v in values}]).value_counts()
    expected = held_by.value_counts().reindex(range(1, len(sets) + 1), fill_value=0).tolist()
    assert releases["s0"].public == {"distinct": len(held_by), "seen_at": expected}


def test_a_dealer_of_the_study_is_left_out_of_the_registry_ring(tables):
    """A study with a dealer site (for vertical models) still counts over the sites holding data."""
    frames = {**tables, "dealer": {}}
    with mv.Federation.in_process(frames, policy=POLICY, roles={"dealer": "dealer"}) as fed:
        counts = fed.distinct_patients(on="patient_id")
    pooled = pd.concat([frame["patient_id"] for frame in tables.values()]).map(canonical)
    assert counts.attrs["distinct"] == pooled.nunique()
