"""Manhattan and QQ plots: the points drawn are the table's finite P values, placed and noted as documented."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

pytest.importorskip("matplotlib")
from matplotlib.collections import PathCollection, PolyCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from medveil.gwas_plots import manhattan, qq  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SMALLEST_DOUBLE = float(np.nextafter(0.0, 1.0))
NAMED_ORDER = [str(number) for number in range(1, 23)] + ["X", "Y", "XY", "MT"]


@pytest.fixture
def table() -> pd.DataFrame:
    """Shuffled SNPs on several chromosomes (one with an unknown name), a few hits, NaN P and one P == 0."""
    rng = np.random.default_rng(20240612)
    sizes = {"1": 60, "2": 45, "10": 30, "X": 25, "MT": 5, "GL000192": 4, "22": 35}
    chrom = np.concatenate([[name] * size for name, size in sizes.items()])
    pos = np.concatenate([np.sort(rng.choice(10_000_000, size, replace=False)) + 1 for size in sizes.values()])
    p = rng.uniform(size=len(chrom))
    p[rng.choice(len(p), 6, replace=False)] = 10.0 ** -rng.uniform(8, 15, 6)
    p[rng.choice(len(p), 9, replace=False)] = np.nan
    p[np.flatnonzero(np.isfinite(p))[3]] = 0.0
    frame = pd.DataFrame({"CHROM": chrom, "POS": pos, "ID": [f"rs{i}" for i in range(len(chrom))], "P": p})
    return frame.sample(frac=1.0, random_state=3).reset_index(drop=True)


def natural_order(names) -> list[str]:
    present = set(names)
    return [name for name in NAMED_ORDER if name in present] + sorted(present - set(NAMED_ORDER))


def plotted_points(ax) -> np.ndarray:
    return np.concatenate([c.get_offsets() for c in ax.collections if isinstance(c, PathCollection)])


def assert_png(path) -> None:
    assert path.exists()
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_manhattan_places_finite_snps_by_chromosome_then_position(table, tmp_path):
    path = tmp_path / "manhattan.png"
    ax = manhattan(table, path)
    assert_png(path)

    finite = table[np.isfinite(table["P"])]
    order = natural_order(finite["CHROM"])
    rank = finite["CHROM"].map({name: i for i, name in enumerate(order)})
    expected = finite.assign(rank=rank).sort_values(["rank", "POS"])
    points = plotted_points(ax)
    assert len(points) == len(finite)
    np.testing.assert_allclose(points[:, 1], -np.log10(np.maximum(expected["P"], SMALLEST_DOUBLE)))
    assert np.all(np.diff(points[:, 0]) > 0)
    for name, block in expected.groupby("CHROM"):
        x = points[(expected["CHROM"] == name).to_numpy()][:, 0]
        np.testing.assert_allclose(np.diff(x), np.diff(block["POS"].to_numpy()))

    assert [label.get_text() for label in ax.get_xticklabels()] == order
    starts = np.searchsorted(expected["rank"].to_numpy(), np.arange(len(order)))
    ends = np.append(starts[1:], len(expected)) - 1
    np.testing.assert_allclose(ax.get_xticks(), (points[starts, 0] + points[ends, 0]) / 2)

    thresholds = sorted(line.get_ydata()[0] for line in ax.get_lines())
    np.testing.assert_allclose(thresholds, sorted(-np.log10([5e-8, 1e-5])))
    assert all(line.get_linestyle() == "--" for line in ax.get_lines())


def test_manhattan_draws_p_zero_at_the_top_and_notes_skipped_snps(table):
    ax = manhattan(table, ax=Figure().subplots())
    heights = plotted_points(ax)[:, 1]
    assert heights.max() == pytest.approx(-np.log10(SMALLEST_DOUBLE))
    assert np.sum(heights == heights.max()) == np.sum(table["P"] == 0)
    note = ax.get_title(loc="right")
    assert f"{table['P'].isna().sum()} SNPs with no P not shown" in note
    assert (table["P"] == 0).sum() == 1
    assert "1 SNP with P = 0 drawn" in note


def test_qq_plots_sorted_observed_against_expected_with_band_and_lambda(table, tmp_path):
    path = tmp_path / "qq.png"
    ax = qq(table, path, title="QQ")
    assert_png(path)
    assert ax.get_title() == "QQ"
    note = ax.get_legend().get_title().get_text()
    assert f"{table['P'].isna().sum()} SNPs with no P not shown" in note

    finite = table["P"].dropna().to_numpy()
    count = len(finite)
    points = plotted_points(ax)
    assert len(points) == count
    np.testing.assert_allclose(points[:, 1], np.sort(-np.log10(np.maximum(finite, SMALLEST_DOUBLE)))[::-1])
    np.testing.assert_allclose(points[:, 0], -np.log10(np.arange(1, count + 1) / (count + 1)))

    band = next(c for c in ax.collections if isinstance(c, PolyCollection)).get_paths()[0].vertices
    rank = np.round((count + 1) * 10.0 ** -band[:, 0])
    band_lower = -np.log10(stats.beta.ppf(0.975, rank, count - rank + 1))
    band_upper = -np.log10(stats.beta.ppf(0.025, rank, count - rank + 1))
    assert np.all(np.isclose(band[:, 1], band_lower) | np.isclose(band[:, 1], band_upper))
    assert {1, count} <= set(rank)

    diagonal = next(line for line in ax.get_lines() if line.get_label() == "y = x")
    np.testing.assert_allclose(diagonal.get_xdata(), diagonal.get_ydata())
    assert max(diagonal.get_xdata()) == pytest.approx(points[:, 0].max())

    lambda_gc = np.median(stats.chi2.isf(finite, 1)) / stats.chi2.ppf(0.5, 1)
    assert f"= {lambda_gc:.3f}" in ax.get_legend().get_title().get_text()


def test_qq_shows_lambda_from_table_attrs(table):
    table.attrs["lambda_gc"] = 1.0734
    ax = qq(table, ax=Figure().subplots())
    assert "= 1.073" in ax.get_legend().get_title().get_text()


@pytest.mark.parametrize("plot", [manhattan, qq])
def test_nothing_to_plot_is_a_clear_error(plot, table, tmp_path):
    with pytest.raises(ValueError, match="nothing to plot"):
        plot(table.iloc[:0], tmp_path / "empty.png")
    with pytest.raises(ValueError, match="nothing to plot"):
        plot(table.assign(P=np.nan), tmp_path / "nan.png")
    with pytest.raises(ValueError, match="no column"):
        plot(table.drop(columns="P"), tmp_path / "no_p.png")
    assert not list(tmp_path.iterdir())
