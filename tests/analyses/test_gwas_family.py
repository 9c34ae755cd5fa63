"""TDT: transmission counts summed over sites equal plink1.9 --tdt on the pooled pedigree."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from medveil.analyses.gwas_family import tdt_counts, tdt_table, trios

bed_reader = pytest.importorskip("bed_reader")

N_TRIOS = 150
N_SNPS = 200
OVER_TRANSMITTED = np.arange(5)  # SNPs where het parents pass allele_1 to affected children 80% of the time
N_MENDEL_ERRORS = 30
SITES = ("site_a", "site_b", "site_c")
PLINK_RTOL = 6e-4  # plink prints 4 significant digits


@dataclass
class Pedigree:
    bed: str
    iid: np.ndarray
    fid: np.ndarray
    father: np.ndarray
    mother: np.ndarray
    affected: np.ndarray
    allele_1: np.ndarray
    dosages: np.ndarray  # copies of allele_1, read back from the .bed
    mendel_errors: list[tuple[int, int]]  # (child row, SNP) where the child's genotype cannot be inherited

    def affected_trios(self) -> np.ndarray:
        return trios(self.iid, self.father, self.mother, self.affected)

    def all_children(self) -> np.ndarray:
        return trios(self.iid, self.father, self.mother, np.ones(len(self.iid), dtype=bool))


def _simulate(directory, seed: int = 20240613) -> Pedigree:
    """Trios (some with an unaffected or a second affected sibling), one-parent families, unrelated founders."""
    rng = np.random.default_rng(seed)
    freq = rng.uniform(0.05, 0.95, N_SNPS)
    people: list[dict] = []
    haplotypes: list[np.ndarray] = []

    def founder(fid, role, sex):
        people.append(dict(fid=fid, iid=f"{fid}_{role}", father="0", mother="0", sex=sex, pheno="1"))
        haplotypes.append((rng.random((2, N_SNPS)) < freq).astype(int))
        return len(people) - 1

    def child(fid, role, father_row, mother_row, affected, father_iid=None, mother_iid=None):
        passed = []
        for parent in (father_row, mother_row):
            alleles = haplotypes[parent]
            heterozygous = alleles[0] != alleles[1]
            p_a1 = np.where(affected & np.isin(np.arange(N_SNPS), OVER_TRANSMITTED), 0.8, 0.5)
            passed.append(np.where(heterozygous, rng.random(N_SNPS) < p_a1, alleles[0]).astype(int))
        people.append(dict(fid=fid, iid=f"{fid}_{role}", father=father_iid or people[father_row]["iid"],
                           mother=mother_iid or people[mother_row]["iid"], sex=int(rng.integers(1, 3)),
                           pheno="2" if affected else "1"))
        haplotypes.append(np.array(passed))

    for family in range(N_TRIOS):
        fid = f"fam{family}"
        father, mother = founder(fid, "father", 1), founder(fid, "mother", 2)
        child(fid, "child", father, mother, affected=True)
        if family % 7 == 0:
            child(fid, "sib", father, mother, affected=False)
        if family % 11 == 0:
            child(fid, "sib2", father, mother, affected=True)
    for family in range(6):
        fid = f"onep{family}"
        father, stand_in = founder(fid, "father", 1), founder(f"{fid}x", "mother", 2)
        child(fid, "child", father, stand_in, affected=True, mother_iid="0" if family % 2 else "absent_mother")
    for person in range(30):
        founder(f"ind{person}", "self", int(rng.integers(1, 3)))

    dosages = np.array([h.sum(axis=0) for h in haplotypes], dtype=np.float64)
    dosages[rng.random(dosages.shape) < 0.01] = np.nan
    iids = [p["iid"] for p in people]
    row_of = {name: row for row, name in enumerate(iids)}
    candidates = [(row, snp) for row, p in enumerate(people) if p["father"] in row_of and p["mother"] in row_of
                  for snp in range(N_SNPS)]
    mendel_errors = []
    for pick in rng.permutation(len(candidates)):
        row, snp = candidates[pick]
        parents = dosages[[row_of[people[row]["father"]], row_of[people[row]["mother"]]], snp]
        if np.isnan(parents).any() or (parents != 1).all() or (parents == 1).all():
            continue  # only one heterozygous parent leaves an impossible child genotype that a naive count would use
        possible = {f + m for f in _passable(parents[0]) for m in _passable(parents[1])}
        impossible = [value for value in (0, 1, 2) if value not in possible]
        dosages[row, snp] = impossible[0]
        mendel_errors.append((row, snp))
        if len(mendel_errors) == N_MENDEL_ERRORS:
            break

    order = rng.permutation(len(people))  # parents need not precede children in the .fam
    alleles = np.array([("A", "G"), ("C", "T"), ("A", "C"), ("G", "T")])[rng.integers(0, 4, N_SNPS)]
    properties = {key: [people[i][key] for i in order] for key in ("fid", "iid", "father", "mother", "sex", "pheno")}
    properties.update(sid=[f"rs{j}" for j in range(N_SNPS)], chromosome=np.repeat(["1", "2", "3", "4"], N_SNPS // 4),
                      bp_position=np.tile(np.arange(N_SNPS // 4) * 1000 + 5000, 4),
                      allele_1=alleles[:, 0], allele_2=alleles[:, 1])
    bed = str(directory / "pooled.bed")
    bed_reader.to_bed(bed, dosages[order], properties=properties)
    new_row = np.argsort(order)
    with bed_reader.open_bed(bed) as reader:
        return Pedigree(bed=bed, iid=reader.iid, fid=reader.fid, father=reader.father, mother=reader.mother,
                        affected=reader.pheno == "2", allele_1=reader.allele_1, dosages=reader.read(dtype="float64"),
                        mendel_errors=[(int(new_row[row]), snp) for row, snp in mendel_errors])


def _passable(dosage: float) -> set[int]:
    """Copies of allele_1 a parent with this dosage can pass on."""
    return {int(dosage) // 2, (int(dosage) + 1) // 2}


@pytest.fixture(scope="module")
def pedigree(tmp_path_factory) -> Pedigree:
    return _simulate(tmp_path_factory.mktemp("tdt"))


def inheritances(dosages: np.ndarray, child: int, father: int, mother: int, snp: int) -> list[tuple[int, int]] | None:
    """Copies of allele_1 (from father, from mother) that explain the child's genotype; None if one is missing."""
    genotypes = dosages[[child, father, mother], snp]
    if np.isnan(genotypes).any():
        return None
    kid, dad, mum = (int(g) for g in genotypes)
    return [(f, m) for f in _passable(dad) for m in _passable(mum) if f + m == kid]


def reference_counts(dosages: np.ndarray, trio_rows: np.ndarray,
                     family_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Loop over trios and SNPs: skip the family where any child is unexplained, else count het parents' alleles."""
    t, u = np.zeros(dosages.shape[1]), np.zeros(dosages.shape[1])
    for child, father, mother in trio_rows:
        siblings = [row for row in family_rows if (row[1], row[2]) == (father, mother)]
        for snp in range(dosages.shape[1]):
            ways = inheritances(dosages, child, father, mother, snp)
            if not ways or any(inheritances(dosages, *sibling, snp) == [] for sibling in siblings):
                continue
            parents = dosages[[father, mother], snp]
            passed_by_het = sum(copies for copies, parent in zip(ways[0], parents) if parent == 1)
            t[snp] += passed_by_het
            u[snp] += (parents == 1).sum() - passed_by_het
    return t, u


def reference_trios(iid, father, mother, affected) -> list[tuple[int, int, int]]:
    rows = []
    for child in range(len(iid)):
        parents = [np.flatnonzero(iid == parent) for parent in (father[child], mother[child])]
        if affected[child] and all(len(found) == 1 for found in parents):
            rows.append((child, parents[0][0], parents[1][0]))
    return rows


def family_sites(pedigree: Pedigree, seed: int = 5) -> dict[str, np.ndarray]:
    """Sample rows per site, every family at one site."""
    families = np.unique(pedigree.fid)
    site_of = dict(zip(families, np.random.default_rng(seed).integers(0, len(SITES), len(families))))
    site = np.array([site_of[fid] for fid in pedigree.fid])
    return {name: np.flatnonzero(site == k) for k, name in enumerate(SITES)}


def summed_over_sites(pedigree: Pedigree) -> tuple[np.ndarray, np.ndarray]:
    t, u = np.zeros(N_SNPS), np.zeros(N_SNPS)
    for rows in family_sites(pedigree).values():
        iid, father, mother = pedigree.iid[rows], pedigree.father[rows], pedigree.mother[rows]
        site_t, site_u = tdt_counts(pedigree.dosages[rows], trios(iid, father, mother, pedigree.affected[rows]),
                                    family_rows=trios(iid, father, mother, np.ones(len(rows), dtype=bool)))
        t, u = t + site_t, u + site_u
    return t, u


def test_trios_are_affected_children_with_both_parents_sampled(pedigree):
    found = pedigree.affected_trios()
    expected = reference_trios(pedigree.iid, pedigree.father, pedigree.mother, pedigree.affected)
    assert [tuple(row) for row in found] == expected
    assert len(found) == N_TRIOS + sum(family % 11 == 0 for family in range(N_TRIOS))
    assert found.dtype == np.intp and found.shape[1] == 3


def test_trios_need_unique_iids():
    with pytest.raises(ValueError, match="unique"):
        trios(["a", "a", "c"], ["0", "0", "a"], ["0", "0", "a"], [False, False, True])
    assert trios(["a"], ["0"], ["0"], [True]).shape == (0, 3)


def test_counts_equal_loop_over_trios(pedigree):
    t, u = tdt_counts(pedigree.dosages, pedigree.affected_trios(), family_rows=pedigree.all_children())
    ref_t, ref_u = reference_counts(pedigree.dosages, pedigree.affected_trios(), pedigree.all_children())
    np.testing.assert_array_equal(t, ref_t)
    np.testing.assert_array_equal(u, ref_u)
    assert t.dtype == u.dtype == np.float64


def test_a_mendel_error_in_any_child_drops_the_family_at_that_snp(pedigree):
    rows, children = pedigree.affected_trios(), pedigree.all_children()
    masked = pedigree.dosages.copy()
    for erring_child, snp in pedigree.mendel_errors:
        family = children[(children[:, 1:] == children[children[:, 0] == erring_child, 1:]).all(axis=1)]
        masked[np.unique(family), snp] = np.nan
    np.testing.assert_array_equal(np.stack(tdt_counts(pedigree.dosages, rows, family_rows=children)),
                                  np.stack(tdt_counts(masked, rows)))
    errors_in_unaffected = [(child, snp) for child, snp in pedigree.mendel_errors if not pedigree.affected[child]]
    assert errors_in_unaffected, "the fixture should put some Mendel errors in unaffected siblings"
    only_own = np.stack(tdt_counts(pedigree.dosages, rows))
    with_siblings = np.stack(tdt_counts(pedigree.dosages, rows, family_rows=children))
    assert (only_own != with_siblings).any()
    assert len(pedigree.mendel_errors) == N_MENDEL_ERRORS


def test_dosages_must_be_hard_calls():
    with pytest.raises(ValueError, match="hard calls"):
        tdt_counts(np.array([[1.0], [0.5], [2.0]]), np.array([[0, 1, 2]]))


def test_table_marks_untestable_snps_as_plink_does():
    table = tdt_table(np.array([0.0, 5.0, 0.0, 12.0]), np.array([0.0, 0.0, 3.0, 4.0]))
    assert list(table.columns) == ["T", "U", "OR", "CHISQ", "P"]
    assert table.loc[[0, 1], "OR"].isna().all()
    assert table.loc[0, ["CHISQ", "P"]].isna().all()
    assert table.loc[2, "OR"] == 0
    assert table.loc[3, "OR"] == pytest.approx(12 / 4)
    assert table.loc[3, "CHISQ"] == pytest.approx((12 - 4) ** 2 / 16)
    assert table.loc[3, "P"] == pytest.approx(stats.chi2.sf((12 - 4) ** 2 / 16, 1))


@pytest.mark.skipif(shutil.which("plink1.9") is None, reason="plink1.9 is not installed (Debian package plink1.9)")
def test_counts_summed_over_sites_equal_plink_tdt(pedigree, tmp_path):
    out = tmp_path / "plink"
    subprocess.run(["plink1.9", "--bfile", pedigree.bed.removesuffix(".bed"), "--tdt", "--out", str(out)],
                   check=True, capture_output=True)
    plink = pd.read_csv(f"{out}.tdt", sep=r"\s+")
    assert list(plink["SNP"]) == [f"rs{j}" for j in range(N_SNPS)]

    t, u = summed_over_sites(pedigree)
    a1_is_allele_1 = (plink["A1"] == pedigree.allele_1).to_numpy()
    assert 0 < a1_is_allele_1.sum() < N_SNPS
    oriented = tdt_table(np.where(a1_is_allele_1, t, u), np.where(a1_is_allele_1, u, t))
    np.testing.assert_array_equal(oriented["T"], plink["T"])
    np.testing.assert_array_equal(oriented["U"], plink["U"])
    for column in ("OR", "CHISQ", "P"):
        np.testing.assert_allclose(oriented[column], plink[column], rtol=PLINK_RTOL, equal_nan=True)
    assert (oriented.loc[OVER_TRANSMITTED, "P"] < 1e-3).all()


@st.composite
def multisite_families(draw):
    """Families (two parents, one to three children of any phenotype) with genotypes 0/1/2/NaN, each at one site."""
    n_snps = draw(st.integers(1, 5))
    genotype = st.sampled_from([0.0, 1.0, 2.0, np.nan])
    families = []
    for _ in range(draw(st.integers(0, 8))):
        affected = draw(st.lists(st.booleans(), min_size=1, max_size=3))
        values = draw(st.lists(genotype, min_size=(2 + len(affected)) * n_snps,
                               max_size=(2 + len(affected)) * n_snps))
        families.append((np.array(affected), np.array(values).reshape(-1, n_snps), draw(st.integers(0, 2))))
    return n_snps, families


def samples(families, n_snps: int):
    """Sample arrays (iid, father, mother, affected, dosages) of these families: parents first, then children."""
    iid, father, mother, affected, dosages = [], [], [], [], [np.zeros((0, n_snps))]
    for number, (children_affected, genotypes, _) in enumerate(families):
        parents = [f"fam{number}_father", f"fam{number}_mother"]
        iid += parents + [f"fam{number}_child{k}" for k in range(len(children_affected))]
        father += ["0", "0"] + [parents[0]] * len(children_affected)
        mother += ["0", "0"] + [parents[1]] * len(children_affected)
        affected += [False, False, *children_affected]
        dosages.append(genotypes)
    return np.array(iid, dtype=str), np.array(father, dtype=str), np.array(mother, dtype=str), \
        np.array(affected, dtype=bool), np.concatenate(dosages)


def counts_with_families(iid, father, mother, affected, dosages) -> np.ndarray:
    every_child = trios(iid, father, mother, np.ones(len(iid), dtype=bool))
    return np.stack(tdt_counts(dosages, trios(iid, father, mother, affected), family_rows=every_child))


@settings(max_examples=200, deadline=None)
@given(multisite_families())
def test_per_site_counts_add_up_to_counts_on_the_union(data):
    n_snps, families = data
    union = samples(families, n_snps)
    pooled = counts_with_families(*union)
    summed = sum((counts_with_families(*samples([f for f in families if f[2] == site], n_snps)) for site in range(3)),
                 start=np.zeros((2, n_snps)))
    np.testing.assert_array_equal(summed, pooled)
    iid, father, mother, affected, dosages = union
    reference = reference_counts(dosages, trios(iid, father, mother, affected),
                                 trios(iid, father, mother, np.ones(len(iid), dtype=bool)))
    np.testing.assert_array_equal(pooled, np.stack(reference))
