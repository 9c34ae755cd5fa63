"""Federated PCA vs plink2 --pca meanimpute on the pooled fileset, in the same run.

Seeded genotypes from five populations with different allele frequencies (so the top PCs carry
structure), written as a pooled fileset and three site filesets (samples split). Federated:
`fed.pca(components=4)`, 3 sites, secure aggregation on, loopback HTTP; the timer covers the
call. Peer: `plink2 --pca 4 meanimpute --threads 2` on the pooled fileset.

    python benchmarks/pca.py [--samples 5000] [--snps 20000] [--components 4]
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
from bed_reader import open_bed, to_bed

import medveil as mv

def write_filesets(directory: Path, samples: int, snps: int, seed: int = 2026) -> dict:
    rng = np.random.default_rng(seed)
    ancestral = rng.uniform(0.1, 0.9, snps)
    population = rng.integers(0, 5, samples)
    frequencies = np.clip(ancestral + rng.normal(0, 0.08, (5, snps)), 0.02, 0.98)
    dosages = rng.binomial(2, frequencies[population]).astype(np.int8)
    iid = np.array([f"s{i}" for i in range(samples)])
    variants = dict(sid=[f"rs{i}" for i in range(snps)], chromosome=["1"] * snps, bp_position=np.arange(snps) + 1)
    to_bed(directory / "pooled.bed", dosages, properties=dict(variants, iid=iid, fid=iid))
    sites = {}
    for k, part in enumerate(np.array_split(rng.permutation(samples), 3)):
        part = np.sort(part)
        to_bed(directory / f"site{k}.bed", dosages[part], properties=dict(variants, iid=iid[part], fid=iid[part]))
        sites[f"site_{k}"] = {"cohort": pd.DataFrame({"IID": iid[part]}), "geno": str(directory / f"site{k}.bed")}
    return sites


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--snps", type=int, default=20_000)
    parser.add_argument("--components", type=int, default=4, help="5 populations: 4 PCs carry structure")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        directory = Path(workdir)
        sites = write_filesets(directory, args.samples, args.snps)
        with mv.Federation.simulate(sites, timeout=600) as fed:
            start = time.perf_counter()
            result = fed.pca(genotypes="geno", components=args.components, data="cohort")
            t_fed = time.perf_counter() - start
        print(f"PCA, {args.samples:,} samples x {args.snps:,} SNPs, 3 sites, secure aggregation on")
        print(f"federated fed.pca:          {t_fed:7.2f} s  ({result.iterations} subspace iterations, "
              f"converged {result.converged})")
        if shutil.which("plink2") is None:
            print("plink2 not installed: no ratio")
            return
        start = time.perf_counter()
        subprocess.run(["plink2", "--bfile", str(directory / "pooled"), "--maf", "0.01", "--pca", str(args.components),
                        "meanimpute", "--threads", "2", "--out", str(directory / "plink2")], check=True,
                       capture_output=True)
        t_plink = time.perf_counter() - start
        print(f"plink2 --pca meanimpute:    {t_plink:7.2f} s  ratio federated/plink2 {t_fed / t_plink:.2f}")
        eigenval = np.loadtxt(directory / "plink2.eigenval")
        worst = float(np.max(np.abs(result.eigenvalues / eigenval - 1)))
        plink = pd.read_csv(directory / "plink2.eigenvec", sep="\t").set_index("IID")
        scores = []
        for site in sites.values():
            with open_bed(site["geno"]) as reader:
                scores.append(pd.DataFrame(result.project(reader.read()), index=reader.iid))
        ours = pd.concat(scores).loc[plink.index]
        correlation = min(abs(np.corrcoef(ours[k], plink[f"PC{k + 1}"])[0, 1]) for k in range(args.components))
        print(f"eigenvalues within {worst:.1e} relative; lowest |corr| of a PC's scores with plink2's: "
              f"{correlation:.6f}")


if __name__ == "__main__":
    main()
