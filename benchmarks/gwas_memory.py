"""Peak memory of one GWAS site when its number of SNPs doubles (it should stay flat).

A seeded site fileset is written at M and at 2M SNPs. For each, a fresh process runs exactly
what that site's node runs for a whole `fed.gwas(..., test="logistic")` over the file: the
variant listing, then per batch of variants the genotype counts and a Newton round (dosages
decoded once per batch and kept for the batch's rounds), and reports its peak resident set
size (VmHWM). The site's memory is bounded by the batch, not by the file.

    python benchmarks/gwas_memory.py [--samples 3333] [--snps 50000]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from bed_reader import to_bed


def site_run(path: Path, samples: int, batch_size: int) -> None:
    """Every local step of one site for a logistic GWAS over all its variants; prints peak RSS."""
    from medveil.analyses.base import SiteContext, get_analysis
    from medveil.analyses.variants import agree_variants, batch_broadcast
    from medveil.data.genotypes import GenotypeFile
    from medveil.privacy.disclosure import DisclosurePolicy

    rng = np.random.default_rng(7)
    cohort = pd.DataFrame({"IID": [f"s{i}" for i in range(samples)], "case": rng.integers(0, 2, samples),
                           "age": rng.normal(50, 10, samples)})
    analysis = get_analysis("gwas")
    params = analysis.parse_params({"genotypes": "geno", "phenotype": "case", "covariates": ["age"],
                                    "test": "logistic", "batch_size": batch_size})
    genotypes, policy, scratch = GenotypeFile("geno", path), DisclosurePolicy(), {}
    context = SiteContext("site", cohort, policy, scratch, {"released": {}}, genotypes=genotypes)
    listing = analysis.local(params, 0, {}, context)
    agreed, _ = agree_variants({"site": listing.public["variants"]})
    for start in range(0, len(agreed), batch_size):
        batch = batch_broadcast(agreed, start, min(start + batch_size, len(agreed)))
        analysis.local(params, 1, {"stage": "counts", "batch": batch}, context)
        beta = np.zeros((len(batch["pos"]), 3))
        analysis.local(params, 2, {"stage": "newton", "batch": batch, "active": np.arange(len(beta)), "beta": beta},
                       context)
    print(peak_rss_mib())


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that over from the
    parent through fork and exec, so it would report the memory the parent used to write the file."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_site(path: Path, samples: int, snps: int) -> None:
    rng = np.random.default_rng(2026)
    dosages = rng.binomial(2, rng.uniform(0.05, 0.5, snps), size=(samples, snps)).astype(np.int8)
    to_bed(path, dosages, properties={"iid": [f"s{i}" for i in range(samples)], "chromosome": ["1"] * snps,
                                      "bp_position": np.arange(snps) * 10 + 1})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=3333)
    parser.add_argument("--snps", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=20_000)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        site_run(args.child, args.samples, args.batch_size)
        return
    peaks = {}
    with tempfile.TemporaryDirectory() as workdir:
        for snps in (args.snps, 2 * args.snps):
            path = Path(workdir) / f"site_{snps}.bed"
            write_site(path, args.samples, snps)
            start = time.perf_counter()
            completed = subprocess.run([sys.executable, __file__, "--child", str(path), "--samples", str(args.samples),
                                        "--batch-size", str(args.batch_size)], check=True, capture_output=True,
                                       text=True)
            peaks[snps] = float(completed.stdout.split()[-1])
            print(f"{args.samples:,} samples x {snps:,} SNPs: peak RSS {peaks[snps]:7.1f} MiB "
                  f"({time.perf_counter() - start:.1f} s, batches of {args.batch_size:,})")
    print(f"peak RSS ratio, 2x SNPs / 1x SNPs: {peaks[2 * args.snps] / peaks[args.snps]:.2f}")


if __name__ == "__main__":
    main()
