"""GWAS statistics from pooled sums, with PLINK's column names: pure functions of aggregates.

`allelic_table` turns pooled genotype counts into PLINK 1.9's --freq/--missing/--assoc/--model
TREND/--hardy figures; `regression_table` turns pooled per-SNP moments into plink2 --glm rows
(logistic Wald or linear), and `score_table` into score-test rows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats
from scipy.special import chdtrc

MEDIAN_CHISQ_1DF = stats.chi2.ppf(0.5, 1)


def pack_symmetric(matrices: np.ndarray) -> np.ndarray:
    """The upper triangles of a stack of symmetric k x k matrices, (..., k(k+1)/2)."""
    rows, cols = np.triu_indices(matrices.shape[-1])
    return matrices[..., rows, cols]


def unpack_symmetric(packed: np.ndarray, k: int) -> np.ndarray:
    """Inverse of `pack_symmetric`."""
    rows, cols = np.triu_indices(k)
    full = np.zeros((*packed.shape[:-1], k, k))
    full[..., rows, cols] = packed
    full[..., cols, rows] = packed
    return full


def lambda_gc(chisq: np.ndarray) -> float:
    """Genomic inflation: median 1-df chi-square over its null median."""
    finite = np.asarray(chisq, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return float(np.median(finite) / MEDIAN_CHISQ_1DF) if len(finite) else float("nan")


def trend_chisq(cases: np.ndarray, controls: np.ndarray) -> np.ndarray:
    """Cochran-Armitage trend chi-square (1 df) on genotype counts, as plink1.9 --model TREND."""
    weights = np.array([2.0, 1.0, 0.0])
    r, s = cases.sum(axis=1), controls.sum(axis=1)
    n = r + s
    totals = cases + controls
    with np.errstate(divide="ignore", invalid="ignore"):
        numerator = n * (n * (cases @ weights) - r * (totals @ weights)) ** 2
        denominator = r * s * (n * (totals @ weights**2) - (totals @ weights) ** 2)
        return numerator / denominator


def hwe_exact(heterozygotes: int, homozygotes_1: int, homozygotes_2: int) -> float:
    """Hardy-Weinberg exact test p-value (Wigginton, Cutler and Abecasis 2005), as plink --hardy.

    Written out because no maintained Python package provides it; it is the published SNPHWE
    recurrence over heterozygote counts."""
    rare_homs, common_homs = sorted((homozygotes_1, homozygotes_2))
    rare = 2 * rare_homs + heterozygotes
    total = heterozygotes + rare_homs + common_homs
    if total == 0:
        return 1.0
    probs = np.zeros(rare + 1)
    mid = rare * (2 * total - rare) // (2 * total)
    if mid % 2 != rare % 2:
        mid += 1
    probs[mid] = 1.0
    hets, homr, homc = mid, (rare - mid) // 2, total - mid - (rare - mid) // 2
    while hets >= 2:
        probs[hets - 2] = probs[hets] * hets * (hets - 1) / (4.0 * (homr + 1) * (homc + 1))
        hets, homr, homc = hets - 2, homr + 1, homc + 1
    hets, homr, homc = mid, (rare - mid) // 2, total - mid - (rare - mid) // 2
    while hets <= rare - 2:
        probs[hets + 2] = probs[hets] * 4.0 * homr * homc / ((hets + 2.0) * (hets + 1.0))
        hets, homr, homc = hets + 2, homr - 1, homc - 1
    observed = probs[heterozygotes]
    p_value = probs[probs <= observed * (1 + 1e-8)].sum() / probs.sum()
    return float(min(1.0, p_value))


def allelic_table(variants: pd.DataFrame, counts: np.ndarray, hardy: bool) -> pd.DataFrame:
    """PLINK 1.9 --assoc columns (plus --freq/--missing/--model TREND figures) from pooled counts.

    `counts[v, group, d]`: samples of group (0 controls, 1 cases) with d = 0, 1, 2 copies of the
    variant's A1 as listed in `variants`, or d = 3 missing. PLINK's A1 is the pooled minor allele;
    the column `A1_IS_A2` says where that is the listed A2."""
    controls, cases = counts[:, 0, :], counts[:, 1, :]
    listed_cases = 2 * cases[:, 2] + cases[:, 1]
    listed_controls = 2 * controls[:, 2] + controls[:, 1]
    called_cases = 2 * cases[:, :3].sum(axis=1)
    called_controls = 2 * controls[:, :3].sum(axis=1)
    listed_total = listed_cases + listed_controls
    called = called_cases + called_controls
    a1_is_a2 = listed_total > called - listed_total
    a1_cases = np.where(a1_is_a2, called_cases - listed_cases, listed_cases)
    a1_controls = np.where(a1_is_a2, called_controls - listed_controls, listed_controls)
    a2_cases, a2_controls = called_cases - a1_cases, called_controls - a1_controls
    with np.errstate(divide="ignore", invalid="ignore"):
        table = np.stack([[a1_cases, a2_cases], [a1_controls, a2_controls]])
        total = table.sum(axis=(0, 1))
        expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / total
        chisq = np.sum((table - expected) ** 2 / expected, axis=(0, 1))
        odds = (a1_cases * a2_controls) / (a2_cases * a1_controls)
        f_a, f_u = a1_cases / called_cases, a1_controls / called_controls
        a1_freq = (a1_cases + a1_controls) / called
        missing_rate = counts[:, :, 3].sum(axis=1) / counts.sum(axis=(1, 2))

    def oriented(group: np.ndarray) -> np.ndarray:
        """Genotype counts as homozygous A1, heterozygous, homozygous A2."""
        return np.where(a1_is_a2[:, None], group[:, [0, 1, 2]], group[:, [2, 1, 0]])

    a1_case_geno, a1_control_geno = oriented(cases), oriented(controls)
    trend = trend_chisq(a1_case_geno, a1_control_geno)
    listed_a1, listed_a2 = variants["A1"].to_numpy(object), variants["A2"].to_numpy(object)
    frame = pd.DataFrame({
        "CHROM": variants["CHROM"].to_numpy(), "POS": variants["POS"].to_numpy(), "ID": variants["ID"].to_numpy(),
        "REF": listed_a2, "ALT": listed_a1,
        "A1": np.where(a1_is_a2, listed_a2, listed_a1), "A2": np.where(a1_is_a2, listed_a1, listed_a2),
        "F_A": f_a, "F_U": f_u, "A1_FREQ": a1_freq, "OBS_CT": (called / 2).astype(np.int64),
        "F_MISS": missing_rate, "CHISQ": chisq, "P": chdtrc(1, chisq), "OR": odds,
        "TREND_CHISQ": trend, "TREND_P": chdtrc(1, trend),
        "GENO_UNAFF": _slashed(a1_control_geno),
        "A1_IS_A2": a1_is_a2,
    })
    if hardy:
        frame["HWE_P_UNAFF"] = [hwe_exact(int(b), int(a), int(c)) for a, b, c in a1_control_geno]
    return frame


def _slashed(counts: np.ndarray) -> pd.Series:
    """Genotype counts written as PLINK writes them: "hom/het/hom"."""
    text = pd.DataFrame(counts.astype(np.int64)).astype(str)
    return text[0] + "/" + text[1] + "/" + text[2]


def qc_keep(table: pd.DataFrame, maf: float, geno: float, hwe: float | None) -> dict[str, np.ndarray]:
    """PLINK's variant filters (--geno, --hwe, --maf) as named masks of the variants each removes."""
    minor = np.minimum(table["A1_FREQ"], 1 - table["A1_FREQ"]).fillna(0.0)
    removed = {"geno": (table["F_MISS"] > geno).to_numpy(), "maf": (minor < maf).to_numpy() if maf > 0 else
               np.zeros(len(table), dtype=bool)}
    if hwe is not None:
        removed["hwe"] = (table["HWE_P_UNAFF"] < hwe).to_numpy()
    return removed


def regression_table(variants: pd.DataFrame, kind: str, beta: np.ndarray, information: np.ndarray,
                     observed: np.ndarray, converged: np.ndarray, residual_ss: np.ndarray | None = None
                     ) -> pd.DataFrame:
    """plink2 --glm rows for the genotype term (the last coefficient) of every SNP's model.

    `information`: X'WX per SNP (logistic) or X'X (linear, with `residual_ss`); a SNP whose fit did
    not converge or whose design is singular gets no numbers and an ERRCODE."""
    k = beta.shape[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = converged & np.isfinite(information).all(axis=(1, 2))
        ok[ok] &= np.linalg.cond(information[ok]) < 1e12
        variance = np.full(len(beta), np.nan)
        variance[ok] = np.linalg.inv(information[ok])[:, -1, -1]
        effect = np.where(ok, beta[:, -1], np.nan)
        if kind == "linear":
            dof = observed - k
            variance = variance * residual_ss / dof
        se = np.sqrt(variance)
        statistic = effect / se
    frame = variants[["CHROM", "POS", "ID", "REF", "ALT", "A1", "A1_FREQ"]].reset_index(drop=True)
    frame["OBS_CT"] = observed.astype(np.int64)
    if kind == "linear":
        frame["BETA"], frame["SE"], frame["T_STAT"] = effect, se, statistic
        frame["P"] = 2 * stats.t.sf(np.abs(statistic), np.maximum(dof, 1))
    else:
        frame["OR"], frame["LOG(OR)_SE"], frame["Z_STAT"] = np.exp(effect), se, statistic
        frame["P"] = 2 * stats.norm.sf(np.abs(statistic))
    frame["ERRCODE"] = np.where(ok, ".", np.where(converged, "SINGULAR", "UNFINISHED"))
    return frame


def score_table(variants: pd.DataFrame, score: np.ndarray, variance: np.ndarray, observed: np.ndarray
                ) -> pd.DataFrame:
    """Score-test rows: U and its variance V under the null model; BETA = U/V and SE = 1/sqrt(V)
    are the one-step effect estimates biobank tools report beside the score chi-square."""
    with np.errstate(invalid="ignore", divide="ignore"):
        usable = variance > 1e-12 * np.maximum(1.0, observed)
        z = np.where(usable, score / np.sqrt(variance), np.nan)
        frame = variants[["CHROM", "POS", "ID", "REF", "ALT", "A1", "A1_FREQ"]].reset_index(drop=True)
        frame["OBS_CT"] = observed.astype(np.int64)
        frame["BETA"] = np.where(usable, score / variance, np.nan)
        frame["SE"] = np.where(usable, 1 / np.sqrt(variance), np.nan)
    frame["Z_STAT"] = z
    frame["CHISQ"] = z**2
    frame["P"] = chdtrc(1, z**2)
    frame["ERRCODE"] = np.where(usable, ".", "CONST_GENOTYPE")
    return frame
