"""GWAS, federated vs PLINK on the pooled fileset, in the same run.

Seeded synthetic genotypes (binary phenotype, age and sex), written once as a pooled fileset
and as three site filesets (samples split), SNP by SNP with bed-reader's writer so memory stays
small. Federated: `fed.gwas(..., test=...)`, 3 sites, secure aggregation on, loopback HTTP; the
timer covers the call (federation up). Peers: `plink1.9 --assoc` for the allelic test,
`plink2 --glm --threads 2` (Wald, age and sex as covariates) for logistic and logistic-score.
Site memory is measured by gwas_memory.py.

    python benchmarks/gwas.py [--samples 10000] [--snps 100000] [--test allelic|logistic|logistic-score]
                              [--workdir DIR] [--processes]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from bed_reader import create_bed

import medveil as mv

BLOCK = 2000


def write_filesets(directory: Path, samples: int, snps: int, seed: int = 2026) -> dict:
    rng = np.random.default_rng(seed)
    if (directory / "site2.bed").exists():  # written by an earlier run with --workdir
        return _site_tables(directory, samples, rng)
    case = rng.integers(0, 2, samples)
    iid = np.array([f"s{i}" for i in range(samples)])
    parts = np.array_split(rng.permutation(samples), 3)
    parts = [np.sort(p) for p in parts]
    variants = dict(sid=[f"rs{i}" for i in range(snps)], chromosome=["1"] * snps,
                    bp_position=np.arange(snps) * 10 + 1, allele_1=["A"] * snps, allele_2=["G"] * snps)
    writers = [create_bed(directory / "pooled.bed", samples, snps,
                          properties=dict(variants, iid=iid, fid=iid, pheno=(case + 1).astype(str)))]
    writers += [create_bed(directory / f"site{k}.bed", len(p), snps,
                           properties=dict(variants, iid=iid[p], fid=iid[p])) for k, p in enumerate(parts)]
    for start in range(0, snps, BLOCK):
        stop = min(start + BLOCK, snps)
        freq = rng.uniform(0.05, 0.5, stop - start)
        block = rng.binomial(2, freq, size=(samples, stop - start)).astype(np.int8)
        for j in range(stop - start):
            writers[0].write(block[:, j])
            for k, p in enumerate(parts):
                writers[k + 1].write(block[p, j])
    for writer in writers:
        writer.close()
    return _site_tables(directory, samples, np.random.default_rng(seed))


def _site_tables(directory: Path, samples: int, rng: np.random.Generator) -> dict:
    """Each site's phenotype table (case, age, sex) beside its fileset; the phenotype depends on nothing."""
    case = rng.integers(0, 2, samples)
    iid = np.array([f"s{i}" for i in range(samples)])
    parts = [np.sort(p) for p in np.array_split(rng.permutation(samples), 3)]
    age = rng.normal(50, 10, samples).round(1)
    sex = rng.integers(0, 2, samples)
    return {f"site_{k}": {"cohort": pd.DataFrame({"IID": iid[p], "case": case[p], "age": age[p], "sex": sex[p]}),
                          "geno": str(directory / f"site{k}.bed")}
            for k, p in enumerate(parts)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--snps", type=int, default=100_000)
    parser.add_argument("--test", choices=["allelic", "logistic", "logistic-score"], default="allelic")
    parser.add_argument("--workdir", type=Path, help="keep the filesets here and reuse them on the next run")
    parser.add_argument("--processes", action="store_true", help="run each site's node in its own process")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        directory = args.workdir or Path(scratch)
        directory.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        sites = write_filesets(directory, args.samples, args.snps)
        print(f"filesets ready in {time.perf_counter() - start:.1f} s")
        with mv.Federation.simulate(sites, timeout=600, processes=args.processes) as fed:
            start = time.perf_counter()
            covariates = [] if args.test == "allelic" else ["age", "sex"]
            result = fed.gwas(genotypes="geno", phenotype="case", data="cohort", test=args.test,
                              covariates=covariates)
            t_fed = time.perf_counter() - start
        print(f"{args.test} test, {args.samples:,} samples x {args.snps:,} SNPs, 3 sites, secure aggregation on, "
              f"nodes as {'processes' if args.processes else 'threads'}")
        print(f"federated fed.gwas:        {t_fed:7.2f} s  (lambda_gc {result.attrs['lambda_gc']:.3f})")
        if args.test == "allelic":
            compare_plink19(directory, result, t_fed)
        else:
            compare_plink2(directory, sites, result, t_fed)


def compare_plink19(directory: Path, result: pd.DataFrame, t_fed: float) -> None:
    if shutil.which("plink1.9") is None:
        print("plink1.9 not installed: no ratio")
        return
    start = time.perf_counter()
    subprocess.run(["plink1.9", "--bfile", str(directory / "pooled"), "--assoc", "--allow-no-sex",
                    "--out", str(directory / "plink")], check=True, capture_output=True)
    t_plink = time.perf_counter() - start
    plink = pd.read_csv(directory / "plink.assoc", sep=r"\s+")
    finite = plink["CHISQ"].to_numpy() > 0
    worst = float(np.nanmax(np.abs(result["CHISQ"].to_numpy()[finite] / plink["CHISQ"].to_numpy()[finite] - 1)))
    print(f"plink1.9 --assoc (pooled): {t_plink:7.2f} s  ratio federated/plink {t_fed / t_plink:.2f}")
    print(f"max relative difference of CHISQ vs PLINK's printed values: {worst:.1e}")


def compare_plink2(directory: Path, sites: dict, result: pd.DataFrame, t_fed: float) -> None:
    if shutil.which("plink2") is None:
        print("plink2 not installed: no ratio")
        return
    covariates = pd.concat(site["cohort"] for site in sites.values())
    covariates.assign(FID=covariates["IID"])[["FID", "IID", "age", "sex"]].to_csv(directory / "covar.txt",
                                                                                  sep="\t", index=False)
    start = time.perf_counter()
    subprocess.run(["plink2", "--bfile", str(directory / "pooled"), "--glm", "hide-covar", "--covar",
                    str(directory / "covar.txt"), "--threads", "2", "--out", str(directory / "plink2")],
                   check=True, capture_output=True)
    t_plink = time.perf_counter() - start
    plink = pd.read_csv(next(directory.glob("plink2*.glm.logistic*")), sep="\t")
    plink = plink[plink["TEST"] == "ADD"].set_index("ID")
    ours = result.set_index("ID")
    print(f"plink2 --glm --threads 2:  {t_plink:7.2f} s  ratio federated/plink2 {t_fed / t_plink:.2f}")
    if "LOG(OR)_SE" in ours:
        worst = float(np.nanmax(np.abs(ours["LOG(OR)_SE"] / plink.loc[ours.index, "LOG(OR)_SE"] - 1)))
        print(f"max relative difference of LOG(OR)_SE vs plink2's printed values: {worst:.1e}")
    else:
        agreement = np.corrcoef(ours["Z_STAT"], plink.loc[ours.index, "Z_STAT"])[0, 1]
        print(f"correlation of score Z with plink2's Wald Z: {agreement:.4f}")


if __name__ == "__main__":
    main()
