"""KeySets: the key set a session's secure tasks share is made by one keys step, reused while it
is keyed and young, and replaced once it is KEYSET_RENEW_S old (over the in-process grid)."""

from __future__ import annotations

import uuid

import numpy as np
import pandas as pd
import pytest

import medveil as mv
from medveil.runtime.runs import TaskRun
from medveil.runtime.secure_aggregation import KEYSET_RENEW_S
from medveil.runtime.secure_rounds import KeySets, TaskChannel, new_coordinator

SITES = ["site_a", "site_b", "site_c"]


@pytest.fixture(scope="module")
def fed():
    frames = {site: pd.DataFrame({"x": np.arange(30.0) + i}) for i, site in enumerate(SITES)}
    with mv.Federation.in_process(frames) as federation:
        yield federation


def _channel(fed) -> TaskChannel:
    task = TaskRun(uuid.uuid4().hex, fed.study.id, "describe", {"variables": ["x"]}, "default", list(SITES))
    return TaskChannel(fed.session.grid, task, 30.0)


def test_the_first_task_makes_the_key_set_with_one_keys_step_and_later_tasks_reuse_it(fed):
    keysets = KeySets(fed.study)
    assert keysets.current is None
    fresh = keysets.for_new_task()
    assert not fresh.keyed and keysets.current is None  # handing it out sends nothing
    channel = _channel(fed)
    state = keysets.ready(channel, fresh)
    assert state is fresh and state.keyed and sorted(state.key_envelopes) == SITES
    assert keysets.current is state and channel.task.step == 1  # one keys step
    assert keysets.for_new_task() is state
    again = _channel(fed)
    assert keysets.ready(again, state) is state and again.task.step == 0  # keyed: no keys step


def test_a_key_set_that_is_not_keyed_or_too_old_is_not_handed_to_a_new_task(fed):
    keysets = KeySets(fed.study)
    keysets.current = new_coordinator(fed.study)  # its keys step never answered
    assert keysets.for_new_task() is not keysets.current
    state = keysets.ready(_channel(fed), None)
    assert state.keyed and keysets.for_new_task() is state
    state.created_at -= KEYSET_RENEW_S + 1
    renewed = keysets.for_new_task()
    assert renewed is not state and not renewed.keyed and renewed.keyset != state.keyset


def test_runs_of_a_session_share_its_key_set(fed):
    fed.describe("x")
    first = fed.session.keysets.current
    fed.histogram("x", [0, 10, 20, 40])
    assert first is not None and first.keyed and fed.session.keysets.current is first
