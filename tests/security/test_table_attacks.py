"""Red-team tests of the table releases: histograms, crosstabs, describe, GWAS and PCA.

A hostile researcher with a study approved the ordinary way tries to read one patient through
a suppressed cell (rows used minus the cells shown, a margin from another query minus the
cells shown), shifted histogram edges, a describe on a subset one row smaller, a CDF grid the
node never derived, and genotype analyses at a site with a handful of samples or cases, or on a
variant the site never listed. Raw task messages (signed with the researcher's real key) go to
a study without secure aggregation, so each site's own release is read as the strongest
attacker would. Each attack is refused with a named rule, or finds nothing identifying.
"""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest

import medveil as mv
from medveil.analyses.describe import GRID_HALF_WIDTH_SD, GRID_POINTS
from medveil.privacy.disclosure import DisclosurePolicy
from raw_tasks import send_raw

pytestmark = pytest.mark.e2e

MIN = DisclosurePolicy().min_cell_count
AGE_EDGES = [30.0, 40.0, 50.0, 60.0, 70.0]


def _frame(seed: int, n: int = 120) -> pd.DataFrame:
    """Ages 30-69 (none at 30 or below 31 but the planted ones), a stage with a rare level IV."""
    rng = np.random.default_rng(seed)
    age = rng.integers(31, 70, n).astype(float)
    stage = rng.choice(["I", "II", "III"], n)
    sex = rng.choice(["f", "m"], n)
    return pd.DataFrame({"age": age, "stage": stage, "sex": sex, "bmi": rng.normal(27, 4, n)})


def _site_a() -> pd.DataFrame:
    frame = _frame(1)
    frame.loc[:1, "age"] = 30.0  # two patients aged exactly 30: the target of the edge shift
    frame.loc[2:4, "age"] = 75.0  # three patients above the last edge: a small bin
    frame.loc[5:7, ["stage", "sex"]] = ["IV", "f"]  # three women at stage IV, the cell to hide
    frame.loc[8:17, ["stage", "sex"]] = ["IV", "m"]
    frame["bmi_but_one"] = frame["bmi"]
    frame.loc[20, "bmi_but_one"] = np.nan  # one patient fewer: the subset to difference
    return frame


@pytest.fixture(scope="module")
def fed():
    sites = {"a": _site_a(), "b": _frame(2).assign(bmi_but_one=lambda f: f["bmi"]),
             "c": _frame(3).assign(bmi_but_one=lambda f: f["bmi"])}
    with mv.Federation.simulate(sites, timeout=30) as federation:
        federation.plain = federation.network.add_study(
            "plain", dict(federation.network.study.datasets), secure_aggregation=False)
        yield federation


def _session(fed, spec):
    from medveil.runtime.session import ResearcherSession

    return ResearcherSession(fed.network.researcher, spec, timeout=30)


def test_a_suppressed_bin_is_not_rows_used_minus_the_bins_shown(fed):
    answers = send_raw(fed, "plain", "t-hist-rows", 0, 0, "histogram", {"variable": "age", "edges": AGE_EDGES})
    status, body = answers["a"]
    assert status == "ok"
    counts, hidden = body["sums"]["counts"], body["sums"]["suppressed"] > 0
    true = np.bincount(np.searchsorted(AGE_EDGES, _site_a()["age"], side="right"), minlength=len(AGE_EDGES) + 1)
    assert true[-1] == 3 and hidden[-1]  # the three patients above the last edge are hidden ...
    assert hidden.sum() >= 2  # ... beside another bin
    deficit = body["public"]["rows"] - counts.sum()
    assert deficit != 3 and deficit >= MIN  # rows used minus the bins shown is a sum of bins, not the 3


def test_a_crosstab_margin_does_not_recover_a_hidden_cell(fed):
    margins = fed.crosstab("stage")
    table = fed.crosstab("stage", "sex")
    hidden = table.attrs["suppressed"]
    assert hidden.loc["IV", "f"]  # site a's three women at stage IV
    for axis in (0, 1):  # no row or column with exactly one hidden cell
        assert not (hidden.sum(axis=axis) == 1).any()
    shown = table.loc["IV"].dropna().sum()
    assert margins.loc["IV", "count"] - shown >= MIN  # the margin minus the cells shown is not the 3
    # Per site, in the clear: the same holds for site a's own cells and its rows.
    send_raw(fed, "plain", "t-xtab", 0, 0, "crosstab", {"row": "stage", "col": "sex"})
    levels = {"stage": ["I", "II", "III", "IV"], "sex": ["f", "m"]}
    status, body = send_raw(fed, "plain", "t-xtab", 1, 1, "crosstab", {"row": "stage", "col": "sex"},
                         {"levels": levels})["a"]
    assert status == "ok"
    cells, cell_hidden = body["sums"]["counts"], body["sums"]["suppressed"] > 0
    assert cell_hidden[3, 0] and cells[3, 0] == 0
    for axis in (0, 1):
        assert not (cell_hidden.sum(axis=axis) == 1).any()
    assert cells[3].sum() != 10  # stage IV's released cells are not the 13 minus the 3


def test_two_histograms_whose_edges_differ_by_one_unit_are_refused(fed):
    fed.histogram("age", AGE_EDGES)
    with pytest.raises(mv.RefusedError) as error:
        fed.histogram("age", [31.0, *AGE_EDGES[1:]])  # [30, 31) holds site a's two patients aged 30
    assert error.value.site == "a" and error.value.rule == "differencing"
    assert "2" not in error.value.detail  # nor does the refusal say how many


def test_a_describe_on_a_subset_one_row_smaller_is_refused(fed):
    fed.describe("bmi")
    with pytest.raises(mv.RefusedError) as error:
        fed.describe("bmi_but_one")
    assert error.value.site == "a" and error.value.rule == "differencing"


def _describe_rounds(fed, task: str, variable: str) -> tuple[np.ndarray, dict]:
    """Rounds 0 and 1 of a describe, as an honest session would run them; returns the pooled mean."""
    params = {"variables": [variable]}
    first = send_raw(fed, "plain", task, 0, 0, "describe", params)
    n = sum(body["sums"]["n"] for _, body in first.values())
    mean = sum(body["sums"]["sum"] for _, body in first.values()) / n
    second = send_raw(fed, "plain", task, 1, 1, "describe", params, {"mean": mean})
    assert all(status == "ok" for status, _ in second.values())
    return mean, params


@pytest.mark.parametrize("forged", ["uneven", "off_centre", "extra_key", "nan"])
def test_a_describe_grid_the_node_never_derived_is_refused(fed, forged):
    mean, params = _describe_rounds(fed, f"t-grid-{forged}", "bmi")
    offsets = np.linspace(-GRID_HALF_WIDTH_SD, GRID_HALF_WIDTH_SD, GRID_POINTS)
    grid = mean[:, None] + 4.0 * offsets[None, :]
    broadcast = {"grid": grid}
    if forged == "uneven":  # points packed around one patient's value
        broadcast["grid"] = np.sort(np.concatenate([grid[:, :-40], 24.0 + np.linspace(0, 0.01, 40)[None, :]], axis=1))
    elif forged == "off_centre":
        broadcast["grid"] = grid + 1.0
    elif forged == "extra_key":
        broadcast["mean"] = mean
    else:
        broadcast["grid"] = np.where(np.arange(GRID_POINTS) == 7, np.nan, grid)
    answers = send_raw(fed, "plain", f"t-grid-{forged}", 2, 2, "describe", params, broadcast)
    expected = {"uneven": "broadcast_not_released", "off_centre": "broadcast_not_released",
                "extra_key": "unexpected_broadcast", "nan": "broadcast_malformed"}[forged]
    assert {rule for _, rule in answers.values()} == {expected}
    assert all(status == "refused" for status, _ in answers.values())


def test_a_describe_grid_fine_enough_to_isolate_one_patient_shows_no_step(fed):
    """A valid grid (evenly spaced, centred on the mean) so narrow that one patient sits in it."""
    mean, params = _describe_rounds(fed, "t-grid-fine", "bmi")
    values = _site_a()["bmi"].to_numpy()
    nearest = values[np.argmin(np.abs(values - mean[0]))]
    half_width = 2 * abs(nearest - mean[0]) + 1e-9
    grid = mean[:, None] + np.linspace(-half_width, half_width, GRID_POINTS)[None, :]
    inside = np.count_nonzero(np.abs(values - mean[0]) <= half_width)
    assert inside >= 1
    status, body = send_raw(fed, "plain", "t-grid-fine", 2, 2, "describe", params, {"grid": grid})["a"]
    assert status == "ok"
    cdf = body["sums"]["cdf"][0]
    true = np.searchsorted(np.sort(values), grid[0], side="right")
    assert np.ptp(true) == inside < MIN  # the true CDF steps where a patient lies ...
    steps = np.diff(cdf)
    assert np.all((steps == 0) | (steps >= MIN))  # ... the released one never steps by fewer than MIN
    # and no count is exact: each released value is the midpoint of MIN consecutive counts or more.
    assert np.all(np.abs(cdf - true) <= MIN - 1)


def _genotype_sites(tmp_path, n=150):
    from tests.e2e.test_gwas import _make

    sites, _, _ = _make(tmp_path, n=n, m=20, seed=5)
    return sites


@pytest.mark.parametrize("test", ["allelic", "logistic"])
def test_gwas_at_a_site_with_too_few_cases_is_refused(tmp_path, test):
    sites = _genotype_sites(tmp_path)
    cohort = sites["site_2"]["cohort"]
    cases = np.flatnonzero(cohort["case"].to_numpy() == 1)
    cohort.loc[cases[3:], "case"] = 0  # three cases left at site_2
    with mv.Federation.simulate(sites, timeout=30) as fed:
        with pytest.raises(mv.RefusedError) as error:
            fed.gwas(genotypes="geno", phenotype="case", data="cohort", test=test)
        assert {(site, rule) for site, rule, _ in error.value.refusals} == {("site_2", "min_cell_count")}
        assert "3" not in error.value.detail
        # Asked again, the site's controls differ from its earlier sample by those three cases.
        with pytest.raises(mv.RefusedError) as error:
            fed.gwas(genotypes="geno", phenotype="case", data="cohort", test=test)
        assert error.value.rule in ("differencing", "min_cell_count")


def test_pca_at_a_site_with_too_few_samples_is_refused(tmp_path):
    sites = _genotype_sites(tmp_path)
    sites["site_1"]["cohort"] = sites["site_1"]["cohort"].head(3)
    with mv.Federation.simulate(sites, timeout=30) as fed:
        with pytest.raises(mv.RefusedError) as error:
            fed.pca(genotypes="geno", components=2, data="cohort")
        assert {(site, rule) for site, rule, _ in error.value.refusals} == {("site_1", "min_cell_count")}


def test_a_gwas_batch_with_a_variant_the_site_never_listed_is_refused(tmp_path):
    sites = _genotype_sites(tmp_path)
    with mv.Federation.simulate(sites, timeout=30, secure_aggregation=False) as fed:
        params = {"genotypes": "geno", "phenotype": "case"}
        first = send_raw(fed, fed.study.id, "t-variant", 0, 0, "gwas", params, dataset="cohort")
        listed = first["site_0"][1]["public"]["variants"]
        batch = {"chrom": [listed["chrom"][0], "1"], "pos": np.array([listed["pos"][0], 10**9]),
                 "counted": [listed["a1"][0], "A"]}
        answers = send_raw(fed, fed.study.id, "t-variant", 1, 1, "gwas", params, {"stage": "counts", "batch": batch},
                        dataset="cohort")
        assert {rule for _, rule in answers.values()} == {"broadcast_not_released"}
        assert all(status == "refused" for status, _ in answers.values())
        unknown_stage = send_raw(fed, fed.study.id, "t-variant-2", 0, 0, "gwas", params, dataset="cohort")
        assert all(status == "ok" for status, _ in unknown_stage.values())
        answers = send_raw(fed, fed.study.id, "t-variant-2", 1, 1, "gwas", params,
                        {"stage": "newton", "batch": {k: v[:1] for k, v in batch.items()}, "active": np.array([0]),
                         "beta": np.zeros((1, 2))}, dataset="cohort")
        assert {rule for _, rule in answers.values()} == {"unexpected_broadcast"}  # allelic has no Newton stage
