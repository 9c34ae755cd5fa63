"""The hub's durable state through SQLAlchemy: SQLite file by default, PostgreSQL by URL.

Everything the hub knows lives here (parties, studies, approvals, tasks, their steps, relayed
messages, results), so a restarted hub resumes where it stopped. The relayed traffic of a task
is pruned once the task is long finished (`HubStore.prune_finished`); its result row stays.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Engine,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    delete,
    func,
    inspect,
    or_,
    select,
    text,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from medveil.runtime.db import make_engine


class Base(DeclarativeBase):
    pass


class Party(Base):
    __tablename__ = "parties"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    public_key: Mapped[str] = mapped_column(String(64))
    registered_at: Mapped[float] = mapped_column(Float)


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    researcher: Mapped[str] = mapped_column(ForeignKey("parties.id"))
    spec: Mapped[dict] = mapped_column(JSON)
    envelope: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[float] = mapped_column(Float)


class Approval(Base):
    __tablename__ = "approvals"
    study: Mapped[str] = mapped_column(ForeignKey("studies.id"), primary_key=True)
    site: Mapped[str] = mapped_column(ForeignKey("parties.id"), primary_key=True)
    envelope: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[float] = mapped_column(Float)


class Task(Base):
    __tablename__ = "tasks"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    study: Mapped[str] = mapped_column(ForeignKey("studies.id"))
    researcher: Mapped[str] = mapped_column(ForeignKey("parties.id"))
    analysis: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="running")
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class TaskStepRow(Base):
    """One step of a task: the union of the recipients of the task messages posted for it."""

    __tablename__ = "steps"
    task: Mapped[str] = mapped_column(ForeignKey("tasks.id"), primary_key=True)
    number: Mapped[int] = mapped_column(Integer, primary_key=True)
    recipients: Mapped[list] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)


class Message(Base):
    __tablename__ = "messages"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))
    sender: Mapped[str] = mapped_column(String(128))
    task: Mapped[str] = mapped_column(String(64), index=True)
    step: Mapped[int] = mapped_column(Integer)
    nonce: Mapped[str] = mapped_column(String(64), unique=True)
    envelope: Mapped[bytes] = mapped_column(LargeBinary)
    blob: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)


class Delivery(Base):
    """One row per recipient of a relayed message: a site's inbox is its deliveries in order."""

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("message", "recipient"),)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    message: Mapped[int] = mapped_column(ForeignKey("messages.seq"), index=True)
    recipient: Mapped[str] = mapped_column(String(128), index=True)


class HubEvent(Base):
    """Refused requests and other notable events, for the operator."""

    __tablename__ = "hub_events"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str] = mapped_column(Text)


MAX_EVENT_DETAIL = 2000


class Conflict(ValueError):
    """A write collides with what is stored (replayed nonce, re-registered key)."""


class StepClosed(Conflict):
    """A task message for a step older than the task's latest: that step is over."""


def _upgrade(engine: Engine) -> None:
    """Bring a database written before the hub's rounds became steps up to date, in place: the
    table `rounds` becomes `steps`, messages' `round` column `step`, and tasks gain `finished_at`."""
    found = inspect(engine)
    tables = set(found.get_table_names())
    columns = {table: {column["name"] for column in found.get_columns(table)}
               for table in ("messages", "tasks") if table in tables}
    with engine.begin() as connection:
        if "rounds" in tables and "steps" not in tables:
            connection.execute(text("ALTER TABLE rounds RENAME TO steps"))
        if "round" in columns.get("messages", ()):
            connection.execute(text('ALTER TABLE messages RENAME COLUMN "round" TO step'))
        if "tasks" in columns and "finished_at" not in columns["tasks"]:
            connection.execute(text("ALTER TABLE tasks ADD COLUMN finished_at FLOAT"))


@dataclass
class StoredMessage:
    seq: int
    envelope: bytes


class HubStore:
    """Thread-safe access to the hub's tables.

    Messages above `BLOB_THRESHOLD` bytes (large aggregates) are kept as files named by their
    SHA-256 in `blob_dir`, with the row pointing at them: a database BLOB write costs several
    times a file write, and large releases would otherwise dominate a round's time.
    """

    BLOB_THRESHOLD = 256 * 1024
    PRUNE_BATCH = 500  # tasks per delete, well inside every database's bound-parameter limit

    def __init__(self, url: str, blob_dir: str | Path | None = None):
        self.engine = make_engine(url)
        if blob_dir is None:
            database = self.engine.url.database if url.startswith("sqlite") else None
            blob_dir = f"{database}-blobs" if database else "medveil-hub-blobs"
        self.blob_dir = Path(blob_dir)
        _upgrade(self.engine)
        Base.metadata.create_all(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._lock = threading.Lock()
        # Parties and studies never change once written, so reads of them are cached.
        self._parties: dict[str, Party] = {}
        self._studies: dict[str, Study] = {}

    def close(self) -> None:
        self.engine.dispose()

    def _session(self) -> Session:
        return self._sessions()

    def register(self, party_id: str, role: str, public_key: str) -> bool:
        """Record an enrolled party's key (the hub checks the invitation); True if new. A different
        key or role for a known id is refused."""
        with self._lock, self._session() as s:
            existing = s.get(Party, party_id)
            if existing is not None:
                if existing.public_key != public_key or existing.role != role:
                    raise Conflict(f"{party_id!r} is already registered with another key or role")
                return False
            s.add(Party(id=party_id, role=role, public_key=public_key, registered_at=time.time()))
            s.commit()
            return True

    def _cached(self, cache: dict, model: type, key: str) -> Any:
        """Read an immutable row once; later reads come from memory."""
        if key not in cache:
            with self._session() as s:
                found = s.get(model, key)
            if found is None:
                return None
            cache[key] = found
        return cache[key]

    def party(self, party_id: str) -> Party | None:
        return self._cached(self._parties, Party, party_id)

    def add_study(self, study_id: str, researcher: str, spec: dict[str, Any], envelope: bytes) -> None:
        with self._lock, self._session() as s:
            if s.get(Study, study_id) is not None:
                raise Conflict(f"study {study_id!r} already exists")
            s.add(Study(id=study_id, researcher=researcher, spec=spec, envelope=envelope, created_at=time.time()))
            s.commit()

    def study(self, study_id: str) -> Study | None:
        return self._cached(self._studies, Study, study_id)

    def studies(self) -> list[Study]:
        with self._session() as s:
            return list(s.scalars(select(Study).order_by(Study.created_at)))

    def add_approval(self, study_id: str, site: str, envelope: bytes) -> None:
        with self._lock, self._session() as s:
            s.merge(Approval(study=study_id, site=site, envelope=envelope, created_at=time.time()))
            s.commit()

    def approvals(self, study_id: str) -> list[Approval]:
        with self._session() as s:
            return list(s.scalars(select(Approval).where(Approval.study == study_id)))

    def add_task_step(
        self, task_id: str, study: str, researcher: str, analysis: str, number: int, recipients: list[str],
        nonce: str, envelope: bytes,
    ) -> int:
        """Store one task message of a step and deliver it to each recipient; returns the message seq.

        A step may be posted as several messages (one per distinct body) whose recipients are
        pairwise disjoint; the step's recipients are their union. A recipient already asked this
        step, a replayed nonce, or a message for a step older than the task's latest is a Conflict.
        """
        with self._lock, self._session() as s:
            task = s.get(Task, task_id)
            if task is None:
                s.add(Task(id=task_id, study=study, researcher=researcher, analysis=analysis, created_at=time.time()))
            elif task.researcher != researcher or task.study != study:
                raise Conflict(f"task {task_id!r} belongs to another study or researcher")
            later = s.scalars(select(TaskStepRow.number).where(TaskStepRow.task == task_id,
                                                               TaskStepRow.number > number)).first()
            if later is not None:
                raise StepClosed(f"step {number} of task {task_id!r} is closed; step {later} has begun")
            step = s.get(TaskStepRow, (task_id, number))
            if step is None:
                s.add(TaskStepRow(task=task_id, number=number, recipients=list(recipients), created_at=time.time()))
            else:
                repeated = sorted(set(step.recipients) & set(recipients))
                if repeated:
                    raise Conflict(f"step {number} of task {task_id!r} was already sent to {', '.join(repeated)}")
                step.recipients = [*step.recipients, *recipients]  # a new list, so the JSON change is saved
            message = self._message("task", researcher, task_id, number, nonce, envelope)
            s.add(message)
            try:
                s.flush()
            except IntegrityError as exc:
                raise Conflict("replayed message: nonce already seen") from exc
            s.add_all(Delivery(message=message.seq, recipient=site) for site in recipients)
            s.commit()
            return message.seq

    def _message(self, kind: str, sender: str, task_id: str, number: int, nonce: str, envelope: bytes) -> Message:
        blob = None
        if len(envelope) > self.BLOB_THRESHOLD:
            blob = hashlib.sha256(envelope).hexdigest()
            self.blob_dir.mkdir(parents=True, exist_ok=True)
            partial = self.blob_dir / f"{blob}.partial"
            partial.write_bytes(envelope)
            os.replace(partial, self.blob_dir / blob)
            envelope = b""
        return Message(kind=kind, sender=sender, task=task_id, step=number, nonce=nonce, envelope=envelope,
                       blob=blob, created_at=time.time())

    def _stored(self, seq: int, envelope: bytes, blob: str | None) -> StoredMessage:
        return StoredMessage(seq, (self.blob_dir / blob).read_bytes() if blob else envelope)

    def step(self, task_id: str, number: int) -> TaskStepRow | None:
        with self._session() as s:
            return s.get(TaskStepRow, (task_id, number))

    def last_step(self, task_id: str) -> int:
        """The task's latest step number; -1 before its first."""
        with self._session() as s:
            steps = s.scalars(select(TaskStepRow.number).where(TaskStepRow.task == task_id)
                              .order_by(TaskStepRow.number.desc()))
            return next(iter(steps), -1)

    def task(self, task_id: str) -> Task | None:
        with self._session() as s:
            return s.get(Task, task_id)

    def add_reply(self, task_id: str, number: int, sender: str, nonce: str, envelope: bytes) -> int:
        with self._lock, self._session() as s:
            duplicate = s.scalars(
                select(Message.seq).where(
                    Message.task == task_id, Message.step == number, Message.kind == "reply", Message.sender == sender
                )
            ).first()
            if duplicate is not None:
                raise Conflict(f"{sender!r} already replied to step {number} of task {task_id!r}")
            message = self._message("reply", sender, task_id, number, nonce, envelope)
            s.add(message)
            try:
                s.commit()
            except IntegrityError as exc:
                raise Conflict("replayed message: nonce already seen") from exc
            return message.seq

    def inbox(self, recipient: str, after: int, limit: int = 100) -> list[StoredMessage]:
        with self._session() as s:
            rows = s.execute(
                select(Delivery.seq, Message.envelope, Message.blob)
                .join(Message, Message.seq == Delivery.message)
                .where(Delivery.recipient == recipient, Delivery.seq > after)
                .order_by(Delivery.seq)
                .limit(limit)
            )
            return [self._stored(*row) for row in rows]

    def replies(self, task_id: str, number: int) -> list[StoredMessage]:
        with self._session() as s:
            rows = s.execute(
                select(Message.seq, Message.envelope, Message.blob)
                .where(Message.task == task_id, Message.step == number, Message.kind == "reply")
                .order_by(Message.seq)
            )
            return [self._stored(*row) for row in rows]

    def reply_senders(self, task_id: str, number: int) -> list[str]:
        """The senders of a step's replies (as verified when posted), without reading their bodies."""
        with self._session() as s:
            return list(s.scalars(select(Message.sender).where(Message.task == task_id, Message.step == number,
                                                               Message.kind == "reply").order_by(Message.seq)))

    def set_result(self, task_id: str, status: str, result: dict[str, Any]) -> None:
        with self._lock, self._session() as s:
            task = s.get(Task, task_id)
            if task is None:
                raise KeyError(task_id)
            task.status, task.result = status, json.loads(json.dumps(result))
            task.finished_at = time.time()
            s.commit()

    def prune_finished(self, retention_s: float, now: float | None = None) -> list[str]:
        """Delete the relayed traffic (messages, deliveries, blob files, steps) of every task whose
        result was recorded more than `retention_s` ago, or that has been idle that long; the task
        row and its result stay (the researcher's provenance). Returns the pruned task ids.

        Replay protection forgets the pruned nonces, so `retention_s` must exceed the window in
        which the hub accepts a message as fresh (the hub checks this).
        """
        cutoff = (time.time() if now is None else now) - retention_s
        with self._lock, self._session() as s:
            last_message = (select(Message.task, func.max(Message.created_at).label("at"))
                            .group_by(Message.task).subquery())
            tasks = list(s.scalars(
                select(Task.id)
                .join(last_message, last_message.c.task == Task.id)  # only tasks with traffic left to prune
                .where(or_(Task.finished_at < cutoff, last_message.c.at < cutoff))
                .order_by(Task.id)
            ))
            for start in range(0, len(tasks), self.PRUNE_BATCH):
                self._prune(s, tasks[start:start + self.PRUNE_BATCH])
        return tasks

    def messages(self) -> list[StoredMessage]:
        with self._session() as s:
            rows = s.execute(select(Message.seq, Message.envelope, Message.blob).order_by(Message.seq))
            return [self._stored(*row) for row in rows]

    def _prune(self, s: Session, tasks: list[str]) -> None:
        """Delete these tasks' messages, deliveries and steps, then the blob files no row names."""
        blobs = set(s.scalars(select(Message.blob).where(Message.task.in_(tasks), Message.blob.is_not(None))))
        s.execute(delete(Delivery).where(Delivery.message.in_(select(Message.seq).where(Message.task.in_(tasks)))))
        s.execute(delete(Message).where(Message.task.in_(tasks)))
        s.execute(delete(TaskStepRow).where(TaskStepRow.task.in_(tasks)))
        s.commit()
        if blobs:
            blobs -= set(s.scalars(select(Message.blob).where(Message.blob.in_(blobs))))
        for blob in blobs:
            (self.blob_dir / blob).unlink(missing_ok=True)

    def log_event(self, kind: str, detail: str) -> None:
        """Record a refused request or notable event; the detail is cut to MAX_EVENT_DETAIL characters."""
        with self._lock, self._session() as s:
            s.add(HubEvent(at=time.time(), kind=kind[:32], detail=detail[:MAX_EVENT_DETAIL]))
            s.commit()

    def events(self) -> list[HubEvent]:
        with self._session() as s:
            return list(s.scalars(select(HubEvent).order_by(HubEvent.seq)))

