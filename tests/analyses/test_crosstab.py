"""crosstab: pooled frequency tables equal pd.crosstab on the pooled data, small cells withheld."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medveil.analyses.crosstab import OTHER
from medveil.privacy.disclosure import DisclosurePolicy, DisclosureRefused, secondary_suppression

MIN = DisclosurePolicy().min_cell_count


def hidden_cells(table: pd.DataFrame, min_count: int) -> pd.DataFrame:
    """A site's hidden cells: the small ones, then secondary suppression (tested on its own in
    tests/privacy/test_disclosure.py)."""
    small = (table >= 1) & (table < min_count)
    hidden = secondary_suppression(table.to_numpy(), small.to_numpy(), DisclosurePolicy(min_cell_count=min_count))
    return pd.DataFrame(hidden, index=table.index, columns=table.columns)


def reference(sites, row, col, min_count=MIN):
    """The expected table, built with pandas: agreed levels, "(other)", pooled counts, suppression."""
    names = [row] + ([col] if col else [])
    labels = {site: frame[names].dropna().astype(str) for site, frame in sites.items()}
    agreed = {
        name: sorted(set().union(*(set(vc.index[vc >= min_count]) for vc in (lab[name].value_counts()
                                                                           for lab in labels.values()))))
        for name in names
    }
    rows = agreed[row] + [OTHER]
    cols = (agreed[col] + [OTHER]) if col else ["count"]

    def table(lab: pd.DataFrame) -> pd.DataFrame:
        mapped = {name: lab[name].where(lab[name].isin(agreed[name]), OTHER) for name in names}
        if col:
            counts = pd.crosstab(mapped[row], mapped[col])
        else:
            counts = mapped[row].value_counts().to_frame("count")
        return counts.reindex(index=rows, columns=cols, fill_value=0)

    per_site = [table(lab) for lab in labels.values()]
    pooled = table(pd.concat(list(labels.values()), ignore_index=True))  # pd.crosstab on the pooled rows
    assert pooled.equals(sum(per_site))
    suppressed = sum(hidden_cells(t, min_count).astype(int) for t in per_site) > 0
    keep_rows = [r for r in rows if r != OTHER or pooled.loc[r].any() or suppressed.loc[r].any()]
    keep_cols = [c for c in cols if c != OTHER or pooled[c].any() or suppressed[c].any()]
    pooled, suppressed = pooled.loc[keep_rows, keep_cols], suppressed.loc[keep_rows, keep_cols]
    pooled.index.name, pooled.columns.name = row, col
    suppressed.index.name, suppressed.columns.name = row, col
    return pooled.astype("Int64").mask(suppressed), suppressed


def check(result: pd.DataFrame, expected: pd.DataFrame, suppressed: pd.DataFrame, min_count=MIN) -> None:
    pd.testing.assert_frame_equal(result, expected, check_column_type=False, check_index_type=False)
    pd.testing.assert_frame_equal(result.attrs["suppressed"], suppressed, check_column_type=False,
                                  check_index_type=False)
    assert result.isna().equals(suppressed)
    released = result.to_numpy(dtype=float, na_value=np.nan)
    released = released[~np.isnan(released)]
    assert not np.any((released > 0) & (released < min_count)), "a small pooled count was released"


CASES = {
    "gbsg2": [("tgrade", "horTh"), ("menostat", "tgrade"), ("horTh", "menostat"), ("tgrade", None),
              ("pnodes", None), ("pnodes", "tgrade")],
    "synthetic": [("group", "sex"), ("group", "stage"), ("stage", "sex"), ("group", None), ("stage", None),
                  ("count", "flag")],
}


@pytest.mark.parametrize("case", range(6))
def test_crosstab_equals_pandas_on_pooled_data(run_federated, dataset, case):
    name, sites = dataset
    row, col = CASES[name][case]
    result = run_federated("crosstab", {"row": row, "col": col}, sites).result
    expected, suppressed = reference(sites, row, col)
    check(result, expected, suppressed)


@pytest.mark.parametrize("row, col", [("tgrade", "horTh"), ("menostat", "horTh")])
def test_large_cells_equal_plain_pd_crosstab(run_federated, gbsg2_sites, row, col):
    pooled = pd.concat(list(gbsg2_sites.values()), ignore_index=True)
    expected = pd.crosstab(pooled[row], pooled[col])
    # Precondition for comparing with an unmodified pd.crosstab: every cell is large at every site.
    assert all((pd.crosstab(f[row], f[col]).reindex_like(expected).fillna(0) >= MIN).all().all()
               for f in gbsg2_sites.values())
    result = run_federated("crosstab", {"row": row, "col": col}, gbsg2_sites).result
    assert not result.attrs["suppressed"].to_numpy().any()
    assert list(result.index) == list(expected.index) and list(result.columns) == list(expected.columns)
    np.testing.assert_array_equal(result.to_numpy(dtype=np.int64), expected.to_numpy())


def test_small_cells_are_missing_and_marked(run_federated, synthetic_sites):
    result = run_federated("crosstab", {"row": "group", "col": "stage"}, synthetic_sites).result
    expected, suppressed = reference(synthetic_sites, "group", "stage")
    # The scenario exercises both protections: some suppressed cells and an "(other)" row.
    assert suppressed.to_numpy().any()
    assert OTHER in expected.index
    check(result, expected, suppressed)
    for row, col in zip(*np.nonzero(suppressed.to_numpy())):
        assert pd.isna(result.iat[row, col])
        assert result.attrs["suppressed"].iat[row, col]


def test_rare_levels_are_hidden_or_withheld(run_federated, synthetic_sites):
    result = run_federated("crosstab", {"row": "group"}, synthetic_sites).result
    counts = pd.DataFrame({site: f["group"].value_counts() for site, f in synthetic_sites.items()}).fillna(0)
    rare_everywhere = counts.index[(counts < MIN).all(axis=1)]
    rare_somewhere = counts.index[((counts > 0) & (counts < MIN)).any(axis=1) & (counts >= MIN).any(axis=1)]
    assert len(rare_everywhere) and len(rare_somewhere)  # the synthetic data holds both kinds
    for level in rare_everywhere:  # never named by any site: counted under "(other)"
        assert level not in result.index
    assert OTHER in result.index
    for level in rare_somewhere:  # named by a site that holds it often, withheld as a partial sum
        assert pd.isna(result.loc[level, "count"]) and result.attrs["suppressed"].loc[level, "count"]


def test_stricter_policy_changes_agreed_levels_and_suppression(run_federated, synthetic_sites):
    policy = DisclosurePolicy(min_cell_count=40)
    result = run_federated("crosstab", {"row": "group", "col": "stage"}, synthetic_sites, policy).result
    expected, suppressed = reference(synthetic_sites, "group", "stage", min_count=40)
    check(result, expected, suppressed, min_count=40)


@pytest.mark.parametrize("row, col, too_many", [("code", None, "code"), ("sex", "code", "code"),
                                                ("code", "sex", "code")])
def test_too_many_levels_is_refused(run_federated, synthetic_sites, row, col, too_many):
    most = max(f[too_many].nunique() for f in synthetic_sites.values())
    with pytest.raises(DisclosureRefused) as info:
        run_federated("crosstab", {"row": row, "col": col}, synthetic_sites, DisclosurePolicy(max_levels=most - 1))
    assert info.value.rule == "max_levels"
    assert repr(too_many) in info.value.detail


def test_default_max_levels_refuses_a_sixty_level_code(run_federated, synthetic_sites):
    assert max(f["code"].nunique() for f in synthetic_sites.values()) > DisclosurePolicy().max_levels
    with pytest.raises(DisclosureRefused) as info:
        run_federated("crosstab", {"row": "code"}, synthetic_sites)
    assert info.value.rule == "max_levels"


def test_exactly_max_levels_is_allowed(run_federated, synthetic_sites):
    most = max(f["code"].nunique() for f in synthetic_sites.values())
    result = run_federated("crosstab", {"row": "code", "col": "sex"}, synthetic_sites,
                           DisclosurePolicy(max_levels=most)).result
    expected, suppressed = reference(synthetic_sites, "code", "sex")
    check(result, expected, suppressed)


def test_crosstab_broadcast_levels_are_checked():
    from medveil.analyses.base import BroadcastRefused, get_analysis

    crosstab = get_analysis("crosstab")
    params = crosstab.parse_params({"row": "stage", "col": "sex"})
    memory = {"released": {0: {"rows": 40, "levels": {"stage": ["I", "II"], "sex": ["f", "m"]}}}}
    crosstab.check_broadcast(params, 1, {"levels": {"stage": ["I", "II", "III"], "sex": ["f", "m"]}}, memory)
    for broadcast, rule in [({"levels": {"stage": ["I", "II"]}}, "broadcast_malformed"),
                            ({"levels": {"stage": ["II", "I"], "sex": ["f", "m"]}}, "broadcast_malformed"),
                            ({"levels": {"stage": ["I", "I", "II"], "sex": ["f", "m"]}}, "broadcast_malformed"),
                            ({"levels": {"stage": ["I", "II"], "sex": ["f", "m"], "ssn": ["1"]}}, "broadcast_malformed"),
                            ({"levels": {"stage": [str(i) for i in range(2000)], "sex": ["f"]}}, "broadcast_malformed"),
                            ({"levels": {"stage": ["I"], "sex": ["f", "m"]}}, "broadcast_not_released"),
                            ({"levels": {"stage": ["I", "II"], "sex": ["f", "m"]}, "edges": [1]}, "unexpected_broadcast")]:
        with pytest.raises(BroadcastRefused) as error:
            crosstab.check_broadcast(params, 1, broadcast, memory)
        assert error.value.rule == rule, broadcast
    fixed = crosstab.parse_params({"row": "stage", "levels": {"stage": ["I", "IV"]}})
    crosstab.check_broadcast(fixed, 1, {"levels": {"stage": ["I", "IV"]}}, {"released": {0: {}}})
    with pytest.raises(BroadcastRefused) as error:
        crosstab.check_broadcast(fixed, 1, {"levels": {"stage": ["I", "III"]}}, {"released": {0: {}}})
    assert error.value.rule == "broadcast_not_released"


def test_a_crosstab_cell_row_set_is_released_only_for_cells_shown(synthetic_sites):
    from medveil.analyses.base import get_analysis

    crosstab = get_analysis("crosstab")
    frame = synthetic_sites["site_a"]
    params = crosstab.parse_params({"row": "group", "col": "stage"})
    levels = {"group": ["A", "B", "C", "D"], "stage": ["I", "II", "III", "IV"]}
    sets = crosstab.row_sets(params, frame, 1, {"levels": levels})
    assert sets and all(s.sum() >= MIN for s in sets)
    assert all(not (a & b).any() for i, a in enumerate(sets) for b in sets[i + 1:])  # one set per cell
