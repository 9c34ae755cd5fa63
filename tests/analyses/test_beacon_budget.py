"""A Shringarpure-Bustamante membership probe through `fed.beacon` is stopped by the query budget
before its likelihood ratio reaches significance; without the budget it would get there."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import medveil as mv
from medveil.analyses.beacon import BUDGET_GROUP
from medveil.privacy.beacon_risk import (
    answer_probabilities,
    lrt,
    null_threshold,
    simulate_power,
)
from medveil.privacy.disclosure import DisclosurePolicy
from medveil.runtime.audit import read_audit_log
from medveil.runtime.grid import RefusedError

VARIANT_QUERY_BUDGET = DisclosurePolicy().variant_query_budget

bed_reader = pytest.importorskip("bed_reader")

SITES = ("site_a", "site_b", "site_c")
PER_SITE, VARIANTS, MIN_COUNT = 400, 1000, 5


def write_sites(directory, seed: int = 13, variants: int = VARIANTS, per_site: int = PER_SITE):
    """Three sites of `per_site` samples over `variants` rare variants with frequencies f ~
    log-uniform[1e-4, 1e-2]; the target (site_a's first sample) carries every ALT allele once.
    Returns the sites (a table "cohort" of IIDs and a PLINK dataset "geno" each), f, the keys
    and each site's dosages of ALT."""
    rng = np.random.default_rng(seed)
    f = np.exp(rng.uniform(np.log(1e-4), np.log(1e-2), variants))
    keys = [f"1:{1000 + 10 * j}:G:A" for j in range(variants)]
    sites, dosages = {}, {}
    for s, site in enumerate(SITES):
        alt = rng.binomial(2, f, size=(per_site, variants)).astype(np.float32)
        if s == 0:
            alt[0] = 1.0  # the target
        iid = np.array([f"{site}-{i}" for i in range(per_site)])
        # .bim: A1 = ALT (A), A2 = REF (G); site_b lists them the other way round (A1 = REF)
        swap = site == "site_b"
        bed_reader.to_bed(directory / f"{site}.bed", 2 - alt if swap else alt, properties={
            "iid": iid, "fid": iid, "sid": [f"v{j}" for j in range(variants)], "chromosome": ["1"] * variants,
            "bp_position": np.arange(variants) * 10 + 1000, "allele_1": ["G" if swap else "A"] * variants,
            "allele_2": ["A" if swap else "G"] * variants})
        sites[site] = {"cohort": pd.DataFrame({"IID": iid}), "geno": str(directory / f"{site}.bed")}
        dosages[site] = alt
    return sites, f, keys, dosages


def expected_answer(dosages: dict[str, np.ndarray], j: int) -> tuple[bool, int]:
    """What the beacon must say for variant j: any site with >= MIN_COUNT carriers; the sum of
    the per-site carrier counts that reach MIN_COUNT."""
    counts = [int((d[:, j] >= 1).sum()) for d in dosages.values()]
    kept = [c for c in counts if c >= MIN_COUNT]
    return bool(kept), sum(kept)


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    directory = tmp_path_factory.mktemp("beacon")
    sites, f, keys, dosages = write_sites(directory)
    policy = DisclosurePolicy(min_cell_count=MIN_COUNT)
    with mv.Federation.in_process(sites, policy=policy) as fed:
        answers = [fed.beacon(key, "boolean", genotypes="geno", data="cohort") for key in keys[:VARIANT_QUERY_BUDGET]]
        with pytest.raises(RefusedError) as refused:
            fed.beacon(keys[VARIANT_QUERY_BUDGET], "boolean", genotypes="geno", data="cohort")
        audits = {site: read_audit_log(node.config.state_dir / "audit.jsonl") for site, node in fed.network.nodes.items()}
    return f, dosages, answers, refused.value, audits


def test_the_budget_is_twenty():
    assert VARIANT_QUERY_BUDGET == 20


def test_beacon_answers_what_the_genotypes_say(probe):
    _, dosages, answers, _, _ = probe
    assert all(set(a) == {"exists"} for a in answers)
    assert [a["exists"] for a in answers] == [expected_answer(dosages, j)[0] for j in range(len(answers))]


def test_query_21_is_refused_at_every_site_and_audited(probe):
    _, _, _, refused, audits = probe
    assert sorted(site for site, _, _ in refused.refusals) == list(SITES)
    assert {rule for _, rule, _ in refused.refusals} == {"query_budget_exhausted"}
    for site, entries in audits.items():
        charges = [e for e in entries if e["kind"] == "query_budget"]
        assert [e["charged"] for e in charges] == [True] * VARIANT_QUERY_BUDGET + [False], site
        assert charges[-1]["used"] == VARIANT_QUERY_BUDGET and charges[-1]["group"] == BUDGET_GROUP
        assert any(e["kind"] == "refusal" and e["rule"] == "query_budget_exhausted" for e in entries), site
        # nothing was computed for the refused query: 20 releases, no 21st
        assert sum(e["kind"] == "release" and e.get("analysis") == "beacon" for e in entries) == VARIANT_QUERY_BUDGET


def test_the_likelihood_ratio_after_the_budget_is_short_of_significance(probe):
    f, _, answers, _, _ = probe
    p0, p1 = answer_probabilities(f, [PER_SITE] * 3, MIN_COUNT, target_site=0)
    k = VARIANT_QUERY_BUDGET
    observed = lrt([a["exists"] for a in answers], p0[:k], p1[:k])
    assert observed > null_threshold(p0, p1, k, alpha=0.05, reps=4000, seed=1)


def test_without_the_budget_the_probe_would_reach_significance_and_at_the_budget_it_is_weak(probe):
    f = probe[0]
    p0, p1 = answer_probabilities(f, [PER_SITE] * 3, MIN_COUNT, target_site=0)
    curve = simulate_power(p0, p1, alpha=0.05, reps=4000, seed=2)
    reached = curve.significant_at()
    assert reached is not None and VARIANT_QUERY_BUDGET < reached <= VARIANTS  # teeth: a longer probe wins
    assert curve.power[VARIANT_QUERY_BUDGET - 1] <= 0.2
    assert curve.power[-1] >= 0.9
    # Lambda_k takes few values at small k, so the quantile threshold is conservative, never liberal
    assert curve.false_positive[VARIANT_QUERY_BUDGET - 1] <= 0.06 and curve.false_positive[-1] <= 0.06
