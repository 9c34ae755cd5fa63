"""Red team: a hostile researcher's GLM formulas and broadcasts.

Each attack tries to run code on a node or to read one patient through a model column, and must
be refused with a named rule, with nothing run and no coefficient returned: formula escapes
(`formula_not_allowed`, by the researcher's own client and, sent raw, by every node), indicator
columns (`indicator_isolation`), the saturation guard in every round, and broadcasts the site
never released (`broadcast_*`).
"""

from __future__ import annotations

import re
import uuid

import numpy as np
import pandas as pd
import pytest

import medveil as mv
from medveil.analyses.base import BroadcastRefused, SiteContext, get_analysis
from medveil.analyses.formula import FormulaNotAllowed, parse_formula
from medveil.privacy.disclosure import DisclosurePolicy, DisclosureRefused

MARKER_NAME = "pwned"


def _site(seed: int, n: int, rare_stage: int, ages: list[int], first_id: int, flags: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    stage = ["I", "II", "III"] * ((n - rare_stage) // 3 + 1)
    frame = pd.DataFrame({
        "age": np.concatenate([rng.integers(40, 90, n - len(ages)), ages]).astype(float),
        "x": rng.normal(0.0, 1.0, n),
        "stage": (stage[:n - rare_stage] + ["IV"] * rare_stage),
        "flag": np.arange(n) < flags,
        "id": np.arange(first_id, first_id + n),
    })
    frame["y"] = 0.05 * frame["age"] + frame["x"] + rng.normal(0.0, 1.0, n)
    return frame


def _sites() -> dict[str, pd.DataFrame]:
    """site_a holds the one 97-year-old (and six aged 98+) and patient id 5; site_c holds three
    stage IV patients (the other sites twenty each) and two flagged rows."""
    return {
        "site_a": _site(1, 90, 20, [97, 98, 99, 100, 101, 102, 103], 1, 30),
        "site_b": _site(2, 80, 20, [], 1001, 30),
        "site_c": _site(3, 70, 3, [], 2001, 2),
    }


@pytest.fixture(scope="module")
def fed():
    with mv.Federation.simulate(_sites(), timeout=60) as federation:
        yield federation


@pytest.fixture(scope="module")
def marker(tmp_path_factory):
    return tmp_path_factory.mktemp("formula-attacks") / MARKER_NAME


def _escapes(path) -> list[str]:
    """Formula escapes through different Python features; evaluated, each would create `path`."""
    opened = f"open('{path}', 'w')"
    return [
        f"y ~ I(__import__('os').system('touch {path}'))",     # import and call
        f"y ~ I({opened})",                                     # a call to an unlisted builtin
        f"y ~ I(eval(\"{opened}\"))",                           # eval of a string
        f"y ~ I((lambda: {opened})())",                         # lambda
        f"y ~ I([{opened} for _ in 'a'])",                      # comprehension
        f"y ~ I((f := {opened}))",                              # walrus
        "y ~ I(x.__class__.__base__.__subclasses__())",         # attribute access
        f"y ~ x[{opened}]",                                     # subscript
        f"y ~ I(\U0001d5fc\U0001d5fd\U0001d5f2\U0001d5fb('{path}', 'w'))",  # mathematical letters NFKC-fold to 'open'
        "y ~ {" + opened + "}",                                 # formulaic's own Python block
        "y ~ I(" + "(" * 400 + opened + ")" * 400 + ")",        # huge nested expression
        f"y ~ C(stage, levels={opened})",                       # keyword argument
    ]


def _raw_task(fed, params: dict, broadcast: dict | None = None, task: str | None = None, step: int = 0,
              round_no: int = 0, study: str | None = None) -> str:
    """Seal and post a task as a hostile researcher would, bypassing the client's validation."""
    task = task or f"t-{uuid.uuid4().hex}"
    envelope = fed.session.grid.client.seal("task", {"params": params, "broadcast": broadcast or {}},
                                       study=study or fed.study.id,
                                       task=task, step=step, phase="compute", round=round_no, analysis="glm",
                                       dataset="default", recipients=fed.sites)
    fed.session.grid.client.post_message(envelope)
    return task


def _replies(fed, task: str, step: int, study: str | None = None) -> dict:
    """The verified replies of every site to a raw step (RefusedError on a refusal)."""
    return fed.session.grid.gather(task, step, fed.sites, timeout=fed.session.timeout, study_id=study)


# --- formula escapes -------------------------------------------------------------------------

@pytest.mark.parametrize("index", range(len(_escapes("m"))))
def test_formula_escape_is_refused_by_the_parser(index, marker):
    formula = _escapes(marker)[index]
    with pytest.raises(FormulaNotAllowed) as error:
        parse_formula(formula)
    assert error.value.rule == "formula_not_allowed"
    assert not marker.exists()


@pytest.mark.parametrize("index", range(len(_escapes("m"))))
def test_formula_escape_is_refused_by_the_researchers_client_before_sending(fed, index, marker):
    with pytest.raises(DisclosureRefused) as error:
        fed.glm(_escapes(marker)[index])
    assert error.value.rule == "formula_not_allowed"
    assert not marker.exists()


@pytest.mark.parametrize("index", range(len(_escapes("m"))))
def test_formula_escape_sent_raw_is_refused_by_every_node(fed, index, marker):
    task = _raw_task(fed, {"formula": _escapes(marker)[index]})
    with pytest.raises(mv.RefusedError) as error:
        _replies(fed, task, 0)
    assert {(site, rule) for site, rule, _ in error.value.refusals} == {(s, "formula_not_allowed") for s in fed.sites}
    assert not marker.exists()


def test_standardize_is_refused_as_it_would_not_equal_a_pooled_fit(fed):
    with pytest.raises(DisclosureRefused, match="pooled") as error:
        fed.glm("y ~ standardize(age)")
    assert error.value.rule == "formula_not_allowed"
    task = _raw_task(fed, {"formula": "y ~ standardize(age)"})
    with pytest.raises(mv.RefusedError) as refused:
        _replies(fed, task, 0)
    assert refused.value.rule == "formula_not_allowed"


# --- indicator columns -----------------------------------------------------------------------

@pytest.mark.parametrize(("formula", "site"), [
    ("y ~ I(age == 97)", "site_a"),                 # one patient's column
    ("I(age == 97) ~ 1", "site_a"),                 # one patient as the response
    ("y ~ age:I(id == 5)", "site_a"),               # a continuous column times a one-patient indicator
    ("y ~ x:I(id != 5)", "site_a"),                 # everyone but one patient
    ("y ~ I(age >= 97) + I(age > 97)", "site_a"),   # nested thresholds: their difference is one patient
    ("y ~ C(stage)", "site_c"),                     # a level three patients hold at this site
    ("y ~ x + x:C(stage)", "site_c"),               # the same level inside an interaction only
    ("y ~ flag", "site_c"),                         # a bool column two rows hold
    ("y ~ I(flag * x)", "site_c"),                  # the same bool column inside arithmetic
])
def test_indicator_isolation_refuses_columns_that_single_out_few_patients(fed, formula, site):
    with pytest.raises(mv.RefusedError) as error:
        fed.glm(formula)
    assert (site, "indicator_isolation") in {(s, rule) for s, rule, _ in error.value.refusals}
    detail = re.sub(r"'[^']*'", "", error.value.detail)  # the term quoted from the formula
    assert "fewer than 5 rows" in detail and set(re.findall(r"\d+", detail)) == {"5"}  # no count from the data


def test_honest_indicator_model_still_fits(fed):
    pooled = pd.concat(_sites().values(), ignore_index=True)
    result = fed.glm("y ~ x + I(age > 60) + x:I(age > 60)")
    sm = pytest.importorskip("statsmodels.api")
    reference = sm.GLM.from_formula("y ~ x + I(age > 60) + x:I(age > 60)", pooled).fit()
    expected = reference.params.rename(lambda name: name.replace("[T.True]", ""))  # patsy codes a bool as a level
    np.testing.assert_allclose(result.params, expected.reindex(result.params.index), rtol=1e-6)


# --- unit level: the same rules at one site ----------------------------------------------------

GLM = get_analysis("glm")
POLICY = DisclosurePolicy()


def _fit_rounds(formula: str, frame: pd.DataFrame, policies: list[DisclosurePolicy]) -> None:
    """Run one site's rounds 0.. with the given policy per round (as a steward may tighten it)."""
    params = GLM.parse_params({"formula": formula})
    levels = GLM.local(params, 0, {}, SiteContext("s", frame, policies[0], {}, {})).public["levels"]
    scratch: dict = {}
    broadcasts = [{"levels": levels}, {"levels": levels, "ybar": 1.0, "ybar_weighted": 1.0}]
    for round_no, (policy, broadcast) in enumerate(zip(policies[1:], broadcasts), start=1):
        GLM.local(params, round_no, broadcast, SiteContext("s", frame, policy, scratch, {}))


def test_saturation_guard_runs_in_every_fit_round_not_only_the_first():
    frame = _sites()["site_b"]
    _fit_rounds("y ~ x + age", frame, [POLICY, POLICY, POLICY])
    tightened = DisclosurePolicy(max_parameter_ratio=0.01)
    with pytest.raises(DisclosureRefused) as error:
        _fit_rounds("y ~ x + age", frame, [POLICY, POLICY, tightened])
    assert error.value.rule == "saturation"


def test_rare_reference_level_is_caught_though_it_has_no_column():
    frame = _sites()["site_c"].assign(stage=lambda f: f["stage"].replace({"IV": "0"}))
    params = GLM.parse_params({"formula": "y ~ C(stage)"})
    with pytest.raises(DisclosureRefused) as error:
        GLM.local(params, 1, {"levels": {"stage": ["0", "I", "II", "III"]}}, SiteContext("s", frame, POLICY, {}, {}))
    assert error.value.rule == "indicator_isolation"


def test_interaction_column_is_checked_beside_its_factors():
    """I(age >= 97) holds seven rows, but dose is nonzero for one of them: their product is one patient."""
    frame = _sites()["site_a"].assign(dose=lambda f: np.where(f["age"] == 97, 2.0, 0.0) + np.where(f["age"] < 97, 1.0, 0.0))
    params = GLM.parse_params({"formula": "y ~ dose + dose:I(age >= 97)"})
    with pytest.raises(DisclosureRefused, match="dose:I") as error:
        GLM.local(params, 1, {"levels": {}}, SiteContext("s", frame, POLICY, {}, {}))
    assert error.value.rule == "indicator_isolation"


def test_a_level_this_site_does_not_hold_is_no_disclosure():
    params = GLM.parse_params({"formula": "y ~ C(stage)"})
    frame = _sites()["site_b"][lambda f: f["stage"] != "IV"]
    release = GLM.local(params, 1, {"levels": {"stage": ["I", "II", "III", "IV"]}}, SiteContext("s", frame, POLICY, {}, {}))
    assert "C(stage)[T.IV]" in release.public["columns"]


# --- broadcasts the site never released -------------------------------------------------------

def _memory(levels: dict, columns: list[str] | None = None) -> dict:
    memory = {"released": {0: {"levels": levels}}}
    if columns is not None:
        memory["released"][1] = {"rows": 80, "rows_dropped": 0, "columns": columns}
    return memory


PARAMS = GLM.parse_params({"formula": "y ~ x + C(stage)"})
OWN = {"stage": ["I", "II", "III"]}
AGREED = {"stage": ["I", "II", "III", "IV"]}
COLUMNS = ["Intercept", "C(stage)[T.II]", "C(stage)[T.III]", "C(stage)[T.IV]", "x"]


@pytest.mark.parametrize(("round_no", "broadcast", "rule"), [
    (0, {"levels": OWN}, "unexpected_broadcast"),
    (1, {"levels": {"stage": ["IV"]}}, "broadcast_not_released"),                 # drops the site's own levels
    (1, {"levels": {**AGREED, "x": ["1", "2"]}}, "broadcast_not_released"),      # turns a number into levels
    (1, {"levels": {}}, "broadcast_not_released"),
    (1, {"levels": {"stage": ["II", "I", "III"]}}, "broadcast_malformed"),       # unsorted
    (1, {"levels": {"stage": ["I", "I", "II", "III"]}}, "broadcast_malformed"),  # repeated
    (1, {"levels": {"stage": ["I", "II", "III", "x" * 500]}}, "broadcast_malformed"),
    (1, {"levels": {"stage": [str(i) for i in range(5000)]}}, "broadcast_malformed"),
    (1, {"levels": {"stage": ["I", "II", "III", 4]}}, "broadcast_malformed"),
    (1, {"levels": AGREED, "beta": [0.0] * 5}, "broadcast_malformed"),            # a key round 1 never takes
    (1, {"levels": AGREED, "filter": "age == 97"}, "broadcast_malformed"),
])
def test_round_0_and_1_broadcasts_are_checked_against_round_0(round_no, broadcast, rule):
    with pytest.raises(BroadcastRefused) as error:
        GLM.check_broadcast(PARAMS, round_no, broadcast, _memory(OWN))
    assert error.value.rule == rule


@pytest.mark.parametrize(("round_no", "broadcast", "rule"), [
    (2, {"levels": AGREED, "ybar": float("nan"), "ybar_weighted": 1.0}, "broadcast_malformed"),
    (2, {"levels": AGREED, "ybar": "1.0", "ybar_weighted": 1.0}, "broadcast_malformed"),
    (2, {"levels": AGREED, "ybar": 1.0}, "broadcast_malformed"),
    (2, {"levels": {"stage": ["I", "II", "III", "IV", "V"]}, "ybar": 1.0, "ybar_weighted": 1.0}, "broadcast_changed"),
    (3, {"levels": AGREED, "beta": np.zeros(4)}, "broadcast_malformed"),               # not one per released column
    (3, {"levels": AGREED, "beta": np.array([0, 0, np.inf, 0, 0.0])}, "broadcast_malformed"),
    (3, {"levels": AGREED, "beta": ["0"] * 5}, "broadcast_malformed"),
    (3, {"levels": AGREED, "beta": np.zeros(5), "ybar": 1.0}, "broadcast_malformed"),
    (4, {"levels": {"stage": ["I", "II", "III"]}, "beta": np.zeros(5)}, "broadcast_changed"),
])
def test_later_broadcasts_must_keep_the_pinned_levels_and_the_released_design(round_no, broadcast, rule):
    memory = _memory(OWN, COLUMNS)
    GLM.check_broadcast(PARAMS, 1, {"levels": AGREED}, memory)
    with pytest.raises(BroadcastRefused) as error:
        GLM.check_broadcast(PARAMS, round_no, broadcast, memory)
    assert error.value.rule == rule


def test_honest_broadcasts_pass():
    memory = _memory(OWN, COLUMNS)
    GLM.check_broadcast(PARAMS, 0, {}, memory)
    GLM.check_broadcast(PARAMS, 1, {"levels": AGREED}, memory)
    GLM.check_broadcast(PARAMS, 2, {"levels": AGREED, "ybar": 1.5, "ybar_weighted": 1.25}, memory)
    GLM.check_broadcast(PARAMS, 3, {"levels": AGREED, "beta": np.zeros(5)}, memory)


def test_levels_the_node_never_released_are_refused_end_to_end(fed):
    """Without secure aggregation in the way (whose own guard would refuse a raw step first)."""
    study = fed.network.add_study("glm-plain", fed.study.datasets, secure_aggregation=False).id
    task = _raw_task(fed, {"formula": "y ~ x + C(stage)"}, study=study)
    assert len(_replies(fed, task, 0, study=study)) == 3
    _raw_task(fed, {"formula": "y ~ x + C(stage)"}, {"levels": {"stage": ["IV"], "age": ["97"]}}, task, 1, 1,
              study=study)
    with pytest.raises(mv.RefusedError) as error:
        _replies(fed, task, 1, study=study)
    assert {rule for _, rule, _ in error.value.refusals} == {"broadcast_not_released"}
