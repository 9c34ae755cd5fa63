"""pca: principal components of the pooled genotype matrix, as plink2 --maf <maf> --pca meanimpute.

Round 0 agrees the variants (see `variants`) and keeps those on autosomes 1-22, as plink2 does.
Round 1 sums each variant's genotype counts over the sample set (the table's IIDs found in the
fileset), giving the pooled A1 frequency p; variants with pooled minor allele frequency below
`maf` are left out. Genotypes are then standardised as plink2's variance-standardised
relationship matrix does: x = (g - 2p) / sqrt(2p(1 - p)), a missing genotype contributing 0
(mean imputation), and GRM = X X' / M over the M variants kept. plink2's default --pca instead
rescales each pair of samples by the variants both have called, which couples samples of
different sites; with no missing genotypes the two agree.

The top components come from randomised subspace iteration on the variant side: the researcher
broadcasts an orthonormal M x l basis Q (l = components + oversampling, seeded start), each
site streams its standardised blocks twice to form X_s' (X_s Q), the sum X'X Q comes back
through secure aggregation, and the researcher takes the Ritz pairs of Q' X'X Q, stops when the
top Ritz values settle, or re-orthonormalises X'X Q for the next round. The GRM's eigenvalues are
the Ritz values over M; the variant loadings are X's right singular vectors times sqrt(M), as
plink2's .eigenvec.var (there signed for the non-major allele, here for A1).

Sample scores never leave a site: `PCAResult.project` turns a site's own dosages into its
samples' PC scores, scaled as plink2's .eigenvec.

A site with fewer than min_cell_count samples refuses (`min_cell_count`); its sample set is a
row set of the differencing guard. The node checks each broadcast: round 1 the counts stage
with a batch of variants this site listed in round 0; later rounds the iterate stage with that
same batch, mean and scale fixed from the first iteration on (finite, one per variant), and an
orthonormal basis of at most components + oversampling columns.
What leaks: pooled per-variant genotype counts, and each round the pooled product X'X Q, from
which the pooled variant covariance (LD) matrix can be learnt; nothing per sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field

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
    frame_to_wire,
    register,
    released_in,
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
from medveil.plotting import axes, save
from medveil.privacy.disclosure import DisclosurePolicy, require_min_count

AUTOSOMES = frozenset(str(number) for number in range(1, 23))
MAX_VARIANTS = 10_000_000  # most variants one broadcast may name


class PCAParams(Params):
    genotypes: str
    components: int = Field(10, ge=1, le=50)
    iid: str = "IID"
    oversampling: int = Field(10, ge=0, le=100, description="extra basis vectors that speed up convergence")
    max_iter: int = Field(100, ge=1, le=1000)
    tolerance: float = Field(1e-10, gt=0, description="largest relative change of a top Ritz value at convergence")
    block_size: int = Field(1000, ge=1, le=100_000, description="variants decoded at once at a site")
    maf: float = Field(0.01, ge=0.0, le=0.5, description="leave out variants with pooled minor allele frequency below")
    seed: int = Field(0, ge=0, description="seed of the random starting basis")


@dataclass(frozen=True, eq=False)
class PCAResult:
    """Eigenvalues of the pooled GRM and variant loadings; no sample-level data."""

    eigenvalues: np.ndarray
    variants: pd.DataFrame  # CHROM, POS, ID, A1, A2, A1_FREQ, PC1..PCk (loadings, as plink2's .eigenvec.var)
    variance_explained: np.ndarray
    iterations: int
    converged: bool
    n_samples: int
    variant_report: dict[str, list[str]] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def pc_names(self) -> list[str]:
        return [f"PC{j + 1}" for j in range(len(self.eigenvalues))]

    @property
    def loadings(self) -> np.ndarray:
        """Variants x components: sqrt(M) times the unit right singular vectors of X, counted on A1."""
        return self.variants[self.pc_names].to_numpy(np.float64)

    def project(self, dosages: np.ndarray) -> np.ndarray:
        """A site's own samples' PC scores from its dosages (samples x the variants of `variants`,
        copies of A1, NaN missing): their rows of the pooled GRM's unit-norm eigenvectors, which is
        plink2's .eigenvec scaling."""
        dosages = np.asarray(dosages, dtype=np.float64)
        if dosages.ndim != 2 or dosages.shape[1] != len(self.variants):
            raise ValueError(f"dosages must be samples x {len(self.variants)} variants, got shape {dosages.shape}")
        frequency = self.variants["A1_FREQ"].to_numpy(np.float64)
        standardised = standardise(dosages, 2 * frequency, genotype_scale(frequency))
        n_variants = len(self.variants)
        return standardised @ self.loadings / (n_variants * np.sqrt(self.eigenvalues))

    def summary(self) -> str:
        """Eigenvalues, variance explained and convergence, as text."""
        table = pd.DataFrame({"eigenvalue": self.eigenvalues, "variance explained": self.variance_explained},
                             index=self.pc_names)
        return "\n".join([
            f"Federated PCA   sites: {', '.join(self.provenance.get('sites', [])) or '-'}",
            f"samples: {self.n_samples}   variants: {len(self.variants)}   "
            f"subspace iterations: {self.iterations} (converged: {self.converged})",
            "", table.to_string(float_format=lambda v: f"{v:.6g}"),
        ])

    def __repr__(self) -> str:
        return self.summary()

    def plot(self, path: str | None = None, ax: Any = None) -> Any:
        """Scree plot of the eigenvalues; saved as PNG when `path` is given."""
        ax = axes(ax, path, figsize=(6, 4))
        positions = np.arange(1, len(self.eigenvalues) + 1)
        ax.plot(positions, self.eigenvalues, marker="o")
        ax.set_xticks(positions, self.pc_names)
        ax.set_xlabel("principal component")
        ax.set_ylabel("eigenvalue of the GRM")
        ax.set_title(f"Scree plot (federated, {len(self.provenance.get('sites', []))} sites)")
        return save(ax, path)


def genotype_scale(frequency: np.ndarray) -> np.ndarray:
    """1 / sqrt(2p(1 - p)) per variant; 0 for a monomorphic variant, which then adds nothing (as in plink2)."""
    variance = 2 * frequency * (1 - frequency)
    return np.divide(1.0, np.sqrt(variance), out=np.zeros_like(variance), where=variance > 0)


def standardise(dosages: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(g - 2p) / sqrt(2p(1 - p)), missing genotypes set to 0."""
    standardised = (np.asarray(dosages, dtype=np.float64) - mean[None, :]) * scale[None, :]
    return np.nan_to_num(standardised, nan=0.0)


def is_autosome(chrom: str) -> bool:
    """Chromosomes 1-22 (with or without a "chr" prefix): those plink2 builds its GRM from."""
    name = chrom[3:] if chrom.lower().startswith("chr") else chrom
    return name in AUTOSOMES


@register
class PCA(Analysis[PCAParams]):
    name = "pca"
    Params = PCAParams

    def variables(self, params: PCAParams) -> list[str]:
        return [params.iid]

    def genotype_dataset(self, params: PCAParams) -> str | None:
        return params.genotypes

    def row_sets(self, params: PCAParams, data: pd.DataFrame, round_no: int = 0,
                 broadcast: dict[str, Any] | None = None, policy: DisclosurePolicy | None = None
                 ) -> list[np.ndarray]:
        """In round 1, where the samples are first used: the table's rows with an IID."""
        return [data[params.iid].notna().to_numpy()] if round_no == 1 else []

    def check_broadcast(self, params: PCAParams, round_no: int, broadcast: dict[str, Any],
                        memory: dict[str, Any]) -> None:
        """Round 1: counts of a batch this site listed. Later: that batch, the mean and scale of the
        first iteration, and a finite orthonormal basis of at most components + oversampling columns."""
        if round_no == 0:
            return super().check_broadcast(params, round_no, broadcast, memory)
        listed = released_in(memory, 0).get("variants")
        if round_no == 1:
            if set(broadcast) != {"stage", "batch"} or broadcast["stage"] != "counts":
                raise BroadcastRefused("unexpected_broadcast", "round 1 of pca carries the counts stage and a batch")
            check_batch(broadcast["batch"], listed, MAX_VARIANTS)
            return
        if set(broadcast) != {"stage", "batch", "mean", "scale", "basis"} or broadcast["stage"] != "iterate":
            raise BroadcastRefused("unexpected_broadcast", "later rounds of pca carry the iterate stage, batch, "
                                                           "mean, scale and basis")
        pinned = memory.get("pca_pinned")
        if pinned is None:
            length = check_batch(broadcast["batch"], listed, MAX_VARIANTS)
            mean, scale = finite_array(broadcast["mean"], (length,)), finite_array(broadcast["scale"], (length,))
            if np.any((mean < 0) | (mean > 2)) or np.any(scale < 0):
                raise BroadcastRefused("broadcast_malformed", "mean dosages lie in [0, 2] and scales are not negative")
            memory["pca_pinned"] = {"batch": {k: list(v) if k != "pos" else np.asarray(v, np.int64)
                                              for k, v in broadcast["batch"].items()}, "mean": mean, "scale": scale}
        else:
            if not (_same_batch(broadcast["batch"], pinned["batch"])
                    and _same_array(broadcast["mean"], pinned["mean"]) and _same_array(broadcast["scale"], pinned["scale"])):
                raise BroadcastRefused("broadcast_not_released", "the batch, mean and scale must stay those of the "
                                                                 "first iteration")
            length = len(pinned["mean"])
        width = params.components + params.oversampling
        columns = np.shape(broadcast["basis"])[1:2] if np.ndim(broadcast["basis"]) == 2 else (0,)
        if not 1 <= columns[0] <= width:
            raise BroadcastRefused("broadcast_malformed", f"the basis must be variants x at most {width} columns")
        basis = finite_array(broadcast["basis"], (length, columns[0]))
        if not np.allclose(basis.T @ basis, np.eye(columns[0]), atol=1e-6):
            raise BroadcastRefused("broadcast_malformed", "the basis must have orthonormal columns")

    # -- site side ---------------------------------------------------------------------------

    def local(self, params: PCAParams, round_no: int, broadcast: dict[str, Any], context: SiteContext) -> Release:
        genotypes, policy, scratch = context.genotypes, context.policy, context.scratch
        if genotypes is None:
            raise AnalysisError("pca needs a genotype dataset")
        if round_no == 0:
            return Release(public={"variants": site_variants(genotypes)})
        samples = scratch.get("samples")
        if samples is None:
            samples = _samples(params.iid, context.data, genotypes)
            scratch["samples"] = samples
        require_min_count(len(samples), policy, "the samples of this site's PCA")
        if broadcast["stage"] == "counts":
            counts = count_genotypes(genotypes, broadcast["batch"], [samples], params.block_size)
            return Release(sums={"genotype_counts": counts}, public={"rows": len(samples)})
        return Release(sums={"product": _gram_product(genotypes, broadcast, samples, params.block_size)})

    # -- researcher side ---------------------------------------------------------------------

    def global_step(self, params: PCAParams, round_no: int, aggregated: Aggregated,
                    state: dict[str, Any]) -> NextRound | Finished:
        if round_no == 0:
            agreed, report = agree_variants({site: p["variants"] for site, p in aggregated.public.items()})
            autosomal = agreed["CHROM"].map(is_autosome).to_numpy(bool)
            report = dict(report, non_autosomal=agreed.loc[~autosomal, "ID"].tolist())
            agreed = agreed[autosomal].reset_index(drop=True)
            if agreed.empty:
                raise AnalysisError("no agreed variant lies on an autosome (1-22)")
            return NextRound({"stage": "counts", "batch": batch_broadcast(agreed, 0, len(agreed))},
                             {"agreed": frame_to_wire(agreed), "report": report})
        if round_no == 1:
            n_samples = sum(int(facts["rows"]) for facts in aggregated.public.values())
            return self._start(params, state, aggregated.sums["genotype_counts"][:, 0, :], n_samples)
        return self._iterate(params, state, aggregated.sums["product"])

    def _start(self, params: PCAParams, state: dict[str, Any], counts: np.ndarray, n_samples: int) -> NextRound:
        """Pooled frequencies, the variants kept, the GRM's trace and the seeded starting basis."""
        observed = counts[:, :3].sum(axis=1)
        frequency = np.divide(counts[:, 1] + 2 * counts[:, 2], 2 * observed, out=np.full(len(counts), np.nan),
                              where=observed > 0)
        keep = (observed > 0) & (np.minimum(frequency, 1 - frequency) >= params.maf)
        agreed = frame_from_wire(state["agreed"])
        report = dict(state["report"], low_maf=agreed.loc[~keep, "ID"].tolist())
        n_variants = int(keep.sum())
        if n_variants < params.components or n_samples <= params.components:
            raise AnalysisError(f"{params.components} components need more than that many samples and at least "
                                f"as many variants; there are {n_samples} samples and {n_variants} variants "
                                f"with minor allele frequency >= {params.maf}")
        variants = agreed[keep].reset_index(drop=True).assign(A1_FREQ=frequency[keep])
        frequency, counts = frequency[keep], counts[keep]
        scale = genotype_scale(frequency)
        deviations = np.array([0.0, 1.0, 2.0])[None, :] - 2 * frequency[:, None]
        squares = np.sum(counts[:, :3] * deviations**2, axis=1)  # per variant: sum over samples of (g - 2p)^2
        width = min(params.components + params.oversampling, n_variants)
        start = np.random.default_rng(params.seed).standard_normal((n_variants, width))
        state = {"variants": frame_to_wire(variants), "report": report, "n_samples": n_samples, "iteration": 0,
                 "trace": float(np.sum(squares * scale**2) / n_variants), "ritz_values": None,
                 "broadcast": {"stage": "iterate", "batch": batch_broadcast(variants, 0, n_variants),
                               "mean": 2 * frequency, "scale": scale}}
        return self._next_basis(state, start)

    @staticmethod
    def _next_basis(state: dict[str, Any], directions: np.ndarray) -> NextRound:
        basis = np.linalg.qr(directions)[0]
        return NextRound(dict(state["broadcast"], basis=basis), dict(state, basis=basis))

    def _iterate(self, params: PCAParams, state: dict[str, Any], product: np.ndarray) -> NextRound | Finished:
        """Rayleigh-Ritz on the basis with X'X Q; finish once the top Ritz values settle."""
        basis = state["basis"]
        projected = basis.T @ product
        values, vectors = np.linalg.eigh((projected + projected.T) / 2)
        order = np.argsort(values)[::-1]
        values, vectors = values[order], vectors[:, order]
        top = values[:params.components]
        previous = state["ritz_values"]
        iteration = state["iteration"] + 1
        converged = previous is not None and bool(np.all(np.abs(top - previous) <= params.tolerance * np.abs(top)))
        if not converged and iteration < params.max_iter:
            return self._next_basis(dict(state, ritz_values=top, iteration=iteration), product @ vectors)
        return Finished(_result(params, state, top, basis @ vectors[:, :params.components], iteration, converged))


def _result(params: PCAParams, state: dict[str, Any], ritz_values: np.ndarray, singular_vectors: np.ndarray,
            iterations: int, converged: bool) -> PCAResult:
    """GRM eigenvalues (Ritz values / M) and loadings sqrt(M) V, each PC signed so its largest loading is positive."""
    variants = frame_from_wire(state["variants"])
    n_variants = len(variants)
    largest = singular_vectors[np.argmax(np.abs(singular_vectors), axis=0), np.arange(singular_vectors.shape[1])]
    loadings = singular_vectors * np.sign(largest) * np.sqrt(n_variants)
    eigenvalues = ritz_values / n_variants
    table = variants.assign(**{f"PC{j + 1}": loadings[:, j] for j in range(params.components)})
    return PCAResult(eigenvalues=eigenvalues, variants=table, variance_explained=eigenvalues / state["trace"],
                     iterations=iterations, converged=converged, n_samples=state["n_samples"],
                     variant_report=state["report"])


def _same_array(value: Any, pinned: Any) -> bool:
    try:
        return bool(np.array_equal(np.asarray(value, dtype=np.float64), np.asarray(pinned, dtype=np.float64)))
    except (TypeError, ValueError):
        return False


def _same_batch(batch: Any, pinned: dict[str, Any]) -> bool:
    if not isinstance(batch, dict) or set(batch) != set(pinned):
        return False
    return (list(map(str, batch["chrom"])) == list(map(str, pinned["chrom"]))
            and list(map(str, batch["counted"])) == list(map(str, pinned["counted"]))
            and _same_array(batch["pos"], pinned["pos"]))


def _samples(iid: str, data: pd.DataFrame, genotypes: GenotypeFile) -> np.ndarray:
    """Rows of the genotype file whose IID is in the table's `iid` column, in file order."""
    wanted = set(data[iid].dropna().astype(str))
    return np.flatnonzero(np.isin(genotypes.iid, list(wanted)))


def _gram_product(genotypes: GenotypeFile, broadcast: dict[str, Any], samples: np.ndarray, block_size: int
                  ) -> np.ndarray:
    """X_s' (X_s Q) for this site's standardised genotypes X_s, in two passes over its blocks;
    X_s Q, its samples' coordinates, stays here."""
    batch = broadcast["batch"]
    mean = np.asarray(broadcast["mean"], dtype=np.float64)
    scale = np.asarray(broadcast["scale"], dtype=np.float64)
    basis = np.asarray(broadcast["basis"], dtype=np.float64)
    coordinates = np.zeros((len(samples), basis.shape[1]))
    for chunk, dosages in aligned_blocks(genotypes, batch, samples, block_size):
        coordinates += standardise(dosages, mean[chunk], scale[chunk]) @ basis[chunk]
    product = np.empty_like(basis)
    for chunk, dosages in aligned_blocks(genotypes, batch, samples, block_size):
        product[chunk] = standardise(dosages, mean[chunk], scale[chunk]).T @ coordinates
    return product
