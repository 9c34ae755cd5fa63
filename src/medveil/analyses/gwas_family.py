"""Transmission disequilibrium test (TDT) from per-site transmission counts, as plink1.9 --tdt.

Each trio (father, mother, affected child) lives entirely at one site. Per SNP, a site counts how
often heterozygous parents transmitted allele A1 to an affected child (T) and how often they
transmitted the other allele (U); only these per-SNP totals are summed across sites, and the
pooled T and U give the same test as plink on the pooled pedigree. Like plink 1.9, a trio is
skipped at a SNP where any of the three genotypes is missing or the child's genotype cannot come
from the parents' (a Mendel error); a child with an unknown or absent parent is not a trio.
The counts are autosomal: plink's chrX/haploid handling is not modelled.
"""

from __future__ import annotations

from itertools import product

import numpy as np
import pandas as pd
from scipy import stats

UNKNOWN_PARENT = "0"


def _transmission_tables() -> tuple[np.ndarray, np.ndarray]:
    """T and U for every (father, mother, child) dosage pattern, indexed [father, mother, child].

    Homozygous parents pass on a known allele; the child's remaining A1 copies came from its
    heterozygous parents (whichever of them it was). When that remainder is impossible (below 0
    or above the number of heterozygous parents) the pattern is a Mendel error and counts nothing.
    """
    transmitted = np.zeros((3, 3, 3))
    untransmitted = np.zeros((3, 3, 3))
    for father, mother, child in product(range(3), repeat=3):
        heterozygous = (father == 1) + (mother == 1)
        from_homozygous = sum(dosage // 2 for dosage in (father, mother) if dosage != 1)
        from_heterozygous = child - from_homozygous
        if 0 <= from_heterozygous <= heterozygous:
            transmitted[father, mother, child] = from_heterozygous
            untransmitted[father, mother, child] = heterozygous - from_heterozygous
    return transmitted, untransmitted


TRANSMITTED, UNTRANSMITTED = _transmission_tables()


def trios(iid: np.ndarray, father: np.ndarray, mother: np.ndarray, affected: np.ndarray) -> np.ndarray:
    """Rows (child, father, mother) into the sample arrays for each affected child with both parents sampled.

    Parents are given by IID ("0" for unknown) and looked up among `iid`, which must be unique; a
    child whose father or mother is unknown or not in the sample list is left out, as plink does.
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


def tdt_counts(dosages: np.ndarray, trio_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-SNP T and U: transmissions of A1 (the counted allele) and of the other allele to affected children.

    `dosages` is samples x SNPs (0/1/2 copies of A1, NaN missing); `trio_rows` as from `trios`.
    A trio counts at a SNP only when all three genotypes are present and Mendel-consistent.
    """
    dosages = np.asarray(dosages, dtype=np.float64)
    trio_rows = np.asarray(trio_rows, dtype=np.intp).reshape(-1, 3)
    if dosages.ndim != 2:
        raise ValueError("dosages must be a samples x SNPs matrix")
    called = ~np.isnan(dosages)
    if not np.isin(dosages[called], (0.0, 1.0, 2.0)).all():
        raise ValueError("dosages must be 0, 1, 2 or NaN (hard calls)")
    child, father, mother = (dosages[trio_rows[:, column]] for column in range(3))
    complete = ~(np.isnan(child) | np.isnan(father) | np.isnan(mother))
    pattern = np.where(complete, 9 * father + 3 * mother + child, 0).astype(np.intp)
    transmitted = np.where(complete, TRANSMITTED.ravel()[pattern], 0.0).sum(axis=0)
    untransmitted = np.where(complete, UNTRANSMITTED.ravel()[pattern], 0.0).sum(axis=0)
    return transmitted, untransmitted


def tdt_table(t: np.ndarray, u: np.ndarray) -> pd.DataFrame:
    """plink1.9 --tdt columns T, U, OR = T/U, CHISQ = (T-U)^2/(T+U) and its 1-df P; NaN where plink prints NA."""
    t = np.asarray(t, dtype=np.float64)
    u = np.asarray(u, dtype=np.float64)
    informative = t + u > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        odds_ratio = np.where(u > 0, t / u, np.nan)
        chisq = np.where(informative, (t - u) ** 2 / (t + u), np.nan)
    return pd.DataFrame({"T": t, "U": u, "OR": odds_ratio, "CHISQ": chisq, "P": stats.chi2.sf(chisq, 1)})
