"""Secure aggregation end to end: what the hub sees, dropouts, the threshold, and turning it off.

(Attacks on the protocol by a hostile researcher or hub are in tests/security/test_secure_aggregation_attacks.py.)
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import medveil as mv
from medveil.analyses.base import SiteContext, get_analysis
from medveil.crypto.secagg import encode_fixed, flatten
from medveil.privacy.disclosure import DisclosurePolicy
from medveil.runtime.audit import read_audit_log
from medveil.runtime.session import SecureAggregationError
from medveil.runtime.wire import open_envelope

pytestmark = pytest.mark.e2e
EDGES = [float(e) for e in np.linspace(-3, 3, 13)]


def _sites(n: int, rows: int = 300, seed: int = 1) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    return {f"site_{i}": pd.DataFrame({"x": rng.normal(size=rows), "y": rng.normal(5, 2, rows)}) for i in range(n)}


def _drop_at_compute(fed: mv.Federation, sites: list[str]) -> None:
    """These nodes crash after sending their key shares: they never answer a compute step."""
    for site in sites:
        node = fed.network.nodes[site].node
        handle = node.handle
        node.handle = lambda raw, handle=handle: None if open_envelope(raw).header.get("phase") == "compute" else handle(raw)


def test_hub_sees_only_uniform_masked_vectors_that_change_every_round():
    sites = _sites(3)
    with mv.Federation.simulate(sites, record_hub_traffic=True) as fed:
        result = fed.describe(["x", "y"])
        fed.histogram("x", EDGES)
        fed.histogram("x", EDGES)
        traffic = fed.hub_traffic()
    pooled = pd.concat(sites.values())
    np.testing.assert_allclose(result["mean"], pooled[["x", "y"]].mean(), rtol=1e-12)
    np.testing.assert_allclose(result["sd"], pooled[["x", "y"]].std(), rtol=1e-12)
    replies = traffic[(traffic["kind"] == "reply")]
    masked = replies[replies["body"].map(lambda body: "masked" in body)]
    assert len(masked) == 3 * 3 + 3 * 2
    assert not replies["body"].map(lambda body: bool(body.get("sums"))).any()
    describe, histogram = get_analysis("describe"), get_analysis("histogram")
    for site, frame in sites.items():
        own = histogram.local(histogram.parse_params({"variable": "x", "edges": EDGES}), 0, {},
                              SiteContext(site, frame, DisclosurePolicy(), {}, {}))
        plain = encode_fixed(flatten(own.sums)[0]).ravel()
        vectors = [np.asarray(b["masked"]) for b in masked[masked["sender"] == site]["body"]]
        histogram_vectors = [v for v in vectors if v.size == plain.size]
        assert len(histogram_vectors) == 2
        assert not np.array_equal(histogram_vectors[0], histogram_vectors[1])
        assert all(not np.array_equal(v, plain) for v in histogram_vectors)
        first = describe.local(describe.parse_params({"variables": ["x", "y"]}), 0, {},
                               SiteContext(site, frame, DisclosurePolicy(), {}, {}))
        assert not any(np.array_equal(v, encode_fixed(flatten(first.sums)[0]).ravel()) for v in vectors)
    big = np.concatenate([np.asarray(b["masked"]) for b in masked["body"]]).view(np.uint8)
    counts = np.bincount(big, minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-4


def test_five_sites_one_dropping_after_sharing_keys_still_give_the_exact_sum():
    sites = _sites(5, seed=2)
    with mv.Federation.simulate(sites, timeout=3, record_hub_traffic=True, allow_dropouts=True) as fed:
        _drop_at_compute(fed, ["site_3"])
        with pytest.warns(RuntimeWarning, match="site_3 dropped out"):
            result = fed.histogram("x", EDGES)
        phases = fed.hub_traffic()["body"]
    survivors = pd.concat([frame for name, frame in sites.items() if name != "site_3"])["x"]
    inner, _ = np.histogram(survivors, bins=EDGES)
    released = ~result["suppressed"].to_numpy()[1:-1]
    assert released.sum() >= 6
    assert (result["count"].to_numpy(dtype=float)[1:-1][released] == inner[released]).all()
    assert result.attrs["provenance"]["sites"] == ["site_0", "site_1", "site_2", "site_4"]
    revealed = [body["public"]["dropped_seeds"] for body in phases if "dropped_seeds" in body.get("public", {})]
    assert len(revealed) == 4 and all(list(seeds) == ["site_3"] for seeds in revealed)


def test_three_sites_with_threshold_two_survive_one_dropout():
    """Each submitter signs the dropout set in a consistency step before anything is revealed."""
    sites = _sites(3, seed=8)
    with mv.Federation.simulate(sites, timeout=3, record_hub_traffic=True, allow_dropouts=True) as fed:
        assert fed.study.threshold() == 2
        _drop_at_compute(fed, ["site_1"])
        with pytest.warns(RuntimeWarning, match="site_1 dropped out"):
            result = fed.describe(["x", "y"])
        bodies = fed.hub_traffic()["body"]
    survivors = pd.concat([sites["site_0"], sites["site_2"]])
    np.testing.assert_allclose(result["mean"], survivors[["x", "y"]].mean(), rtol=1e-12)
    np.testing.assert_allclose(result["sd"], survivors[["x", "y"]].std(), rtol=1e-12)
    assert result.attrs["provenance"]["sites"] == ["site_0", "site_2"]
    agreed = [body["public"] for body in bodies if "signature" in body.get("public", {})]
    assert len(agreed) == 2 and all(public["dropped"] == ["site_1"] for public in agreed)
    revealed = [body["public"]["dropped_seeds"] for body in bodies if body.get("public", {}).get("dropped_seeds")]
    assert len(revealed) == 2 and all(list(seeds) == ["site_1"] for seeds in revealed)


def test_below_the_threshold_the_round_aborts_and_nothing_is_revealed():
    with mv.Federation.simulate(_sites(5, seed=3), timeout=2, record_hub_traffic=True, allow_dropouts=True) as fed:
        assert fed.study.threshold() == 3
        _drop_at_compute(fed, ["site_1", "site_2", "site_4"])
        with pytest.raises(SecureAggregationError, match="threshold 3"):
            fed.histogram("x", EDGES)
        assert not any({"self_mask_shares", "dropped_seeds"} & set(body.get("public", {}))
                       for body in fed.hub_traffic()["body"])


def test_turning_secure_aggregation_off_is_recorded():
    with mv.Federation.simulate(_sites(3, seed=4), secure_aggregation=False, record_hub_traffic=True) as fed:
        result = fed.describe("x")
        assert result.attrs["provenance"]["secure_aggregation"] is False
        bodies = fed.hub_traffic()["body"]
        assert any("sums" in body and body["sums"] for body in bodies)
        decisions = [e for e in read_audit_log(fed.network.workdir / "site_0" / "state" / "audit.jsonl")
                     if e["kind"] == "decision"]
        assert decisions and all(e["secure_aggregation"] is False for e in decisions)


def test_a_session_reuses_its_key_set_across_tasks_and_dropouts():
    """Dropout recovery reveals pairwise seeds of one step only, so the key set outlives it."""
    with mv.Federation.simulate(_sites(4, seed=5), timeout=3, record_hub_traffic=True, allow_dropouts=True) as fed:
        fed.histogram("x", EDGES)
        fed.describe("y")
        fed.histogram("y", EDGES)

        def key_steps() -> int:
            return sum("secagg_public" in body.get("public", {}) for body in fed.hub_traffic()["body"])

        assert key_steps() == 4  # one key exchange for three analyses
        _drop_at_compute(fed, ["site_3"])
        with pytest.warns(RuntimeWarning):
            fed.histogram("x", EDGES)
        del fed.network.nodes["site_3"].node.handle  # the site comes back
        result = fed.histogram("x", EDGES)
        assert key_steps() == 4
        assert result.attrs["provenance"]["sites"] == ["site_0", "site_1", "site_2", "site_3"]


def test_without_allow_dropouts_a_silent_site_fails_the_run_by_name():
    with mv.Federation.simulate(_sites(3, seed=6), timeout=2) as fed:
        fed.histogram("x", EDGES)
        _drop_at_compute(fed, ["site_1"])
        with pytest.raises(mv.SiteTimeoutError, match="site_1"):
            fed.histogram("x", EDGES)


def test_a_dropout_in_a_multi_round_analysis_continues_with_the_survivors():
    sites = _sites(4, seed=7)
    with mv.Federation.simulate(sites, timeout=3, allow_dropouts=True) as fed:
        _drop_at_compute(fed, ["site_2"])
        with pytest.warns(RuntimeWarning, match="site_2"):
            result = fed.describe(["x", "y"])
    survivors = pd.concat([frame for name, frame in sites.items() if name != "site_2"])
    np.testing.assert_allclose(result["mean"], survivors[["x", "y"]].mean(), rtol=1e-12)
    np.testing.assert_allclose(result["sd"], survivors[["x", "y"]].std(), rtol=1e-12)
    assert result.attrs["provenance"]["sites"] == ["site_0", "site_1", "site_3"]
