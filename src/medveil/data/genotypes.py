"""PLINK 1 binary filesets (.bed/.bim/.fam) read with bed-reader, in blocks of variants so a
site's memory stays bounded whatever the number of SNPs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from medveil.data.sources import DataError


class GenotypeFile:
    """One site's genotypes: samples (IID), variants (CHROM, POS, ID, A1, A2) and A1 dosages."""

    def __init__(self, name: str, path: Path):
        try:
            from bed_reader import open_bed
        except ImportError as exc:
            raise DataError("genotype datasets need bed-reader: pip install 'medveil[gwas]'") from exc
        path = Path(path)
        for suffix in (".bed", ".bim", ".fam"):
            if not path.with_suffix(suffix).exists():
                raise DataError(f"dataset {name!r}: {path.with_suffix(suffix)} does not exist")
        try:
            self._bed = open_bed(path)
            self.iid = np.asarray(self._bed.iid).astype(str)
            self.variants = pd.DataFrame({
                "CHROM": np.asarray(self._bed.chromosome).astype(str), "POS": np.asarray(self._bed.bp_position),
                "ID": np.asarray(self._bed.sid).astype(str), "A1": np.asarray(self._bed.allele_1).astype(str),
                "A2": np.asarray(self._bed.allele_2).astype(str),
            })
        except Exception as exc:
            raise DataError(f"dataset {name!r}: cannot read PLINK fileset {path}: {exc}") from exc

    def block(self, samples: np.ndarray, start: int, stop: int) -> np.ndarray:
        """A1 dosages (0, 1, 2; NaN missing) of `samples` x variants [start, stop)."""
        return self._bed.read(index=np.s_[samples, start:stop], dtype="float32")

    def close(self) -> None:
        self._bed.__exit__(None, None, None)
