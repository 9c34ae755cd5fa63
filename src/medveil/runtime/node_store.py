"""A node's own durable state (SQLite): approvals its steward signed, seen nonces, progress,
the state of each task it takes part in, its differential-privacy accounts and its query budgets."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import JSON, Float, Integer, LargeBinary, String, insert, select
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from medveil.runtime.db import make_engine
from medveil.runtime.wire import pack_body, unpack_body


class _Base(DeclarativeBase):
    pass


class StoredApproval(_Base):
    __tablename__ = "approvals"
    study: Mapped[str] = mapped_column(String(128), primary_key=True)
    spec: Mapped[dict] = mapped_column(JSON)
    approval: Mapped[dict] = mapped_column(JSON)


class SeenNonce(_Base):
    __tablename__ = "seen_nonces"
    nonce: Mapped[str] = mapped_column(String(64), primary_key=True)
    at: Mapped[float] = mapped_column(Float)


class ProcessedRound(_Base):
    __tablename__ = "processed_rounds"
    task: Mapped[str] = mapped_column(String(64), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[float] = mapped_column(Float)


class Budget(_Base):
    """Differential-privacy budget (zCDP rho) an account (a researcher, across all of their
    studies) has spent at this site."""

    __tablename__ = "dp_accounts"
    account: Mapped[str] = mapped_column(String(256), primary_key=True)
    spent: Mapped[float] = mapped_column(Float, default=0.0)


class QueryBudget(_Base):
    """Queries a holder (a researcher's name, or their signing key) has spent in a budget group at
    this site (e.g. "variant_queries": beacon and private look-ups); `day` set: a daily count."""

    __tablename__ = "query_budgets"
    group: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(512), primary_key=True)
    day: Mapped[str] = mapped_column(String(16), default="")
    used: Mapped[int] = mapped_column(Integer, default=0)


class StoredTask(_Base):
    """What this node pinned and released in one task, so later steps are checked against it."""

    __tablename__ = "task_states"
    task: Mapped[str] = mapped_column(String(128), primary_key=True)
    study: Mapped[str] = mapped_column(String(128))
    analysis: Mapped[str] = mapped_column(String(64))
    dataset: Mapped[str] = mapped_column(String(128))
    params_sha256: Mapped[str] = mapped_column(String(64))
    last_step: Mapped[int] = mapped_column(Integer)
    last_round: Mapped[int] = mapped_column(Integer)
    memory: Mapped[bytes] = mapped_column(LargeBinary)
    updated_at: Mapped[float] = mapped_column(Float)


class StoredRelease(_Base):
    """The public facts this node released in one round of a task (what later broadcasts may echo)."""

    __tablename__ = "task_releases"
    task: Mapped[str] = mapped_column(String(128), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    public: Mapped[bytes] = mapped_column(LargeBinary)


def dp_account(researcher: str) -> str:
    """The differential-privacy account a researcher's releases are charged to at a site, shared
    by all of that researcher's studies (a new study does not refill it)."""
    return f"researcher:{researcher}"


@dataclass
class TaskState:
    """A task as this node knows it: pinned study, analysis, dataset and parameters, the last
    step and compute round it handled, and `memory` (with `memory["released"][round]`, the digests
    of sealed payloads consumed in `memory["consumed_payloads"]`, and `memory["ended"]` once its
    "end" step came)."""

    task: str
    study: str
    analysis: str
    dataset: str
    params_sha256: str
    last_step: int = -1
    last_round: int = -1
    memory: dict[str, Any] = field(default_factory=lambda: {"released": {}})


class RowSet(_Base):
    """Rows an earlier query released to a researcher used (a bitmap), for the differencing guard;
    never leaves. `study` holds the account the set is kept under ("researcher:<name>" and
    "researcher:key:<key>"; the column kept its first name)."""

    __tablename__ = "row_sets"
    study: Mapped[str] = mapped_column(String(128), primary_key=True)
    dataset: Mapped[str] = mapped_column(String(128), primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[str] = mapped_column(String(256))
    size: Mapped[int] = mapped_column(Integer)
    bits: Mapped[bytes] = mapped_column(LargeBinary)


class Setting(_Base):
    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[Any] = mapped_column(JSON)


class NodeStore:
    def __init__(self, path: Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(f"sqlite:///{path}")
        _Base.metadata.create_all(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._lock = threading.Lock()

    def close(self) -> None:
        self.engine.dispose()

    def save_approval(self, study: str, spec: dict[str, Any], approval: dict[str, Any]) -> None:
        with self._lock, self._sessions() as s:
            s.merge(StoredApproval(study=study, spec=spec, approval=approval))
            s.commit()

    def approval(self, study: str) -> StoredApproval | None:
        with self._sessions() as s:
            return s.get(StoredApproval, study)

    def approvals(self) -> list[StoredApproval]:
        with self._sessions() as s:
            return list(s.scalars(select(StoredApproval)))

    def claim(self, nonce: str, task: str, round_no: int) -> bool:
        """Record a task message as handled; False if its nonce or its (task, round) was seen before."""
        now = time.time()
        with self._lock:
            try:
                with self.engine.begin() as connection:  # rolled back whole if either row exists
                    connection.execute(insert(SeenNonce).values(nonce=nonce, at=now))
                    connection.execute(insert(ProcessedRound).values(task=task, round=round_no, at=now))
            except IntegrityError:
                return False
            return True

    def budget_spent(self, account: str) -> float:
        with self._sessions() as s:
            row = s.get(Budget, account)
            return 0.0 if row is None else row.spent

    def charge_budget(self, account: str, rho: float, limit: float) -> float:
        """Add `rho` to the account's spending if it stays within `limit`; return the new total or raise."""
        with self._lock, self._sessions() as s:
            row = s.get(Budget, account) or Budget(account=account, spent=0.0)
            if row.spent + rho > limit * (1 + 1e-12):
                raise OverflowError(row.spent)
            row.spent += rho
            s.merge(row)
            s.commit()
            return row.spent

    def queries_used(self, group: str, identities: Sequence[str], *, day: str | None = None) -> int:
        """Queries spent in `group` by whoever the identities name (the most any of them spent)."""
        with self._sessions() as s:
            return self._used(s, group, identities, day)

    def charge_queries(self, group: str, identities: Sequence[str], amount: int, limit: int, *,
                       day: str | None = None) -> tuple[int, bool]:
        """Charge `amount` queries of `group` to every identity, all or nothing, if the most any of
        them has spent plus `amount` stays within `limit`; return (spent before, charged?).

        One researcher is kept under several identities (their name and their signing key), so a
        new study naming the same key under another name, or the same name with a new key, finds
        the budget as spent as they left it. `day` None: a total that never resets (a probe cannot
        wait for tomorrow); a day string: a count that starts from 0 on another day."""
        if amount < 0 or not identities:
            raise ValueError("a charge is a nonnegative amount to at least one identity")
        with self._lock, self._sessions() as s:
            used = self._used(s, group, identities, day)
            if used + amount > limit:
                return used, False
            for holder in identities:
                s.merge(QueryBudget(group=group, holder=holder, day=day or "", used=used + amount))
            s.commit()
            return used, True

    @staticmethod
    def _used(session: Any, group: str, identities: Sequence[str], day: str | None) -> int:
        rows = session.scalars(select(QueryBudget).where(QueryBudget.group == group,
                                                         QueryBudget.holder.in_(list(identities))))
        return max((row.used for row in rows if row.day == (day or "")), default=0)

    def row_sets(self, study: str, dataset: str, version: str) -> list[np.ndarray]:
        with self._sessions() as s:
            rows = s.scalars(select(RowSet).where(RowSet.study == study, RowSet.dataset == dataset,
                                                  RowSet.version == version))
            return [np.unpackbits(np.frombuffer(r.bits, dtype=np.uint8), count=r.size).astype(bool) for r in rows]

    def add_row_sets(self, study: str, dataset: str, version: str, row_sets: list[np.ndarray]) -> None:
        """Remember the rows behind released statistics, in one transaction (a survival fit has
        one set per step and risk set); a set already stored is kept once."""
        rows = []
        for row_set in row_sets:
            bits = np.packbits(np.asarray(row_set, dtype=np.uint8)).tobytes()
            rows.append({"study": study, "dataset": dataset, "version": version, "size": len(row_set), "bits": bits,
                         "digest": hashlib.sha256(bits + version.encode()).hexdigest()})
        if not rows:
            return
        with self._lock, self.engine.begin() as connection:
            connection.execute(sqlite_insert(RowSet).on_conflict_do_nothing(), rows)  # executemany

    def get(self, key: str, default: Any = None) -> Any:
        with self._sessions() as s:
            row = s.get(Setting, key)
            return default if row is None else row.value

    def put(self, key: str, value: Any) -> None:
        with self._lock, self._sessions() as s:
            s.merge(Setting(key=key, value=value))
            s.commit()

    def delete(self, key: str) -> None:
        """Forget a setting (e.g. spent secure-aggregation key material)."""
        with self._lock, self._sessions() as s:
            row = s.get(Setting, key)
            if row is not None:
                s.delete(row)
                s.commit()

    def task_state(self, task: str) -> TaskState | None:
        """The stored state of a task, with what this node released in each of its rounds."""
        with self._sessions() as s:
            row = s.get(StoredTask, task)
            if row is None:
                return None
            releases = s.scalars(select(StoredRelease).where(StoredRelease.task == task))
            released = {r.round: unpack_body(r.public)["public"] for r in releases}
        memory = unpack_body(row.memory)
        memory["released"] = released
        return TaskState(row.task, row.study, row.analysis, row.dataset, row.params_sha256, row.last_step,
                         row.last_round, memory)

    def save_task_state(self, state: TaskState, released_round: int | None = None) -> None:
        """Persist a task's state; `released_round` adds that round's public release (written once).

        One SQLite upsert per table (not an ORM merge, which reads the row first): this runs
        for every step a node handles."""
        row = {"task": state.task, "study": state.study, "analysis": state.analysis, "dataset": state.dataset,
               "params_sha256": state.params_sha256, "last_step": state.last_step, "last_round": state.last_round,
               "memory": pack_body({k: v for k, v in state.memory.items() if k != "released"}),
               "updated_at": time.time()}
        changing = {k: v for k, v in row.items() if k != "task"}
        with self._lock, self.engine.begin() as connection:
            connection.execute(sqlite_insert(StoredTask).values(row)
                               .on_conflict_do_update(index_elements=["task"], set_=changing))
            if released_round is not None:
                public = pack_body({"public": state.memory["released"][released_round]})
                connection.execute(sqlite_insert(StoredRelease).values(task=state.task, round=released_round,
                                                                       public=public)
                                   .on_conflict_do_update(index_elements=["task", "round"], set_={"public": public}))

    def prune_tasks(self, older_than_s: float) -> list[str]:
        """Forget the state of tasks untouched for `older_than_s` seconds; return their ids (the
        node deletes their scratch too)."""
        cutoff = time.time() - older_than_s
        with self._lock, self._sessions() as s:
            stale = list(s.scalars(select(StoredTask.task).where(StoredTask.updated_at < cutoff)))
            for task in stale:
                s.query(StoredRelease).filter(StoredRelease.task == task).delete()
                s.query(StoredTask).filter(StoredTask.task == task).delete()
            s.commit()
            return stale
