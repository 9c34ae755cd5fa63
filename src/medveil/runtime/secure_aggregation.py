"""Secure aggregation as a protocol between nodes and the researcher's session, over the hub.

Per key set (made with a session's first secure task, kept for its later tasks until a site
drops out): step "keys" (each site publishes a fresh X25519 key in its signed reply) and step
"shares" (each site checks the others' signed keys, then sends Shamir shares of its private
key, encrypted to each peer). Per analysis round: step "compute" (each site masks its
fixed-point release with one pairwise mask per participant, derived for that task and step,
so masks are fresh every round). Only if
sites fail to submit: step "unmask", where the survivors reveal their shares of the missing
sites' keys, after asking the hub which sites did submit, and refusing to reveal the key of any
site whose masked vector the hub holds. The hub closes a step once a later one starts, so a
late vector can never meet a revealed key. What each party learns: the hub and the researcher
learn the sum over submitting sites; sites learn nothing of each other's data.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medveil.crypto import secagg
from medveil.runtime.wire import Envelope


class SecureAggregationAborted(RuntimeError):
    """Too few sites remain to recover the sum; nothing was revealed."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"))


def share_context(keyset: str, sender: str, recipient: str) -> bytes:
    return f"{keyset}|share|{sender}|{recipient}".encode()


def mask_context(task: str, step: int) -> bytes:
    return f"{task}|step|{step}".encode()


@dataclass
class NodeTaskKeys:
    """One site's secret state for one key set, kept in the node's store between steps.

    `revealed` is set once this site has revealed shares of a peer's key: the key set is then
    spent and the site masks nothing more with it."""

    private: bytes
    peers: dict[str, bytes] = field(default_factory=dict)
    revealed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"private": _b64(self.private), "peers": {site: _b64(key) for site, key in self.peers.items()},
                "revealed": self.revealed}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "NodeTaskKeys":
        return cls(_unb64(data["private"]), {site: _unb64(key) for site, key in data["peers"].items()},
                   bool(data.get("revealed", False)))

    def secret_with(self, peer: str) -> bytes:
        return secagg.shared_secret(self.private, self.peers[peer])


def node_new_keys() -> tuple[NodeTaskKeys, dict[str, Any]]:
    private, public = secagg.generate_key(os.urandom)
    return NodeTaskKeys(private), {"secagg_public": _b64(public)}


def node_shares(keys: NodeTaskKeys, me: str, keyset: str, peer_keys: dict[str, bytes],
                threshold: int) -> dict[str, Any]:
    """Record the verified peer keys; Shamir-share our private key, one encrypted share per peer."""
    keys.peers = dict(peer_keys)
    order = sorted(peer_keys)
    shares = secagg.split_secret(keys.private, len(order), threshold, os.urandom)
    encrypted = {
        peer: _b64(secagg.encrypt_share(keys.secret_with(peer), shares[i], share_context(keyset, me, peer), os.urandom))
        for i, peer in enumerate(order) if peer != me
    }
    return {"shares": encrypted}


def node_mask(keys: NodeTaskKeys, me: str, task: str, step: int, participants: list[str],
              sums: dict[str, np.ndarray]) -> dict[str, Any]:
    if keys.revealed:
        raise PermissionError("this key set is spent: shares of a peer's key were revealed")
    flat, layout = secagg.flatten(sums)
    encoded = secagg.encode_fixed(flat).ravel()
    context = mask_context(task, step)
    seeds = {p: secagg.mask_seed(keys.secret_with(p), context) for p in participants if p != me}
    return {"masked": secagg.apply_masks(encoded, me, seeds), "layout": [[name, list(shape)] for name, shape in layout]}


def node_reveal(keys: NodeTaskKeys, me: str, keyset: str, dropped: list[str], ciphertexts: dict[str, str],
                submitted: set[str]) -> dict[str, Any]:
    """Decrypt our shares of the dropped sites' keys; never for a site whose vector the hub holds."""
    held = sorted(set(dropped) & submitted)
    if held:
        raise PermissionError(f"refusing to reveal the keys of {held}: the hub holds their masked vectors")
    keys.revealed = True
    return {"revealed": {
        site: format(secagg.decrypt_share(keys.secret_with(site), _unb64(ciphertexts[site]),
                                          share_context(keyset, site, me)), "x")
        for site in dropped
    }}


@dataclass
class CoordinatorState:
    """The session's view of one key set of secure aggregation."""

    keyset: str
    sites: list[str]
    threshold: int
    public_keys: dict[str, bytes] = field(default_factory=dict)
    key_envelopes: dict[str, bytes] = field(default_factory=dict)
    shares: dict[str, dict[str, str]] = field(default_factory=dict)  # sender -> recipient -> ciphertext
    participants: list[str] = field(default_factory=list)

    def record_keys(self, replies: dict[str, tuple[Envelope, dict]]) -> None:
        for site, (envelope, body) in replies.items():
            self.public_keys[site] = _unb64(body["public"]["secagg_public"])
            self.key_envelopes[site] = envelope.encode()
        self.participants = sorted(self.public_keys)

    def record_shares(self, replies: dict[str, tuple[Envelope, dict]]) -> None:
        for site, (_, body) in replies.items():
            self.shares[site] = body["public"]["shares"]

    def unmask_request(self, dropped: list[str], recipients: list[str]) -> dict[str, Any]:
        """For each survivor, the ciphertexts of the dropped sites' shares addressed to it."""
        return {"dropped": dropped,
                "ciphertexts": {r: {d: self.shares[d][r] for d in dropped} for r in recipients}}

    def combine(self, masked: dict[str, dict], task: str, step: int,
                revealed: dict[str, dict[str, str]]) -> dict[str, np.ndarray]:
        """Sum masked vectors, remove the masks of sites that never submitted, decode, unflatten."""
        submitters = sorted(masked)
        carrying = [site for site, body in masked.items() if "masked" in body]
        if not carrying:
            return {}  # a round that releases only public facts (e.g. agreeing levels)
        if len(carrying) != len(submitters):
            raise ValueError("some sites sent masked vectors and others did not")
        layouts = {tuple((name, tuple(shape)) for name, shape in body["layout"]) for body in masked.values()}
        if len(layouts) != 1:
            raise ValueError("sites sent masked vectors of different layouts")
        layout = [(name, shape) for name, shape in next(iter(layouts))]
        total = np.zeros_like(np.asarray(masked[submitters[0]]["masked"], dtype=np.uint64))
        for body in masked.values():
            total += np.asarray(body["masked"], dtype=np.uint64)
        dropped = [p for p in self.participants if p not in masked]
        order = sorted(self.public_keys)
        for site in dropped:
            shares = {order.index(survivor) + 1: int(values[site], 16) for survivor, values in revealed.items()}
            private = secagg.combine_secret(shares, self.threshold)
            seeds = {s: secagg.mask_seed(secagg.shared_secret(private, self.public_keys[s]), mask_context(task, step))
                     for s in submitters}
            total -= secagg.dropped_mask_total(site, seeds, total.size)
        return secagg.unflatten(secagg.decode_fixed(total.reshape(-1, secagg.LIMBS)), layout)
