"""Durable run state on the researcher's side: a checkpoint per task and a write-ahead journal.

After every round the session saves the task's whole state (`TaskRun`: analysis, parameters,
dataset, sites, step counter, round, broadcast, global state, rows, privacy spent, audit ids and
the secure-aggregation key set) as one wire-encoded file, written to a temporary file and
renamed over the old one. Every envelope sealed for a step after that checkpoint is first
appended to the task's journal, and only then posted. With `sync=True` every write is fsynced as
well, so the files also survive an OS crash or a power cut (about 1 ms per step on this
machine); without it they survive a killed researcher process. A process killed anywhere
therefore leaves a checkpoint and the exact envelopes it may have sent since; `resume` re-sends
those (the hub answers a copy it holds with 409, which counts as delivered), gathers their
replies and continues. No pickle: the files are the wire framing (msgpack, raw arrays).
The files are the researcher's own (0600 in a 0700 directory): the state holds pooled aggregates.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medveil.runtime.config import make_private_dir
from medveil.runtime.secure_aggregation import CoordinatorState
from medveil.runtime.wire import (
    WireError,
    is_counter,
    is_id,
    open_envelope,
    pack_body,
    unpack_body,
)

RUN_FORMAT = 1
_LENGTH = struct.Struct("<Q")


class RunStateError(ValueError):
    """A run's checkpoint is missing, of another study, or unreadable."""


@dataclass
class TaskRun:
    """One analysis run in flight, everything needed to continue it in another process."""

    id: str
    study: str
    analysis: str
    params_wire: dict[str, Any]
    dataset: str
    sites: list[str]
    step: int = 0
    round: int = 0
    broadcast: dict[str, Any] = field(default_factory=dict)
    per_site: dict[str, dict[str, Any]] = field(default_factory=dict)
    messages: dict[str, list[Any]] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    dp_spent: dict[str, float] = field(default_factory=dict)
    audit_ids: dict[str, list[str]] = field(default_factory=dict)
    secure: bool = False
    coordinator: CoordinatorState | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"format": RUN_FORMAT, "id": self.id, "study": self.study, "analysis": self.analysis,
                "params": self.params_wire, "dataset": self.dataset, "sites": list(self.sites), "step": self.step,
                "round": self.round, "broadcast": self.broadcast, "per_site": self.per_site,
                "messages": self.messages, "state": self.state, "rows": self.rows, "dp_spent": self.dp_spent,
                "audit_ids": self.audit_ids, "secure": self.secure,
                "coordinator": None if self.coordinator is None else self.coordinator.to_wire()}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> TaskRun:
        """The run a checkpoint holds; RunStateError unless every field has its type (the file is
        hostile local input until checked: nothing in it is run or trusted before this)."""
        if data.get("format") != RUN_FORMAT:
            raise RunStateError(f"run state of format {data.get('format')!r}, expected {RUN_FORMAT}")
        _check_run_fields(data)
        coordinator = data.get("coordinator")
        return cls(data["id"], data["study"], data["analysis"], data["params"], data["dataset"], list(data["sites"]),
                   int(data["step"]), int(data["round"]), data["broadcast"], data["per_site"], data["messages"],
                   data["state"], {k: int(v) for k, v in data["rows"].items()},
                   {k: float(v) for k, v in data["dp_spent"].items()},
                   {k: list(v) for k, v in data["audit_ids"].items()}, bool(data["secure"]),
                   None if coordinator is None else CoordinatorState.from_wire(coordinator))


_RUN_FIELDS: dict[str, type | tuple[type, ...]] = {
    "id": str, "study": str, "analysis": str, "params": dict, "dataset": str, "sites": list, "step": int,
    "round": int, "broadcast": dict, "per_site": dict, "messages": dict, "state": dict, "rows": dict,
    "dp_spent": dict, "audit_ids": dict, "secure": bool, "coordinator": (dict, type(None))}


def _check_run_fields(data: dict[str, Any]) -> None:
    """Rule run_state_malformed: a checkpoint has exactly the fields a TaskRun writes, each of its type,
    names that are ids, counters in range, and a coordinator whose key envelopes are bytes."""
    if set(data) != {"format", *_RUN_FIELDS}:
        raise RunStateError(f"run state fields {sorted(map(str, data))[:32]} are not a run's")
    for name, kind in _RUN_FIELDS.items():
        value = data[name]
        if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or not is_counter(value))):
            raise RunStateError(f"run state field {name!r} is not of its type")
    names = [data["id"], data["study"], data["analysis"], data["dataset"], *data["sites"]]
    if not all(is_id(name) for name in names) or len(set(data["sites"])) != len(data["sites"]):
        raise RunStateError("run state names a task, study, analysis, dataset or site that is not an id")
    counts = {"rows": (int,), "dp_spent": (int, float), "audit_ids": (list,)}
    for name, kinds in counts.items():
        if not all(is_id(k) and isinstance(v, kinds) and not isinstance(v, bool) for k, v in data[name].items()):
            raise RunStateError(f"run state field {name!r} is not a map of sites to values of its type")
    for name in ("per_site", "messages"):
        if not all(is_id(k) for k in data[name]):
            raise RunStateError(f"run state field {name!r} is not keyed by sites")
    coordinator = data["coordinator"]
    if coordinator is not None:
        envelopes = coordinator.get("key_envelopes")
        if not (isinstance(envelopes, dict) and all(isinstance(v, bytes) for v in envelopes.values())):
            raise RunStateError("run state holds a key set whose key envelopes are not bytes")


def _fsync_dir(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class RunFile:
    """One task's checkpoint (`<task>.run`) and journal (`<task>.journal`) in a runs directory."""

    def __init__(self, directory: Path, task: str, *, sync: bool = False):
        """`sync`: fsync every write (survives an OS crash or power loss, ~1 ms per step here);
        without it the files survive a killed researcher process, the case resume is for."""
        if not is_id(task):
            raise RunStateError(f"not a task id: {task!r}")
        self.directory = directory
        self.task = task
        self.sync = sync
        self.checkpoint = directory / f"{task}.run"
        self.journal_path = directory / f"{task}.journal"
        self._journal: dict[int, list[bytes]] | None = None

    def save(self, run: TaskRun) -> None:
        """Write the checkpoint atomically and start an empty journal (its steps are all covered)."""
        temporary = self.checkpoint.with_suffix(".tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(pack_body(run.to_wire()))
            handle.flush()
            if self.sync:
                os.fsync(handle.fileno())
        os.replace(temporary, self.checkpoint)
        if self.journal_path.exists():
            os.truncate(self.journal_path, 0)
        if self.sync:
            _fsync_dir(self.directory)
        self._journal = {}

    def load(self) -> TaskRun:
        """The checkpoint of this task; RunStateError if missing, malformed, or of another task."""
        try:
            data = unpack_body(self.checkpoint.read_bytes())
            run = TaskRun.from_wire(data)
        except FileNotFoundError as exc:
            raise RunStateError(f"no unfinished run {self.task!r} in {self.directory}") from exc
        except RunStateError as exc:
            raise RunStateError(f"run state of {self.task!r} is refused: {exc}") from exc
        except (WireError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RunStateError(f"run state of {self.task!r} is unreadable: {exc}") from exc
        if run.id != self.task:
            raise RunStateError(f"the checkpoint {self.checkpoint.name} holds run {run.id!r}, not {self.task!r}")
        return run

    def _read_journal(self) -> dict[int, list[bytes]]:
        """The journalled steps; a torn last record (a crash while writing it) was never sent and is
        dropped. A record that is not {step, envelopes: [bytes]} with each envelope a task message
        of this task and step is refused (RunStateError): a resumed run re-sends only its own steps."""
        entries: dict[int, list[bytes]] = {}
        try:
            data = self.journal_path.read_bytes()
        except FileNotFoundError:
            return entries
        offset = 0
        while offset + _LENGTH.size <= len(data):
            (size,) = _LENGTH.unpack_from(data, offset)
            if offset + _LENGTH.size + size > len(data):
                break
            try:
                record = unpack_body(data[offset + _LENGTH.size:offset + _LENGTH.size + size])
            except WireError as exc:
                raise RunStateError(f"the journal of run {self.task!r} is unreadable: {exc}") from exc
            step, envelopes = record.get("step"), record.get("envelopes")
            if set(record) != {"step", "envelopes"} or not is_counter(step) or not isinstance(envelopes, list) \
                    or not all(isinstance(e, bytes) for e in envelopes):
                raise RunStateError(f"the journal of run {self.task!r} holds a record that is not a step's envelopes")
            for raw in envelopes:
                self._check_journalled(step, raw)
            entries[step] = list(envelopes)
            offset += _LENGTH.size + size
        return entries

    def _check_journalled(self, step: int, raw: bytes) -> None:
        """A journalled envelope parses and is a task message of this run's task and `step`."""
        try:
            header = open_envelope(raw).header
        except WireError as exc:
            raise RunStateError(f"the journal of run {self.task!r} holds an unreadable envelope: {exc}") from exc
        if header.get("kind") != "task" or header.get("task") != self.task or header.get("step") != step:
            raise RunStateError(f"the journal of run {self.task!r} holds an envelope of another task or step")

    def sealed(self, step: int) -> list[bytes] | None:
        if self._journal is None:
            self._journal = self._read_journal()
        return self._journal.get(step)

    def record(self, step: int, envelopes: list[bytes]) -> None:
        record = pack_body({"step": step, "envelopes": envelopes})
        descriptor = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(descriptor, "ab") as handle:
            handle.write(_LENGTH.pack(len(record)) + record)
            handle.flush()
            if self.sync:
                os.fsync(handle.fileno())
        if self._journal is None:
            self._journal = self._read_journal()
        self._journal[step] = list(envelopes)

    def delete(self) -> None:
        for path in (self.checkpoint, self.journal_path):
            path.unlink(missing_ok=True)


class RunStore:
    """A directory of unfinished runs (0700)."""

    def __init__(self, directory: str | Path, *, sync: bool = False):
        """`sync`: fsync every checkpoint and journal record (see RunFile)."""
        self.directory = Path(directory).expanduser()
        self.sync = sync
        self._made = False

    def open(self, task: str) -> RunFile:
        """The run files of `task` (the directory is made 0700 on first use)."""
        if not self._made:
            make_private_dir(self.directory)
            self._made = True
        return RunFile(self.directory, task, sync=self.sync)

    def unfinished(self, study: str | None = None) -> list[TaskRun]:
        """The runs whose checkpoint is still here (of `study` only, when given), oldest first."""
        if not self.directory.is_dir():
            return []
        runs = []
        for path in sorted(self.directory.glob("*.run"), key=lambda p: p.stat().st_mtime):
            try:
                run = RunFile(self.directory, path.stem).load()
            except RunStateError:
                continue
            if study is None or run.study == study:
                runs.append(run)
        return runs
