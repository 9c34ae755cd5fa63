"""A per-recipient exchange through the hub: site_a seals a value to site_b, the researcher only
forwards it, site_b opens it and proves it did; the hub relays nothing but ciphertext, and a
ciphertext altered on the way is refused by the recipient (rule payload_forged)."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pandas as pd
import pytest

import medveil as mv
from medveil.analyses import base
from medveil.analyses.base import Aggregated, Analysis, Finished, NextRound, Params, Release

pytestmark = pytest.mark.e2e

SECRET = b"site_a's private value 7f3a9c41d2"


class RelayParams(Params):
    pass


class RelaySecret(Analysis[RelayParams]):
    """Test-only two-party step: round 0, site_a addresses SECRET to site_b (never summed); the
    global step forwards it; round 1, site_b releases the digest of what it opened."""

    name = "relay_secret"
    Params = RelayParams
    releases_sums = False

    def variables(self, params: RelayParams) -> list[str]:
        return []

    def local(self, params: RelayParams, round_no: int, broadcast: dict[str, Any], context: Any) -> Release:
        if round_no == 0:
            payloads = {"site_b": {"secret": SECRET}} if context.site == "site_a" else {}
            return Release(public={"round": 0}, payloads=payloads)
        opened = context.messages.get("site_a", {}).get("secret", b"")
        return Release(public={"proof": hashlib.sha256(bytes(opened)).hexdigest(),
                               "senders": sorted(context.messages)})

    def global_step(self, params: RelayParams, round_no: int, aggregated: Aggregated,
                    state: dict[str, Any]) -> NextRound | Finished:
        if round_no == 0:
            return NextRound({}, messages={"site_b": [aggregated.payloads["site_a"]["site_b"]]})
        return Finished({site: facts for site, facts in aggregated.public.items()})


@pytest.fixture(scope="module")
def fed():
    base.register(RelaySecret)
    frames = {site: pd.DataFrame({"x": np.arange(10.0)}) for site in ("site_a", "site_b")}
    try:
        with mv.Federation.simulate(frames, record_hub_traffic=True, timeout=30) as federation:
            yield federation
    finally:
        base._REGISTRY.pop(RelaySecret.name, None)


def test_the_recipient_reads_the_payload_and_the_hub_relays_only_ciphertext(fed):
    before = len(fed.session.grid.relayed())
    result = fed.run("relay_secret").result
    assert result["site_b"]["proof"] == hashlib.sha256(SECRET).hexdigest()
    assert result["site_b"]["senders"] == ["site_a"]
    relayed = fed.session.grid.relayed()[before:]
    assert relayed, "the hub recorded the exchange"
    assert all(SECRET not in envelope.encode() for envelope in relayed)
    sealed = [envelope.body()["payloads"]["site_b"] for envelope in relayed
              if envelope.kind == "reply" and "payloads" in envelope.body()]
    assert len(sealed) == 1 and sealed[0]["sender"] == "site_a" and sealed[0]["recipient"] == "site_b"
    forwarded = [envelope for envelope in relayed if envelope.kind == "task" and envelope.body().get("messages")]
    assert [e.header["recipients"] for e in forwarded] == [["site_b"]]  # only the recipient gets it
    assert forwarded[0].body()["messages"] == sealed


def test_a_tampered_ciphertext_is_refused_by_the_recipient(fed, monkeypatch):
    grid = fed.session.grid
    exchange = grid.exchange

    def tampering(step, **options):
        for body in step.bodies.values():
            for sealed in body.get("messages", []):
                ct = bytearray(sealed["ct"])
                ct[len(ct) // 2] ^= 0x01
                sealed["ct"] = bytes(ct)
        return exchange(step, **options)

    monkeypatch.setattr(grid, "exchange", tampering)
    with pytest.raises(mv.RefusedError) as error:
        fed.run("relay_secret")
    assert (error.value.site, error.value.rule) == ("site_b", "payload_forged")
    assert fed.runs().empty  # a refusal is final: nothing is left to resume
