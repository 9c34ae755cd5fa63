"""A node's own durable state (SQLite): approvals its steward signed, seen nonces, progress."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Float, Integer, String, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from medveil.runtime.db import make_engine


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
        with self._lock, self._sessions() as s:
            s.add(SeenNonce(nonce=nonce, at=time.time()))
            s.add(ProcessedRound(task=task, round=round_no, at=time.time()))
            try:
                s.commit()
            except IntegrityError:
                return False
            return True

    def get(self, key: str, default: Any = None) -> Any:
        with self._sessions() as s:
            row = s.get(Setting, key)
            return default if row is None else row.value

    def put(self, key: str, value: Any) -> None:
        with self._lock, self._sessions() as s:
            s.merge(Setting(key=key, value=value))
            s.commit()
