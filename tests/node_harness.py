"""Real nodes in one process, for tests that drive `Node.handle` with hand-made task envelopes.

Each site gets its own identity key, steward key, X25519 encryption key file and state
directory, and a stored steward approval of one study; the nodes' HubClient points at an
address that is never contacted (`senders` answers secure aggregation's second check). The
researcher's envelopes are sealed with the researcher's real key, as a hostile researcher could.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medveil.analyses import base
from medveil.analyses.base import Aggregated, Analysis, BroadcastRefused, Finished, Params, Release, SiteContext
from medveil.crypto.sealed import generate_encryption_key
from medveil.crypto.signing import SigningKey
from medveil.privacy.disclosure import DisclosurePolicy
from medveil.runtime.client import HubClient
from medveil.runtime.config import SiteConfig, write_encryption_key
from medveil.runtime.node import Node
from medveil.runtime.study import StudySpec, sign_approval
from medveil.runtime.wire import Envelope, seal

NEVER_CONTACTED = "http://127.0.0.1:9"


class NodeHarness:
    """Nodes for `frames` (site -> table), all approving study "study-1" of `analyses`."""

    def __init__(self, root: Path, frames: dict[str, pd.DataFrame], analyses: list[str], *,
                 policy: DisclosurePolicy | None = None, pin_encryption: set[str] | None = None,
                 extra_sites: dict[str, SigningKey] | None = None, roles: dict[str, str] | None = None):
        """`pin_encryption`: the sites whose encryption key the study pins (default all);
        `extra_sites`: sites of the study run by no node here (name -> identity key)."""
        self.root = root
        self.researcher = SigningKey.generate()
        self.policy = policy or DisclosurePolicy()
        self.identities = {site: SigningKey.generate() for site in frames}
        self.stewards = {site: SigningKey.generate() for site in frames}
        self.encryption: dict[str, str] = {}
        self.key_files: dict[str, Path] = {}
        for site in frames:
            raw, public = generate_encryption_key()
            path = root / f"{site}.x25519"
            write_encryption_key(path, raw)
            self.encryption[site], self.key_files[site] = public, path
        self.frames = frames
        identities = {**self.identities, **(extra_sites or {})}
        pinned = set(frames) if pin_encryption is None else pin_encryption
        columns = sorted({c for frame in frames.values() for c in frame.columns})
        self.spec = StudySpec(
            id="study-1", researcher="researcher", researcher_key=self.researcher.verify_key.to_text(),
            sites=sorted(identities), site_keys={s: k.verify_key.to_text() for s, k in identities.items()},
            datasets={"default": columns}, analyses=analyses, secure_aggregation=False,
            site_encryption_keys={s: self.encryption[s] for s in sorted(pinned)}, roles=roles or {})
        self.nodes = {site: self.start(site) for site in frames}
        for site, node in self.nodes.items():
            node.store.save_approval(self.spec.id, self.spec.model_dump(),
                                     sign_approval(self.spec, site, self.stewards[site], time.time()))

    def start(self, site: str) -> Node:
        """A node for `site` on its state directory (call again after `close` for a restarted node)."""
        config = SiteConfig(site=site, hub=NEVER_CONTACTED, state_dir=self.root / site, policy=self.policy,
                            encryption_key=self.key_files[site])
        client = HubClient(NEVER_CONTACTED, site, self.identities[site])
        return Node(config, self.identities[site], self.stewards[site].verify_key,
                    frames={"default": self.frames[site]}, client=client, senders=lambda task, step: set())

    def envelope(self, site: str, task: str, step: int, round_no: int, analysis: str, body: dict[str, Any], *,
                 phase: str = "compute") -> Envelope:
        """A task step for one site, signed by the researcher."""
        header = {"kind": "task", "sender": "researcher", "nonce": uuid.uuid4().hex, "issued_at": time.time(),
                  "study": self.spec.id, "task": task, "step": step, "phase": phase, "round": round_no,
                  "analysis": analysis, "dataset": "default", "recipients": [site]}
        return seal(self.researcher, header, body)

    def send(self, site: str, task: str, step: int, round_no: int, analysis: str, params: dict[str, Any] | None = None,
             broadcast: dict[str, Any] | None = None, messages: list[dict] | None = None,
             phase: str = "compute") -> tuple[str, dict[str, Any]]:
        """Hand one step to a site's node; (reply status, reply body)."""
        body: dict[str, Any] = {} if phase == "end" else {"params": params or {}, "broadcast": broadcast or {}}
        if messages is not None:
            body["messages"] = messages
        raw = self.envelope(site, task, step, round_no, analysis, body, phase=phase).encode()
        reply = self.nodes[site].handle(raw)
        assert reply is not None, "a well-formed envelope always gets a reply"
        reply.verify(self.identities[site].verify_key)
        return reply.header["status"], reply.body()

    def close(self) -> None:
        for node in self.nodes.values():
            node.close()


class ProbeParams(Params):
    note: str = ""


class PayloadProbe(Analysis[ProbeParams]):
    """A test-only analysis: broadcast {"to": site} sends that site a payload, {"keep": value} keeps
    a value in the task's scratch; every round publishes what its SiteContext held. The contexts
    it got are in `PayloadProbe.contexts`."""

    name = "payload_probe"
    Params = ProbeParams
    releases_sums = False
    contexts: list[SiteContext] = []
    SECRET = np.arange(5, dtype=np.int64) + 1_000_003

    def variables(self, params: ProbeParams) -> list[str]:
        return []

    def check_broadcast(self, params: ProbeParams, round_no: int, broadcast: dict[str, Any],
                        memory: dict[str, Any]) -> None:
        if not set(broadcast) <= {"to", "keep"} or not isinstance(broadcast.get("to", ""), str):
            raise BroadcastRefused("broadcast_malformed", "the probe takes `to` (a site) and `keep`")

    def local(self, params: ProbeParams, round_no: int, broadcast: dict[str, Any], context: SiteContext) -> Release:
        PayloadProbe.contexts.append(context)
        if "keep" in broadcast:
            context.scratch["kept"] = broadcast["keep"]
        payloads = {broadcast["to"]: {"from": context.site, "round": round_no, "secret": self.SECRET}} \
            if "to" in broadcast else {}
        received = {sender: {"from": p["from"], "round": p["round"], "secret": p["secret"].tolist()}
                    for sender, p in context.messages.items()}
        return Release(public={"received": received, "kept": context.scratch.get("kept"), "role": context.role,
                               "scratch_keys": sorted(context.scratch)}, payloads=payloads)

    def global_step(self, params: ProbeParams, round_no: int, aggregated: Aggregated,
                    state: dict[str, Any]) -> Finished:
        return Finished(aggregated.public)


@contextmanager
def probe_registered() -> Iterator[type[PayloadProbe]]:
    """PayloadProbe in the analysis registry while the block runs (other tests list the registry)."""
    base.register(PayloadProbe)
    PayloadProbe.contexts = []
    try:
        yield PayloadProbe
    finally:
        base._REGISTRY.pop(PayloadProbe.name, None)
