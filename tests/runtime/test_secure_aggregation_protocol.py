"""Secure aggregation between nodes and the coordinator, without HTTP: the sum and nothing else.

(Named *_protocol so that it does not collide with tests/e2e/test_secure_aggregation.py: the test
folders have no __init__.py, so two test modules with one basename break collection.)
"""

from __future__ import annotations

import base64
import math

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag

from medveil.crypto import secagg
from medveil.runtime.secure_aggregation import (
    CoordinatorState,
    NodeTaskKeys,
    mask_context,
    node_mask,
    node_new_keys,
    node_reveal,
    node_shares,
)

SITES = ["site_a", "site_b", "site_c", "site_d"]
TASK = "task-0123"
STEP = 3


class _Envelope:
    """Stands in for the signed envelope; the coordinator only keeps its encoding."""

    def __init__(self, site: str):
        self.site = site

    def encode(self) -> bytes:
        return f"envelope of {self.site}".encode()


def setup(threshold: int):
    """Steps "keys" and "shares" for all sites; returns the nodes' keys, the coordinator, the share bodies."""
    keys, replies = {}, {}
    for site in SITES:
        keys[site], public = node_new_keys()
        replies[site] = (_Envelope(site), {"public": public})
    state = CoordinatorState(TASK, list(SITES), threshold)
    state.record_keys(replies)
    assert state.participants == sorted(SITES)
    peer_keys = {site: base64.b64decode(body["public"]["secagg_public"]) for site, (_, body) in replies.items()}
    assert peer_keys == state.public_keys
    share_bodies = {site: node_shares(keys[site], site, TASK, peer_keys, threshold) for site in SITES}
    state.record_shares({site: (None, {"public": body}) for site, body in share_bodies.items()})
    return keys, state, share_bodies


def site_sums(seed: int) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = {}
    for site in SITES:
        x = rng.normal(size=(50, 4))
        out[site] = {"xtwx": x.T @ x * 1e3, "xtwz": x.T @ rng.normal(size=50), "n": np.array(50.0),
                     "empty": np.zeros((0, 3))}
    return out


def reference(sums: dict[str, dict[str, np.ndarray]], sites: list[str]) -> dict[str, np.ndarray]:
    """Correctly rounded float sums (math.fsum), the exact reference the fixed-point total must match."""
    names = sums[sites[0]]
    return {name: np.array([math.fsum(sums[s][name].flat[i] for s in sites)
                            for i in range(sums[sites[0]][name].size)]).reshape(sums[sites[0]][name].shape)
            for name in names}


def assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], parties: int) -> None:
    assert set(got) == set(want)
    for name in want:
        assert got[name].shape == want[name].shape
        error = np.abs(got[name] - want[name])
        assert np.all(error <= 1e-12 * np.abs(want[name]) + parties * 2.0**-53), name


def test_share_bodies_address_every_peer():
    keys, state, share_bodies = setup(threshold=3)
    for site, body in share_bodies.items():
        assert set(body["shares"]) == set(SITES) - {site}
        assert keys[site].peers == state.public_keys
    assert len({keys[site].private for site in SITES}) == len(SITES)


def test_combine_returns_the_sum():
    keys, state, _ = setup(threshold=3)
    sums = site_sums(1)
    masked = {site: node_mask(keys[site], site, TASK, STEP, state.participants, sums[site]) for site in SITES}
    for site, body in masked.items():
        plain = secagg.encode_fixed(secagg.flatten(sums[site])[0]).ravel()
        assert body["masked"].shape == plain.shape
        assert not np.any(body["masked"] == plain)  # no site's vector travels in the clear
        assert body["layout"] == [["empty", [0, 3]], ["n", []], ["xtwx", [4, 4]], ["xtwz", [4]]]
    total = state.combine(masked, TASK, STEP, {})
    assert_close(total, reference(sums, SITES), len(SITES))
    assert total["n"] == 200.0


def test_combine_at_another_step_does_not_unmask():
    keys, state, _ = setup(threshold=3)
    sums = site_sums(2)
    masked = {site: node_mask(keys[site], site, TASK, STEP if site != "site_b" else STEP + 1,
                              state.participants, sums[site]) for site in SITES}
    total = state.combine(masked, TASK, STEP, {})
    assert not np.allclose(total["xtwx"], reference(sums, SITES)["xtwx"])


@pytest.mark.parametrize("threshold, dropped", [(3, ["site_c"]), (3, ["site_a"]), (2, ["site_b", "site_d"])])
def test_combine_recovers_the_survivors_sum_after_a_dropout(threshold, dropped):
    keys, state, _ = setup(threshold)
    sums = site_sums(3)
    survivors = [site for site in SITES if site not in dropped]
    # the dropped sites took part in the key exchange, so the survivors mask against them too
    masked = {site: node_mask(keys[site], site, TASK, STEP, state.participants, sums[site]) for site in survivors}
    with pytest.raises(ValueError):
        state.combine(masked, TASK, STEP, {})  # below the threshold nothing is recovered
    request = state.unmask_request(dropped, survivors)
    assert set(request["ciphertexts"]) == set(survivors)
    revealed = {}
    for site in survivors:
        body = node_reveal(keys[site], site, TASK, dropped, request["ciphertexts"][site], submitted=set(survivors))
        assert set(body["revealed"]) == set(dropped)
        revealed[site] = body["revealed"]
    total = state.combine(masked, TASK, STEP, revealed)
    assert_close(total, reference(sums, survivors), len(survivors))
    # exactly `threshold` helpers are enough
    helpers = {site: revealed[site] for site in survivors[:threshold]}
    assert_close(state.combine(masked, TASK, STEP, helpers), reference(sums, survivors), len(survivors))


def test_revealed_shares_reconstruct_the_dropped_key():
    keys, state, _ = setup(threshold=3)
    survivors = ["site_a", "site_b", "site_d"]
    request = state.unmask_request(["site_c"], survivors)
    order = sorted(SITES)
    shares = {order.index(site) + 1: int(node_reveal(keys[site], site, TASK, ["site_c"], request["ciphertexts"][site],
                                                     submitted=set(survivors))["revealed"]["site_c"], 16)
              for site in survivors}
    assert secagg.combine_secret(shares, 3) == keys["site_c"].private
    two = dict(list(shares.items())[:2])  # below the threshold: a line through two points, not the key
    assert secagg.combine_secret(two, 2, length=66) != keys["site_c"].private.rjust(66, b"\0")


@pytest.mark.parametrize("dropped", [["site_b"], ["site_c", "site_b"]])
def test_node_refuses_to_reveal_a_submitted_site(dropped):
    keys, state, _ = setup(threshold=2)
    request = state.unmask_request(["site_b", "site_c"], ["site_a"])
    with pytest.raises(PermissionError, match="site_b"):
        node_reveal(keys["site_a"], "site_a", TASK, dropped, request["ciphertexts"]["site_a"],
                    submitted={"site_a", "site_b", "site_d"})


def test_reveal_of_a_misaddressed_share_fails():
    keys, state, _ = setup(threshold=2)
    request = state.unmask_request(["site_c"], ["site_a", "site_b"])
    with pytest.raises(InvalidTag):  # site_b's ciphertext is not addressed to site_a
        node_reveal(keys["site_a"], "site_a", TASK, ["site_c"], request["ciphertexts"]["site_b"], submitted=set())


def test_node_keys_survive_the_store():
    keys, _, _ = setup(threshold=2)
    restored = NodeTaskKeys.from_json(keys["site_a"].to_json())
    assert restored.private == keys["site_a"].private and restored.peers == keys["site_a"].peers
    assert restored.secret_with("site_b") == keys["site_b"].secret_with("site_a")


def test_combine_refuses_mixed_or_mismatched_bodies():
    keys, state, _ = setup(threshold=2)
    sums = site_sums(4)
    masked = {site: node_mask(keys[site], site, TASK, STEP, state.participants, sums[site]) for site in SITES}
    with pytest.raises(ValueError, match="some sites"):
        state.combine({**masked, "site_d": {"public": {}}}, TASK, STEP, {})
    other = node_mask(keys["site_d"], "site_d", TASK, STEP, state.participants, {"other": np.zeros(4)})
    with pytest.raises(ValueError, match="layouts"):
        state.combine({**masked, "site_d": other}, TASK, STEP, {})
    assert state.combine({site: {} for site in SITES}, TASK, STEP, {}) == {}


def test_mask_context_separates_steps_and_tasks():
    assert len({mask_context(TASK, 0), mask_context(TASK, 1), mask_context("other", 0)}) == 3


def test_a_key_set_is_spent_once_shares_were_revealed():
    keys, state, _ = setup(3)
    request = state.unmask_request(["site_c"], ["site_a", "site_b", "site_d"])
    node_reveal(keys["site_a"], "site_a", TASK, ["site_c"], request["ciphertexts"]["site_a"], submitted=set())
    with pytest.raises(PermissionError, match="spent"):
        node_mask(keys["site_a"], "site_a", TASK, STEP, state.participants, {"v": np.zeros(3)})
