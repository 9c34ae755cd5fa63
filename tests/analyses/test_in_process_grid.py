"""Every registered analysis gives identical results over the InProcessGrid and over real loopback
HTTP (hub and nodes in threads), secure aggregation on: the Grid is the only thing that differs."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pandas as pd
import pytest

import medveil as mv
from medveil.analyses.base import registered_names
from medveil.privacy.disclosure import DisclosurePolicy

bed_reader = pytest.importorskip("bed_reader")

SITES = ("site_a", "site_b", "site_c")
ANALYSES = ["coxph", "crosstab", "describe", "glm", "gwas", "histogram", "kaplan_meier", "logrank", "pca", "ping"]


def _sites(directory) -> dict[str, dict[str, Any]]:
    """Three sites, each with a clinical table and a PLINK fileset of the same samples."""
    rng = np.random.default_rng(19)
    sites = {}
    for site, n in zip(SITES, (260, 190, 150)):
        age = rng.normal(60, 9, n)
        stage = rng.choice(["I", "II", "III"], n, p=[0.4, 0.35, 0.25])
        sex = rng.choice(["f", "m"], n)
        risk = -6 + 0.09 * age + (stage == "III") * 0.8
        iid = np.array([f"{site}-{i}" for i in range(n)])
        frame = pd.DataFrame({
            "IID": iid, "age": age, "bmi": rng.normal(26, 4, n), "stage": stage, "sex": sex,
            "death": (rng.random(n) < 1 / (1 + np.exp(-risk))).astype(int),
            "time": np.ceil(rng.exponential(900, n)), "event": (rng.random(n) < 0.6).astype(int),
            "case": rng.integers(0, 2, n),
        })
        m = 120
        dosages = rng.binomial(2, rng.uniform(0.1, 0.5, m), (n, m)).astype(np.float32)
        props = dict(iid=iid, fid=iid, sid=[f"rs{j}" for j in range(m)], chromosome=np.repeat(["1"], m),
                     bp_position=np.arange(m) * 100 + 1000, allele_1=["A"] * m, allele_2=["G"] * m)
        bed_reader.to_bed(directory / f"{site}.bed", dosages, properties=props)
        sites[site] = {"default": frame, "geno": str(directory / f"{site}.bed")}
    return sites


CALLS = {
    "describe": lambda fed: fed.describe(["age", "bmi"], data="default"),
    "crosstab": lambda fed: fed.crosstab("stage", "sex", data="default"),
    "histogram": lambda fed: fed.histogram("age", [30, 50, 60, 70, 90], data="default"),
    "glm": lambda fed: fed.glm("death ~ age + C(stage) + sex", family="binomial", data="default"),
    "coxph": lambda fed: fed.coxph("time", "event", ["age", "bmi"], data="default"),
    "kaplan_meier": lambda fed: fed.kaplan_meier("time", "event", by="sex", data="default"),
    "logrank": lambda fed: fed.logrank("time", "event", "sex", data="default"),
    "gwas": lambda fed: fed.gwas("geno", "case", data="default", test="logistic", covariates=["age"]),
    "pca": lambda fed: fed.pca("geno", components=2, data="default"),
    "ping": lambda fed: fed.ping(data="default"),
}


@pytest.fixture(scope="module")
def federations(tmp_path_factory):
    sites = _sites(tmp_path_factory.mktemp("genotypes"))
    policy = DisclosurePolicy(differencing_guard=False)  # ten analyses of one table; the guard is tested elsewhere
    with mv.Federation.in_process(sites, policy=policy) as in_process, \
            mv.Federation.simulate(sites, policy=policy, timeout=120) as over_http:
        yield in_process, over_http


def _same(a: Any, b: Any, where: str) -> None:
    """Equal to the last digit (NaN equal to NaN), provenance apart (task ids differ)."""
    assert type(a) is type(b), where
    if isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=where)
        _same({k: v for k, v in a.attrs.items() if k != "provenance"},
              {k: v for k, v in b.attrs.items() if k != "provenance"}, f"{where}.attrs")
    elif isinstance(a, pd.Series):
        pd.testing.assert_series_equal(a, b, check_exact=True, obj=where)
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif dataclasses.is_dataclass(a):
        for item in dataclasses.fields(a):
            if item.name != "provenance":
                _same(getattr(a, item.name), getattr(b, item.name), f"{where}.{item.name}")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def test_the_list_covers_every_registered_analysis():
    assert sorted(CALLS) == ANALYSES == [name for name in registered_names() if name in ANALYSES]
    assert set(registered_names()) <= set(ANALYSES) | {"grid_echo", "relay_secret"}  # test-only analyses


@pytest.mark.parametrize("name", ANALYSES)
def test_identical_over_the_in_process_grid_and_http(federations, name):
    in_process, over_http = federations
    assert in_process.study.secure_aggregation and over_http.study.secure_aggregation
    local, remote = CALLS[name](in_process), CALLS[name](over_http)
    _same(local, remote, name)
    if name != "ping":
        provenance = local.attrs["provenance"] if isinstance(local, pd.DataFrame) else local.provenance
        assert provenance["secure_aggregation"] is True and provenance["sites"] == list(SITES)
