"""gwas: genome-wide association from securely summed per-variant sums, as PLINK on pooled data.

Round 0 agrees the variants (see `variants`). Regression tests with covariates then fit the
null model (y ~ 1 + covariates) by Newton's method over summed X'WX and scores. The agreed
variants are then processed in batches of `batch_size`, one or a few rounds each, so memory
at a site and at the researcher stays bounded and progress can be shown:

- "counts": each site counts, per variant, samples with 0/1/2 copies of A1 or missing, among
  controls and cases (popcounts on the packed .bed). From the pooled counts the researcher
  computes PLINK 1.9's --freq/--missing/--assoc/--model TREND/--hardy figures and applies the
  --geno/--hwe/--maf filters. test="allelic" stops there.
- "linear": one round of per-SNP X'X, X'y and y'y (samples missing the genotype left out);
  the researcher solves each SNP's least squares, as plink2 --glm (quantitative trait).
- "newton": test="logistic" fits every SNP's y ~ 1 + covariates + dosage at once, warm-started
  at the null fit; each round the sites return per-SNP X'WX and scores at the broadcast
  coefficients for the SNPs not yet converged. A SNP that does not converge is UNFINISHED.
- "score": test="logistic-score", one round: the score U = g'(y - mu0) and its variance under
  the null model, missing genotypes imputed by the pooled mean (as regenie and SAIGE do).
- "tdt": test="tdt", one round: each site counts transmissions of A1 from heterozygous parents
  to affected children in its own families (trios from the .fam; affection is the phenotype),
  and the pooled T and U give plink1.9 --tdt. Frequencies then come from founders, as PLINK's.

A1 is the pooled minor allele, as in PLINK 1.9 and plink2 --glm; REF/ALT are .bim columns 6
and 5 at the first site.

Each site refuses (`min_cell_count`) when it holds fewer than min_cell_count samples, or for a
case-control test fewer than min_cell_count cases or controls (affected children for TDT); the
sample set, its cases and its controls are row sets of the differencing guard. The node checks
each broadcast: a stage this test uses with exactly its keys, variant batches of variants this
site listed in round 0 (at most `batch_size`), coefficient vectors finite and of the right length.
What leaks: pooled per-variant genotype counts and pooled per-SNP model sums, as published
association tables show, and each site's sample count; nothing per sample.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import MutableMapping
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator
from scipy.special import expit

from medveil.analyses.base import (
    Aggregated,
    Analysis,
    AnalysisError,
    BroadcastRefused,
    Finished,
    NextRound,
    Params,
    Release,
    SiteContext,
    finite_array,
    frame_from_wire,
    frame_rows,
    frame_to_wire,
    register,
    released_in,
)
from medveil.analyses.gwas_family import tdt_counts, tdt_table, trios
from medveil.analyses.gwas_tables import (
    allelic_table,
    lambda_gc,
    pack_symmetric,
    qc_keep,
    regression_table,
    score_table,
    unpack_symmetric,
)
from medveil.analyses.variants import (
    agree_variants,
    aligned_blocks,
    batch_broadcast,
    check_batch,
    count_genotypes,
    site_variants,
)
from medveil.data.genotypes import GenotypeFile
from medveil.privacy.disclosure import DisclosurePolicy, require_min_count

NEWTON_TOLERANCE = 1e-8  # largest coefficient step at which a fit counts as converged

Test = Literal["allelic", "linear", "logistic", "logistic-score", "tdt"]
STAGES: dict[str, set[str]] = {"allelic": {"counts"}, "linear": {"counts", "linear"},
                               "logistic": {"null", "counts", "newton"}, "logistic-score": {"null", "counts", "score"},
                               "tdt": {"counts", "tdt"}}
STAGE_KEYS = {"null": {"stage", "beta"}, "counts": {"stage", "batch"}, "linear": {"stage", "batch"},
              "tdt": {"stage", "batch"}, "score": {"stage", "batch", "beta", "mean"},
              "newton": {"stage", "batch", "active", "beta"}}


class GWASParams(Params):
    genotypes: str
    phenotype: str
    covariates: list[str] = Field(default_factory=list)
    test: Test = "allelic"
    iid: str = "IID"
    maf: float = Field(0.0, ge=0.0, le=0.5, description="drop variants with pooled minor allele frequency below")
    geno: float = Field(1.0, ge=0.0, le=1.0, description="drop variants with a missing rate above")
    hwe: float | None = Field(None, gt=0.0, le=1.0, description="drop variants with HWE exact P (controls) below")
    hardy: bool = Field(False, description="report the Hardy-Weinberg exact test in controls (slower)")
    max_iter: int = Field(25, ge=1, le=100)
    batch_size: int | None = Field(None, ge=1, le=1_000_000,
                                   description="variants per round (default: 100,000 for counting tests, 20,000 for "
                                               "regressions, whose sites keep a batch of dosages in memory)")
    block_size: int = Field(1000, ge=1, le=100_000, description="variants decoded at once at a site")

    @model_validator(mode="after")
    def _defaults(self) -> GWASParams:
        update: dict[str, Any] = {}
        if self.hwe is not None and not self.hardy:
            update["hardy"] = True
        if self.batch_size is None:
            update["batch_size"] = 20_000 if self.test in ("linear", "logistic") else 100_000
        return self.model_copy(update=update) if update else self


@register
class GWAS(Analysis[GWASParams]):
    name = "gwas"
    Params = GWASParams

    def variables(self, params: GWASParams) -> list[str]:
        return [params.iid, params.phenotype, *params.covariates]

    def genotype_dataset(self, params: GWASParams) -> str | None:
        return params.genotypes

    def row_sets(self, params: GWASParams, data: pd.DataFrame, round_no: int = 0,
                 broadcast: dict[str, Any] | None = None, policy: DisclosurePolicy | None = None
                 ) -> list[np.ndarray]:
        """In round 1, where the samples are first used: the table's sample rows (complete, one per
        IID), and for a case-control test its cases and controls; later rounds use the same rows."""
        if round_no != 1:
            return []
        used = _sample_rows(params, data)
        if params.test == "linear":
            return [used]
        phenotype = data[params.phenotype].to_numpy(dtype=np.float64, na_value=np.nan)
        return [used, used & (phenotype == 1), used & (phenotype == 0)]

    def check_broadcast(self, params: GWASParams, round_no: int, broadcast: dict[str, Any],
                        memory: dict[str, Any]) -> None:
        """A stage of this test with exactly its keys; batches of variants this site listed; the
        coefficients finite and of the lengths the model and the batch give."""
        if round_no == 0:
            return super().check_broadcast(params, round_no, broadcast, memory)
        stage = broadcast.get("stage")
        if stage not in STAGES[params.test]:
            raise BroadcastRefused("unexpected_broadcast", f"test={params.test!r} has no such stage")
        if set(broadcast) != STAGE_KEYS[stage]:
            raise BroadcastRefused("unexpected_broadcast", f"stage {stage!r} carries {sorted(STAGE_KEYS[stage])}")
        null_width = len(params.covariates) + 1
        if stage == "null":
            finite_array(broadcast["beta"], (null_width,))
            return
        length = _checked_batch(broadcast["batch"], memory, params.batch_size)
        if stage == "score":
            finite_array(broadcast["beta"], (null_width,))
            mean = finite_array(broadcast["mean"], (length,))
            if np.any((mean < 0) | (mean > 2)):
                raise BroadcastRefused("broadcast_malformed", "mean dosages must lie in [0, 2]")
        elif stage == "newton":
            active = np.asarray(broadcast["active"])
            if (active.ndim != 1 or not np.issubdtype(active.dtype, np.integer) or not 0 < len(active) <= length
                    or np.any(np.diff(active) <= 0) or active[0] < 0 or active[-1] >= length):
                raise BroadcastRefused("broadcast_malformed", "active SNPs must be increasing positions in the batch")
            finite_array(broadcast["beta"], (len(active), null_width + 1))

    def progress(self, params: GWASParams, state: dict[str, Any]) -> tuple[int, int] | None:
        if "agreed" not in state:
            return None
        return min(state["batch_start"], state["n_agreed"]), state["n_agreed"]

    # -- site side ---------------------------------------------------------------------------

    def local(self, params: GWASParams, round_no: int, broadcast: dict[str, Any], context: SiteContext) -> Release:
        genotypes, policy, scratch = context.genotypes, context.policy, context.scratch
        if genotypes is None:
            raise AnalysisError("gwas needs a genotype dataset")
        if round_no == 0:
            return Release(public={"variants": site_variants(genotypes)})
        kept = scratch.get("samples")
        if kept is None:
            kept = list(_samples(params, context.data, genotypes))
            scratch["samples"] = kept
        samples, y, covariates = kept
        _require_enough_samples(params, y, samples, policy)
        design = np.column_stack([np.ones(len(samples)), covariates])
        stage = broadcast["stage"]
        if stage == "null":
            return Release(sums=_null_sums(design, y, np.asarray(broadcast["beta"], dtype=np.float64)),
                           public={"rows": len(samples)})
        batch = broadcast["batch"]
        if stage == "counts":
            if params.test == "tdt":
                controls, cases = _founders(genotypes), samples[:0]
            elif params.test == "linear":
                controls, cases = samples, samples[:0]
            else:
                controls, cases = samples[y == 0], samples[y == 1]
            counts = count_genotypes(genotypes, batch, [controls, cases], params.block_size)
            return Release(sums={"genotype_counts": counts}, public={"rows": len(samples)})
        if stage == "score":
            return Release(sums=self._score_sums(params, broadcast, genotypes, samples, y, design))
        if stage == "tdt":
            return Release(sums=self._transmissions(params, batch, genotypes, samples[y == 1]))
        dosages = _cached_batch(scratch, broadcast, genotypes, samples, params.block_size)
        if stage == "linear":
            sums = _moments(design, y, dosages, None, params.block_size)
        else:
            active = np.asarray(broadcast["active"], dtype=np.int64)
            sums = _moments(design, y, dosages[:, active], np.asarray(broadcast["beta"], dtype=np.float64),
                            params.block_size)
        return Release(sums=sums)

    @staticmethod
    def _score_sums(params: GWASParams, broadcast: dict[str, Any], genotypes: GenotypeFile, samples: np.ndarray,
                    y: np.ndarray, design: np.ndarray) -> dict[str, np.ndarray]:
        """Per SNP: score g'(y - mu0), g'W0 g and Z'W0 g under the null fit, mean-imputing missing g."""
        mu = expit(design @ np.asarray(broadcast["beta"], dtype=np.float64))
        weight, residual = mu * (1 - mu), y - mu
        mean = np.asarray(broadcast["mean"], dtype=np.float64)
        n_snps = len(mean)
        score, g_w_g, z_w_g = np.zeros(n_snps), np.zeros(n_snps), np.zeros((n_snps, design.shape[1]))
        for chunk, dosages in aligned_blocks(genotypes, broadcast["batch"], samples, params.block_size):
            g = np.where(np.isnan(dosages), mean[chunk][None, :], dosages).astype(np.float64)
            score[chunk] = residual @ g
            g_w_g[chunk] = weight @ g**2
            z_w_g[chunk] = (g.T * weight) @ design
        return {"score": score, "g_w_g": g_w_g, "z_w_g": z_w_g}

    @staticmethod
    def _transmissions(params: GWASParams, batch: dict[str, Any], genotypes: GenotypeFile,
                       affected: np.ndarray) -> dict[str, np.ndarray]:
        """Per SNP, A1 transmitted (T) and not transmitted (U) to this site's affected children."""
        is_affected = np.zeros(len(genotypes.iid), dtype=bool)
        is_affected[affected] = True
        trio_rows = trios(genotypes.iid, genotypes.father, genotypes.mother, is_affected)
        family_rows = trios(genotypes.iid, genotypes.father, genotypes.mother, np.ones(len(genotypes.iid), bool))
        transmitted, untransmitted = np.zeros(len(batch["pos"])), np.zeros(len(batch["pos"]))
        everyone = np.arange(len(genotypes.iid))
        for chunk, dosages in aligned_blocks(genotypes, batch, everyone, params.block_size):
            transmitted[chunk], untransmitted[chunk] = tdt_counts(dosages, trio_rows, family_rows)
        return {"transmitted": transmitted, "untransmitted": untransmitted}

    # -- researcher side ---------------------------------------------------------------------

    def global_step(self, params: GWASParams, round_no: int, aggregated: Aggregated,
                    state: dict[str, Any]) -> NextRound | Finished:
        if round_no == 0:
            agreed, report = agree_variants({site: p["variants"] for site, p in aggregated.public.items()})
            state = {"agreed": frame_to_wire(agreed), "n_agreed": len(agreed), "report": report, "batch_start": 0,
                     "tables": [], "removed": {}, "k": len(params.covariates) + 2}
            if params.test in ("logistic", "logistic-score"):
                return self._null_round(state, np.zeros(state["k"] - 1), 0)
            return self._counts_round(params, state)
        stage = state["stage"]
        sums = aggregated.sums
        if stage == "null":
            return self._null_step(params, state, sums)
        if stage == "counts":
            return self._after_counts(params, state, sums["genotype_counts"])
        if stage == "linear":
            k = state["k"]
            information = unpack_symmetric(sums["information"], k)
            beta = np.full((len(information), k), np.nan)
            solvable = np.abs(np.linalg.det(information)) > 0
            beta[solvable] = np.linalg.solve(information[solvable], sums["score"][solvable][..., None])[..., 0]
            residual_ss = sums["y_y"] - np.einsum("bk,bk->b", beta, sums["score"])
            table = regression_table(frame_from_wire(state["batch_table"]), "linear", beta, information,
                                     sums["observed"], solvable, residual_ss)
            return self._batch_done(params, state, table)
        if stage == "score":
            return self._score_step(params, state, sums)
        if stage == "tdt":
            table = frame_from_wire(state["batch_table"])[["CHROM", "POS", "ID", "A1", "A2", "A1_FREQ"]]
            table = table.reset_index(drop=True)
            counts = tdt_table(sums["transmitted"], sums["untransmitted"])
            return self._batch_done(params, state, pd.concat([table, counts], axis=1))
        return self._newton_step(params, state, sums)

    def _null_round(self, state: dict[str, Any], beta: np.ndarray, iteration: int) -> NextRound:
        state = dict(state, stage="null", null_beta=beta, null_iteration=iteration)
        return NextRound({"stage": "null", "beta": beta}, state)

    def _null_step(self, params: GWASParams, state: dict[str, Any], sums: dict[str, np.ndarray]
                   ) -> NextRound | Finished:
        """Newton for y ~ 1 + covariates (no genotype), the warm start and the score test's null."""
        k = state["k"] - 1
        information = unpack_symmetric(sums["information"], k)
        try:
            step = np.linalg.solve(information, sums["score"])
        except np.linalg.LinAlgError:
            raise AnalysisError("the null model y ~ 1 + covariates is singular: check the covariates") from None
        beta = state["null_beta"] + step
        iteration = state["null_iteration"] + 1
        if np.max(np.abs(step)) >= NEWTON_TOLERANCE:
            if iteration >= params.max_iter:
                raise AnalysisError(f"the null model did not converge in {params.max_iter} iterations")
            return self._null_round(state, beta, iteration)
        state = dict(state, null_information=information, null_iterations=iteration)
        return self._counts_round(params, state)

    def _counts_round(self, params: GWASParams, state: dict[str, Any]) -> NextRound:
        start = state["batch_start"]
        stop = min(start + params.batch_size, state["n_agreed"])
        state = dict(state, stage="counts", batch_stop=stop)
        batch = batch_broadcast(frame_rows(state["agreed"], slice(start, stop)), 0, stop - start)
        return NextRound({"stage": "counts", "batch": batch}, state)

    def _after_counts(self, params: GWASParams, state: dict[str, Any], counts: np.ndarray) -> NextRound | Finished:
        """Frequencies, missingness and (for test="allelic") the association tests of one batch; QC filters."""
        batch = frame_rows(state["agreed"], slice(state["batch_start"], state["batch_stop"]))
        table = allelic_table(batch, counts, params.hardy)
        removed = qc_keep(table, params.maf, params.geno, params.hwe)
        keep = ~np.logical_or.reduce(list(removed.values()))
        tallies = dict(state["removed"])
        for name, mask in removed.items():
            tallies[name] = tallies.get(name, 0) + int(mask.sum())
        state = dict(state, removed=tallies)
        if params.test == "allelic":
            return self._batch_done(params, state, table[keep].drop(columns="A1_IS_A2"))
        tested = table[keep]
        state = dict(state, batch_table=frame_to_wire(tested))
        if tested.empty:
            return self._batch_done(params, state, None)
        rows = np.flatnonzero(keep) + state["batch_start"]
        broadcast = {"batch": batch_broadcast(frame_rows(state["agreed"], rows), 0, len(rows),
                                              tested["A1_IS_A2"].to_numpy())}
        if params.test in ("linear", "tdt"):
            return NextRound(dict(broadcast, stage=params.test), dict(state, stage=params.test))
        if params.test == "logistic-score":
            broadcast.update(stage="score", beta=state["null_beta"], mean=2 * tested["A1_FREQ"].to_numpy())
            return NextRound(broadcast, dict(state, stage="score"))
        beta = np.zeros((len(tested), state["k"]))
        beta[:, :-1] = state["null_beta"]
        state = dict(state, stage="newton", broadcast=broadcast, beta=beta, iteration=0,
                     converged=np.zeros(len(tested), dtype=bool), failed=np.zeros(len(tested), dtype=bool),
                     information=np.full((len(tested), state["k"], state["k"]), np.nan), observed=np.zeros(len(tested)))
        return self._newton_round(state)

    @staticmethod
    def _newton_round(state: dict[str, Any]) -> NextRound:
        active = np.flatnonzero(~state["converged"] & ~state["failed"])
        return NextRound(dict(state["broadcast"], stage="newton", active=active, beta=state["beta"][active]), state)

    def _newton_step(self, params: GWASParams, state: dict[str, Any], sums: dict[str, np.ndarray]
                     ) -> NextRound | Finished:
        """One batched Newton step for every SNP still fitting; SNPs leave the round once converged."""
        k = state["k"]
        active = np.flatnonzero(~state["converged"] & ~state["failed"])
        information = unpack_symmetric(sums["information"], k)
        score = sums["score"]
        usable = np.isfinite(information).all(axis=(1, 2)) & (np.abs(np.linalg.det(information)) > 1e-300)
        step = np.zeros((len(active), k))
        step[usable] = np.linalg.solve(information[usable], score[usable][..., None])[..., 0]
        done = usable & (np.max(np.abs(step), axis=1) < NEWTON_TOLERANCE)
        beta, converged, failed = state["beta"].copy(), state["converged"].copy(), state["failed"].copy()
        beta[active] += step
        converged[active] = done
        failed[active] = ~usable
        stored, observed = state["information"].copy(), state["observed"].copy()
        stored[active], observed[active] = information, sums["observed"]
        iteration = state["iteration"] + 1
        state = dict(state, beta=beta, converged=converged, failed=failed, information=stored, observed=observed,
                     iteration=iteration)
        if (converged | failed).all() or iteration >= params.max_iter:
            table = regression_table(frame_from_wire(state["batch_table"]), "logistic", beta, stored, observed,
                                     converged)
            return self._batch_done(params, state, table)
        return self._newton_round(state)

    def _score_step(self, params: GWASParams, state: dict[str, Any], sums: dict[str, np.ndarray]
                    ) -> NextRound | Finished:
        """V = g'Wg - (Z'Wg)' (Z'WZ)^-1 (Z'Wg): the score's variance once the covariates are profiled out."""
        z_w_g = sums["z_w_g"]
        projected = np.einsum("bi,ij,bj->b", z_w_g, np.linalg.inv(state["null_information"]), z_w_g)
        table = frame_from_wire(state["batch_table"])
        result = score_table(table, sums["score"], sums["g_w_g"] - projected, table["OBS_CT"].to_numpy())
        return self._batch_done(params, state, result)

    def _batch_done(self, params: GWASParams, state: dict[str, Any], table: pd.DataFrame | None
                    ) -> NextRound | Finished:
        tables = state["tables"] if table is None else [*state["tables"], frame_to_wire(table)]
        state = dict(state, tables=tables, batch_start=state["batch_stop"])
        if state["batch_start"] < state["n_agreed"]:
            return self._counts_round(params, state)
        return Finished(self._final_table(params, state))

    @staticmethod
    def _final_table(params: GWASParams, state: dict[str, Any]) -> pd.DataFrame:
        if not state["tables"]:
            raise AnalysisError(f"quality control removed every variant: {state['removed']}")
        frame = pd.concat([frame_from_wire(table) for table in state["tables"]], ignore_index=True)
        statistic = {"linear": "T_STAT", "logistic": "Z_STAT"}.get(params.test, "CHISQ")
        values = frame[statistic].to_numpy(np.float64)
        frame.attrs["lambda_gc"] = lambda_gc(values if statistic == "CHISQ" else values**2)
        frame.attrs["variant_report"] = state["report"]
        frame.attrs["qc_removed"] = state["removed"]
        frame.attrs["test"] = params.test
        if "null_iterations" in state:
            frame.attrs["null_model"] = {"coefficients": dict(zip(["intercept", *params.covariates],
                                                                  map(float, state["null_beta"]))),
                                         "iterations": state["null_iterations"]}
        return frame


def _samples(params: GWASParams, data: pd.DataFrame, genotypes: GenotypeFile
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of the genotype file joined to the phenotype table on IID (sorted by file row):
    phenotype and covariates, complete cases only."""
    table = data[[params.iid, params.phenotype, *params.covariates]].dropna()
    table = table.assign(**{params.iid: table[params.iid].astype(str)}).drop_duplicates(params.iid)
    lookup = pd.Series(np.arange(len(genotypes.iid)), index=genotypes.iid)
    table = table[table[params.iid].isin(lookup.index)]
    rows = lookup[table[params.iid]].to_numpy(np.int64)
    order = np.argsort(rows)
    y = table[params.phenotype].to_numpy(np.float64)[order]
    if params.test != "linear" and not np.all((y == 0) | (y == 1)):
        raise AnalysisError(f"phenotype {params.phenotype!r} must be 0 (control) or 1 (case) for test={params.test!r}")
    covariates = table[params.covariates].to_numpy(np.float64).reshape(len(table), len(params.covariates))
    return rows[order], y, covariates[order]


def _sample_rows(params: GWASParams, data: pd.DataFrame) -> np.ndarray:
    """Rows of the table `_samples` can use: complete in IID, phenotype and covariates, first per IID."""
    names = [params.iid, params.phenotype, *params.covariates]
    complete = data[names].notna().all(axis=1).to_numpy()
    first = np.zeros(len(data), dtype=bool)
    complete_rows = np.flatnonzero(complete)
    iids = data[params.iid].iloc[complete_rows].astype(str)
    first[complete_rows[~iids.duplicated().to_numpy()]] = True
    return first


def _require_enough_samples(params: GWASParams, y: np.ndarray, samples: np.ndarray, policy: DisclosurePolicy) -> None:
    """At least min_cell_count samples, and for a case-control test as many cases and controls."""
    require_min_count(len(samples), policy, "the sample of this site's GWAS")
    if params.test == "linear":
        return
    require_min_count(int(np.sum(y == 1)), policy, "the cases group of this site's GWAS" if params.test != "tdt"
                      else "the affected children group of this site's GWAS")
    if params.test != "tdt":
        require_min_count(int(np.sum(y == 0)), policy, "the controls group of this site's GWAS")


def _checked_batch(batch: Any, memory: dict[str, Any], batch_size: int) -> int:
    """`check_batch` against this site's round-0 variant list; a batch already checked in this
    task (Newton rounds repeat it) is recognised by its digest."""
    try:
        digest = hashlib.sha256(json.dumps([list(map(str, batch["chrom"])), np.asarray(batch["pos"]).tolist(),
                                            list(map(str, batch["counted"]))]).encode()).hexdigest()
    except (TypeError, KeyError, ValueError):
        raise BroadcastRefused("broadcast_malformed", "a variant batch has the columns chrom, pos and counted") from None
    if memory.get("checked_batch") == digest:
        return len(batch["chrom"])
    released = released_in(memory, 0).get("variants")
    length = check_batch(batch, released, batch_size)
    memory["checked_batch"] = digest
    return length


def _founders(genotypes: GenotypeFile) -> np.ndarray:
    """Samples with neither parent in the fileset: PLINK computes allele frequencies from these."""
    present = set(genotypes.iid)
    has_parent = np.array([f in present or m in present for f, m in zip(genotypes.father, genotypes.mother)])
    return np.flatnonzero(~has_parent)


def _null_sums(design: np.ndarray, y: np.ndarray, beta: np.ndarray) -> dict[str, np.ndarray]:
    mu = expit(design @ beta)
    information = (design.T * (mu * (1 - mu))) @ design
    return {"information": pack_symmetric(information), "score": design.T @ (y - mu)}


def _cached_batch(scratch: MutableMapping[str, Any], broadcast: dict[str, Any], genotypes: GenotypeFile,
                  samples: np.ndarray, block_size: int) -> np.ndarray:
    """The batch's dosages (samples x variants, int8, -127 missing), decoded once per batch and kept
    in the task's scratch across Newton rounds (with the batch they belong to, in one entry)."""
    batch = broadcast["batch"]
    key = [str(batch["chrom"][0]), int(batch["pos"][0]), str(batch["chrom"][-1]), int(batch["pos"][-1]),
           len(batch["pos"])]
    cached = scratch.get("batch")
    if cached is not None and cached["key"] == key:
        return cached["dosages"]
    scratch.pop("batch", None)
    dosages = np.empty((len(samples), len(batch["pos"])), dtype=np.int8)
    for chunk, block in aligned_blocks(genotypes, batch, samples, block_size, dtype="int8"):
        dosages[:, chunk] = block
    scratch["batch"] = {"key": key, "dosages": dosages}
    return dosages


def _moments(design: np.ndarray, y: np.ndarray, dosages: np.ndarray, beta: np.ndarray | None,
             block_size: int) -> dict[str, np.ndarray]:
    """Per SNP, over the samples with that genotype: X'WX (packed) and X'r for X = [design, dosage].

    Linear (beta None): W = I and r = y, plus y'y. Logistic: the IRLS weights mu(1 - mu) and
    residuals y - mu at each SNP's coefficients `beta`. Products of design columns are formed
    once, so every sum is a matrix product over samples."""
    n, p = design.shape
    k = p + 1
    rows, cols = np.triu_indices(p)
    products = design[:, rows] * design[:, cols]
    n_snps = dosages.shape[1]
    information = np.zeros((n_snps, k, k))
    score = np.zeros((n_snps, k))
    observed_count = np.zeros(n_snps)
    y_y = np.zeros(n_snps)
    for start in range(0, n_snps, block_size):
        block = dosages[:, start:start + block_size]
        observed = block >= 0
        dose = np.where(observed, block, 0).astype(np.float64)
        if beta is None:
            weight = observed.astype(np.float64)
            residual = y[:, None] * weight
            y_y[start:start + block.shape[1]] = (y**2) @ weight
        else:
            part = beta[start:start + block.shape[1]]
            mu = expit(design @ part[:, :-1].T + dose * part[:, -1])
            weight = mu * (1 - mu) * observed
            residual = (y[:, None] - mu) * observed
        span = slice(start, start + block.shape[1])
        packed = (products.T @ weight).T
        full = np.zeros((block.shape[1], p, p))
        full[:, rows, cols] = packed
        full[:, cols, rows] = packed
        information[span, :p, :p] = full
        cross = (design.T @ (weight * dose)).T
        information[span, :p, -1] = cross
        information[span, -1, :p] = cross
        information[span, -1, -1] = np.einsum("nb,nb->b", weight, dose**2)
        score[span, :p] = (design.T @ residual).T
        score[span, -1] = np.einsum("nb,nb->b", dose, residual)
        observed_count[span] = observed.sum(axis=0)
    sums = {"information": pack_symmetric(information), "score": score, "observed": observed_count}
    if beta is None:
        sums["y_y"] = y_y
    return sums
