"""Durable node scratch: per-task working memory of a site's LOCAL steps, kept on disk.

Multi-round analyses keep what they build once per task at the site (GLM's design matrix,
Cox's coarsened rows, a GWAS batch's dosages) in `SiteContext.scratch`. It never leaves the
site. Each task's scratch is a folder `state_dir/scratch/<sha256 of the task id>/` (0700)
holding one file per key (0600): the wire encoding (`wire.pack_body`, numpy arrays as raw
little-endian bytes, no pickle) of {"key", "value"}, written to a temporary file and renamed
into place, so a reader sees a whole value or none. A few tasks' values are also held in
memory (least recently used first out), so the rounds of one task read nothing back from
disk; a restarted node reads them from the folder on first use.

Each task's scratch is bounded (bytes on disk, counted as encoded): a value that would take a
task over its bound is not kept (and any older value under its key is dropped), which is
logged once per task; the analysis then recomputes it, as it does with an empty scratch. An
unreadable file (a torn write after a crash) counts as absent. The node deletes a task's
folder when the task ends, and folders untouched for its retention period when it prunes.

Values are snapshots: assign a key again to change what is kept; arrays read back from disk
are read-only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

from medveil.runtime.wire import WireError, pack_body, unpack_body

log = logging.getLogger("medveil.node.scratch")
SUFFIX = ".val"


def task_digest(task: str) -> str:
    """The folder name of a task's scratch (a digest, so no task id reaches a path)."""
    return hashlib.sha256(task.encode("utf-8")).hexdigest()


def _key_file(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:40] + SUFFIX


class TaskScratch(MutableMapping[str, Any]):
    """One task's scratch: a mapping of str keys to wire-encodable values, on disk under
    `folder`, at most `limit_bytes` of encoded values in all."""

    def __init__(self, folder: Path, limit_bytes: int, label: str = ""):
        self.folder = folder
        self.limit_bytes = int(limit_bytes)
        self._label = label
        self._lock = threading.RLock()
        self._values: dict[str, Any] = {}
        self._dropped_logged = False
        # The folder is made on the first write: most tasks (one-round analyses) keep nothing.
        self._sizes = {path.name: path.stat().st_size for path in folder.glob(f"*{SUFFIX}")} if folder.is_dir() else {}

    @property
    def size_bytes(self) -> int:
        """Encoded bytes this task's scratch holds on disk."""
        with self._lock:
            return sum(self._sizes.values())

    def __getitem__(self, key: str) -> Any:
        with self._lock:
            if key in self._values:
                return self._values[key]
            name = _key_file(_checked_key(key))
            if name not in self._sizes:
                raise KeyError(key)
            value = self._read(name, key)
            self._values[key] = value
            return value

    def __setitem__(self, key: str, value: Any) -> None:
        with self._lock:
            name = _key_file(_checked_key(key))
            encoded = pack_body({"key": key, "value": value})  # WireError for a value the wire cannot carry
            if self.size_bytes - self._sizes.get(name, 0) + len(encoded) > self.limit_bytes:
                self._forget(key, name)
                if not self._dropped_logged:
                    self._dropped_logged = True
                    log.warning("%s: scratch value %r (%d bytes) would exceed the task's bound of %d bytes; "
                                "not kept, the analysis recomputes it", self._label, key[:64], len(encoded),
                                self.limit_bytes)
                return
            try:
                self._write(name, encoded)
            except OSError as exc:
                self._forget(key, name)
                log.warning("%s: scratch value %r not kept: %s", self._label, key[:64], exc)
                return
            self._sizes[name] = len(encoded)
            self._values[key] = value

    def __delitem__(self, key: str) -> None:
        with self._lock:
            name = _key_file(_checked_key(key))
            if name not in self._sizes:
                raise KeyError(key)
            self._forget(key, name)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        with self._lock:
            return key in self._values or _key_file(key) in self._sizes

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            keys = []
            for name in list(self._sizes):
                key = next((k for k in self._values if _key_file(k) == name), None)
                if key is None:
                    key = self._read_key(name)
                if key is not None:
                    keys.append(key)
        return iter(keys)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sizes)

    def _write(self, name: str, encoded: bytes) -> None:
        """Write to a fresh 0600 file beside the target, then rename it into place (atomic)."""
        for folder in (self.folder.parent, self.folder):  # the scratch root, then the task's own
            folder.mkdir(mode=0o700, exist_ok=True)
            os.chmod(folder, 0o700)
        temporary = self.folder / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(encoded)
            os.replace(temporary, self.folder / name)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    def _read(self, name: str, key: str) -> Any:
        try:
            record = unpack_body((self.folder / name).read_bytes(), max_bytes=max(self.limit_bytes, 1))
            if record.get("key") != key:
                raise WireError("a scratch file holds another key")
        except (OSError, WireError) as exc:
            log.warning("%s: scratch value %r unreadable (%s); recomputed", self._label, key[:64], exc)
            self._forget(key, name)
            raise KeyError(key) from None
        return record["value"]

    def _read_key(self, name: str) -> str | None:
        try:
            key = unpack_body((self.folder / name).read_bytes(), max_bytes=max(self.limit_bytes, 1)).get("key")
        except (OSError, WireError):
            key = None
        if not isinstance(key, str) or _key_file(key) != name:
            self._forget(None, name)
            return None
        return key

    def _forget(self, key: str | None, name: str) -> None:
        if key is not None:
            self._values.pop(key, None)
        self._sizes.pop(name, None)
        (self.folder / name).unlink(missing_ok=True)


def _checked_key(key: Any) -> str:
    if not isinstance(key, str):
        raise TypeError(f"scratch keys are strings, not {type(key).__name__}")
    return key


class NodeScratch:
    """The scratch of every task at one node, under `root`, each bounded by `limit_bytes`, the
    `keep` most recently used held in memory too."""

    def __init__(self, root: Path, limit_bytes: int, *, keep: int = 4, label: str = ""):
        self.root = root
        self.limit_bytes = int(limit_bytes)
        self.keep = keep
        self._label = label
        self._lock = threading.Lock()
        self._open: OrderedDict[str, TaskScratch] = OrderedDict()

    def task(self, task: str) -> TaskScratch:
        """The scratch of one task (made on first use; its folder's time marks its last use)."""
        with self._lock:
            scratch = self._open.get(task)
            if scratch is None:
                scratch = TaskScratch(self.root / task_digest(task), self.limit_bytes,
                                      label=f"{self._label} task {task[:64]}")
                self._open[task] = scratch
                while len(self._open) > self.keep:
                    self._open.popitem(last=False)
            self._open.move_to_end(task)
            if scratch.folder.is_dir():
                os.utime(scratch.folder)
            return scratch

    def holds(self, task: str) -> bool:
        """Whether anything of `task` is kept (in memory or on disk)."""
        with self._lock:
            if task in self._open and len(self._open[task]):
                return True
        folder = self.root / task_digest(task)
        return folder.is_dir() and any(folder.iterdir())

    def delete(self, task: str) -> None:
        """Delete a task's scratch, in memory and on disk."""
        with self._lock:
            self._open.pop(task, None)
            shutil.rmtree(self.root / task_digest(task), ignore_errors=True)

    def prune(self, older_than_s: float) -> int:
        """Delete the scratch of tasks untouched for `older_than_s` seconds; return how many."""
        if not self.root.is_dir():
            return 0
        cutoff = time.time() - older_than_s
        removed = 0
        with self._lock:
            for folder in self.root.iterdir():
                if folder.is_dir() and folder.stat().st_mtime < cutoff:
                    for task in [t for t, s in self._open.items() if s.folder == folder]:
                        del self._open[task]
                    shutil.rmtree(folder, ignore_errors=True)
                    removed += 1
        return removed
