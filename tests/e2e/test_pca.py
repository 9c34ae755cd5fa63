"""Federated PCA of the genotype matrix against an exact eigendecomposition and plink2 --pca on the pooled fileset."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

import medveil as mv
from medveil.privacy.disclosure import DisclosurePolicy

bed_reader = pytest.importorskip("bed_reader")
pytestmark = pytest.mark.e2e

POPULATIONS = 6
N_CHRX = 30
NO_PLINK2 = "plink2 is not installed (Debian package plink2)"


def _make(directory, n=450, m=1500, missing=0.01, seed=11):
    """A pooled fileset of six populations (Balding-Nichols drift from shared ancestral frequencies)
    and three site filesets; site_1 stores every variant's alleles swapped. Three variants are
    monomorphic, two carry a single copy of A1 and the last N_CHRX lie on chromosome X."""
    rng = np.random.default_rng(seed)
    ancestral = rng.uniform(0.05, 0.5, m)
    drift = np.linspace(0.03, 0.15, POPULATIONS)[:, None]
    frequencies = rng.beta(ancestral * (1 - drift) / drift, (1 - ancestral) * (1 - drift) / drift)
    population = rng.permutation(np.repeat(np.arange(POPULATIONS), n // POPULATIONS))
    dosages = rng.binomial(2, frequencies[population]).astype(np.float32)
    dosages[:, :5] = 0
    dosages[[7, 8], [3, 4]] = 1
    dosages[rng.random((n, m)) < missing] = np.nan
    iid = np.array([f"s{i}" for i in range(n)])
    alleles = np.array([("A", "G"), ("C", "T"), ("A", "C"), ("G", "T")])[rng.integers(0, 4, m)]
    chromosome = np.repeat(["1", "2"], m // 2)
    chromosome[-N_CHRX:] = "X"
    props = dict(iid=iid, fid=iid, sid=[f"rs{i}" for i in range(m)], chromosome=chromosome,
                 bp_position=np.arange(m) * 100 + 1000, allele_1=alleles[:, 0], allele_2=alleles[:, 1])
    bed_reader.to_bed(directory / "pooled.bed", dosages, properties=props)
    sites = {}
    for k, idx in enumerate(np.array_split(rng.permutation(n), 3)):
        idx = np.sort(idx)
        sub = {key: (np.asarray(v)[idx] if key in ("iid", "fid") else v) for key, v in props.items()}
        block = dosages[idx]
        if k == 1:
            block = 2 - block
            sub["allele_1"], sub["allele_2"] = props["allele_2"], props["allele_1"]
        bed_reader.to_bed(directory / f"site{k}.bed", block, properties=sub)
        cohort = pd.DataFrame({"IID": [*iid[idx], f"absent{k}"]})  # a table row with no genotypes is ignored
        sites[f"site_{k}"] = {"cohort": cohort, "geno": str(directory / f"site{k}.bed")}
    return sites, dosages


def _site_scores(result, sites) -> pd.DataFrame:
    """Each site projects its own samples with its own fileset; the scores gathered by IID."""
    frames = []
    for site in sites.values():
        bed = bed_reader.open_bed(site["geno"])
        column = pd.Series(np.arange(len(bed.sid)), index=bed.sid)[result.variants["ID"]].to_numpy()
        dosages = bed.read(index=np.s_[:, column], dtype="float64")
        flipped = np.asarray(bed.allele_1)[column] != result.variants["A1"].to_numpy()
        dosages[:, flipped] = 2 - dosages[:, flipped]
        frames.append(pd.DataFrame(result.project(dosages), index=bed.iid, columns=result.pc_names))
    return pd.concat(frames)


def _plink2_pca(directory, components, *modifiers) -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame]:
    out = directory / f"plink2_{'_'.join(modifiers) or 'default'}"
    subprocess.run(["plink2", "--bfile", str(directory / "pooled"), "--maf", "0.01", "--pca", str(components),
                    "biallelic-var-wts", *modifiers, "--out", str(out)], check=True, capture_output=True)
    vectors = pd.read_csv(f"{out}.eigenvec", sep="\t").set_index("IID")
    weights = pd.read_csv(f"{out}.eigenvec.var", sep="\t").set_index("ID")
    return np.loadtxt(f"{out}.eigenval"), vectors, weights


def _assert_matches_plink2(result, sites, directory, *modifiers):
    eigenvalues, vectors, weights = _plink2_pca(directory, len(result.eigenvalues), *modifiers)
    # plink2 prints 6 significant digits
    np.testing.assert_allclose(result.eigenvalues, eigenvalues, rtol=1e-4)
    scores = _site_scores(result, sites).loc[vectors.index]
    ours = result.variants.set_index("ID")
    assert set(ours.index) == set(weights.index[(weights[result.pc_names] != 0).any(axis=1)])
    weights = weights.loc[ours.index]
    # plink2's weights, signed like its .eigenvec, apply to the non-major allele's standardised dosage
    a1_is_nonmajor = np.where(weights["NONMAJ"] == ours["A1"], 1.0, -1.0)
    for pc in result.pc_names:
        assert abs(np.corrcoef(scores[pc], vectors[pc])[0, 1]) > 0.999
        sign = np.sign(np.dot(scores[pc], vectors[pc]))
        np.testing.assert_allclose(scores[pc], sign * vectors[pc], atol=1e-5)
        np.testing.assert_allclose(ours[pc], sign * a1_is_nonmajor * weights[pc], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def pca_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pca")
    sites, dosages = _make(directory)
    with mv.Federation.simulate(sites, record_hub_traffic=True) as fed:
        result = fed.pca(genotypes="geno", components=5, data="cohort")
        traffic = fed.hub_traffic()
    return directory, sites, dosages, result, traffic


def test_pca_equals_exact_eigendecomposition_of_the_pooled_grm(pca_run, tmp_path):
    _, sites, dosages, result, _ = pca_run
    observed = ~np.isnan(dosages)
    frequency = np.nansum(dosages, axis=0) / (2 * observed.sum(axis=0))
    autosomal = np.arange(dosages.shape[1]) < dosages.shape[1] - N_CHRX
    kept = autosomal & (np.minimum(frequency, 1 - frequency) >= 0.01)
    p = frequency[kept]
    standardised = np.where(observed[:, kept], dosages[:, kept] - 2 * p, 0) / np.sqrt(2 * p * (1 - p))
    grm = standardised @ standardised.T / kept.sum()
    values, vectors = np.linalg.eigh(grm)
    values, vectors = values[::-1][:5], vectors[:, ::-1][:, :5]

    assert result.converged and result.n_samples == len(dosages)
    assert list(result.variants["ID"]) == [f"rs{i}" for i in np.flatnonzero(kept)]
    assert set(result.variant_report["low_maf"]) == {f"rs{i}" for i in range(5)}
    assert len(result.variant_report["non_autosomal"]) == N_CHRX
    np.testing.assert_allclose(result.variants["A1_FREQ"], p, rtol=1e-12)
    np.testing.assert_allclose(result.eigenvalues, values, rtol=1e-9)
    np.testing.assert_allclose(result.variance_explained, values / np.trace(grm), rtol=1e-9)
    scores = _site_scores(result, sites).loc[[f"s{i}" for i in range(len(dosages))]].to_numpy()
    signs = np.sign(np.sum(scores * vectors, axis=0))
    np.testing.assert_allclose(scores, vectors * signs, atol=1e-6)
    loadings = standardised.T @ vectors / np.sqrt(values)
    np.testing.assert_allclose(result.loadings, loadings * signs, atol=1e-5 * np.abs(loadings).max())
    assert result.plot(tmp_path / "scree.png") is not None and (tmp_path / "scree.png").stat().st_size > 0


@pytest.mark.skipif(shutil.which("plink2") is None, reason=NO_PLINK2)
def test_pca_equals_plink2_meanimpute_with_missing_genotypes(pca_run):
    directory, sites, _, result, _ = pca_run
    _assert_matches_plink2(result, sites, directory, "meanimpute")


@pytest.mark.skipif(shutil.which("plink2") is None, reason=NO_PLINK2)
def test_pca_equals_plink2_default_without_missing_genotypes(tmp_path):
    sites, _ = _make(tmp_path, n=300, m=800, missing=0.0, seed=12)
    with mv.Federation.simulate(sites) as fed:
        result = fed.pca(genotypes="geno", components=4, data="cohort")
    _assert_matches_plink2(result, sites, tmp_path)


def test_hub_never_sees_unmasked_sums_or_sample_scores(pca_run):
    *_, result, traffic = pca_run
    bodies = list(traffic["body"])
    rounds = result.provenance["rounds"]
    assert rounds == result.iterations + 2
    assert all(not body.get("sums") for body in bodies)
    assert sum("masked" in body for body in bodies) == 3 * (rounds - 1)
    compute = [body for body in bodies if "masked" in body or "variants" in body.get("public", {})]
    assert len(compute) == 3 * rounds
    assert all(set(body["public"]) <= {"variants", "rows"} for body in compute)
    assert result.provenance["secure_aggregation"] is True


def test_iteration_cap_reports_no_convergence(tmp_path):
    sites, _ = _make(tmp_path, n=60, m=100, seed=14)
    with mv.Federation.simulate(sites) as fed:
        result = fed.pca(genotypes="geno", components=2, data="cohort", max_iter=2)
    assert not result.converged and result.iterations == 2 and result.provenance["rounds"] == 4
    assert "converged: False" in result.summary()


def test_site_with_too_few_samples_is_refused(tmp_path):
    sites, _ = _make(tmp_path, n=60, m=100, seed=13)
    with mv.Federation.simulate(sites, policy=DisclosurePolicy(min_cell_count=25)) as fed:
        with pytest.raises(mv.RefusedError) as error:
            fed.pca(genotypes="geno", components=2, data="cohort")
    assert error.value.rule == "min_cell_count"
