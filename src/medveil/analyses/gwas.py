"""gwas: genome-wide association from securely summed genotype counts, as PLINK on pooled data.

Round 0 agrees the variants: each site names its variants (chromosome, position, alleles;
no sample data), and the researcher keeps those every site has, matched by chromosome and
position with alleles equal or swapped (swapped sites flip their dosages) and reports
strand-ambiguous (A/T, C/G) and mismatched variants. Round 1: each site streams its
genotypes in SNP blocks and returns, per variant, counts of dosage 0/1/2/missing among cases
and among controls; only the cross-site sums are decoded. From those the researcher computes
PLINK 1.9's --freq/--missing figures, the allelic association test (--assoc: 1-df chi-square
on allele counts, with A1 the pooled minor allele), the Cochran-Armitage trend test (--model
TREND) and the Hardy-Weinberg exact test in controls (--hardy UNAFF). With test="logistic",
further rounds fit y ~ 1 + covariates + dosage of the A1 (minor) allele for every SNP at once
by Newton's method: each site returns per-SNP X'WX and scores at the broadcast coefficients,
summed securely; the Wald statistics match plink2 --glm, and a SNP whose fit does not converge
is reported as UNFINISHED with no numbers.
What leaks: pooled genotype counts per variant in cases and controls, as a published
association table shows.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field
from scipy import stats

from medveil.analyses.base import (
    Aggregated,
    Analysis,
    AnalysisError,
    Finished,
    NextRound,
    Params,
    Release,
    register,
)
from medveil.data.genotypes import GenotypeFile
from medveil.privacy.disclosure import DisclosurePolicy

AMBIGUOUS = {frozenset("AT"), frozenset("CG")}


class GWASParams(Params):
    genotypes: str
    phenotype: str
    covariates: list[str] = Field(default_factory=list)
    test: Literal["allelic", "logistic"] = "allelic"
    max_iter: int = Field(25, ge=1, le=100)
    iid: str = "IID"
    hardy: bool = Field(False, description="also run the Hardy-Weinberg exact test in controls (slower)")
    block_size: int = Field(2000, ge=1, le=100_000)


def _variant_key(chrom: str, pos: int) -> str:
    return f"{chrom}:{int(pos)}"


@register
class GWAS(Analysis[GWASParams]):
    name = "gwas"
    Params = GWASParams

    def variables(self, params: GWASParams) -> list[str]:
        return [params.phenotype, *params.covariates]

    def genotype_dataset(self, params: GWASParams) -> str | None:
        return params.genotypes

    def row_sets(self, params: GWASParams, data: pd.DataFrame) -> list[np.ndarray]:
        return []  # every round uses the same samples; the genotype counts are per variant

    def local(self, params: GWASParams, round_no: int, broadcast: dict[str, Any], data: pd.DataFrame,
              policy: DisclosurePolicy, genotypes: GenotypeFile | None = None) -> Release:
        if genotypes is None:
            raise AnalysisError("gwas needs a genotype dataset")
        if round_no == 0:
            v = genotypes.variants
            return Release(public={"variants": [[c, int(p), a1, a2, i] for c, p, a1, a2, i in
                                                zip(v["CHROM"], v["POS"], v["A1"], v["A2"], v["ID"])]})
        samples, case, covariates = self._samples(params, data, genotypes)
        if round_no == 1:
            counts = np.zeros((len(broadcast["variants"]), 2, 4))
            for chunk, dosages in self._blocks(params, broadcast, genotypes, samples):
                for group in (0, 1):
                    rows = dosages[case == group]
                    for value in (0, 1, 2):
                        counts[chunk, group, value] = np.sum(rows == value, axis=0)
                    counts[chunk, group, 3] = np.sum(np.isnan(rows), axis=0)
            return Release(sums={"genotype_counts": counts},
                           public={"rows": int(len(samples)), "cases": int(case.sum())})
        return Release(sums=self._newton_sums(params, broadcast, genotypes, samples, case, covariates))

    def _blocks(self, params: GWASParams, broadcast: dict[str, Any], genotypes: GenotypeFile,
                samples: np.ndarray):
        """(variant indices, dosages) per SNP block, counted on the agreed reference allele, or on
        the pooled minor allele once the broadcast says which that is."""
        agreed = broadcast["variants"]
        position = {_variant_key(c, p): i for i, (c, p) in enumerate(zip(genotypes.variants["CHROM"],
                                                                          genotypes.variants["POS"]))}
        index = np.array([position[_variant_key(c, p)] for c, p, *_ in agreed], dtype=np.int64)
        flip = genotypes.variants["A1"].to_numpy()[index] != np.array([a1 for _, _, a1, *_ in agreed])
        if "minor_is_ref" in broadcast:
            flip = flip != ~np.asarray(broadcast["minor_is_ref"], dtype=bool)
        order = np.argsort(index)
        for start in range(0, len(order), params.block_size):
            chunk = order[start:start + params.block_size]
            lo, hi = int(index[chunk].min()), int(index[chunk].max()) + 1
            dosages = genotypes.block(samples, lo, hi)[:, index[chunk] - lo]
            yield chunk, np.where(flip[chunk][None, :], 2.0 - dosages, dosages)

    def _newton_sums(self, params: GWASParams, broadcast: dict[str, Any], genotypes: GenotypeFile,
                     samples: np.ndarray, case: np.ndarray, covariates: np.ndarray) -> dict[str, np.ndarray]:
        """Per SNP, X'WX and the score of y ~ 1 + covariates + dosage at the broadcast coefficients;
        a sample missing a SNP's genotype is left out of that SNP's model (weight 0), as PLINK does."""
        beta = np.asarray(broadcast["beta"], dtype=np.float64)
        base = np.column_stack([np.ones(len(samples)), covariates])
        k = base.shape[1] + 1
        information = np.zeros((len(beta), k, k))
        score = np.zeros((len(beta), k))
        observed_count = np.zeros(len(beta))
        for chunk, dosages in self._blocks(params, broadcast, genotypes, samples):
            observed = ~np.isnan(dosages)
            dose = np.where(observed, dosages, 0.0)
            linear = base @ beta[chunk, :-1].T + dose * beta[chunk, -1]
            mu = 1.0 / (1.0 + np.exp(-linear))
            weight = mu * (1.0 - mu) * observed
            residual = (case[:, None] - mu) * observed
            information[chunk, :-1, :-1] = np.einsum("ni,nb,nj->bij", base, weight, base)
            cross = np.einsum("ni,nb->bi", base, weight * dose)
            information[chunk, :-1, -1] = cross
            information[chunk, -1, :-1] = cross
            information[chunk, -1, -1] = np.sum(weight * dose**2, axis=0)
            score[chunk, :-1] = (base.T @ residual).T
            score[chunk, -1] = np.sum(dose * residual, axis=0)
            observed_count[chunk] = observed.sum(axis=0)
        return {"information": information, "score": score, "observed": observed_count}

    @staticmethod
    def _samples(params: GWASParams, data: pd.DataFrame,
                 genotypes: GenotypeFile) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows of the genotype file joined to the phenotype table on IID: case status 0/1, covariates."""
        if params.iid not in data.columns:
            raise AnalysisError(f"the phenotype table has no sample id column {params.iid!r}")
        table = data[[params.iid, params.phenotype, *params.covariates]].dropna()
        table = table.assign(**{params.iid: table[params.iid].astype(str)}).drop_duplicates(params.iid)
        lookup = {iid: i for i, iid in enumerate(genotypes.iid)}
        table = table[table[params.iid].isin(lookup)]
        case = table[params.phenotype].to_numpy(np.float64)
        if not np.all((case == 0) | (case == 1)):
            raise AnalysisError(f"phenotype {params.phenotype!r} must be 0 (control) or 1 (case)")
        return (np.array([lookup[i] for i in table[params.iid]], dtype=np.int64), case.astype(np.int64),
                table[params.covariates].to_numpy(np.float64).reshape(len(table), len(params.covariates)))

    def global_step(self, params: GWASParams, round_no: int, aggregated: Aggregated,
                    state: dict[str, Any]) -> NextRound | Finished:
        if round_no == 0:
            agreed, report = _agree_variants({site: p["variants"] for site, p in aggregated.public.items()})
            if not agreed:
                raise AnalysisError("the sites share no variant")
            return NextRound({"variants": agreed}, {"variants": agreed, "variant_report": report})
        if round_no == 1:
            table = _allelic_table(state["variants"], aggregated.sums["genotype_counts"], state["variant_report"],
                                   params.hardy)
            minor_is_ref = table.attrs.pop("minor_is_ref")
            if params.test == "allelic":
                return Finished(table)
            k = len(params.covariates) + 2
            state = dict(state, table=table, beta=np.zeros((len(table), k)), iteration=0, minor_is_ref=minor_is_ref)
            return NextRound(self._newton_broadcast(state), state)
        return self._newton_step(params, aggregated.sums, state)

    @staticmethod
    def _newton_broadcast(state: dict[str, Any]) -> dict[str, Any]:
        return {"variants": state["variants"], "minor_is_ref": state["minor_is_ref"], "beta": state["beta"]}

    def _newton_step(self, params: GWASParams, sums: dict[str, np.ndarray],
                     state: dict[str, Any]) -> NextRound | Finished:
        """One batched Newton step for every SNP's logistic model; finish when all have converged."""
        information, score = sums["information"], sums["score"]
        determinant = np.linalg.det(information)
        usable = np.isfinite(determinant) & (np.abs(determinant) > 1e-300)
        step = np.full_like(state["beta"], np.nan)
        step[usable] = np.linalg.solve(information[usable], score[usable][..., None])[..., 0]
        converged = usable & (np.nanmax(np.abs(step), axis=1) < 1e-9)
        iteration = state["iteration"] + 1
        if converged[usable].all() or iteration >= params.max_iter:
            return Finished(_logistic_table(state["table"], state["beta"], information, sums["observed"],
                                            converged))
        beta = np.where(usable[:, None], state["beta"] + np.nan_to_num(step), state["beta"])
        state = dict(state, beta=beta, iteration=iteration)
        return NextRound(self._newton_broadcast(state), state)


def _agree_variants(per_site: dict[str, list[list[Any]]]) -> tuple[list[list[Any]], dict[str, list[str]]]:
    """Variants every site holds (by chromosome and position) with matching or swapped alleles."""
    sites = sorted(per_site)
    tables = {site: {_variant_key(c, p): (c, p, a1, a2, i) for c, p, a1, a2, i in per_site[site]} for site in sites}
    reference = tables[sites[0]]
    agreed, ambiguous, mismatched, missing = [], [], [], []
    for key, (chrom, pos, a1, a2, vid) in reference.items():
        held = [tables[s].get(key) for s in sites]
        if any(h is None for h in held):
            missing.append(vid)
            continue
        if any({h[2], h[3]} != {a1, a2} for h in held):
            mismatched.append(vid)
            continue
        if frozenset((a1, a2)) in AMBIGUOUS:
            ambiguous.append(vid)
        agreed.append([chrom, pos, a1, a2, vid])
    return agreed, {"strand_ambiguous": ambiguous, "allele_mismatch": mismatched, "not_at_every_site": missing}


def _logistic_table(table: pd.DataFrame, beta: np.ndarray, information: np.ndarray, observed: np.ndarray,
                    converged: np.ndarray) -> pd.DataFrame:
    """plink2 --glm columns for the dosage term; a SNP whose fit did not converge gets NaN and an ERRCODE."""
    with np.errstate(invalid="ignore", divide="ignore"):
        variance = np.full(len(beta), np.nan)
        ok = converged & np.isfinite(np.linalg.det(information))
        variance[ok] = np.linalg.inv(information[ok])[:, -1, -1]
        log_or = np.where(ok, beta[:, -1], np.nan)
        se = np.sqrt(variance)
        z = log_or / se
    frame = table[["CHROM", "POS", "ID", "A1", "A2", "A1_FREQ"]].copy()
    frame["OBS_CT"] = observed.astype(np.int64)
    frame["OR"] = np.exp(log_or)
    frame["LOG(OR)_SE"] = se
    frame["Z_STAT"] = z
    frame["P"] = 2 * stats.norm.sf(np.abs(z))
    frame["ERRCODE"] = np.where(ok, ".", "UNFINISHED")
    frame.attrs.update(table.attrs)
    finite = frame["Z_STAT"].dropna() ** 2
    frame.attrs["lambda_gc"] = float(np.median(finite) / stats.chi2.ppf(0.5, 1)) if len(finite) else float("nan")
    return frame


def _trend_chisq(cases: np.ndarray, controls: np.ndarray) -> np.ndarray:
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


def _allelic_table(variants: list[list[Any]], counts: np.ndarray, report: dict[str, list[str]],
                   hardy: bool) -> pd.DataFrame:
    """PLINK 1.9 --assoc columns (plus --freq/--missing figures) from pooled genotype counts."""
    controls, cases = counts[:, 0, :], counts[:, 1, :]
    ref_cases = 2 * cases[:, 2] + cases[:, 1]  # copies of the reference file's A1 allele
    ref_controls = 2 * controls[:, 2] + controls[:, 1]
    called_cases = 2 * cases[:, :3].sum(axis=1)
    called_controls = 2 * controls[:, :3].sum(axis=1)
    ref_total = ref_cases + ref_controls
    called = called_cases + called_controls
    minor_is_ref = ref_total <= called - ref_total
    a1_cases = np.where(minor_is_ref, ref_cases, called_cases - ref_cases)
    a1_controls = np.where(minor_is_ref, ref_controls, called_controls - ref_controls)
    a2_cases, a2_controls = called_cases - a1_cases, called_controls - a1_controls
    with np.errstate(divide="ignore", invalid="ignore"):
        table = np.stack([[a1_cases, a2_cases], [a1_controls, a2_controls]])
        total = table.sum(axis=(0, 1))
        expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / total
        chisq = np.sum((table - expected) ** 2 / expected, axis=(0, 1))
        odds = (a1_cases * a2_controls) / (a2_cases * a1_controls)
        f_a, f_u = a1_cases / called_cases, a1_controls / called_controls
    # Genotype counts oriented to A1: homozygous A1, heterozygous, homozygous A2.
    def oriented(group: np.ndarray) -> np.ndarray:
        return np.where(minor_is_ref[:, None], group[:, [2, 1, 0]], group[:, [0, 1, 2]])

    a1_case_geno, a1_control_geno = oriented(cases), oriented(controls)
    trend = _trend_chisq(a1_case_geno, a1_control_geno)
    frame = pd.DataFrame({
        "CHROM": [v[0] for v in variants], "POS": [int(v[1]) for v in variants], "ID": [v[4] for v in variants],
        "A1": [v[2] if m else v[3] for v, m in zip(variants, minor_is_ref)],
        "A2": [v[3] if m else v[2] for v, m in zip(variants, minor_is_ref)],
        "F_A": f_a, "F_U": f_u, "A1_FREQ": np.where(minor_is_ref, ref_total, called - ref_total) / called,
        "OBS_CT": (called / 2).astype(np.int64),
        "F_MISS": counts[:, :, 3].sum(axis=1) / counts.sum(axis=(1, 2)),
        "CHISQ": chisq, "P": stats.chi2.sf(chisq, 1), "OR": odds,
        "TREND_CHISQ": trend, "TREND_P": stats.chi2.sf(trend, 1),
        "GENO_UNAFF": [f"{a:.0f}/{b:.0f}/{c:.0f}" for a, b, c in a1_control_geno],
    })
    if hardy:
        frame["HWE_P_UNAFF"] = [hwe_exact(int(b), int(a), int(c)) for a, b, c in a1_control_geno]
    frame.attrs["minor_is_ref"] = minor_is_ref
    finite = frame["CHISQ"].dropna()
    frame.attrs["lambda_gc"] = float(np.median(finite) / stats.chi2.ppf(0.5, 1)) if len(finite) else float("nan")
    frame.attrs["variant_report"] = report
    return frame
