"""Manhattan and QQ plots of a GWAS result table (CHROM, POS, ID, P), such as the gwas analysis returns.

SNPs whose P is missing (failed tests) are left out and counted in a note on the plot; P == 0
(underflow) is clipped to the smallest positive double (-log10 = 323.3) so those SNPs are drawn
at the top rather than lost, and noted too. Drawing to a file uses a figure outside pyplot,
rendered by Agg, so it works without a display and leaves pyplot's figures and backend alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from medveil.plotting import axes, save

CHROMOSOME_ORDER = {"X": 1, "Y": 2, "XY": 3, "MT": 4}
CHROMOSOME_ALIASES = {"M": "MT"}
SMALLEST_P = float(np.finfo(np.float64).smallest_subnormal)
MANHATTAN_COLOURS = ("#23395d", "#6f9fd8")
BAND_POINTS = 2000  # ranks, log-spaced, at which the QQ band is evaluated: smooth, and fast for 10^7 SNPs


def chromosome_sort_key(name: str) -> tuple[int, int, str]:
    """Natural chromosome order: 1..22 numerically, then X, Y, XY, MT, then other names sorted."""
    bare = str(name).strip()
    if bare.lower().startswith("chr"):
        bare = bare[3:]
    bare = CHROMOSOME_ALIASES.get(bare.upper(), bare.upper())
    if bare.isdigit():
        return (0, int(bare), "")
    if bare in CHROMOSOME_ORDER:
        return (1, CHROMOSOME_ORDER[bare], "")
    return (2, 0, str(name))


def manhattan(table: pd.DataFrame, path: str | Path | None = None, *, p_column: str = "P",
              significance: float = 5e-8, suggestive: float = 1e-5, title: str | None = None,
              ax: Any = None) -> Any:
    """-log10(P) along the genome, chromosomes in natural order; saved as PNG when `path` is given."""
    frame, notes = _plottable(table, p_column, required=("CHROM", "POS"))
    names = sorted(frame["CHROM"].unique(), key=lambda name: (chromosome_sort_key(name), str(name)))
    frame["_order"] = frame["CHROM"].map({name: rank for rank, name in enumerate(names)})
    frame = frame.sort_values(["_order", "POS"], kind="stable")
    ax = axes(ax, path, figsize=(11, 4.5))
    gap = 0.02 * max(_total_span(frame), 1)
    offset = 0.0
    ticks, labels = [], []
    for rank, block in frame.groupby("_order", sort=True):
        positions = block["POS"].to_numpy(dtype=np.float64)
        start, span = positions.min(), positions.max() - positions.min()
        ax.scatter(offset + positions - start, block["_y"], s=6, linewidths=0,
                   color=MANHATTAN_COLOURS[rank % 2], label="_nolegend_")
        ticks.append(offset + span / 2)
        labels.append(str(block["CHROM"].iloc[0]))
        offset += span + gap
    ax.axhline(-np.log10(significance), color="firebrick", linestyle="--", linewidth=0.9,
               label=f"genome-wide (P = {significance:g})")
    ax.axhline(-np.log10(suggestive), color="darkorange", linestyle="--", linewidth=0.9,
               label=f"suggestive (P = {suggestive:g})")
    ax.set_xticks(ticks, labels, fontsize="small")
    ax.set_xlim(-gap, offset)
    ax.set_ylim(0, 1.05 * max(frame["_y"].max(), -np.log10(min(significance, suggestive))))
    ax.set_xlabel("chromosome")
    ax.set_ylabel(r"$-\log_{10}(P)$")
    ax.legend(loc="upper right", fontsize="small", frameon=False)
    ax.set_title(title or f"Manhattan plot ({len(frame):,} SNPs)", loc="left")
    if notes:
        ax.set_title("\n".join(notes), loc="right", fontsize="small", color="dimgray")
    return save(ax, path)


def qq(table: pd.DataFrame, path: str | Path | None = None, *, p_column: str = "P", title: str | None = None,
       ax: Any = None) -> Any:
    """Observed against expected -log10(P) with a 95% band and lambda_GC; saved as PNG when `path` is given."""
    frame, notes = _plottable(table, p_column, required=())
    observed = np.sort(frame["_y"].to_numpy())[::-1]
    count = len(observed)
    # The rank-th smallest of `count` uniform P values is Beta(rank, count - rank + 1); plot its mean.
    expected = -np.log10(np.arange(1, count + 1) / (count + 1))
    band_rank = np.unique(np.geomspace(1, count, BAND_POINTS).round())
    band_x = -np.log10(band_rank / (count + 1))
    lower = -np.log10(stats.beta.ppf(0.975, band_rank, count - band_rank + 1))
    upper = -np.log10(stats.beta.ppf(0.025, band_rank, count - band_rank + 1))
    lambda_gc = table.attrs.get("lambda_gc")
    if lambda_gc is None:
        lambda_gc = genomic_inflation(frame[p_column].to_numpy(dtype=np.float64))
    ax = axes(ax, path, figsize=(5.5, 5.5))
    ax.fill_between(band_x, lower, upper, color="lightgray", linewidth=0, label="95% band under the null")
    ax.plot([0, expected[0]], [0, expected[0]], color="firebrick", linestyle="--", linewidth=0.9, label="y = x")
    ax.scatter(expected, observed, s=8, linewidths=0, color=MANHATTAN_COLOURS[0], label="SNPs")
    ax.set_xlabel(r"expected $-\log_{10}(P)$")
    ax.set_ylabel(r"observed $-\log_{10}(P)$")
    heading = "\n".join([rf"$\lambda_{{GC}}$ = {float(lambda_gc):.3f}", *notes])
    legend = ax.legend(loc="upper left", fontsize="small", frameon=False, title=heading, title_fontsize="small")
    legend.get_title().set_horizontalalignment("left")
    ax.set_title(title or f"QQ plot ({count:,} SNPs)")
    return save(ax, path)


def genomic_inflation(p_values: np.ndarray) -> float:
    """lambda_GC: median 1-df chi-square implied by the finite P values over its null median."""
    finite = p_values[np.isfinite(p_values)]
    if len(finite) == 0:
        return float("nan")
    return float(np.median(stats.chi2.isf(finite, 1)) / stats.chi2.ppf(0.5, 1))


def _plottable(table: pd.DataFrame, p_column: str, required: tuple[str, ...]) -> tuple[pd.DataFrame, list[str]]:
    """Rows with a finite P plus their -log10(P) as `_y`, and notes on the SNPs skipped or clipped."""
    missing_columns = [column for column in (*required, p_column) if column not in table.columns]
    if missing_columns:
        raise ValueError(f"the GWAS table has no column(s) {', '.join(missing_columns)}")
    p_values = pd.to_numeric(table[p_column], errors="coerce").to_numpy(dtype=np.float64)
    finite = np.isfinite(p_values)
    if not finite.any():
        raise ValueError(f"nothing to plot: the GWAS table has no SNP with a finite {p_column} "
                         f"({len(table)} rows)")
    if ((p_values[finite] < 0) | (p_values[finite] > 1)).any():
        raise ValueError(f"{p_column} values must lie in [0, 1]")
    frame = table.loc[finite].copy()
    zero = p_values[finite] == 0
    frame["_y"] = -np.log10(np.maximum(p_values[finite], SMALLEST_P))
    notes = []
    if (~finite).sum():
        notes.append(f"{_snps((~finite).sum())} with no {p_column} not shown")
    if zero.sum():
        notes.append(f"{_snps(zero.sum())} with {p_column} = 0 drawn at {p_column} = {SMALLEST_P:.3g}")
    return frame, notes


def _snps(count: int) -> str:
    return f"{count:,} SNP" if count == 1 else f"{count:,} SNPs"


def _total_span(frame: pd.DataFrame) -> float:
    """Sum over chromosomes of the distance from the first plotted SNP to the last."""
    extent = frame.groupby("_order")["POS"].agg(["min", "max"])
    return float((extent["max"] - extent["min"]).sum())
