"""beacon: "does any site have this allele, and how many carriers?" (GA4GH Beacon v2 style).

The researcher names one variant ("chrom:pos:REF:ALT", normalised as the PIR look-up keys it:
crypto/pir_keyword.normalise_variant), a granularity ("boolean" or "count") and each site's
PLINK dataset. In one round every site finds the variant in its approved fileset (either .bim
allele order; a row that is not there counts 0), counts the carriers of ALT (one or two
copies) among the samples its approved table lists (its PLINK `IID` column, spelled "IID" or
"iid": fixed, not the researcher's choice), and suppresses to 0 a count of 1..min_cell_count-1
or one whose complement (listed samples, or those genotyped there, minus the count) is
1..min_cell_count-1, so a site with a few carriers and a site with none answer alike, and a
near-universal allele does not publish its few non-carriers (its REF allele is asked the same).
"count" releases the suppressed count as a secure sum; "boolean" releases, instead, the
site's yes/no (count > 0 after suppression) times a fresh random weight in [1, 2^20], so the
secure sum is positive exactly when some site has at least min_cell_count carriers and says
little more than that.

A beacon answers membership questions (Shringarpure and Bustamante 2015): an attacker holding
a genome asks about its rare alleles and a likelihood-ratio test tells whether its owner is in
a site's cohort (privacy/beacon_risk.py). Suppression is the first defence; the second is a
total query budget per researcher at every node (`budget_group`, the node's guard
`query_budget_exhausted`, charged in the local step before anything is computed, kept
durably under the researcher's name and signing key, never reset; docs/pir.md says why 20).

What each party learns: the researcher, for "count", the sum over sites of suppressed carrier
counts (under secure aggregation, only that sum; without it, each site's suppressed count);
for "boolean", whether any site holds at least min_cell_count carriers, and from the sum of
random weights at most a rough hint of how many sites do (each site's yes/no without secure
aggregation). The hub sees masked sums only. Each site learns the variant asked (a beacon query
is not private; the PIR look-up, runtime/pir_service.py, is). No site learns another's count.
Residual risk: the differencing guard compares row sets within one approved table; two
approved tables listing sample sets one apart (a cohort and the cohort less one) give two
counts whose difference is that sample's genotype. A steward approves one table per genotype
fileset for the beacon (docs/pir.md).
"""

from __future__ import annotations

import secrets
import weakref
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from medveil.analyses.base import (
    NAME_PATTERN,
    Aggregated,
    Analysis,
    Finished,
    NextRound,
    Params,
    Release,
    SiteContext,
    register,
)
from medveil.crypto.pir_keyword import normalise_variant
from medveil.data.genotypes import GenotypeFile
from medveil.privacy.disclosure import DisclosurePolicy, suppress_small_counts

BUDGET_GROUP = "variant_queries"  # shared with the variant_profile service's private look-ups
MAX_VARIANT_CHARS = 1024
WEIGHT_BITS = 20  # a "yes" is released as a random weight in [1, 2^20]: far inside fixed-point range

Granularity = Literal["boolean", "count"]


def parse_variant(text: str) -> str:
    """The normalised key of a variant written "chrom:pos:REF:ALT" (ValueError otherwise)."""
    parts = text.strip().split(":")
    if len(parts) != 4:
        raise ValueError("a variant is written chrom:pos:REF:ALT")
    return normalise_variant(*parts)


class BeaconParams(Params):
    variant: str = Field(min_length=7, max_length=MAX_VARIANT_CHARS, description="chrom:pos:REF:ALT")
    granularity: Granularity = "boolean"
    genotypes: str = Field(pattern=NAME_PATTERN, description="each site's PLINK dataset")
    iid: Literal["IID", "iid"] = Field("IID", description="the table's PLINK sample id column (fixed: IID)")

    @field_validator("variant")
    @classmethod
    def _normalised(cls, value: str) -> str:
        return parse_variant(value)


_SPANS: weakref.WeakKeyDictionary[GenotypeFile, np.ndarray] = weakref.WeakKeyDictionary()


def _spans(genotypes: GenotypeFile) -> np.ndarray:
    """For each .bim row, the last position its key can have: trimming common leading bases
    moves a key's position on by at most the shorter allele's length less one."""
    spans = _SPANS.get(genotypes)
    if spans is None:
        variants = genotypes.variants
        shorter = np.minimum(variants["A1"].str.len().to_numpy(np.int64), variants["A2"].str.len().to_numpy(np.int64))
        spans = variants["POS"].to_numpy(np.int64) + np.maximum(shorter - 1, 0)
        _SPANS[genotypes] = spans
    return spans


def _key_or_none(chrom: Any, pos: Any, ref: Any, alt: Any) -> str | None:
    try:
        return normalise_variant(chrom, pos, ref, alt)
    except ValueError:
        return None


def find_variant(genotypes: GenotypeFile, key: str) -> tuple[int, bool] | None:
    """The first .bim row whose alleles, in either order, normalise to `key`, and whether ALT is the
    row's A1; None when the fileset has no such row (never an error: absence is an answer)."""
    chrom, pos_text, _, _ = key.split(":")
    pos = int(pos_text)
    variants = genotypes.variants
    names = [name for name in pd.unique(variants["CHROM"]) if (_key_or_none(name, 1, "A", "C") or "").split(":")[0]
             == chrom]
    positions = variants["POS"].to_numpy(np.int64)
    near = variants["CHROM"].isin(names).to_numpy() & (positions <= pos) & (_spans(genotypes) >= pos)
    for row in np.flatnonzero(near):
        a1, a2, name = variants["A1"].iat[row], variants["A2"].iat[row], variants["CHROM"].iat[row]
        if _key_or_none(name, int(positions[row]), a2, a1) == key:
            return int(row), True
        if _key_or_none(name, int(positions[row]), a1, a2) == key:
            return int(row), False
    return None


def carriers(genotypes: GenotypeFile, key: str, samples: np.ndarray) -> int:
    """How many of `samples` (rows of the .fam) carry ALT of `key` at least once (missing: not)."""
    return carriers_and_called(genotypes, key, samples)[0]


def carriers_and_called(genotypes: GenotypeFile, key: str, samples: np.ndarray) -> tuple[int, int]:
    """The ALT carriers of `key` among `samples` and how many of them are genotyped there (a
    variant the fileset lacks: (0, 0))."""
    found = find_variant(genotypes, key)
    if found is None or not len(samples):
        return 0, 0
    row, alt_is_a1 = found
    a1 = genotypes.block(samples, row, row + 1)[:, 0]  # A1 dosages, NaN missing
    with np.errstate(invalid="ignore"):
        count = int(np.sum(a1 >= 1) if alt_is_a1 else np.sum(a1 <= 1))
    return count, int(np.sum(~np.isnan(a1)))


def id_column(iid: str, data: pd.DataFrame) -> str:
    """The table's sample id column: PLINK's IID (named "IID" or "iid"), never a column of the
    researcher's choosing, so that two columns naming sample sets one apart (an FID, a copy with
    one id blanked) cannot be differenced; a table holding both spellings is refused."""
    if {"IID", "iid"} <= set(data.columns):
        raise ValueError("the table has both an 'IID' and an 'iid' column: the beacon's sample ids are ambiguous")
    return iid


def _samples(iid: str, data: pd.DataFrame, genotypes: GenotypeFile) -> np.ndarray:
    """Rows of the genotype file whose IID is in the table's `iid` column, in file order."""
    wanted = data[id_column(iid, data)].dropna().astype(str).unique()
    return np.flatnonzero(np.isin(genotypes.iid, wanted))


def suppressed_count(count: int, listed: int, called: int, policy: DisclosurePolicy) -> int:
    """`count` as the site releases it: 0 when it is 1..min-1, or when its complement among the
    listed samples (`listed` - count) or among those genotyped there (`called` - count) is, since
    the cohort size is known from any other count and the few non-carriers would show."""
    minimum = policy.min_cell_count
    if any(0 < value < minimum for value in (count, listed - count, called - count)):
        return 0
    return int(suppress_small_counts(np.array([count], dtype=np.int64), policy)[0][0])


@register
class Beacon(Analysis[BeaconParams]):
    name = "beacon"
    Params = BeaconParams
    budget_group: ClassVar[str] = BUDGET_GROUP  # the node charges one query of this budget per task

    def variables(self, params: BeaconParams) -> list[str]:
        return [params.iid]

    def row_sets(self, params: BeaconParams, data: pd.DataFrame, round_no: int = 0,
                 broadcast: dict[str, Any] | None = None, policy: DisclosurePolicy | None = None
                 ) -> list[np.ndarray]:
        """The rows whose sample id is given (the default), after refusing an ambiguous id column."""
        id_column(params.iid, data)
        return super().row_sets(params, data, round_no, broadcast, policy)

    def genotype_dataset(self, params: BeaconParams) -> str:
        return params.genotypes

    def local(self, params: BeaconParams, round_no: int, broadcast: dict[str, Any], context: SiteContext) -> Release:
        if context.genotypes is None:
            raise ValueError("beacon needs a genotype dataset")
        samples = _samples(params.iid, context.data, context.genotypes)
        count, called = carriers_and_called(context.genotypes, params.variant, samples)
        released = np.array([suppressed_count(count, len(samples), called, context.policy)], dtype=np.int64)
        if params.granularity == "count":
            return Release(sums={"carriers": released})
        weight = secrets.randbelow(1 << WEIGHT_BITS) + 1
        return Release(sums={"exists": (released > 0).astype(np.int64) * weight})

    def global_step(self, params: BeaconParams, round_no: int, aggregated: Aggregated,
                    state: dict[str, Any]) -> NextRound | Finished:
        if params.granularity == "count":
            return Finished({"count": round(float(aggregated.sums["carriers"][0]))})
        return Finished({"exists": bool(float(aggregated.sums["exists"][0]) >= 0.5)})
