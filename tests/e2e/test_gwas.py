"""Federated GWAS (allelic test, frequencies, missingness) against PLINK 1.9 on the pooled fileset."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import medveil as mv

bed_reader = pytest.importorskip("bed_reader")
pytestmark = pytest.mark.e2e


def _make(directory, n=600, m=300, seed=1):
    """A seeded pooled fileset and three site filesets (site_1 stores every variant's alleles swapped)."""
    rng = np.random.default_rng(seed)
    freq = rng.uniform(0.05, 0.95, m)
    dosages = rng.binomial(2, freq, size=(n, m)).astype(np.float32)
    case = rng.integers(0, 2, n)
    age, sex = rng.normal(50, 10, n).round(1), rng.integers(0, 2, n)
    dosages[case == 1, :10] = rng.binomial(2, np.minimum(freq[:10] * 1.6, 0.9), size=(int(case.sum()), 10))
    height = (160 + 0.2 * age + 8 * sex + 4 * dosages[:, 20:25].sum(axis=1) + rng.normal(0, 6, n)).round(2)
    dosages[rng.random((n, m)) < 0.01] = np.nan
    iid = np.array([f"s{i}" for i in range(n)])
    alleles = np.array([("A", "G"), ("C", "T"), ("A", "C"), ("G", "T")])[rng.integers(0, 4, m)]
    alleles[:5] = ("A", "T")  # strand-ambiguous: kept, and reported
    props = dict(iid=iid, fid=iid, sid=[f"rs{i}" for i in range(m)], chromosome=np.repeat(["1", "2"], m // 2),
                 bp_position=np.arange(m) * 100 + 1000, allele_1=alleles[:, 0], allele_2=alleles[:, 1],
                 pheno=(case + 1).astype(str))
    bed_reader.to_bed(directory / "pooled.bed", dosages, properties=props)
    sites = {}
    for k, idx in enumerate(np.array_split(rng.permutation(n), 3)):
        idx = np.sort(idx)
        sub = {key: (np.asarray(v)[idx] if key in ("iid", "fid", "pheno") else v) for key, v in props.items()}
        block = dosages[idx]
        if k == 1:
            block = 2 - block
            sub["allele_1"], sub["allele_2"] = props["allele_2"], props["allele_1"]
        bed_reader.to_bed(directory / f"site{k}.bed", block, properties=sub)
        cohort = pd.DataFrame({"IID": iid[idx], "case": case[idx], "age": age[idx], "sex": sex[idx],
                               "height": height[idx]})
        sites[f"site_{k}"] = {"cohort": cohort,
                              "geno": str(directory / f"site{k}.bed")}
    return sites, dosages, case


@pytest.fixture(scope="module")
def gwas_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gwas")
    sites, dosages, case = _make(directory)
    with mv.Federation.simulate(sites, record_hub_traffic=True) as fed:
        result = fed.gwas(genotypes="geno", phenotype="case", data="cohort", hardy=True)
        bodies = list(fed.hub_traffic()["body"])
    return directory, result, dosages, case, bodies


def test_allelic_test_equals_numpy_reference(gwas_run):
    _, result, dosages, case, _ = gwas_run
    for j in (0, 3, 50, 299):
        observed = ~np.isnan(dosages[:, j])
        d, c = dosages[observed, j], case[observed]
        ref_case, ref_control = d[c == 1].sum(), d[c == 0].sum()
        table = np.array([[ref_case, 2 * (c == 1).sum() - ref_case], [ref_control, 2 * (c == 0).sum() - ref_control]])
        chisq = stats.chi2_contingency(table, correction=False)[0]
        assert result["CHISQ"].iat[j] == pytest.approx(chisq, rel=1e-10)
        assert result["OBS_CT"].iat[j] == observed.sum()
        assert result["F_MISS"].iat[j] == pytest.approx(1 - observed.mean(), rel=1e-12)
    assert result.attrs["variant_report"]["strand_ambiguous"] == [f"rs{i}" for i in range(5)]
    assert result.attrs["provenance"]["secure_aggregation"] is True


@pytest.mark.skipif(shutil.which("plink1.9") is None, reason="plink1.9 is not installed (Debian package plink1.9)")
def test_allelic_test_equals_plink_assoc(gwas_run):
    directory, result, *_ = gwas_run
    subprocess.run(["plink1.9", "--bfile", str(directory / "pooled"), "--assoc", "--allow-no-sex",
                    "--out", str(directory / "plink")], check=True, capture_output=True)
    plink = pd.read_csv(directory / "plink.assoc", sep=r"\s+")
    merged = result.merge(plink, left_on="ID", right_on="SNP", suffixes=("", "_plink"))
    assert len(merged) == len(result) == 300
    assert (merged["A1"] == merged["A1_plink"]).all() and (merged["A2"] == merged["A2_plink"]).all()
    # PLINK prints 4 significant digits
    np.testing.assert_allclose(merged["CHISQ"], merged["CHISQ_plink"], rtol=6e-4)
    np.testing.assert_allclose(merged["F_A"], merged["F_A_plink"], atol=6e-5)
    np.testing.assert_allclose(merged["F_U"], merged["F_U_plink"], atol=6e-5)
    np.testing.assert_allclose(merged["OR"], merged["OR_plink"], rtol=6e-4)
    np.testing.assert_allclose(merged["P"], merged["P_plink"], rtol=6e-4)


def test_hub_never_sees_a_sites_genotype_counts(gwas_run):
    *_, bodies = gwas_run
    assert all(not body.get("sums") for body in bodies)
    assert sum("masked" in body for body in bodies) == 3


def test_unapproved_genotype_dataset_is_refused(gwas_run, tmp_path):
    sites, *_ = _make(tmp_path, n=60, m=20, seed=2)
    with mv.Federation.simulate(sites) as fed:
        spec = fed.network.add_study("no-genotypes", {"cohort": ["IID", "case"]})
        session = mv.api.ResearcherSession(fed.network.researcher, spec, timeout=20)
        with pytest.raises(mv.RefusedError) as error:
            session.run("gwas", {"genotypes": "geno", "phenotype": "case"}, "cohort")
    assert error.value.rule == "dataset_not_approved"


@pytest.mark.skipif(shutil.which("plink1.9") is None, reason="plink1.9 is not installed (Debian package plink1.9)")
def test_trend_and_hardy_weinberg_equal_plink(gwas_run):
    directory, result, *_ = gwas_run
    subprocess.run(["plink1.9", "--bfile", str(directory / "pooled"), "--model", "--hardy", "--allow-no-sex",
                    "--out", str(directory / "plink_model")], check=True, capture_output=True)
    model = pd.read_csv(directory / "plink_model.model", sep=r"\s+")
    trend = model[model["TEST"] == "TREND"].set_index("SNP")
    hardy = pd.read_csv(directory / "plink_model.hwe", sep=r"\s+")
    controls = hardy[hardy["TEST"] == "UNAFF"].set_index("SNP")
    ours = result.set_index("ID")
    np.testing.assert_allclose(ours["TREND_CHISQ"], trend.loc[ours.index, "CHISQ"].astype(float), rtol=6e-4)
    assert (ours["GENO_UNAFF"] == controls.loc[ours.index, "GENO"]).all()
    np.testing.assert_allclose(ours["HWE_P_UNAFF"], controls.loc[ours.index, "P"], rtol=6e-4, atol=1e-300)


def test_hardy_weinberg_exact_small_cases():
    from medveil.analyses.gwas_tables import hwe_exact

    assert hwe_exact(0, 0, 0) == 1.0
    # 100 samples in perfect equilibrium (p = 0.5) cannot be rejected; an excess of homozygotes is
    assert hwe_exact(50, 25, 25) == pytest.approx(1.0)
    assert hwe_exact(10, 45, 45) < 1e-10


def _write_covariates(directory, sites) -> None:
    """age, sex and height of every sample, as plink2 --covar / --pheno files."""
    cohort = pd.concat(site["cohort"] for site in sites.values())
    cohort = cohort.assign(FID=cohort["IID"])
    cohort[["FID", "IID", "age", "sex"]].to_csv(directory / "covar.txt", sep="\t", index=False)
    cohort[["FID", "IID", "height"]].to_csv(directory / "pheno.txt", sep="\t", index=False)


def _plink2_glm(directory, *options: str) -> pd.DataFrame:
    """plink2 --glm (age and sex as covariates) on the pooled fileset: the genotype rows, by variant ID."""
    subprocess.run(["plink2", "--bfile", str(directory / "pooled"), *options, "--glm", "hide-covar", "--covar",
                    str(directory / "covar.txt"), "--out", str(directory / "plink2")], check=True, capture_output=True)
    plink = pd.read_csv(next(directory.glob("plink2*.glm.*")), sep="\t")
    return plink[plink["TEST"] == "ADD"].set_index("ID")


@pytest.mark.skipif(shutil.which("plink2") is None, reason="plink2 is not installed (Debian package plink2)")
def test_logistic_with_covariates_equals_plink2_glm(tmp_path):
    sites, *_ = _make(tmp_path)
    _write_covariates(tmp_path, sites)
    with mv.Federation.simulate(sites) as fed:
        result = fed.gwas(genotypes="geno", phenotype="case", data="cohort", covariates=["age", "sex"],
                          test="logistic")
    plink = _plink2_glm(tmp_path)
    ours = result.set_index("ID")
    assert (ours["ERRCODE"] == ".").all() and (plink["FIRTH?"] == "N").all()
    assert (ours["A1"] == plink.loc[ours.index, "A1"]).all()
    assert (ours["OBS_CT"] == plink.loc[ours.index, "OBS_CT"]).all()
    # plink2 prints 6 significant digits
    np.testing.assert_allclose(np.log(ours["OR"]), np.log(plink.loc[ours.index, "OR"]), rtol=1e-4, atol=6e-6)
    np.testing.assert_allclose(ours["LOG(OR)_SE"], plink.loc[ours.index, "LOG(OR)_SE"], rtol=1e-4)
    moderate = plink.loc[ours.index, "P"] > 1e-10
    np.testing.assert_allclose(ours["P"][moderate], plink.loc[ours.index, "P"][moderate], rtol=1e-4)
    np.testing.assert_allclose(-np.log10(ours["P"]), -np.log10(plink.loc[ours.index, "P"]), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(shutil.which("plink2") is None, reason="plink2 is not installed (Debian package plink2)")
def test_linear_with_covariates_equals_plink2_glm(tmp_path):
    sites, *_ = _make(tmp_path)
    _write_covariates(tmp_path, sites)
    with mv.Federation.simulate(sites) as fed:
        result = fed.gwas(genotypes="geno", phenotype="height", data="cohort", covariates=["age", "sex"],
                          test="linear")
    plink = _plink2_glm(tmp_path, "--pheno", str(tmp_path / "pheno.txt"))
    ours = result.set_index("ID")
    assert (ours["ERRCODE"] == ".").all() and (ours["A1"] == plink.loc[ours.index, "A1"]).all()
    assert (ours["OBS_CT"] == plink.loc[ours.index, "OBS_CT"]).all()
    np.testing.assert_allclose(ours["BETA"], plink.loc[ours.index, "BETA"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ours["SE"], plink.loc[ours.index, "SE"], rtol=1e-4)
    np.testing.assert_allclose(ours["T_STAT"], plink.loc[ours.index, "T_STAT"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(-np.log10(ours["P"]), -np.log10(plink.loc[ours.index, "P"]), rtol=1e-4, atol=1e-5)
    assert ours.loc[[f"rs{i}" for i in range(20, 25)], "P"].max() < 0.01  # the simulated effects are found


def test_score_test_equals_statsmodels_on_pooled_data(tmp_path):
    sm = pytest.importorskip("statsmodels.api")
    sites, dosages, case = _make(tmp_path, n=300, m=40)
    with mv.Federation.simulate(sites) as fed:
        result = fed.gwas(genotypes="geno", phenotype="case", data="cohort", covariates=["age", "sex"],
                          test="logistic-score")
    pooled = pd.concat(site["cohort"] for site in sites.values()).set_index("IID").loc[[f"s{i}" for i in
                                                                                        range(len(case))]]
    design = sm.add_constant(pooled[["age", "sex"]].to_numpy(float))
    null = sm.GLM(pooled["case"].to_numpy(float), design, family=sm.families.Binomial()).fit(tol=1e-12)
    for j in (0, 7, 21, 39):
        row = result.set_index("ID").loc[f"rs{j}"]
        g = dosages[:, j].astype(float)
        a1_is_listed = row["A1"] == row["ALT"]
        g = g if a1_is_listed else 2 - g
        g = np.where(np.isnan(g), np.nanmean(g), g)
        chisq = float(np.atleast_1d(null.score_test(exog_extra=g[:, None])[0])[0])
        assert row["CHISQ"] == pytest.approx(chisq, rel=1e-6)
        assert row["P"] == pytest.approx(stats.chi2.sf(chisq, 1), rel=1e-5)
    assert result.attrs["null_model"]["coefficients"]["age"] == pytest.approx(null.params[1], rel=1e-7)


def test_batches_give_the_same_table_and_report_progress(tmp_path):
    sites, *_ = _make(tmp_path, n=240, m=90)
    seen = []
    with mv.Federation.simulate(sites) as fed:
        whole = fed.gwas(genotypes="geno", phenotype="case", data="cohort", covariates=["age"], test="logistic")
        batched = fed.gwas(genotypes="geno", phenotype="case", data="cohort", covariates=["age"], test="logistic",
                           batch_size=25, progress=lambda done, total: seen.append((done, total)))
    pd.testing.assert_frame_equal(whole, batched, check_exact=False, rtol=1e-9)
    assert seen[-1] == (90, 90) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert {d for d, _ in seen} >= {25, 50, 75, 90}


@pytest.mark.skipif(shutil.which("plink1.9") is None, reason="plink1.9 is not installed (Debian package plink1.9)")
def test_frequencies_missingness_and_filters_equal_plink(gwas_run, tmp_path):
    directory, result, *_ = gwas_run
    out = str(tmp_path / "qc")
    subprocess.run(["plink1.9", "--bfile", str(directory / "pooled"), "--freq", "--missing", "--allow-no-sex",
                    "--out", out], check=True, capture_output=True)
    freq = pd.read_csv(out + ".frq", sep=r"\s+").set_index("SNP")
    missing = pd.read_csv(out + ".lmiss", sep=r"\s+").set_index("SNP")
    ours = result.set_index("ID")
    assert (ours["A1"] == freq.loc[ours.index, "A1"]).all()
    np.testing.assert_allclose(ours["A1_FREQ"], freq.loc[ours.index, "MAF"], atol=6e-5)  # 4 significant digits
    np.testing.assert_allclose(ours["F_MISS"], missing.loc[ours.index, "F_MISS"], atol=6e-5)
    sites, *_ = _make(tmp_path)
    with mv.Federation.simulate(sites) as fed:
        filtered = fed.gwas(genotypes="geno", phenotype="case", data="cohort", maf=0.2, geno=0.012, hwe=1e-3)
    subprocess.run(["plink1.9", "--bfile", str(tmp_path / "pooled"), "--maf", "0.2", "--geno", "0.012", "--hwe",
                    "1e-3", "--allow-no-sex", "--write-snplist", "--out", out], check=True, capture_output=True)
    kept = set((tmp_path / "qc.snplist").read_text().split())
    assert set(filtered["ID"]) == kept
    assert sum(filtered.attrs["qc_removed"].values()) >= 300 - len(kept)


def test_a_fit_that_cannot_converge_is_reported_not_printed(tmp_path):
    sites, dosages, case = _make(tmp_path, n=120, m=12, seed=4)
    # rs11 separates cases from controls perfectly at every site: its odds ratio is infinite
    for k, site in enumerate(sites.values()):
        path = tmp_path / f"site{k}.bed"
        block = bed_reader.open_bed(path).read()
        cohort = site["cohort"].set_index("IID")
        carrier, other = (0.0, 2.0) if k == 1 else (2.0, 0.0)  # site_1 lists the alleles swapped
        block[:, 11] = np.where(cohort.loc[bed_reader.open_bed(path).iid, "case"].to_numpy() == 1, carrier, other)
        props = bed_reader.open_bed(path).properties
        bed_reader.to_bed(path, block, properties=props)
    with mv.Federation.simulate(sites) as fed:
        result = fed.gwas(genotypes="geno", phenotype="case", data="cohort", test="logistic").set_index("ID")
    assert result.loc["rs11", "ERRCODE"] == "UNFINISHED" and np.isnan(result.loc["rs11", "P"])
    assert (result.drop(index="rs11")["ERRCODE"] == ".").all()


@pytest.mark.skipif(shutil.which("plink1.9") is None, reason="plink1.9 is not installed (Debian package plink1.9)")
def test_tdt_over_sites_equals_plink_tdt(tmp_path):
    from tests.analyses.test_gwas_family import _simulate, family_sites

    pedigree = _simulate(tmp_path)
    pooled = bed_reader.open_bed(pedigree.bed)
    props = pooled.properties
    sites = {}
    for name, rows in family_sites(pedigree).items():
        sample_props = {key: (np.asarray(value)[rows] if key in ("fid", "iid", "father", "mother", "sex", "pheno")
                              else value) for key, value in props.items()}
        bed_reader.to_bed(tmp_path / f"{name}.bed", pedigree.dosages[rows], properties=sample_props)
        cohort = pd.DataFrame({"IID": pedigree.iid[rows], "affected": pedigree.affected[rows].astype(int)})
        sites[name] = {"cohort": cohort, "geno": str(tmp_path / f"{name}.bed")}
    with mv.Federation.simulate(sites) as fed:
        result = fed.gwas(genotypes="geno", phenotype="affected", data="cohort", test="tdt")
    out = str(tmp_path / "plink")
    subprocess.run(["plink1.9", "--bfile", str(tmp_path / "pooled"), "--tdt", "--freq", "--out", out], check=True,
                   capture_output=True)
    plink = pd.read_csv(out + ".tdt", sep=r"\s+").set_index("SNP")
    freq = pd.read_csv(out + ".frq", sep=r"\s+").set_index("SNP")
    ours = result.set_index("ID")
    assert len(ours) == len(plink)
    assert (ours["A1"] == plink.loc[ours.index, "A1"]).all()
    np.testing.assert_array_equal(ours["T"], plink.loc[ours.index, "T"])
    np.testing.assert_array_equal(ours["U"], plink.loc[ours.index, "U"])
    np.testing.assert_allclose(ours["CHISQ"], plink.loc[ours.index, "CHISQ"], rtol=6e-4)
    np.testing.assert_allclose(ours["P"], plink.loc[ours.index, "P"], rtol=6e-4)
    np.testing.assert_allclose(ours["A1_FREQ"], freq.loc[ours.index, "MAF"], atol=6e-5)
    assert ours.loc[[f"rs{j}" for j in range(5)], "P"].max() < 0.05  # the over-transmitted SNPs stand out


def test_a_quantitative_phenotype_is_refused_for_a_case_control_test(tmp_path):
    sites, *_ = _make(tmp_path, n=90, m=10)
    with mv.Federation.simulate(sites) as fed:
        with pytest.raises(mv.RefusedError) as error:
            fed.gwas(genotypes="geno", phenotype="height", data="cohort", test="logistic")
        with pytest.raises(ValueError, match="batch_size"):  # checked before anything is sent
            fed.gwas(genotypes="geno", phenotype="case", data="cohort", batch_size=0)
    assert error.value.rule == "analysis_error" and "0 (control) or 1 (case)" in str(error.value)
