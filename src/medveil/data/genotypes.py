"""PLINK 1 binary filesets (.bed/.bim/.fam) read with bed-reader, in blocks of variants so a
site's memory stays bounded whatever the number of SNPs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from medveil.data.sources import DataError

BED_MAGIC = bytes([0x6C, 0x1B, 0x01])  # PLINK 1 .bed, variant-major


class GenotypeFile:
    """One site's genotypes: samples (IID, parents), variants (CHROM, POS, ID, A1, A2) and A1 dosages."""

    def __init__(self, name: str, path: Path):
        try:
            from bed_reader import open_bed
        except ImportError as exc:
            raise DataError("genotype datasets need bed-reader: pip install 'medveil[gwas]'") from exc
        path = Path(path)
        for suffix in (".bed", ".bim", ".fam"):
            if not path.with_suffix(suffix).exists():
                raise DataError(f"dataset {name!r}: {path.with_suffix(suffix)} does not exist")
        self.path = path.with_suffix(".bed")
        try:
            self._bed = open_bed(path)
            self.iid = np.asarray(self._bed.iid).astype(str)
            self.father = np.asarray(self._bed.father).astype(str)
            self.mother = np.asarray(self._bed.mother).astype(str)
            self.variants = pd.DataFrame({
                "CHROM": np.asarray(self._bed.chromosome).astype(str), "POS": np.asarray(self._bed.bp_position),
                "ID": np.asarray(self._bed.sid).astype(str), "A1": np.asarray(self._bed.allele_1).astype(str),
                "A2": np.asarray(self._bed.allele_2).astype(str),
            })
            with open(self.path, "rb") as handle:
                magic = handle.read(3)
        except Exception as exc:
            raise DataError(f"dataset {name!r}: cannot read PLINK fileset {path}: {exc}") from exc
        if magic != BED_MAGIC:
            raise DataError(f"dataset {name!r}: {self.path} is not a variant-major PLINK 1 .bed file")
        self.bytes_per_variant = (len(self.iid) + 3) // 4
        expected = 3 + self.bytes_per_variant * len(self.variants)
        if self.path.stat().st_size != expected:
            raise DataError(f"dataset {name!r}: {self.path} has {self.path.stat().st_size} bytes, "
                            f"expected {expected} for {len(self.iid)} samples x {len(self.variants)} variants")
        self._positions: dict[str, tuple[np.ndarray, np.ndarray]] | None = None

    def block(self, samples: np.ndarray, start: int, stop: int, dtype: str = "float32") -> np.ndarray:
        """A1 dosages (0, 1, 2; NaN missing, or -127 for int8) of `samples` x variants [start, stop)."""
        return self._bed.read(index=np.s_[samples, start:stop], dtype=dtype)

    def packed(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The raw .bed bytes of the given variant rows (ascending): 2 bits per sample, 4 samples per
        byte. Reads the span they cover when it is dense, row by row otherwise; `out` may be a wider
        zero-padded buffer to fill."""
        rows = np.asarray(rows, dtype=np.int64)
        width = self.bytes_per_variant
        if out is None:
            out = np.empty((len(rows), width), dtype=np.uint8)
        if not len(rows):
            return out
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        with open(self.path, "rb", buffering=0) as handle:
            if hi - lo <= 2 * len(rows):
                span = np.frombuffer(os.pread(handle.fileno(), (hi - lo) * width, 3 + lo * width), dtype=np.uint8)
                out[:, :width] = span.reshape(hi - lo, width)[rows - lo]
            else:
                for i, row in enumerate(rows):
                    out[i, :width] = np.frombuffer(os.pread(handle.fileno(), width, 3 + int(row) * width), np.uint8)
        return out

    def index_of(self, chrom: list[str], pos: np.ndarray) -> np.ndarray:
        """Row of each (chromosome, position) in this fileset; DataError naming any that is absent."""
        if self._positions is None:
            self._positions = {}
            for name, rows in self.variants.groupby("CHROM", sort=False).indices.items():
                order = np.argsort(self.variants["POS"].to_numpy()[rows], kind="stable")
                self._positions[str(name)] = (self.variants["POS"].to_numpy(np.int64)[rows][order], rows[order])
        chrom = np.asarray(chrom, dtype=object)
        index = np.full(len(pos), -1, dtype=np.int64)
        for name in pd.unique(chrom):
            wanted = chrom == name
            if name not in self._positions:
                continue
            positions, rows = self._positions[name]
            at = np.clip(np.searchsorted(positions, pos[wanted]), 0, len(positions) - 1)
            index[wanted] = np.where(positions[at] == pos[wanted], rows[at], -1)
        if (index < 0).any():
            first = int(np.argmax(index < 0))
            raise DataError(f"{int((index < 0).sum())} requested variant(s) are not in {self.path.name}, "
                            f"e.g. {chrom[first]}:{int(pos[first])}")
        return index

    def close(self) -> None:
        self._bed.__exit__(None, None, None)
