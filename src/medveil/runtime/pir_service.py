"""The `variant_profile` site service: which phenotypes go with a variant, looked up privately.

The steward builds it (`medveil service build variant_profile` or `medveil pir build`) from
the site's approved PLINK genotypes and phenotype table: per variant, the carriers of its ALT
allele (dosage >= 1) in total, the homozygous-ALT carriers, the genotyped samples and the
carriers in each phenotype group (0/1 indicator columns such as HPO terms, at most 24). A
variant with fewer carriers than the site's minimum cell count (or a stricter `min_count`) gets
no record at all, which reads exactly like a variant the site does not hold. A group or
hom-ALT cell in 1..min-1, or whose complement among the carriers (total - cell) or among the
group's listed samples (group size - cell: group sizes may be public) is, is stored as
suppressed. Where the groups cover every carrier exactly once (the group cells sum to the
total: detected per variant, whether or not the steward declared `partition`), secondary
suppression hides enough other cells that the total minus the cells shown is never a small
count. A variant whose non-carriers (listed samples - total, or genotyped - total) are 1..min-1
keeps its record with every count suppressed: otherwise the few non-carriers would be published.
The records go into a keyword PIR database
(crypto/pir_keyword.py) and SimplePIR's hint is computed once (crypto/pir.py). Precondition:
the PLINK data were normalised with `bcftools norm -f <ref.fa> -m -any` before conversion (keys
are trimmed without a reference; left-alignment needs one).

Queries are {"op": "hint"} (the public parameters, the ~64 MiB hint, the record layout and the
build id; audited and limited per day, not charged) and {"op": "answer", "build": id,
"queries": [up to 64 vectors of 4m bytes]}, answered with one batched pass over the database.
Every field is checked against the built state before anything is charged: a query for an
older build is refused `pir_build_changed` (the client fetches the new hint), a vector of the
wrong size `pir_query_size`, a database built under a weaker policy than today's
`pir_policy_changed`. Each vector costs one look-up from the researcher's total (never reset)
budget `budget_group`, shared with the beacon (`variant_queries`), refused past it as
`query_budget_exhausted`; the limit is the option `queries_total` capped by the policy's
`variant_query_budget`. A look-up is a thresholded count query (record present <=> at least
min carriers), so it counts as a beacon probe does.

What each party learns:
- The site learns that the researcher made k look-ups of its build, never which variants: each
  vector is an LWE sample, the same size for every column, and the server's work is one pass
  over the whole database. Its audit log holds a keyed digest of each query.
- The researcher learns, per vector, a whole column: about N/m records (at most `slots`,
  ~192 on average at full size), each a disclosure-checked aggregate one count query would
  reveal, and tags that are a public hash of enumerable keys. A crafted vector reads up to
  `COLUMNS_PER_VECTOR` = 4 columns exactly and no more: an answer is l entries mod 2^32 and a
  database entry is 8 bits, so a noiseless vector A s + sum_j 2^(8j) u_(c_j), j < 4, packs four
  columns into the four bytes of each answer entry (a fifth shift, 2^32, is 0); any vector's
  answer holds at most 32 bits per database row, four columns' worth. The budget counts vectors,
  so it bounds the columns read by 4 x budget (docs/pir.md). The hint H = D A (l x n) is a public
  linear function of the database; every build has at least `MIN_COLUMNS` = 2n columns (empty
  ones zero), so each row of D has m >= 2n unknowns against n hint equations and elimination
  has no unique solution (with m <= n it gives the whole database). The entries are small and
  mostly zero, so a lattice or support-guessing attack is not ruled out for a site with very
  few records: SimplePIR gives no database privacy, only suppressed aggregates are ever stored,
  and no suppressed count or sub-threshold variant can be recovered from anything sent.
- The hub relays the vectors and answers (signed, not encrypted; pseudorandom to anyone without
  the client's secret): it learns who looked up how many variants at which site, when.
Residual risk: a rebuild on changed data lets a client compare two builds' records.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from medveil.crypto import pir, pir_keyword
from medveil.crypto.encoding import canonical_json
from medveil.privacy.disclosure import DisclosurePolicy, secondary_suppression
from medveil.runtime.node import Refusal
from medveil.runtime.services import (
    BuildInputs,
    Charge,
    Service,
    ServiceError,
    ServiceOptions,
    register_service,
)

MAX_BATCH = 64
MIN_COLUMNS = 2 * pir.LWE_N  # the hint then has fewer equations per database row than unknowns (see above)
COLUMNS_PER_VECTOR = 4  # the most whole columns one crafted vector reads: 32-bit answers over 8-bit entries
FRAMING_BYTES = 64 * 1024
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"


class VariantProfileOptions(ServiceOptions):
    genotypes: str = Field(min_length=1, max_length=256, description="the site's PLINK dataset")
    iid_column: str = Field("iid", min_length=1, max_length=256, description="the table's sample id column, "
                                                                            "matched to the .fam IIDs")
    group_columns: list[str] = Field(default_factory=list, max_length=pir_keyword.MAX_GROUPS,
                                     description="0/1 indicator columns (e.g. HPO terms), public metadata")
    partition: bool = Field(False, description="the groups partition the samples: apply secondary suppression")
    ref_allele: Literal["A2", "A1"] = Field("A2", description="which .bim allele is REF (plink2 --make-bed: A2)")
    min_count: int | None = Field(None, ge=1, le=pir_keyword.MAX_COUNT,
                                  description="a stricter minimum count than the site's min_cell_count")
    queries_total: int = Field(20, ge=1, le=1_000_000, description="look-ups one researcher may make, ever, "
                                                                   "across the budget group")
    budget_group: str = Field("variant_queries", pattern=NAME_PATTERN,
                              description="the total budget this service shares (with the beacon by default)")
    hints_per_day: int = Field(4, ge=1, le=1000, description="hint downloads per researcher per UTC day")
    slots: int = Field(pir_keyword.DEFAULT_SLOTS, ge=1, le=pir_keyword.DEFAULT_SLOTS,
                       description="records per column (the hint is 16 KiB x 64 x slots, the answer 256 B x slots)")
    block_size: int = Field(4096, ge=1, le=1_000_000, description="variants read per block at build")

    @field_validator("group_columns", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        """The CLI gives a list option as one comma-separated string."""
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("group_columns")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value) or any(not name for name in value):
            raise ValueError("group columns are distinct, non-empty names")
        return value


QueryVector = Annotated[bytes, Field(min_length=4, max_length=4 * pir.MAX_COLUMNS)]


class VariantProfileQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, ser_json_bytes="base64")

    op: Literal["hint", "answer"]
    build: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    queries: list[QueryVector] | None = Field(None, min_length=1, max_length=MAX_BATCH)

    @model_validator(mode="after")
    def _shape(self) -> VariantProfileQuery:
        if self.op == "hint" and (self.build is not None or self.queries is not None):
            raise ValueError("a hint request holds only op")
        if self.op == "answer" and (self.build is None or self.queries is None):
            raise ValueError("an answer request names its build and holds 1 to 64 query vectors")
        return self


def threshold(policy: DisclosurePolicy, options: VariantProfileOptions) -> int:
    """The smallest count a record holds: the site's min_cell_count or the stricter min_count."""
    return max(policy.min_cell_count, options.min_count or 0)


def hidden_cells(cells: np.ndarray, totals: np.ndarray, minimum: int) -> np.ndarray:
    """Cells to suppress: a count in 1..min-1, or one whose complement among the variant's
    carriers (total - cell) is, since the total is released beside it."""
    rest = totals[:, None] - cells
    return _small(cells, minimum) | _small(rest, minimum)


def _small(counts: np.ndarray, minimum: int) -> np.ndarray:
    """Counts in 1..minimum-1."""
    return (counts > 0) & (counts < minimum)


@register_service
class VariantProfile(Service):
    """Per-variant carrier counts by phenotype group, fetched by SimplePIR keyword look-up."""

    name = "variant_profile"
    Options = VariantProfileOptions
    Query = VariantProfileQuery
    uses_genotypes = True

    def build(self, data: pd.DataFrame, options: ServiceOptions, inputs: BuildInputs) -> dict[str, Any]:
        assert isinstance(options, VariantProfileOptions) and inputs.genotypes is not None
        genotypes, minimum = inputs.genotypes, threshold(inputs.policy, options)
        samples, groups = _cohort(data, options, genotypes.iid)
        counts, hom, genotyped = _count(genotypes, samples, groups, options)
        keys, rows, not_keyed, duplicates = _keys(genotypes.variants, options.ref_allele)
        totals = counts[rows, 0]
        kept = totals >= minimum
        keys = [key for key, keep in zip(keys, kept) if keep]
        rows, totals = rows[kept], totals[kept]
        cells, hom, genotyped = counts[rows, 1:], hom[rows], genotyped[rows]
        sizes = groups.sum(axis=1)
        hidden = hidden_cells(cells, totals, minimum) | _small(sizes[None, :] - cells, minimum)
        common = _small(len(samples) - totals, minimum) | _small(genotyped - totals, minimum)
        policy = inputs.policy.model_copy(update={"min_cell_count": minimum})
        lines = cells.sum(axis=1) == totals  # the groups cover each carrier once: the total is a line total
        for i in np.flatnonzero(hidden.any(axis=1) & (lines | options.partition) & ~common):
            if cells.shape[1] > 1:
                hidden[i] = secondary_suppression(cells[i], hidden[i], policy)
        hidden[common] = True
        hom_hidden = hidden_cells(hom[:, None], totals, minimum)[:, 0] | common
        records = [pir_keyword.pack_record(b"\x01" * 8, None if off else int(total), None if hom_off else int(h),
                                           None if off else int(g),
                                           [None if cell_off else int(c) for c, cell_off in zip(row, row_hidden)])
                   for total, off, h, hom_off, g, row, row_hidden
                   in zip(totals, common, hom, hom_hidden, genotyped, cells, hidden)]
        m = max(MIN_COLUMNS, pir_keyword.column_count(len(keys), options.slots))
        db, layout = pir_keyword.build_keyword_db(keys, records, options.slots, m=m)
        params, hint = pir.setup(db)
        build = hashlib.sha256(canonical_json({"params": params.to_dict(), "layout": layout,
                                               "groups": options.group_columns, "min_count": minimum})
                               + db.tobytes()).hexdigest()
        return {"db": db, "hint": hint, "params": params.to_dict(), "layout": layout,
                "groups": list(options.group_columns), "build": build, "min_count": minimum,
                "samples": len(samples), "variants": len(genotypes.variants), "not_keyed": not_keyed,
                "duplicate_keys": duplicates, "below_min_count": int((~kept).sum())}

    def summary(self, state: dict[str, Any]) -> dict[str, Any]:
        params, layout = state["params"], state["layout"]
        return {"build": state["build"], "variants": state["variants"], "records": layout["records"],
                "samples": state["samples"], "groups": state["groups"], "min_count": state["min_count"],
                "not_keyed": state["not_keyed"], "duplicate_keys": state["duplicate_keys"],
                "below_min_count": state["below_min_count"], "m": params["cols"], "rows": params["rows"],
                "p": params["p"], "slots": layout["slots"], "salt": layout["salt"],
                "hint_bytes": int(state["hint"].nbytes), "answer_bytes": 4 * params["rows"],
                "query_bytes": 4 * params["cols"], "db_bytes": int(state["db"].nbytes)}

    def max_query_bytes(self, state: dict[str, Any]) -> int:
        return MAX_BATCH * 4 * int(state["params"]["cols"]) + FRAMING_BYTES

    def check(self, state: dict[str, Any], query: Any, options: ServiceOptions, policy: DisclosurePolicy) -> None:
        """A build made under a weaker policy than today's is not served; an answer request must
        name this build and hold vectors of exactly 4m bytes."""
        assert isinstance(query, VariantProfileQuery) and isinstance(options, VariantProfileOptions)
        if threshold(policy, options) > state["min_count"]:
            raise Refusal("pir_policy_changed", f"{self.name} was built with min count {state['min_count']}, below "
                                                "today's policy; the steward must rebuild it")
        if query.op == "hint":
            return
        if query.build != state["build"]:
            raise Refusal("pir_build_changed", f"{self.name} was rebuilt: fetch the new hint and query again")
        size = 4 * int(state["params"]["cols"])
        if any(len(vector) != size for vector in query.queries):
            raise Refusal("pir_query_size", f"each query vector is exactly {size} bytes (uint32 x m)")

    def charge(self, query: Any, options: ServiceOptions, policy: DisclosurePolicy | None = None) -> Charge:
        """A hint costs one of the day's hints; each vector one look-up of the total budget, whose
        limit is the option `queries_total` capped by the policy's `variant_query_budget` (the
        beacon's, sharing the counter): a service option never grants more than the policy."""
        assert isinstance(query, VariantProfileQuery) and isinstance(options, VariantProfileOptions)
        if query.op == "hint":
            return Charge(f"{self.name}:hint", 1, options.hints_per_day)
        limit = options.queries_total if policy is None else min(options.queries_total, policy.variant_query_budget)
        return Charge(options.budget_group, len(query.queries), limit, total=True)

    def answer(self, state: dict[str, Any], query: BaseModel, options: ServiceOptions,
               policy: DisclosurePolicy) -> dict[str, Any]:
        assert isinstance(query, VariantProfileQuery)
        if query.op == "hint":
            return {"op": "hint", "build": state["build"], "params": state["params"], "hint": state["hint"],
                    "layout": state["layout"], "groups": state["groups"], "min_count": state["min_count"],
                    "record_version": pir_keyword.RECORD_VERSION}
        vectors = np.stack([np.frombuffer(vector, dtype="<u4") for vector in query.queries]).astype(np.uint32)
        return {"op": "answer", "build": state["build"], "answers": pir.answer_batch(state["db"], vectors)}

    def wire_query(self, query: BaseModel) -> dict[str, Any]:
        """Vectors travel as raw bytes (msgpack bin), not base64."""
        return query.model_dump(exclude_none=True)


def _cohort(data: pd.DataFrame, options: VariantProfileOptions, iids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fileset's samples that the approved table lists (indices into the .fam), and each
    group's membership of them (bool, groups x samples); ServiceError for a table that does not fit."""
    columns = [options.iid_column, *options.group_columns]
    missing = [c for c in columns if c not in data.columns]
    if missing:
        raise ServiceError("missing_column", f"column(s) {missing} are not in the dataset")
    ids = data[options.iid_column].astype(str).str.strip()
    if data[options.iid_column].isna().any() or ids.duplicated().any():
        raise ServiceError("invalid_iid_column", f"{options.iid_column!r} must name each sample once")
    where = pd.Series(np.arange(len(iids)), index=pd.Index(iids.astype(str)))
    if where.index.duplicated().any():
        raise ServiceError("data_error", "the genotype fileset lists a sample IID twice")
    listed = ids.isin(where.index).to_numpy()
    if not listed.any():
        raise ServiceError("no_samples", "no sample of the table is in the genotype fileset")
    if listed.sum() > pir_keyword.MAX_COUNT:
        raise ServiceError("too_many_samples", f"a record counts at most {pir_keyword.MAX_COUNT} samples")
    samples = where[ids[listed]].to_numpy(np.int64)
    order = np.argsort(samples)
    groups = np.zeros((len(options.group_columns), len(samples)), dtype=bool)
    for g, column in enumerate(options.group_columns):
        values = pd.to_numeric(data[column], errors="coerce")
        if not (values.isin([0, 1]) | data[column].isna()).all():
            raise ServiceError("invalid_group_column", f"group column {column!r} holds values other than 0 and 1")
        groups[g] = (values.to_numpy()[listed] == 1)[order]
    if options.partition and groups.shape[0] and not (groups.sum(axis=0) == 1).all():
        raise ServiceError("not_a_partition", "with partition, every sample is in exactly one group")
    return samples[order], groups


def _count(genotypes: Any, samples: np.ndarray, groups: np.ndarray, options: VariantProfileOptions
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per variant: ALT carriers in all samples and in each group ((variants, 1 + groups)), hom-ALT
    carriers and genotyped samples, from bed-reader's decoded dosages in blocks of variants.

    One matrix product per block counts every group at once (exact: float32 sums of 0/1 below
    2^24); the popcount path of analyses/variants.py costs a pass per group, and it locates
    variants by position, which is ambiguous for the split multi-allelic sites `-m -any` makes."""
    weights = np.vstack([np.ones((1, len(samples)), np.float32), groups.astype(np.float32)])
    n_variants = len(genotypes.variants)
    carriers = np.zeros((n_variants, weights.shape[0]), np.int64)
    hom, genotyped = np.zeros(n_variants, np.int64), np.zeros(n_variants, np.int64)
    for start in range(0, n_variants, options.block_size):
        stop = min(start + options.block_size, n_variants)
        dosage = genotypes.block(samples, start, stop, dtype="int8")  # A1 copies, -127 missing
        called = dosage >= 0
        alt = np.where(called, 2 - dosage, -1) if options.ref_allele == "A1" else np.where(called, dosage, -1)
        carriers[start:stop] = np.rint((alt >= 1).astype(np.float32).T @ weights.T).astype(np.int64)
        hom[start:stop] = (alt == 2).sum(axis=0)
        genotyped[start:stop] = called.sum(axis=0)
    return carriers, hom, genotyped


def _keys(variants: pd.DataFrame, ref_allele: str) -> tuple[list[str], np.ndarray, int, int]:
    """The normalised key of each keyable variant and its row; how many were not keyable
    (symbolic or missing alleles) and how many rows shared a key (all of them left out: a
    duplicated variant's counts are ambiguous)."""
    ref, alt = ("A2", "A1") if ref_allele == "A2" else ("A1", "A2")
    keys, rows = [], []
    for row, (chrom, pos, r, a) in enumerate(zip(variants["CHROM"], variants["POS"], variants[ref], variants[alt])):
        try:
            keys.append(pir_keyword.normalise_variant(chrom, int(pos), r, a))
        except ValueError:
            continue
        rows.append(row)
    not_keyed = len(variants) - len(keys)
    repeated = pd.Series(keys, dtype=object).duplicated(keep=False).to_numpy()
    unique = [key for key, twice in zip(keys, repeated) if not twice]
    return unique, np.asarray(rows, dtype=np.int64)[~repeated], not_keyed, int(repeated.sum())


__all__ = ["COLUMNS_PER_VECTOR", "MAX_BATCH", "MIN_COLUMNS", "VariantProfile", "VariantProfileOptions", "VariantProfileQuery", "hidden_cells",
           "threshold"]
