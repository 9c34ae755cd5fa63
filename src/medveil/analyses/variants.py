"""Variant agreement across sites and aligned genotype blocks, shared by the genotype analyses.

Each site names its variants (chromosome, position, alleles, ID; no sample data) in columnar
form. The researcher keeps the variants every site holds, matched by chromosome and position
with alleles equal or swapped, and reports strand-ambiguous (A/T, C/G) and mismatched ones.
A batch of agreed variants is then broadcast as (chromosome, position, A1) columns; each site
checks every one is a variant it listed itself, with an allele of its own (`check_batch`),
finds them in its own fileset and reads its genotypes counted on the agreed A1, flipping
dosages where its .bim lists the alleles the other way round.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pandas as pd

from medveil.analyses.base import AnalysisError, BroadcastRefused
from medveil.data.genotypes import GenotypeFile

STRAND_AMBIGUOUS_PAIRS = ["AT", "TA", "CG", "GC"]


def site_variants(genotypes: GenotypeFile) -> dict[str, Any]:
    """A site's variant list, columnar (what round 0 of a genotype analysis releases)."""
    v = genotypes.variants
    return {"chrom": v["CHROM"].tolist(), "pos": v["POS"].to_numpy(np.int64), "a1": v["A1"].tolist(),
            "a2": v["A2"].tolist(), "id": v["ID"].tolist()}


def agree_variants(per_site: dict[str, dict[str, Any]]) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """Variants every site holds (chromosome and position) with the same alleles, possibly swapped.

    Returns the agreed variants (CHROM, POS, ID, A1, A2 as the first site lists them, in its
    order) and a report of those left out or ambiguous."""
    frames = {site: pd.DataFrame({"CHROM": list(map(str, cols["chrom"])), "POS": np.asarray(cols["pos"], np.int64),
                                  "A1": list(cols["a1"]), "A2": list(cols["a2"]), "ID": list(cols["id"])})
              for site, cols in sorted(per_site.items())}
    sites = list(frames)
    agreed = frames[sites[0]].drop_duplicates(["CHROM", "POS"], keep=False)
    present = pd.Series(True, index=agreed.index)
    matching = pd.Series(True, index=agreed.index)
    for site in sites[1:]:
        other = frames[site].drop_duplicates(["CHROM", "POS"], keep=False)
        if other.reset_index(drop=True).equals(agreed.reset_index(drop=True)):
            continue  # the usual case: the same array or imputation panel at every site
        joined = agreed[["CHROM", "POS", "A1", "A2"]].merge(other[["CHROM", "POS", "A1", "A2"]], how="left",
                                                            on=["CHROM", "POS"], suffixes=("", "_o"))
        joined.index = agreed.index
        here = joined["A1_o"].notna()
        same = (joined["A1"] == joined["A1_o"]) & (joined["A2"] == joined["A2_o"])
        swapped = (joined["A1"] == joined["A2_o"]) & (joined["A2"] == joined["A1_o"])
        present &= here
        matching &= ~here | same | swapped
    report = {
        "not_at_every_site": agreed.loc[~present, "ID"].tolist(),
        "allele_mismatch": agreed.loc[present & ~matching, "ID"].tolist(),
    }
    agreed = agreed[present & matching].reset_index(drop=True)
    pair = agreed["A1"] + agreed["A2"]
    report["strand_ambiguous"] = agreed.loc[pair.isin(STRAND_AMBIGUOUS_PAIRS), "ID"].tolist()
    if agreed.empty:
        raise AnalysisError("the sites share no variant")
    return agreed[["CHROM", "POS", "ID", "A1", "A2"]], report


def batch_broadcast(agreed: pd.DataFrame, start: int, stop: int, counted_is_a2: np.ndarray | None = None
                    ) -> dict[str, Any]:
    """What sites need to read agreed variants [start, stop): where they are and which allele to count
    (A1, or A2 where `counted_is_a2` says so)."""
    part = agreed.iloc[start:stop]
    counted = part["A1"].to_numpy(object)
    if counted_is_a2 is not None:
        counted = np.where(counted_is_a2[start:stop], part["A2"].to_numpy(object), counted)
    return {"chrom": part["CHROM"].tolist(), "pos": part["POS"].to_numpy(np.int64), "counted": counted.tolist()}


def check_batch(batch: Any, listed: Any, max_variants: int) -> int:
    """Refuse a broadcast batch that is not columns of at most `max_variants` distinct variants
    this site listed in round 0 (`listed`, its `site_variants`), each counting one of its alleles;
    return the batch's length."""
    if not isinstance(batch, dict) or set(batch) != {"chrom", "pos", "counted"}:
        raise BroadcastRefused("broadcast_malformed", "a variant batch has the columns chrom, pos and counted")
    if not isinstance(listed, dict):
        raise BroadcastRefused("broadcast_not_released", "this site listed no variants in round 0 of this task")
    try:
        chrom = [str(c) for c in batch["chrom"]]
        counted = [str(a) for a in batch["counted"]]
        pos = np.asarray(batch["pos"])
    except TypeError:
        raise BroadcastRefused("broadcast_malformed", "a variant batch's columns must be lists") from None
    if not 0 < len(chrom) <= max_variants or len(pos) != len(chrom) or len(counted) != len(chrom):
        raise BroadcastRefused("broadcast_malformed", f"a variant batch holds 1 to {max_variants} variants in "
                                                      "columns of one length")
    if pos.ndim != 1 or not np.issubdtype(pos.dtype, np.integer):
        raise BroadcastRefused("broadcast_malformed", "variant positions must be integers")
    own = pd.DataFrame({"chrom": list(map(str, listed["chrom"])), "pos": np.asarray(listed["pos"], np.int64),
                        "a1": list(map(str, listed["a1"])), "a2": list(map(str, listed["a2"]))})
    asked = pd.DataFrame({"chrom": chrom, "pos": pos.astype(np.int64), "counted": counted})
    if asked.duplicated(["chrom", "pos"]).any():
        raise BroadcastRefused("broadcast_malformed", "a variant batch lists a variant twice")
    found = asked.merge(own.drop_duplicates(["chrom", "pos"], keep=False), how="left", on=["chrom", "pos"])
    if len(found) != len(asked) or found["a1"].isna().any():
        raise BroadcastRefused("broadcast_not_released", "a variant batch holds a variant this site did not list")
    if not ((found["counted"] == found["a1"]) | (found["counted"] == found["a2"])).all():
        raise BroadcastRefused("broadcast_not_released", "a variant batch counts an allele this site does not list")
    return len(chrom)


def locate(genotypes: GenotypeFile, batch: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Indices in this site's fileset of a broadcast batch, and whether to flip each (2 - dosage)."""
    index = genotypes.index_of(batch["chrom"], np.asarray(batch["pos"], np.int64))
    own_a1 = genotypes.variants["A1"].to_numpy(object)[index]
    return index, own_a1 != np.asarray(batch["counted"], dtype=object)


def aligned_blocks(genotypes: GenotypeFile, batch: dict[str, Any], samples: np.ndarray, block_size: int,
                   dtype: str = "float32") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(positions within the batch, dosages of the counted allele) per block of variants, read in file
    order so each block is one span of the .bed. Missing is NaN for floats and -127 for int8."""
    index, flip = locate(genotypes, batch)
    order = np.argsort(index, kind="stable")
    two = np.array(2, dtype=dtype)
    for start in range(0, len(order), block_size):
        chunk = order[start:start + block_size]
        lo, hi = int(index[chunk].min()), int(index[chunk].max()) + 1
        dosages = genotypes.block(samples, lo, hi, dtype=dtype)[:, index[chunk] - lo]
        flipped = flip[chunk][None, :] if dtype != "int8" else flip[chunk][None, :] & (dosages >= 0)
        yield chunk, np.where(flipped, two - dosages, dosages)


_LOW_BITS = np.uint64(0x5555_5555_5555_5555)


def sample_slots(samples: np.ndarray, n_file_samples: int) -> np.ndarray:
    """A bit mask over one variant's packed .bed bytes (as little-endian uint64 words) with the low
    bit of each listed sample's 2-bit slot set."""
    width = (n_file_samples + 3) // 4
    mask = np.zeros(-(-width // 8) * 8, dtype=np.uint8)
    samples = np.asarray(samples, dtype=np.int64)
    np.bitwise_or.at(mask, samples // 4, (1 << (2 * (samples % 4))).astype(np.uint8))
    return mask.view("<u8")


def count_genotypes(genotypes: GenotypeFile, batch: dict[str, Any], groups: list[np.ndarray], block_size: int
                    ) -> np.ndarray:
    """Per variant of the batch and per sample group: how many carry 0, 1 or 2 copies of the counted
    allele, and how many are missing; counted with popcounts on the packed .bed bytes, as PLINK does.

    Written by hand because bed-reader only hands out decoded dosages, which cost 30 times more."""
    index, flip = locate(genotypes, batch)
    masks = [sample_slots(group, len(genotypes.iid)) for group in groups]
    sizes = np.array([len(group) for group in groups], dtype=np.int64)
    counts = np.zeros((len(index), len(groups), 4))
    words = len(masks[0])
    order = np.argsort(index, kind="stable")
    buffer = np.zeros((min(block_size, len(index)), words * 8), dtype=np.uint8)
    for start in range(0, len(order), block_size):
        chunk = order[start:start + block_size]
        data = genotypes.packed(index[chunk], out=buffer[:len(chunk)]).view("<u8")
        low, high = data & _LOW_BITS, (data >> np.uint64(1)) & _LOW_BITS
        # .bed codes per sample: 00 two copies of the file's A1, 10 one copy, 11 none, 01 missing
        classes = {0: high & low, 1: high & ~low, 3: low & ~high}
        block = np.empty((len(chunk), len(groups), 4))
        for g, mask in enumerate(masks):
            for dosage, bits in classes.items():
                block[:, g, dosage] = np.bitwise_count(bits & mask).sum(axis=1, dtype=np.int64)
            block[:, g, 2] = sizes[g] - block[:, g, [0, 1, 3]].sum(axis=1)
        counts[chunk] = block
    counts[flip] = counts[flip][:, :, [2, 1, 0, 3]]
    return counts
