"""A node's tamper-evident audit log: hash-chained JSON lines.

Each entry carries the SHA-256 of the previous entry, and its own hash covers its content and
that link, so editing, dropping or reordering any past line breaks `verify_audit_log`.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from medveil.runtime.wire import canonical_json

GENESIS = "0" * 64


class AuditError(ValueError):
    """The audit log has been altered."""


def _entry_hash(entry: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def summarised(value: Any, limit: int = 64) -> Any:
    """`value` with arrays and long lists replaced by their SHA-256 and size, so the log records
    what was released (verifiably) without growing with the number of variants."""
    if isinstance(value, np.ndarray):
        return {"sha256": hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest(),
                "dtype": str(value.dtype), "shape": list(value.shape)}
    if isinstance(value, dict):
        return {str(k): summarised(v, limit) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if len(value) > limit:
            text = json.dumps(value, sort_keys=True, default=str).encode()
            return {"sha256": hashlib.sha256(text).hexdigest(), "length": len(value)}
        return [summarised(v, limit) for v in value]
    return value


class AuditLog:
    """Append-only; `append` returns the entry id that results quote as provenance."""

    def __init__(self, path: Path, party: str):
        self.path = Path(path)
        self.party = party
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._seq, self._last = 0, GENESIS
        if self.path.exists():
            for entry in read_audit_log(self.path):
                self._seq, self._last = entry["seq"], entry["hash"]

    def head(self) -> dict[str, Any]:
        """The log's current head (last sequence number and hash), quoted in every signed reply so
        that researchers and the hub hold evidence of what the log said at that moment."""
        with self._lock:
            return {"seq": self._seq, "hash": self._last}

    def append(self, kind: str, **fields: Any) -> str:
        with self._lock:
            entry = {"seq": self._seq + 1, "id": f"{self.party}:{self._seq + 1}", "at": time.time(),
                     "kind": kind, "prev": self._last, **fields}
            entry["hash"] = _entry_hash(entry)
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry, sort_keys=True, default=str) + "\n")
                handle.flush()
            self._seq, self._last = entry["seq"], entry["hash"]
            return entry["id"]


def read_audit_log(path: Path) -> list[dict[str, Any]]:
    entries = []
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError as exc:
                raise AuditError(f"{path}: line {number} is not valid JSON") from exc
            if not isinstance(entry, dict):
                raise AuditError(f"{path}: line {number} is not an audit entry")
            entries.append(entry)
    return entries


def verify_audit_log(path: Path) -> int:
    """Check every link and hash; return the number of entries or raise AuditError."""
    previous = GENESIS
    entries = read_audit_log(path)
    for number, entry in enumerate(entries, start=1):
        if entry.get("seq") != number or entry.get("prev") != previous:
            raise AuditError(f"{path}: entry {number} is out of sequence or its link is broken")
        if _entry_hash(entry) != entry.get("hash"):
            raise AuditError(f"{path}: entry {number} was altered")
        previous = entry["hash"]
    return len(entries)
