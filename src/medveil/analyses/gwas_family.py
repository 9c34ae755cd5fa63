"""Transmission disequilibrium test (TDT) from per-site transmission counts, as plink1.9 --tdt.

Each family (two parents and their children) lives entirely at one site. Per SNP, a site counts
how often heterozygous parents transmitted allele A1 to an affected child (T) and how often they
transmitted the other allele (U); only these per-SNP totals are summed across sites, and the
pooled T and U give the same test as plink on the pooled pedigree. As plink 1.9 does, a trio is
skipped at a SNP where any of its three genotypes is missing, and the whole family is skipped
at a SNP where any child of the two parents (affected or not) has a genotype it cannot have
inherited from them (a Mendel error); a child with an unknown or absent parent is not a trio.
The counts are autosomal: plink's chrX handling and its parenTDT (affected parents) are not modelled.
"""

from __future__ import annotations

from itertools import product

import numpy as np
import pandas as pd
from scipy import stats

UNKNOWN_PARENT = "0"


def _pattern_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """T, U and Mendel error for every (father, mother, child) dosage pattern, indexed [father, mother, child].

    Homozygous parents pass on a known allele; the child's remaining A1 copies came from its
    heterozygous parents (whichever of them it was). When that remainder is impossible (below 0
    or above the number of heterozygous parents) the pattern is a Mendel error and counts nothing.
    """
    transmitted = np.zeros((3, 3, 3))
    untransmitted = np.zeros((3, 3, 3))
    mendel_error = np.zeros((3, 3, 3), dtype=bool)
    for father, mother, child in product(range(3), repeat=3):
        heterozygous = (father == 1) + (mother == 1)
        from_homozygous = sum(dosage // 2 for dosage in (father, mother) if dosage != 1)
        from_heterozygous = child - from_homozygous
        if 0 <= from_heterozygous <= heterozygous:
            transmitted[father, mother, child] = from_heterozygous
            untransmitted[father, mother, child] = heterozygous - from_heterozygous
        else:
            mendel_error[father, mother, child] = True
    return transmitted, untransmitted, mendel_error


TRANSMITTED, UNTRANSMITTED, MENDEL_ERROR = _pattern_tables()


def trios(iid: np.ndarray, father: np.ndarray, mother: np.ndarray, affected: np.ndarray) -> np.ndarray:
    """Rows (child, father, mother) into the sample arrays for each affected child with both parents sampled.

    Parents are given by IID ("0" for unknown) and looked up among `iid`, which must be unique; a
    child whose father or mother is unknown or not in the sample list is left out, as plink does.
    With every sample marked affected it lists all children, as `tdt_counts` wants for `family_rows`.
    """
    iid = np.asarray(iid).astype(str)
    father = np.asarray(father).astype(str)
    mother = np.asarray(mother).astype(str)
    affected = np.asarray(affected, dtype=bool)
    if not len(iid) == len(father) == len(mother) == len(affected):
        raise ValueError("iid, father, mother and affected must have one entry per sample")
    if len(np.unique(iid)) != len(iid):
        raise ValueError("sample IIDs must be unique to find parents by IID")
    row_of = {name: row for row, name in enumerate(iid)}
    rows = [(child, row_of[father[child]], row_of[mother[child]]) for child in np.flatnonzero(affected)
            if father[child] != UNKNOWN_PARENT and mother[child] != UNKNOWN_PARENT
            and father[child] in row_of and mother[child] in row_of]
    return np.array(rows, dtype=np.intp).reshape(-1, 3)


def tdt_counts(dosages: np.ndarray, trio_rows: np.ndarray,
               family_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-SNP T and U: transmissions of A1 (the counted allele) and of the other allele to affected children.

    `dosages` is samples x SNPs (0/1/2 copies of A1, NaN missing); `trio_rows` as from `trios`.
    A trio counts at a SNP only when all three genotypes are present and no child of the same
    two parents has a Mendel error there. `family_rows` lists those children whatever their
    phenotype (`trios` with every sample marked affected); without it only the trios' own
    children are checked, which matches plink when the pedigree has no other children.
    """
    dosages = np.asarray(dosages, dtype=np.float64)
    trio_rows = np.asarray(trio_rows, dtype=np.intp).reshape(-1, 3)
    if dosages.ndim != 2:
        raise ValueError("dosages must be a samples x SNPs matrix")
    called = ~np.isnan(dosages)
    if not np.isin(dosages[called], (0.0, 1.0, 2.0)).all():
        raise ValueError("dosages must be 0, 1, 2 or NaN (hard calls)")
    checked = trio_rows if family_rows is None else np.concatenate(
        [trio_rows, np.asarray(family_rows, dtype=np.intp).reshape(-1, 3)])
    parents, family = np.unique(checked[:, 1:], axis=0, return_inverse=True)
    family = family.reshape(-1)
    pattern, complete = _patterns(dosages, checked)
    family_error = np.zeros((len(parents), dosages.shape[1]), dtype=bool)
    np.logical_or.at(family_error, family, complete & MENDEL_ERROR.ravel()[pattern])
    counted = complete[:len(trio_rows)] & ~family_error[family[:len(trio_rows)]]
    trio_pattern = pattern[:len(trio_rows)]
    transmitted = np.where(counted, TRANSMITTED.ravel()[trio_pattern], 0.0).sum(axis=0)
    untransmitted = np.where(counted, UNTRANSMITTED.ravel()[trio_pattern], 0.0).sum(axis=0)
    return transmitted, untransmitted


def _patterns(dosages: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index 9 * father + 3 * mother + child into the pattern tables per (trio, SNP), and where all three are called."""
    child, father, mother = (dosages[rows[:, column]] for column in range(3))
    complete = ~(np.isnan(child) | np.isnan(father) | np.isnan(mother))
    pattern = np.where(complete, 9 * father + 3 * mother + child, 0).astype(np.intp)
    return pattern, complete


def tdt_table(t: np.ndarray, u: np.ndarray) -> pd.DataFrame:
    """plink1.9 --tdt columns T, U, OR = T/U, CHISQ = (T-U)^2/(T+U) and its 1-df P; NaN where plink prints NA."""
    t = np.asarray(t, dtype=np.float64)
    u = np.asarray(u, dtype=np.float64)
    informative = t + u > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        odds_ratio = np.where(u > 0, t / u, np.nan)
        chisq = np.where(informative, (t - u) ** 2 / (t + u), np.nan)
    return pd.DataFrame({"T": t, "U": u, "OR": odds_ratio, "CHISQ": chisq, "P": stats.chi2.sf(chisq, 1)})
