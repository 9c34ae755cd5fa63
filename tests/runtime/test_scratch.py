"""Durable node scratch: bounded per task, written atomically with private permissions, kept
across a node restart, deleted when its task ends and when old tasks are pruned."""

from __future__ import annotations

import logging
import os
import stat
import time

import numpy as np
import pandas as pd
import pytest
from node_harness import NodeHarness

from medveil.runtime.node import TASK_RETENTION_S
from medveil.runtime.node_store import StoredTask
from medveil.runtime.scratch import NodeScratch, TaskScratch, task_digest
from medveil.runtime.wire import WireError


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_values_round_trip_and_survive_a_new_store_on_the_same_folder(tmp_path):
    scratch = NodeScratch(tmp_path / "scratch", 1 << 20).task("t-1")
    design = np.arange(12, dtype=np.float64).reshape(4, 3)
    scratch["design"] = [design, np.array([1, 2], dtype=np.int8), ["a", "b"], 7]
    scratch["flag"] = {"done": True}
    reopened = NodeScratch(tmp_path / "scratch", 1 << 20).task("t-1")
    assert sorted(reopened) == ["design", "flag"] and len(reopened) == 2
    y, codes, names, count = reopened["design"]
    np.testing.assert_array_equal(y, design)
    assert codes.dtype == np.int8 and names == ["a", "b"] and count == 7
    assert not y.flags.writeable  # read back from disk: a snapshot, never changed in place
    assert reopened["flag"] == {"done": True}
    del reopened["flag"]
    assert "flag" not in NodeScratch(tmp_path / "scratch", 1 << 20).task("t-1")


def test_files_are_private_and_written_whole(tmp_path):
    scratch = NodeScratch(tmp_path / "scratch", 1 << 20).task("t-1")
    scratch["x"] = np.zeros(1000)
    scratch["x"] = np.ones(1000)  # replaced by a rename, never rewritten in place
    files = list(scratch.folder.iterdir())
    assert len(files) == 1 and not files[0].name.startswith(".")  # no temporary file left behind
    assert _mode(scratch.folder) == 0o700 and _mode(files[0]) == 0o600
    assert scratch.folder.name == task_digest("t-1")  # no task id reaches a path


def test_a_torn_file_counts_as_absent(tmp_path):
    scratch = NodeScratch(tmp_path / "scratch", 1 << 20).task("t-1")
    scratch["x"] = np.arange(100.0)
    (path,) = scratch.folder.iterdir()
    path.write_bytes(path.read_bytes()[:50])  # as a crash mid-write without the rename would leave it
    reopened = TaskScratch(scratch.folder, 1 << 20)
    assert "x" in reopened  # listed, until it is read
    assert reopened.get("x") is None
    assert "x" not in reopened and not path.exists()


def test_a_value_over_the_bound_is_not_kept_and_logged_once(tmp_path, caplog):
    scratch = NodeScratch(tmp_path / "scratch", 10_000).task("t-1")
    scratch["small"] = np.zeros(100)
    scratch["big"] = np.zeros(800)
    assert "big" in scratch and scratch.size_bytes <= 10_000
    with caplog.at_level(logging.WARNING, logger="medveil.node.scratch"):
        scratch["big"] = np.zeros(2000)  # 16 kB: over the bound, so the older "big" goes too
        scratch["other"] = np.zeros(2000)
    assert "big" not in scratch and "other" not in scratch and "small" in scratch
    assert scratch.size_bytes <= 10_000
    assert sum("exceed the task's bound" in record.getMessage() for record in caplog.records) == 1
    assert sorted(NodeScratch(tmp_path / "scratch", 10_000).task("t-1")) == ["small"]


def test_what_the_wire_cannot_carry_is_refused(tmp_path):
    scratch = NodeScratch(tmp_path / "scratch", 1 << 20).task("t-1")
    with pytest.raises(WireError):
        scratch["frame"] = pd.DataFrame({"a": [1]})
    with pytest.raises(TypeError):
        scratch[3] = 1  # type: ignore[index]
    assert len(scratch) == 0


def test_tasks_do_not_share_scratch_and_delete_and_prune_remove_folders(tmp_path):
    store = NodeScratch(tmp_path / "scratch", 1 << 20, keep=1)
    store.task("t-1")["x"] = 1
    store.task("t-2")["x"] = 2
    assert store.task("t-1")["x"] == 1 and store.task("t-2")["x"] == 2  # t-1 read back from disk (keep=1)
    store.delete("t-1")
    assert not (tmp_path / "scratch" / task_digest("t-1")).exists()
    assert "x" not in store.task("t-1")
    old = time.time() - 2 * TASK_RETENTION_S
    os.utime(tmp_path / "scratch" / task_digest("t-2"), (old, old))
    assert store.prune(TASK_RETENTION_S) == 1
    assert not (tmp_path / "scratch" / task_digest("t-2")).exists()
    store.task("t-1")["y"] = 3
    assert store.prune(TASK_RETENTION_S) == 0
    assert (tmp_path / "scratch" / task_digest("t-1")).exists()  # written just now


def test_a_task_that_keeps_nothing_makes_no_folder(tmp_path):
    store = NodeScratch(tmp_path / "scratch", 1 << 20)
    assert "x" not in store.task("t-1") and not store.holds("t-1")
    assert not (tmp_path / "scratch").exists()
    store.task("t-1")["x"] = 1
    assert store.holds("t-1")
    assert oct((tmp_path / "scratch").stat().st_mode & 0o777) == oct(0o700)
    assert oct((tmp_path / "scratch" / task_digest("t-1")).stat().st_mode & 0o777) == oct(0o700)


@pytest.fixture()
def harness(tmp_path):
    rng = np.random.default_rng(4)
    frame = pd.DataFrame({"y": rng.normal(size=80), "x": rng.normal(size=80)})
    harness = NodeHarness(tmp_path, {"a": frame}, ["glm"])
    yield harness
    harness.close()


def _glm_rounds(harness: NodeHarness, task: str, rounds: int) -> None:
    params = {"formula": "y ~ x"}
    broadcasts = [{}, {"levels": {}}, {"levels": {}, "ybar": 0.0, "ybar_weighted": 0.0}]
    for round_no in range(rounds):
        status, body = harness.send("a", task, round_no, round_no, "glm", params, broadcasts[round_no])
        assert status == "ok", body


def test_a_glm_design_is_kept_across_a_node_restart_and_deleted_when_the_task_ends(harness):
    _glm_rounds(harness, "t-glm", 2)
    folder = harness.nodes["a"].scratch.root / task_digest("t-glm")
    assert len(list(folder.iterdir())) == 1  # the design, written once
    harness.nodes["a"].close()
    harness.nodes["a"] = harness.start("a")
    assert harness.nodes["a"].scratch.task("t-glm")["design"][4] == ["Intercept", "x"]
    status, body = harness.send("a", "t-glm", 2, 2, "glm", {"formula": "y ~ x"},
                                {"levels": {}, "ybar": 0.0, "ybar_weighted": 0.0})
    assert status == "ok" and "xtwx" in body["sums"]
    status, body = harness.send("a", "t-glm", 3, 2, "glm", phase="end")
    assert (status, body) == ("ok", {"public": {}})
    assert not folder.exists()
    status, body = harness.send("a", "t-glm", 4, 3, "glm", {"formula": "y ~ x"}, {"levels": {}, "beta": [0.0, 0.0]})
    assert (status, body["rule"]) == ("refused", "task_ended")


def test_an_end_step_must_come_in_the_tasks_last_round(harness):
    _glm_rounds(harness, "t-late", 2)
    status, body = harness.send("a", "t-late", 2, 0, "glm", phase="end")
    assert (status, body["rule"]) == ("refused", "round_order")
    assert (harness.nodes["a"].scratch.root / task_digest("t-late")).exists()


def test_pruning_old_tasks_removes_their_scratch(harness):
    _glm_rounds(harness, "t-old", 2)
    _glm_rounds(harness, "t-new", 2)
    node = harness.nodes["a"]
    with node.store.engine.begin() as connection:
        connection.execute(StoredTask.__table__.update().where(StoredTask.task == "t-old")
                           .values(updated_at=time.time() - 2 * TASK_RETENTION_S))
    node.close()
    harness.nodes["a"] = harness.start("a")  # a node prunes old tasks as it starts
    assert not (node.scratch.root / task_digest("t-old")).exists()
    assert (node.scratch.root / task_digest("t-new")).exists()
