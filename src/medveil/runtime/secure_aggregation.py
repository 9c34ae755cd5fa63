"""Secure aggregation with double masking, between the nodes and the researcher's session, over the hub.

What each party learns: the researcher and the hub learn the sum over the sites that submitted
a compute step, and which sites submitted; never one site's vector, even when they collude and
show different sites different dropout sets (each submitter signs the one set it agrees to, and
reveals only against every submitter's signature on that same set); a site learns nothing of its
peers' data (their public keys, shares that are each uniform on their own, and the dropout set
it signs). Residual: threshold - 1 sites colluding with the researcher and the hub can open a
peer's vector, by claiming that every other site dropped (the peer's own share of its self-mask
seed counts toward the threshold); fewer cannot.

Key set (one per researcher session, bound to its study, reused across the session's tasks;
a node deletes it after KEYSET_LIFETIME_S and the session renews it before):
  "keys"     each site makes a fresh X25519 key pair and publishes the public half in its signed
             reply, bound to the study and the key-set id.
Per compute step s of task T, over the participants P = the key set's sites (which are exactly
the study's sites) less the dropouts recorded earlier in T, never fewer than max(threshold, 2):
  "compute"  the request carries the key-set id, P and the sites' signed key replies. Each site
             checks the replies against the study's pinned identity keys (once per key set) and
             P against its own records, never the request, then sends
                 y = encode(x) + PRG(b) + sum over p in P, p != me, of +-PRG(seed(me, p, T, s))
             with b a fresh self-mask seed, Shamir-shared (threshold t) among P, each share
             encrypted to its peer. It records (T, s, P) and keeps its own share of b.
  "consistency"  (only when some site of P did not submit: one extra round trip) the request
             names the dropouts D and the submitters S = P less D. A submitter that masked s and
             has not unmasked it checks D within P less itself, S of at least max(t, 2) sites and
             that the hub holds no vector from D; it records D as the one dropout set it agrees to
             for s, and signs, with its identity key, a statement binding study, key set, T, s, D
             and S (consistency_statement).
  "unmask"   (every step: one extra round trip) the request names D and forwards to each
             submitter the shares of b addressed to it; with D non-empty it carries every
             submitter's signature on the statement of D. A submitter answers once, and only if
             D is what it agreed to (none when it agreed to nothing), every signature verifies
             against the signer's pinned identity key, and the checks above hold again: it
             reveals its shares of b for every submitter and, for every site of D, its pairwise
             seed of step s, never both for one site. The session rebuilds each b from t shares,
             removes the self masks and the uncancelled pairwise masks of D, and decodes the sum.
Why the signatures: a site v's vector opens only when all its pairwise seeds come out and t
shares of its b. Had the hub and researcher told each site of a different D, v could reveal
its seed with a peer that in turn, told that v submitted, reveals a share of v's b, and such
pieces add up (tests/security/test_review_attacks.py). Now v reveals seeds only for a D that
every co-submitter signed, and a site signs one D per step and unmasks only with it, so every
honest co-submitter takes v for a submitter as well and keeps its seed with v; without a D, v
reveals no seed, and an honest site revealing a share of v's b keeps its seed with v. So v's
vector opens only with at least t - 1 colluding sites (the residual above).
Dropout recovery reveals per-step pairwise seeds rather than Shamir shares of a dropped site's
private key (as in the paper): the key set lives across steps, and a revealed private key would
open every earlier vector of that site whose self mask had already been removed; a seed opens
one step, in which the site's self mask stays on. The price: a dropout is recovered only if
every submitter signs the dropout set and answers the unmask step (removing self masks alone
needs any t).
Residual: hub and researcher together can keep a task from a site, so that a step's sum covers
the others only (at least max(t, 2) sites); differencing that against another task's sum over
all sites is not stopped here (a site's policy `secagg_dropouts: false` refuses to help).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag

from medveil.crypto import secagg
from medveil.crypto.signing import SignatureError, VerifyKey
from medveil.runtime.study import StudySpec
from medveil.runtime.wire import WireError, canonical_json, open_envelope

KEYSET_LIFETIME_S = 24 * 3600.0  # a node deletes a key set's private key this long after making it
KEYSET_RENEW_S = 12 * 3600.0  # a session makes a fresh key set once its own is this old
TASK_IDLE_S = 2 * 3600.0  # a node forgets a task's masking records after this long without a step
KEYSET_PATTERN = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
CONSISTENCY_PREFIX = b"medveil secure-aggregation dropouts v1\n"

RULES = {
    "secagg_disabled": "the study does not use secure aggregation",
    "secagg_malformed": "a secure-aggregation field has the wrong type or form",
    "secagg_keyset_exists": "a keys step names a key set this site already made",
    "secagg_unknown_keyset": "the key set was never made at this site, or has expired and was deleted",
    "secagg_wrong_study": "the key set, or the task's masking record, belongs to another study",
    "secagg_wrong_keyset": "a task switches key sets part-way",
    "secagg_peer_key": "a peer's key reply does not verify against its pinned identity key, or is bound "
                       "to another site, study or key set",
    "secagg_participants": "a compute step does not cover exactly the key set's sites (the study's sites) "
                           "less the dropouts this site recorded in the same task, or covers fewer than "
                           "max(threshold, 2)",
    "secagg_unmask_refused": "a consistency or unmask step for a step this site did not mask, a repeated "
                             "unmask, a claimed dropout outside the step, submitters other than the step's "
                             "participants less the dropouts, fewer than max(threshold, 2) submitters, a "
                             "claimed dropout whose vector the hub holds, or a share not addressed to this site",
    "secagg_inconsistent_dropouts": "a consistency step names other dropouts than this site agreed to before, "
                                    "or comes after the step was unmasked; or an unmask step names other "
                                    "dropouts than this site agreed to, or lacks a submitter's valid signature "
                                    "on the same dropout statement",
    "secagg_repeat": "a compute step this site has masked before",
    "secagg_dropouts_refused": "a consistency or unmask step names dropouts, and this site's policy (or its "
                               "lack of a signing key) does not recover sums without a site",
    "secagg_overflow": "a value is too large to be masked",
}


class SecureAggregationAborted(RuntimeError):
    """Too few sites remain to recover the sum; nothing was revealed that opens a site's vector."""


class SecureAggregationRefused(Exception):
    """A node's refusal of a secure-aggregation step; `rule` is one of RULES."""

    def __init__(self, rule: str, message: str):
        super().__init__(message)
        self.rule = rule


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, size: int | None = None) -> bytes:
    if not isinstance(text, str):
        raise SecureAggregationRefused("secagg_malformed", "expected base64 text")
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise SecureAggregationRefused("secagg_malformed", "expected base64 text") from exc
    if size is not None and len(data) != size:
        raise SecureAggregationRefused("secagg_malformed", f"expected {size} bytes")
    return data


def mask_context(study: str, keyset: str, task: str, step: int) -> bytes:
    """What the pairwise masks of one compute step are bound to: fresh per study, key set, task and step."""
    return f"{study}|{keyset}|{task}|step|{step}".encode()


def self_share_context(study: str, keyset: str, task: str, step: int, sender: str, recipient: str) -> bytes:
    return f"{study}|{keyset}|{task}|step|{step}|self|{sender}|{recipient}".encode()


def consistency_statement(study: str, keyset: str, task: str, step: int, dropped: list[str],
                          submitters: list[str]) -> bytes:
    """What a submitter signs in a consistency step: the one dropout set it agrees to for a step.
    The prefix keeps it apart from anything else an identity key signs (envelope headers, tokens)."""
    return CONSISTENCY_PREFIX + canonical_json({"study": study, "keyset": keyset, "task": task, "step": step,
                                                "dropped": sorted(dropped), "submitters": sorted(submitters)})


def _sorted_names(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or len(set(value)) != len(value):
        raise SecureAggregationRefused("secagg_malformed", f"{what} must be a list of distinct site names")
    return sorted(value)


def _keyset_id(request: Any) -> str:
    keyset = request.get("keyset") if isinstance(request, dict) else None
    if not isinstance(keyset, str) or not KEYSET_PATTERN.match(keyset):
        raise SecureAggregationRefused("secagg_malformed", "the key-set id must be 8 to 64 letters, digits, - or _")
    return keyset


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:40]


# --- the site's side ----------------------------------------------------------------------

class MemoryStore:
    """The node store's get/put/delete in memory, values round-tripped through JSON as the node
    store keeps them: for a site's secure-aggregation state in tests and benchmarks."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    def get(self, key: str, default: Any = None) -> Any:
        return json.loads(self.data[key]) if key in self.data else default

    def put(self, key: str, value: Any) -> None:
        self.data[key] = json.dumps(value)

    def delete(self, key: str) -> None:
        self.data.pop(key, None)


@dataclass
class SiteSecureAggregation:
    """One site's half of the protocol, keeping its secrets and records in `store`
    (get/put/delete of JSON values, e.g. NodeStore). It trusts only the approved study spec
    (its sites, threshold and pinned identity keys) and its own records, never the request.

    `senders(task, step)`: the sites whose replies the hub holds for a step (checked as well,
    not relied on); `hub_key(site)`: a site's key as the hub serves it, used only for a spec
    without pinned keys; `allow_dropouts`: the site's policy on revealing a dropped peer's
    pairwise seeds (off: a sum never survives a missing site, which closes the residual risk of
    a sum over survivors compared with a full one); `sign`: signs with the site's identity key
    the dropout set it agrees to in a consistency step (without it the site agrees to none, so
    it never helps recover a dropout)."""

    site: str
    store: Any
    senders: Callable[[str, int], set[str]]
    hub_key: Callable[[str], VerifyKey] | None = None
    sign: Callable[[bytes], bytes] | None = None
    allow_dropouts: bool = True
    max_bytes: int = 64 * 1024 * 1024
    clock: Callable[[], float] = time.time
    random_bytes: Callable[[int], bytes] = os.urandom

    # records ---------------------------------------------------------------------------

    def _keyset_key(self, keyset: str) -> str:
        return f"secagg:keyset:{_digest(keyset)}"

    def _task_key(self, task: str) -> str:
        return f"secagg:task:{_digest(task)}"

    def _load_keyset(self, spec: StudySpec, keyset: str) -> dict[str, Any]:
        self.prune()
        record = self.store.get(self._keyset_key(keyset))
        if record is None or record.get("id") != keyset:
            raise SecureAggregationRefused("secagg_unknown_keyset", f"no key set {keyset!r} at {self.site}")
        if record["study"] != spec.id:
            raise SecureAggregationRefused("secagg_wrong_study",
                                           f"key set {keyset!r} was made for another study than {spec.id!r}")
        return record

    def _load_task(self, spec: StudySpec, task: str, keyset: str) -> dict[str, Any]:
        record = self.store.get(self._task_key(task))
        if record is None or record.get("task") != task:
            return {"task": task, "study": spec.id, "keyset": keyset, "dropped": [], "steps": {}}
        if record["study"] != spec.id:
            raise SecureAggregationRefused("secagg_wrong_study", f"task {task!r} belongs to another study")
        if record["keyset"] != keyset:
            raise SecureAggregationRefused("secagg_wrong_keyset", f"task {task!r} started under another key set")
        return record

    def _save_task(self, record: dict[str, Any]) -> None:
        record["touched_at"] = self.clock()
        key = self._task_key(record["task"])
        self.store.put(key, record)
        self._index_add("tasks", key, record["touched_at"])

    def _index_add(self, kind: str, key: str, at: float) -> None:
        index = self.store.get("secagg:index", {"keysets": {}, "tasks": {}})
        index[kind][key] = at
        self.store.put("secagg:index", index)

    def prune(self) -> None:
        """Delete expired key sets (their private keys) and the records of tasks idle too long."""
        index = self.store.get("secagg:index")
        if not index:
            return
        now = self.clock()
        limits = {"keysets": KEYSET_LIFETIME_S, "tasks": TASK_IDLE_S}
        expired = {kind: [key for key, at in index[kind].items() if now - at > limits[kind]] for kind in limits}
        if not any(expired.values()):
            return
        for kind, keys in expired.items():
            for key in keys:
                self.store.delete(key)
                del index[kind][key]
        self.store.put("secagg:index", index)

    def forget_task(self, task: str) -> None:
        """Delete a task's masking records and any self-mask share still held (the task has ended)."""
        key = self._task_key(task)
        self.store.delete(key)
        index = self.store.get("secagg:index")
        if index and key in index["tasks"]:
            del index["tasks"][key]
            self.store.put("secagg:index", index)

    # steps -----------------------------------------------------------------------------

    def new_keys(self, spec: StudySpec, request: Any) -> dict[str, Any]:
        """Step "keys": a fresh X25519 key pair for a new key set of this study; the public half."""
        if not spec.secure_aggregation:
            raise SecureAggregationRefused("secagg_disabled", f"study {spec.id!r} does not use secure aggregation")
        keyset = _keyset_id(request)
        self.prune()
        if self.store.get(self._keyset_key(keyset)) is not None:
            raise SecureAggregationRefused("secagg_keyset_exists", f"key set {keyset!r} already exists")
        private, public = secagg.generate_key(self.random_bytes)
        now = self.clock()
        self.store.put(self._keyset_key(keyset), {"id": keyset, "study": spec.id, "created_at": now,
                                                  "private": _b64(private), "public": _b64(public), "peers": None})
        self._index_add("keysets", self._keyset_key(keyset), now)
        return {"keyset": keyset, "study": spec.id, "secagg_public": _b64(public)}

    def _peers(self, spec: StudySpec, record: dict[str, Any], envelopes: Any) -> dict[str, bytes]:
        """The key set's public keys: verified once from the peers' signed key replies, then kept."""
        if record["peers"] is not None:
            return {site: _unb64(key) for site, key in record["peers"].items()}
        if not isinstance(envelopes, dict) or not all(isinstance(raw, bytes) for raw in envelopes.values()):
            raise SecureAggregationRefused("secagg_malformed", "key replies must map sites to signed envelopes")
        if sorted(envelopes) != sorted(spec.sites):
            raise SecureAggregationRefused("secagg_participants", "the key set must cover exactly the study's sites")
        peers = {site: self._verified_key(spec, record["id"], site, raw) for site, raw in envelopes.items()}
        if peers[self.site] != _unb64(record["public"]):
            raise SecureAggregationRefused("secagg_peer_key", f"the key set does not hold {self.site}'s own key")
        record["peers"] = {site: _b64(key) for site, key in peers.items()}
        self.store.put(self._keyset_key(record["id"]), record)
        return peers

    def _identity_key(self, spec: StudySpec, site: str) -> VerifyKey:
        """A site's identity key as the study pins it (the hub's copy only for a spec without pins)."""
        pinned = getattr(spec, "site_keys", None)
        return VerifyKey.from_text(pinned[site]) if pinned else self.hub_key(site)

    def _verified_key(self, spec: StudySpec, keyset: str, site: str, raw: bytes) -> bytes:
        """A peer's public key, from its own reply to this key set's keys step, signed by its pinned key."""
        try:
            envelope = open_envelope(raw, self.max_bytes)
            envelope.verify(self._identity_key(spec, site))
            header, public = envelope.header, envelope.body(self.max_bytes).get("public", {})
        except (WireError, SignatureError, KeyError, ValueError, TypeError) as exc:
            raise SecureAggregationRefused("secagg_peer_key", f"key of {site!r} does not verify against "
                                                              f"its pinned identity") from exc
        if (envelope.sender != site or envelope.kind != "reply" or header.get("study") != spec.id
                or header.get("status") != "ok" or not isinstance(public, dict)
                or public.get("keyset") != keyset or public.get("study") != spec.id):
            raise SecureAggregationRefused("secagg_peer_key", f"key reply of {site!r} is bound to another site, "
                                                              "study or key set")
        return _unb64(public.get("secagg_public"), 32)

    def check_compute(self, spec: StudySpec, task: str, request: Any,
                      recipients: Any = None) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        """The key set, this task's record and the step's participants, checked against this
        site's own records; the request's participant list (and recipients) must match them."""
        if not spec.secure_aggregation:
            raise SecureAggregationRefused("secagg_disabled", f"study {spec.id!r} does not use secure aggregation")
        if not isinstance(request, dict):
            raise SecureAggregationRefused("secagg_malformed", "a compute step needs its secure-aggregation fields")
        keyset = _keyset_id(request)
        record = self._load_keyset(spec, keyset)
        task_record = self._load_task(spec, task, keyset)
        peers = self._peers(spec, record, request.get("key_envelopes"))
        participants = sorted(set(peers) - set(task_record["dropped"]))
        floor = max(spec.threshold(), 2)
        if len(participants) < floor or self.site not in participants:
            raise SecureAggregationRefused("secagg_participants", f"a secure sum needs at least {floor} sites")
        if _sorted_names(request.get("participants"), "participants") != participants:
            raise SecureAggregationRefused("secagg_participants", "the step's participants are not the key set's "
                                                                  "sites less this task's dropouts")
        if recipients is not None and _sorted_names(recipients, "recipients") != participants:
            raise SecureAggregationRefused("secagg_participants", "the step is not addressed to exactly its "
                                                                  "participants")
        return record, task_record, participants

    def mask(self, spec: StudySpec, task: str, step: int, request: Any, sums: dict[str, np.ndarray],
             recipients: Any = None) -> dict[str, Any]:
        """Step "compute": the double-masked release and the encrypted shares of its self-mask seed."""
        record, task_record, participants = self.check_compute(spec, task, request, recipients)
        if str(step) in task_record["steps"]:
            raise SecureAggregationRefused("secagg_repeat", f"step {step} of task {task!r} was masked before")
        private = _unb64(record["private"])
        peers = {site: _unb64(key) for site, key in record["peers"].items()}
        flat, layout = secagg.flatten(sums)
        try:
            encoded = secagg.encode_fixed(flat).ravel()
        except secagg.FixedPointOverflow as exc:
            raise SecureAggregationRefused("secagg_overflow", "a value is too large to be masked") from exc
        context = mask_context(spec.id, record["id"], task, step)
        secrets = {p: secagg.shared_secret(private, peers[p]) for p in participants if p != self.site}
        pair_seeds = {p: secagg.mask_seed(secret, context) for p, secret in secrets.items()}
        self_seed = self.random_bytes(32)
        shares = secagg.split_secret(self_seed, len(participants), spec.threshold(), self.random_bytes)
        encrypted = {
            p: _b64(secagg.encrypt_share(secrets[p], shares[i], self_share_context(
                spec.id, record["id"], task, step, self.site, p), self.random_bytes))
            for i, p in enumerate(participants) if p != self.site
        }
        masked = secagg.apply_masks(encoded, self.site, pair_seeds, self_seed)
        task_record["steps"][str(step)] = {"participants": participants, "unmasked": False,
                                           "own_share": format(shares[participants.index(self.site)], "x")}
        self._save_task(task_record)  # recorded before anything leaves
        return {"masked": masked, "layout": [[name, list(shape)] for name, shape in layout],
                "self_shares": encrypted}

    def _dropout_claim(self, spec: StudySpec, task: str, request: Any,
                       what: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], int, list[str], list[str]]:
        """The checks a consistency and an unmask step share: the step this site masked, and the
        request's dropouts D against it (within its participants less this site, allowed by policy,
        at least max(threshold, 2) submitters left, none of D's vectors held by the hub).
        Returns the key set, the task record, the step's record, the step, D and the submitters."""
        if not spec.secure_aggregation:
            raise SecureAggregationRefused("secagg_disabled", f"study {spec.id!r} does not use secure aggregation")
        if not isinstance(request, dict):
            raise SecureAggregationRefused("secagg_malformed", f"a {what} step needs its secure-aggregation fields")
        keyset = _keyset_id(request)
        record = self._load_keyset(spec, keyset)
        of_step = request.get("of_step")
        if not isinstance(of_step, int) or isinstance(of_step, bool):
            raise SecureAggregationRefused("secagg_malformed", "of_step must be an integer")
        task_record = self._load_task(spec, task, keyset)
        masked = task_record["steps"].get(str(of_step))
        if masked is None:
            raise SecureAggregationRefused("secagg_unmask_refused", f"{self.site} did not mask step {of_step} "
                                                                    f"of task {task!r}")
        participants = masked["participants"]
        dropped = _sorted_names(request.get("dropped"), "dropped")
        if not set(dropped) <= set(participants) - {self.site}:
            raise SecureAggregationRefused("secagg_unmask_refused", "a claimed dropout was not a participant "
                                                                    "of the step")
        if dropped and not self.allow_dropouts:
            raise SecureAggregationRefused("secagg_dropouts_refused", "this site does not help recover a sum "
                                                                      "without a missing site")
        submitters = [p for p in participants if p not in dropped]
        if len(submitters) < max(spec.threshold(), 2):
            raise SecureAggregationRefused("secagg_unmask_refused", "too few sites submitted to recover the sum")
        try:
            held = set(self.senders(task, of_step))
        except Exception as exc:  # no answer: reveal nothing
            raise SecureAggregationRefused("secagg_unmask_refused", "the hub did not say which sites "
                                                                    "submitted") from exc
        if held & set(dropped):
            raise SecureAggregationRefused("secagg_unmask_refused", "the hub holds the vector of a claimed dropout")
        return record, task_record, masked, of_step, dropped, submitters

    def consistency(self, spec: StudySpec, task: str, request: Any) -> dict[str, Any]:
        """Step "consistency", before an unmask step that names dropouts: agree to one dropout set
        for the step (recorded, and never another) and sign it, binding study, key set, task,
        step, dropouts and submitters."""
        record, task_record, masked, of_step, dropped, submitters = self._dropout_claim(
            spec, task, request, "consistency")
        if not dropped:
            raise SecureAggregationRefused("secagg_malformed", "a consistency step names the dropouts")
        if _sorted_names(request.get("submitters"), "submitters") != submitters:
            raise SecureAggregationRefused("secagg_unmask_refused", "the submitters are not the step's "
                                                                    "participants less the dropouts")
        if self.sign is None:
            raise SecureAggregationRefused("secagg_dropouts_refused", "this site has no identity key to sign "
                                                                      "a dropout set with")
        if masked["unmasked"]:
            raise SecureAggregationRefused("secagg_inconsistent_dropouts", f"step {of_step} of task {task!r} "
                                                                           "was unmasked before")
        if masked.get("agreed") not in (None, dropped):
            raise SecureAggregationRefused("secagg_inconsistent_dropouts", "this site agreed to other dropouts "
                                                                           f"for step {of_step} of task {task!r}")
        masked["agreed"] = dropped
        self._save_task(task_record)  # recorded before anything leaves
        statement = consistency_statement(spec.id, record["id"], task, of_step, dropped, submitters)
        return {"of_step": of_step, "dropped": dropped, "signature": _b64(self.sign(statement))}

    def _check_agreement(self, spec: StudySpec, keyset: str, task: str, of_step: int, masked: dict[str, Any],
                         dropped: list[str], submitters: list[str], signatures: Any) -> None:
        """An unmask step's dropouts are the ones this site agreed to (none if it agreed to none)
        and, when there are any, every submitter signed that same statement with its pinned key."""
        if (masked.get("agreed") or []) != dropped:
            raise SecureAggregationRefused("secagg_inconsistent_dropouts", "the dropouts are not the ones this "
                                                                           "site agreed to for the step")
        if not dropped:
            return
        if not isinstance(signatures, dict) or sorted(signatures) != submitters:
            raise SecureAggregationRefused("secagg_inconsistent_dropouts", "the request must carry every "
                                                                           "submitter's signature on the dropouts")
        statement = consistency_statement(spec.id, keyset, task, of_step, dropped, submitters)
        for site in submitters:
            try:
                self._identity_key(spec, site).verify(_unb64(signatures[site], 64), statement)
            except (SignatureError, SecureAggregationRefused, KeyError, ValueError, TypeError) as exc:
                raise SecureAggregationRefused("secagg_inconsistent_dropouts", f"the signature of {site!r} on "
                                                                               "the dropouts does not verify") from exc

    def unmask(self, spec: StudySpec, task: str, request: Any) -> dict[str, Any]:
        """Step "unmask", once per compute step this site masked: shares of the submitters'
        self-mask seeds, and this site's pairwise seeds of that step with the sites that dropped
        (only for the dropouts it agreed to, against every submitter's signature on them)."""
        record, task_record, masked, of_step, dropped, submitters = self._dropout_claim(spec, task, request, "unmask")
        keyset = record["id"]
        if masked["unmasked"]:
            raise SecureAggregationRefused("secagg_unmask_refused", f"step {of_step} of task {task!r} was "
                                                                    "unmasked before")
        self._check_agreement(spec, keyset, task, of_step, masked, dropped, submitters, request.get("signatures"))
        participants = masked["participants"]
        ciphertexts = request.get("self_shares", {})
        ciphertexts = ciphertexts.get(self.site) if isinstance(ciphertexts, dict) else None
        others = [p for p in submitters if p != self.site]
        if not isinstance(ciphertexts, dict) or sorted(ciphertexts) != others:
            raise SecureAggregationRefused("secagg_unmask_refused", "the request must carry exactly the submitters' "
                                                                    "shares addressed to this site")
        private = _unb64(record["private"])
        peers = {site: _unb64(key) for site, key in record["peers"].items()}
        secrets = {p: secagg.shared_secret(private, peers[p]) for p in participants if p != self.site}
        shares = {self.site: masked["own_share"]}
        for p in others:
            try:
                share = secagg.decrypt_share(secrets[p], _unb64(ciphertexts[p]), self_share_context(
                    spec.id, keyset, task, of_step, p, self.site))
            except InvalidTag as exc:
                raise SecureAggregationRefused("secagg_unmask_refused", f"the share from {p!r} is not addressed "
                                                                        "to this site") from exc
            shares[p] = format(share, "x")
        context = mask_context(spec.id, keyset, task, of_step)
        seeds = {d: _b64(secagg.mask_seed(secrets[d], context)) for d in dropped}
        masked.update(unmasked=True, own_share=None)
        task_record["dropped"] = sorted(set(task_record["dropped"]) | set(dropped))
        self._save_task(task_record)  # recorded before anything leaves
        return {"self_mask_shares": shares, "dropped_seeds": seeds}


# --- the researcher's side ----------------------------------------------------------------

@dataclass
class CoordinatorState:
    """The session's view of one key set: the sites' signed key replies, forwarded to the nodes.
    Wire-encodable (`to_wire`/`from_wire`), so a run's checkpoint carries it across a restart;
    `created_at` is wall-clock time for the same reason."""

    keyset: str
    study: str
    sites: list[str]
    threshold: int
    created_at: float = field(default_factory=time.time)
    key_envelopes: dict[str, bytes] = field(default_factory=dict)

    def record_keys(self, replies: dict[str, Any]) -> None:
        """Keep each site's signed key reply (the keys step's `Reply`s, or (envelope, body) pairs)
        after checking its binding."""
        for site, reply in replies.items():
            envelope, body = (reply.envelope, reply.body) if hasattr(reply, "envelope") else reply
            public = body.get("public", {})
            if public.get("keyset") != self.keyset or public.get("study") != self.study:
                raise ValueError(f"key reply of {site!r} is bound to another key set or study")
            self.key_envelopes[site] = envelope.encode()

    @property
    def keyed(self) -> bool:
        """Whether the keys step has been answered by every site of the key set."""
        return sorted(self.key_envelopes) == sorted(self.sites)

    def expired(self) -> bool:
        return time.time() - self.created_at > KEYSET_RENEW_S

    def to_wire(self) -> dict[str, Any]:
        return {"keyset": self.keyset, "study": self.study, "sites": list(self.sites), "threshold": self.threshold,
                "created_at": self.created_at, "key_envelopes": dict(self.key_envelopes)}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> CoordinatorState:
        return cls(str(data["keyset"]), str(data["study"]), [str(s) for s in data["sites"]], int(data["threshold"]),
                   float(data["created_at"]), {str(k): bytes(v) for k, v in data["key_envelopes"].items()})

    def compute_request(self, participants: list[str]) -> dict[str, Any]:
        return {"keyset": self.keyset, "participants": sorted(participants), "key_envelopes": self.key_envelopes}

    def consistency_request(self, of_step: int, participants: list[str], masked: dict[str, dict]) -> dict[str, Any]:
        """Name the dropouts and the submitters, for every submitter to sign (only when some site dropped)."""
        return {"keyset": self.keyset, "of_step": of_step,
                "dropped": sorted(p for p in participants if p not in masked), "submitters": sorted(masked)}

    def unmask_request(self, of_step: int, participants: list[str], masked: dict[str, dict],
                       signatures: dict[str, str] | None = None) -> dict[str, Any]:
        """Name the dropouts, with the submitters' signatures on them from the consistency step;
        forward to each submitter the self-mask shares addressed to it."""
        submitters = sorted(masked)
        request = {"keyset": self.keyset, "of_step": of_step,
                   "dropped": sorted(p for p in participants if p not in masked),
                   "self_shares": {r: {q: masked[q]["self_shares"][r] for q in submitters if q != r}
                                   for r in submitters}}
        if signatures is not None:
            request["signatures"] = dict(signatures)
        return request

    def combine(self, participants: list[str], masked: dict[str, dict],
                revealed: dict[str, dict]) -> dict[str, np.ndarray]:
        """Sum the masked vectors, remove the self masks and the dropouts' pairwise masks, decode."""
        participants = sorted(participants)
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
        total = np.array(masked[submitters[0]]["masked"], dtype=np.uint64, copy=True)
        for site in submitters[1:]:
            np.add(total, np.asarray(masked[site]["masked"], dtype=np.uint64), out=total)
        self_seeds = []
        for q in submitters:
            shares = {participants.index(v) + 1: int(body["self_mask_shares"][q], 16)
                      for v, body in revealed.items() if q in body.get("self_mask_shares", {})}
            if len(shares) < self.threshold:
                raise SecureAggregationAborted(f"only {len(shares)} shares of a self mask came back "
                                               f"(threshold {self.threshold})")
            self_seeds.append(secagg.combine_secret(shares, self.threshold))
        dropped = {}
        for d in (p for p in participants if p not in masked):
            if not all(d in revealed.get(q, {}).get("dropped_seeds", {}) for q in submitters):
                raise SecureAggregationAborted("a dropout's masks can be removed only when every submitter "
                                               "answers the unmask step")
            dropped[d] = {q: base64.b64decode(revealed[q]["dropped_seeds"][d]) for q in submitters}
        secagg.remove_masks(total, self_seeds, dropped)
        return secagg.unflatten(secagg.decode_fixed(total.reshape(-1, secagg.LIMBS)), layout)
