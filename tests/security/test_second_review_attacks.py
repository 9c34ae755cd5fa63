"""Second red-team review: attacks the first review did not cover.

A hostile researcher reads the longest follow-up by bisecting max_time (a refusal told whether a
time exceeded it), or stops a node with a time grid too large to allocate; an enrolled party
makes the hub fail with a task naming a site twice, claims an approval of a study it is not in,
or reads the operator's event log (every party's refusals and task ids). Each test asserts the
attack is refused with a named rule (or, for the oracle, that nothing differs) and that nothing
was extracted or stored.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from in_process_hub import enrol_and_publish, post
from raw_tasks import refusal_rules, send_raw

import medveil as mv
from medveil.analyses.base import SiteContext, get_analysis
from medveil.crypto.signing import SigningKey
from medveil.privacy.disclosure import DisclosurePolicy
from medveil.runtime.auth import HEADER, make_token
from medveil.runtime.hub import create_hub_app
from medveil.runtime.hub_store import HubStore
from medveil.runtime.wire import seal

POLICY = DisclosurePolicy()
LONGEST = 1500.0
OPERATOR = SigningKey.generate()
RESEARCHER = SigningKey.generate()
SITE = SigningKey.generate()
OUTSIDER = SigningKey.generate()


def _site(seed: int, n: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"t": rng.integers(1, 400, n).astype(float), "e": rng.integers(0, 2, n),
                         "x": rng.normal(size=n)})


# --- survival: max_time is no oracle on the longest follow-up, and the grid is bounded --------


@pytest.fixture(scope="module")
def fed():
    lonely = _site(1, 60)
    lonely.loc[59, ["t", "e"]] = [LONGEST, 1]  # one patient alone has the longest follow-up
    with mv.Federation.simulate({"site_a": lonely, "site_b": _site(2, 60)}, timeout=60) as federation:
        yield federation


@pytest.mark.e2e
def test_bisecting_max_time_does_not_read_the_longest_follow_up(fed):
    """Before: max_time just below site_a's longest time was refused at site_a alone, just above
    it was not, so a bisection read that patient's time. Now both give the same table."""
    below = fed.kaplan_meier("t", "e", max_time=LONGEST - 1)
    above = fed.kaplan_meier("t", "e", max_time=LONGEST + 1)
    pd.testing.assert_frame_equal(below.tables["all"], above.tables["all"])
    assert below.tables["all"].index.max() < 400


def test_cox_and_km_censor_times_beyond_max_time_instead_of_refusing():
    data = _site(3, 40).assign(t=np.linspace(0.5, 20.0, 40))  # about half the rows beyond max_time
    data.loc[0, "t"] = 10.6  # within max_time, yet it rounds to a slot past the grid's end
    for name, extra in (("coxph", {"covariates": ["x"]}), ("kaplan_meier", {})):
        analysis = get_analysis(name)
        params = analysis.parse_params({"duration": "t", "event": "e", "max_time": 10.6, **extra})
        release = analysis.local(params, 0, {}, SiteContext("s", data, POLICY, {}, {}))
        assert release.public.get("rows") == len(data)
    km = get_analysis("kaplan_meier")
    params = km.parse_params({"duration": "t", "event": "e", "max_time": 10.6})
    release = km.local(params, 1, {"groups": ["all"]}, SiteContext("s", data, POLICY, {}, {}))
    assert release.sums["removed"].sum() == len(data)
    assert release.sums["events"][0, -1] == 0  # what lies beyond max_time is censored, never an event there


@pytest.mark.parametrize("name, extra", [("kaplan_meier", {}), ("logrank", {"by": "x"}),
                                         ("coxph", {"covariates": ["x"]})])
@pytest.mark.parametrize("grid", [{"max_time": 1e12}, {"max_time": float("inf")},
                                  {"time_unit": 1e-300, "max_time": 1e10}])
def test_a_time_grid_too_large_to_allocate_is_refused_before_any_site_computes(name, extra, grid):
    with pytest.raises(ValidationError, match="more than"):
        get_analysis(name).parse_params({"duration": "t", "event": "e", **extra, **grid})


@pytest.mark.e2e
def test_a_raw_task_with_a_huge_time_grid_is_refused_by_every_node(fed):
    answers = send_raw(fed, fed.study.id, "t-huge-grid", 0, 0, "kaplan_meier",
                       {"duration": "t", "event": "e", "max_time": 1e9})
    assert refusal_rules(answers) == {"invalid_parameters"}
    assert all(status != "ok" for status, _ in answers.values())


# --- hub: duplicate recipients, outsiders' approvals, the operator's event log ----------------


def _get(client: TestClient, path: str, party: str, key: SigningKey):
    return client.get(path, headers={HEADER: make_token(party, key, "GET", path)})


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """An in-process hub with a researcher, site_a in study-1, and site_x in no study."""
    store = HubStore(f"sqlite:///{tmp_path_factory.mktemp('hub') / 'hub.db'}")
    app = create_hub_app(store, operator_key=OPERATOR.verify_key, max_wait_s=0.05)
    with TestClient(app, raise_server_exceptions=False) as client:
        enrol_and_publish(client, OPERATOR, {"researcher": ("researcher", RESEARCHER), "site_a": ("site", SITE),
                                             "site_x": ("site", OUTSIDER)}, SITE)
        yield client, store
    store.close()


def test_a_task_naming_a_site_twice_gets_a_4xx_not_a_server_error(hub):
    client, store = hub
    task = seal(RESEARCHER, {"kind": "task", "sender": "researcher", "nonce": "dup-recipients",
                             "issued_at": time.time(), "study": "study-1", "task": "t-dup", "step": 0, "round": 0,
                             "phase": "compute", "analysis": "ping", "dataset": "default",
                             "recipients": ["site_a", "site_a"]}, {"params": {}, "broadcast": {}})
    response = post(client, "/v1/messages", task.encode())
    assert response.status_code == 400 and store.events()[-1].kind == "malformed"
    assert store.task("t-dup") is None and store.inbox("site_a", 0) == []


def test_a_site_outside_a_study_cannot_post_an_approval_of_it(hub):
    client, store = hub
    approval = seal(OUTSIDER, {"kind": "approval", "sender": "site_x", "nonce": "outsider-approval",
                               "issued_at": time.time(), "study": "study-1"}, {"approval": {}})
    response = post(client, "/v1/studies/study-1/approvals", approval.encode())
    assert response.status_code == 403 and store.events()[-1].kind == "not_in_study"
    assert store.approvals("study-1") == []
    assert client.get("/v1/studies").json()[0]["approved_by"] == []


@pytest.mark.parametrize("party, key", [("researcher", RESEARCHER), ("site_a", SITE), ("site_x", OUTSIDER)])
def test_an_enrolled_party_cannot_read_the_operators_event_log(hub, party, key):
    client, store = hub
    response = _get(client, "/v1/events", party, key)
    assert response.status_code == 403 and store.events()[-1].kind == "not_operator"
    assert "registered as" not in response.text
    operator = _get(client, "/v1/events", "operator", OPERATOR)
    assert operator.status_code == 200 and any(event["kind"] == "enrolled" for event in operator.json())
