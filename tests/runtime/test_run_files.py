"""Run files with and without fsync: the same checkpoint and journal, private to the researcher."""

from __future__ import annotations

import stat
import time
import uuid

import pytest

from medveil.crypto.signing import SigningKey
from medveil.runtime.runs import RunStore, TaskRun
from medveil.runtime.wire import seal


def _envelope(key: SigningKey, task: str, step: int) -> bytes:
    header = {"kind": "task", "sender": "researcher", "nonce": uuid.uuid4().hex, "issued_at": time.time(),
              "study": "s", "task": task, "step": step, "phase": "compute", "round": 0, "analysis": "ping",
              "dataset": "default", "recipients": ["a"]}
    return seal(key, header, {}).encode()


@pytest.mark.parametrize("sync", [False, True])
def test_a_checkpoint_starts_a_fresh_journal_and_files_are_private(tmp_path, sync):
    key = SigningKey.generate()
    run_file = RunStore(tmp_path / "runs", sync=sync).open("t1")
    run_file.save(TaskRun("t1", "s", "ping", {}, "default", ["a"]))
    first = _envelope(key, "t1", 0)
    run_file.record(0, [first])
    assert RunStore(tmp_path / "runs").open("t1").sealed(0) == [first]  # as another process reads it
    run_file.save(TaskRun("t1", "s", "ping", {}, "default", ["a"], step=1, round=1))
    reread = RunStore(tmp_path / "runs").open("t1")
    assert reread.sealed(0) is None and reread.load().step == 1  # the checkpoint covers step 0
    for path in (run_file.checkpoint, run_file.journal_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "runs").stat().st_mode) == 0o700
    run_file.delete()
    assert not run_file.checkpoint.exists() and not run_file.journal_path.exists()
