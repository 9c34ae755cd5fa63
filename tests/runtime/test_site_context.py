"""The SiteContext a node hands to every LOCAL step: its table, policy, task scratch, memory, role
and DP noise, each task's scratch its own."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from node_harness import NodeHarness, probe_registered

from medveil.analyses.base import SiteContext, get_analysis
from medveil.privacy.disclosure import DisclosurePolicy
from medveil.runtime.scratch import TaskScratch

STEPS = {  # analysis -> (params, broadcast of round 0)
    "describe": ({"variables": ["x"]}, {}),
    "histogram": ({"variable": "x", "edges": [-1.0, 0.0, 1.0]}, {}),
    "crosstab": ({"row": "g"}, {}),
    "glm": ({"formula": "x ~ z"}, {}),
    "kaplan_meier": ({"duration": "t", "event": "e"}, {}),
    "coxph": ({"duration": "t", "event": "e", "covariates": ["z"]}, {}),
    "ping": ({}, {}),
}


def _frame(n: int = 90) -> pd.DataFrame:
    rng = np.random.default_rng(8)
    return pd.DataFrame({"x": rng.normal(size=n), "z": rng.normal(size=n), "g": rng.choice(["u", "v"], n),
                         "t": rng.integers(1, 60, n).astype(float), "e": rng.integers(0, 2, n)})


@pytest.fixture()
def harness(tmp_path):
    with probe_registered():
        policy = DisclosurePolicy(min_cell_count=3, differencing_guard=False)
        harness = NodeHarness(tmp_path, {"a": _frame(), "b": _frame()}, [*STEPS, "payload_probe"], policy=policy,
                              roles={"a": "label_holder", "b": "feature_holder"})
        yield harness
        harness.close()


@pytest.mark.parametrize("name", sorted(STEPS))
def test_every_analysis_gets_one_site_context_from_its_node(harness, monkeypatch, name):
    analysis = get_analysis(name)
    seen: list[SiteContext] = []
    original = type(analysis).local

    def spy(self, params, round_no, broadcast, context):
        seen.append(context)
        return original(self, params, round_no, broadcast, context)

    monkeypatch.setattr(type(analysis), "local", spy)
    params, broadcast = STEPS[name]
    status, body = harness.send("a", f"t-{name}", 0, 0, name, params, broadcast)
    assert status == "ok", body
    (context,) = seen
    node = harness.nodes["a"]
    assert context.site == "a" and context.role == "label_holder"
    assert context.data is node.frames["default"] and context.policy == node.config.policy
    assert isinstance(context.scratch, TaskScratch)
    assert context.scratch.folder == node.scratch.task(f"t-{name}").folder
    assert context.memory["released"] == {0: body["public"]}  # the node's own record of the task
    assert context.noise is None and context.genotypes is None and context.messages == {}


def test_a_task_sees_its_own_scratch_only(harness):
    for task, value in (("t-one", "first"), ("t-two", "second")):
        status, body = harness.send("a", task, 0, 0, "payload_probe", broadcast={"keep": value})
        assert status == "ok" and body["public"]["kept"] == value
    for task, value in (("t-one", "first"), ("t-two", "second")):
        status, body = harness.send("a", task, 1, 1, "payload_probe")
        assert body["public"]["kept"] == value and body["public"]["scratch_keys"] == ["kept"]
    status, body = harness.send("a", "t-three", 0, 0, "payload_probe")
    assert body["public"]["kept"] is None and body["public"]["scratch_keys"] == []
    folders = {context.scratch.folder for context in get_analysis("payload_probe").contexts}
    assert len(folders) == 3 and all(folder.parent == harness.nodes["a"].scratch.root for folder in folders)


def test_memory_holds_what_the_site_released_in_earlier_rounds(harness):
    probe = get_analysis("payload_probe")
    harness.send("b", "t-mem", 0, 0, "payload_probe", broadcast={"keep": 4})
    harness.send("b", "t-mem", 1, 1, "payload_probe")
    context = probe.contexts[-1]
    assert context.memory["released"][0]["kept"] == 4 and context.role == "feature_holder"
    with pytest.raises(TypeError):
        context.memory["released"] = {}  # type: ignore[index]  # the node's record, read-only here
