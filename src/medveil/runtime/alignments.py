"""Alignments a node keeps: the rows of one of its datasets that a private set intersection matched,
in the order both parties agreed, so later tasks of the same study can run on them.

A PSI step's LOCAL step returns `Release.alignment`; the node keeps it here under the PSI task id,
for that study and dataset and the dataset's version then. A later analysis names the id
(`Analysis.alignment`), and the node hands it exactly those rows in that order, refusing an
alignment of another study (`alignment_unknown`), of another dataset (`alignment_dataset`) or of
data that changed since (`alignment_stale`). Nothing of an alignment leaves the site: each file
(0600, in a 0700 folder named by a digest, so no id reaches a path) holds the wire encoding of
the record, written to a temporary file and renamed into place.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medveil.runtime.config import make_private_dir, write_private_file
from medveil.runtime.wire import WireError, pack_body, unpack_body

MAX_ALIGNMENT_BYTES = 1024**3


@dataclass(frozen=True)
class Alignment:
    """One kept alignment: `rows` are positions in the dataset's table, in the agreed order."""

    id: str
    study: str
    dataset: str
    data_version: str
    column: str
    peers: tuple[str, ...]
    reveal: str
    rows: np.ndarray
    created_at: float


class AlignmentStore:
    """The alignments of one node, one file each under `folder`."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._lock = threading.Lock()

    def _path(self, study: str, alignment_id: str) -> Path:
        digest = hashlib.sha256(f"{study}\0{alignment_id}".encode()).hexdigest()
        return self.folder / f"{digest}.alignment"

    def save(self, alignment: Alignment) -> None:
        """Keep (or replace) `alignment` for its study and id."""
        record = {"id": alignment.id, "study": alignment.study, "dataset": alignment.dataset,
                  "data_version": alignment.data_version, "column": alignment.column,
                  "peers": list(alignment.peers), "reveal": alignment.reveal,
                  "rows": np.ascontiguousarray(alignment.rows, dtype=np.int64), "created_at": alignment.created_at}
        with self._lock:
            make_private_dir(self.folder)
            target = self._path(alignment.study, alignment.id)
            temporary = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            temporary.unlink(missing_ok=True)
            try:
                write_private_file(temporary, pack_body(record))
                os.replace(temporary, target)
            except BaseException:
                temporary.unlink(missing_ok=True)
                raise

    def load(self, study: str, alignment_id: str) -> Alignment | None:
        """The alignment `alignment_id` of `study`, or None when this node keeps none (or it is unreadable)."""
        path = self._path(study, alignment_id)
        try:
            record = unpack_body(path.read_bytes(), max_bytes=MAX_ALIGNMENT_BYTES)
            rows = np.asarray(record["rows"], dtype=np.int64)
            alignment = Alignment(str(record["id"]), str(record["study"]), str(record["dataset"]),
                                  str(record["data_version"]), str(record["column"]),
                                  tuple(str(p) for p in record["peers"]), str(record["reveal"]), rows,
                                  float(record["created_at"]))
        except (OSError, WireError, KeyError, TypeError, ValueError):
            return None
        if (alignment.study, alignment.id) != (study, alignment_id) or rows.ndim != 1:
            return None
        return alignment

    def prune(self, older_than_s: float) -> int:
        """Delete alignments older than `older_than_s` seconds; return how many."""
        if not self.folder.is_dir():
            return 0
        cutoff, removed = time.time() - older_than_s, 0
        for path in self.folder.glob("*.alignment"):
            if path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                removed += 1
        return removed


def new_alignment(alignment_id: str, study: str, dataset: str, data_version: str, raw: object,
                  table_rows: int) -> Alignment:
    """An Alignment from a LOCAL step's `Release.alignment` map, checked (ValueError when malformed):
    rows are distinct positions inside the table."""
    if not isinstance(raw, dict):
        raise ValueError("an alignment must be a map")
    rows = np.asarray(raw.get("rows"))
    if rows.ndim != 1 or rows.dtype.kind not in "iu":
        raise ValueError("an alignment's rows must be a 1-d integer array")
    rows = rows.astype(np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= table_rows or np.unique(rows).size != rows.size):
        raise ValueError("an alignment's rows must be distinct positions in the table")
    peers = raw.get("peers", [])
    if not isinstance(peers, list) or not all(isinstance(p, str) for p in peers):
        raise ValueError("an alignment's peers must be a list of site names")
    return Alignment(alignment_id, study, dataset, data_version, str(raw.get("column", "")), tuple(peers),
                     str(raw.get("reveal", "")), rows, time.time())
