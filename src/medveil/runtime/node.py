"""The node: a site's enforcement point, polling its hub for tasks over outbound connections.

Threat model: the hub and the researcher may be malicious. Every step of a task passes an
ordered pipeline of guards, each a small method naming the rule it enforces (`task_guards`,
`compute_guards`): the header's types, the steward's signed approval of exactly this study, the
researcher's signature and freshness, replay, the analysis, parameters, dataset and variables
approved, the task's pinned parameters, rounds in order, a broadcast this site can vouch for
from what it released itself earlier in the task (`Analysis.check_broadcast`), and the
differencing guard on the rows behind each released statistic, and the researcher's total query
budget for an analysis that has one (the beacon: `query_budget_exhausted`). Only aggregates that pass the
site's disclosure policy leave; differential-privacy noise is charged to the researcher's
account at this site as it is drawn. A local step gets one `SiteContext` (its table, policy,
durable per-task scratch on disk, DP noise, genotypes, role, and the payloads other sites
sealed to it, each opened and verified here and consumed once); payloads it addresses to other
sites are sealed end to end to their pinned encryption keys before they leave. A task's last
step ("end") deletes its scratch and secure-aggregation record and closes it; a "query" step
goes to the site's services (runtime/services.py). Every request, decision and release is written to the
hash-chained audit log (with digests of the parameters and broadcast), and every reply quotes
the log's head. A message that cannot be handled is refused or quarantined; the polling loop
never dies. What the node learns: the researcher's requests; what it releases: aggregates that
passed its rules (masked under secure aggregation, so the hub and researcher see only totals).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pandas as pd
from pydantic import ValidationError

from medveil.analyses.base import (
    Analysis,
    AnalysisError,
    BroadcastRefused,
    Params,
    SiteContext,
    UnknownAnalysis,
    get_analysis,
)
from medveil.crypto.sealed import SealedPayloadError, encryption_public_key, open_payload, seal_payload
from medveil.crypto.secagg import FixedPointOverflow
from medveil.crypto.signing import SignatureError, SigningKey, VerifyKey
from medveil.data.genotypes import GenotypeFile
from medveil.data.images import ImageFolder
from medveil.data.sources import DataError, load_dataset
from medveil.privacy.disclosure import DisclosureRefused, check_differencing_many
from medveil.privacy.dp import BudgetExhausted, CountNoise, gaussian_count_noise
from medveil.runtime.audit import AuditLog, summarised
from medveil.runtime.client import HubClient, HubError
from medveil.runtime.config import KeyFileError, SiteConfig, load_site_config, read_encryption_key
from medveil.runtime.node_store import NodeStore, TaskState, dp_account
from medveil.runtime.alignments import AlignmentStore, new_alignment
from medveil.runtime.scratch import NodeScratch
from medveil.runtime.secure_aggregation import SecureAggregationRefused, SiteSecureAggregation
from medveil.runtime.study import StudySpec, sign_approval, verify_approval
from medveil.runtime.wire import (
    MAX_ENDED_PER_STEP,
    Envelope,
    WireError,
    canonical_json,
    is_id,
    open_envelope,
    pack_body,
)

if TYPE_CHECKING:
    from medveil.runtime.services import ServiceHost

log = logging.getLogger("medveil.node")
MAX_TASK_AGE_S = 3600.0
TASK_RETENTION_S = 7 * 24 * 3600.0
PHASES = ("keys", "compute", "consistency", "unmask", "end", "query")
SCRATCH_TASKS_IN_MEMORY = 4  # tasks whose scratch values a node also holds in memory
TASK_FIELDS = ("study", "task", "step", "phase", "round", "analysis", "dataset")
REQUEST_FIELDS = ("study", "task", "step", "phase", "round", "analysis", "sender", "nonce", "body_sha256")


class Refusal(Exception):
    """A task the node will not run; `rule` names why."""

    def __init__(self, rule: str, message: str):
        super().__init__(message)
        self.rule = rule


@dataclass
class TaskStep:
    """One task message as the guards see it; each guard fills in what the later ones use."""

    envelope: Envelope
    spec: StudySpec | None = None
    analysis: Analysis | None = None
    params: Params | None = None
    params_sha256: str = ""
    broadcast_sha256: str = ""
    body: dict[str, Any] = field(default_factory=dict)
    broadcast: dict[str, Any] = field(default_factory=dict)
    variables: list[str] = field(default_factory=list)
    state: TaskState | None = None
    data: pd.DataFrame | None = None
    messages: dict[str, dict[str, Any]] = field(default_factory=dict)  # opened payloads, by sender
    message_digests: list[dict[str, str]] = field(default_factory=list)  # [{"sender", "sha256"}] consumed
    reads_data: bool = True  # False: the analysis reads no dataset at this site (a dealer, a bystander)
    aligned_rows: np.ndarray | None = None  # the base table's rows this step runs on, when on an alignment
    base_rows: int = 0  # rows of the base table (to lift an aligned step's row sets back onto it)

    @property
    def header(self) -> dict[str, Any]:
        return self.envelope.header

    @property
    def task(self) -> str:
        return self.header["task"]

    @property
    def step(self) -> int:
        return self.header["step"]

    @property
    def round_no(self) -> int:
        return self.header["round"]

    @property
    def phase(self) -> str:
        return self.header["phase"]

    @property
    def dataset(self) -> str:
        return self.header["dataset"]


class PrivacyCharger:
    """Charges zCDP rho to the researcher's budget at this site, before what it pays for is
    released; `charged` is the rho spent in this step (a refused release stays paid for)."""

    def __init__(self, charge: Callable[[float], None]):
        self._charge = charge
        self.charged = 0.0

    def __call__(self, rho: float) -> None:
        if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho > 0):
            raise ValueError(f"a privacy charge must be a positive finite rho, got {rho!r}")
        self._charge(float(rho))
        self.charged += float(rho)


class ChargedNoise:
    """DP count noise that charges `rho` through the step's PrivacyCharger before each draw."""

    def __init__(self, noise: CountNoise, rho: float, charger: PrivacyCharger):
        self._noise, self._rho, self._charger = noise, rho, charger

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        self._charger(self._rho)
        return self._noise(counts)


class Node:
    """Runs approved analyses on local data and replies with what policy lets out."""

    def __init__(self, config: SiteConfig, identity: SigningKey, steward: VerifyKey, *,
                 frames: dict[str, pd.DataFrame] | None = None, client: HubClient | None = None,
                 senders: Callable[[str, int], set[str]] | None = None):
        """`senders(task, step)` says which sites' replies the relay holds for a step (secure
        aggregation's second check); by default the hub is asked through `client`."""
        self.config = config
        self.site = config.site
        self.steward = steward
        self.frames = dict(frames or {})
        self.client = client or HubClient(config.hub, config.site, identity, max_bytes=config.max_message_bytes)
        self._senders = senders
        self.store = NodeStore(config.state_dir / "node.db")
        self._stop: threading.Event | None = None  # set by `serve`: ends reply retries at shutdown
        self.audit = AuditLog(config.state_dir / "audit.jsonl", config.site)
        self.scratch = NodeScratch(config.state_dir / "scratch", config.policy.max_scratch_bytes,
                                   keep=SCRATCH_TASKS_IN_MEMORY, label=config.site)
        self._cache: dict[str, tuple[tuple, Any]] = {}
        self._verified: dict[str, tuple[str, StudySpec]] = {}
        self._tasks: OrderedDict[str, TaskState] = OrderedDict()
        self._services: ServiceHost | None = None
        self._encryption_private: bytes | None = None
        for task in self.store.prune_tasks(TASK_RETENTION_S):
            self.scratch.delete(task)
        self.scratch.prune(TASK_RETENTION_S)
        self.alignments = AlignmentStore(config.state_dir / "alignments")

    @classmethod
    def from_config_file(cls, path: Path, passphrase: bytes | None = None) -> "Node":
        """The node a site YAML describes. Its identity key must be private to its owner (else
        KeyFileError) and, if encrypted, unlocked by `passphrase` or MEDVEIL_KEY_PASSPHRASE; the
        state directory is made 0700."""
        from medveil.runtime.config import make_private_dir, read_private_key

        config = load_site_config(path)
        identity = read_private_key(config.identity, passphrase)
        steward = VerifyKey.from_text(config.steward_key.read_text().strip())
        make_private_dir(config.state_dir)
        client = HubClient(config.hub, config.site, identity, max_bytes=config.max_message_bytes,
                           invitation=config.invitation)
        return cls(config, identity, steward, client=client)

    def close(self) -> None:
        self.client.close()
        self.store.close()

    def dataset_names(self) -> list[str]:
        return sorted(set(self.frames) | set(self.config.datasets))

    # --- steward actions -------------------------------------------------------------------

    def register(self) -> None:
        self.client.register("site")

    def approve(self, study_id: str, steward_key: SigningKey) -> StudySpec:
        """Steward approves a study as published on the hub, after checking the researcher signed it
        and that it pins this node's own identity key for the site (else Refusal `pinned_key_mismatch`):
        the steward thereby approves exactly the keys that researchers and peers will verify against."""
        if steward_key.verify_key != self.steward:
            raise SignatureError("this is not the steward key configured for the site")
        envelope = self.client.study_envelope(study_id)
        spec = StudySpec.model_validate(envelope.body()["spec"])
        envelope.verify(VerifyKey.from_text(spec.researcher_key))
        if self.site not in spec.sites:
            raise ValueError(f"study {study_id!r} does not include site {self.site!r}")
        if spec.site_keys[self.site] != self.client.key.verify_key.to_text():
            raise Refusal("pinned_key_mismatch", f"study {study_id!r} pins another identity key for {self.site!r} "
                                                 "than this node's; not approved")
        self._check_encryption_pin(spec)
        approval = sign_approval(spec, self.site, steward_key, time.time())
        self.store.save_approval(spec.id, spec.model_dump(), approval)
        self.audit.append("approval", study=spec.id, spec_sha256=spec.digest(), datasets=spec.datasets,
                          analyses=spec.analyses, researcher=spec.researcher)
        self.client.post_approval(spec.id, self.client.seal("approval", {"approval": approval}, study=spec.id))
        return spec

    def _check_encryption_pin(self, spec: StudySpec) -> None:
        """Rule pinned_encryption_key_mismatch: a study that pins an X25519 key for this site pins the
        public half of this node's own encryption key; otherwise its peers would seal this site's
        payloads to a key someone else (the researcher who wrote the spec) may hold."""
        pinned = spec.site_encryption_keys.get(self.site)
        if pinned is None:
            return
        try:
            own = encryption_public_key(self._encryption_key())
        except Refusal:
            own = None
        if pinned != own:
            raise Refusal("pinned_encryption_key_mismatch", f"study {spec.id!r} pins an encryption key for "
                                                            f"{self.site!r} that is not this node's; not approved")

    def approved_study(self, study_id: str) -> StudySpec:
        stored = self.store.approval(study_id)
        if stored is None:
            raise Refusal("study_not_approved", f"study {study_id!r} is not approved by the steward of {self.site}")
        signature = str(stored.approval.get("signature"))
        cached = self._verified.get(study_id)
        if cached is not None and cached[0] == signature:
            return cached[1]
        spec = StudySpec.model_validate(stored.spec)
        try:
            verify_approval(stored.approval, spec, self.site, self.steward)
        except (SignatureError, ValueError, KeyError) as exc:
            raise Refusal("study_not_approved", f"stored approval of {study_id!r} does not verify: {exc}") from exc
        self._verified[study_id] = (signature, spec)
        return spec

    # --- task handling: an ordered pipeline of guards, each naming its rule ------------------

    def handle(self, raw: bytes) -> Envelope | None:
        """Check and run one task message; return the signed reply (a release or a refusal).

        A message whose envelope or header cannot be parsed gets no reply (nothing trustworthy
        to bind one to); it is refused in the audit log. Nothing a message holds can raise out."""
        try:
            envelope = open_envelope(raw, self.config.max_message_bytes)
        except WireError as exc:
            self.audit.append("refusal", rule="malformed", detail=str(exc))
            return None
        header = envelope.header
        if envelope.kind == "task" and header.get("phase") == "query":
            return self._query(envelope)
        context = {k: header.get(k) for k in REQUEST_FIELDS}  # types checked by wire.check_header
        request_id = self.audit.append("request", **context)
        bound = {k: context[k] for k in ("study", "task", "step", "round")}
        try:
            release, decision_ids = self._run(TaskStep(envelope))
        except Exception as exc:
            # An unexpected error's text may hold data values: the researcher gets its type only.
            refusal = exc if isinstance(exc, Refusal) else Refusal(
                "internal_error", f"{type(exc).__name__} at {self.site}; the site's audit log has the details")
            detail = str(refusal) if isinstance(exc, Refusal) else f"{type(exc).__name__}: {exc}"
            refusal_id = self.audit.append("refusal", rule=refusal.rule, detail=detail, **context)
            log.info("%s refused %s: [%s] %s", self.site, context["task"], refusal.rule, detail)
            return self.client.seal("reply", {"rule": refusal.rule, "message": str(refusal)}, status="refused",
                                    audit_ids=[request_id, refusal_id], audit_head=self.audit.head(), **bound)
        return self.client.seal("reply", release, status="ok", audit_ids=[request_id, *decision_ids],
                                audit_head=self.audit.head(), **bound)

    def _query(self, envelope: Envelope) -> Envelope:
        """A site-service query goes to the services, which check, answer and audit it; a failure
        there is refused as internal_error, its details kept in the audit log only."""
        try:
            return self.services.handle(envelope)
        except Exception as exc:  # noqa: BLE001 - nothing a message holds may raise out of handle
            header = envelope.header
            refusal_id = self.audit.append("refusal", rule="internal_error", detail=f"{type(exc).__name__}: {exc}",
                                           **{k: header.get(k) for k in REQUEST_FIELDS})
            log.warning("%s: service query %s failed: %s", self.site, header.get("task"), exc)
            return self.client.seal("reply", {"rule": "internal_error",
                                              "message": f"{type(exc).__name__} at {self.site}; the site's audit "
                                                         "log has the details"},
                                    status="refused", audit_ids=[refusal_id], audit_head=self.audit.head(),
                                    **{k: header.get(k) for k in ("study", "task", "step", "round")})

    @property
    def services(self) -> "ServiceHost":
        """The site's long-lived services (runtime/services.py), made on first use."""
        if self._services is None:
            from medveil.runtime.services import ServiceHost

            self._services = ServiceHost(self)
        return self._services

    def build_service(self, name: str, dataset: str, options: dict[str, Any], steward_key: SigningKey) -> dict:
        """Steward action: build (or rebuild) a registered service from this site's own data."""
        return self.services.build(name, dataset, options, steward_key)

    def task_guards(self) -> list[Callable[["TaskStep"], None]]:
        """The checks every step of a task passes, in order; each raises a Refusal naming its rule.
        Later capabilities (expiry, revocation, consent, metering) add a guard here."""
        return [self._guard_is_task, self._guard_study_approved, self._guard_sender_is_researcher,
                self._guard_signed_by_researcher, self._guard_fresh, self._guard_not_replayed,
                self._guard_analysis_allowed, self._guard_parameters_valid, self._guard_parties,
                self._guard_dataset_approved,
                self._guard_variables_approved, self._guard_same_task, self._guard_not_ended, self._guard_in_order]

    def compute_guards(self) -> list[Callable[["TaskStep"], None]]:
        """The further checks of a compute step, once the data are at hand."""
        return [self._guard_secure_participants, self._guard_columns_present, self._guard_broadcast_vouched,
                self._guard_messages, self._guard_differencing, self._guard_query_budget]

    def _run(self, step: "TaskStep") -> tuple[dict[str, Any], list[str]]:
        for guard in self.task_guards():
            guard(step)
        self._end_announced(step)
        if step.phase == "end":
            return self._end(step)
        if step.phase != "compute":
            result = self._secure_step(step.spec, step.phase, step.task, step.step, step.body)
            self._advance(step, released=None)
            return result
        step.data = self._task_data(step)
        for guard in self.compute_guards():
            guard(step)
        return self._compute(step)

    def _guard_is_task(self, step: "TaskStep") -> None:
        """A task carries every field the guards read; their types and bounds were checked once,
        by `wire.check_header`, when the envelope was opened."""
        if step.envelope.kind != "task":
            raise Refusal("malformed", f"expected a task, got {step.envelope.kind!r}")
        missing = [name for name in TASK_FIELDS if step.header.get(name) is None]
        if missing:
            raise Refusal("malformed", f"a task header needs {missing}")
        if step.phase not in PHASES:
            raise Refusal("malformed", f"unknown phase {step.phase!r}")

    def _guard_study_approved(self, step: "TaskStep") -> None:
        step.spec = self.approved_study(step.header["study"])

    def _guard_sender_is_researcher(self, step: "TaskStep") -> None:
        if step.envelope.sender != step.spec.researcher:
            raise Refusal("wrong_researcher",
                          f"{step.envelope.sender!r} is not the researcher of study {step.spec.id!r}")

    def _guard_signed_by_researcher(self, step: "TaskStep") -> None:
        try:
            step.envelope.verify(VerifyKey.from_text(step.spec.researcher_key))
        except SignatureError as exc:
            raise Refusal("bad_signature", str(exc)) from exc

    def _guard_fresh(self, step: "TaskStep") -> None:
        if abs(time.time() - float(step.header["issued_at"])) > MAX_TASK_AGE_S:
            raise Refusal("stale", "task was issued too long ago")

    def _guard_not_replayed(self, step: "TaskStep") -> None:
        if not self.store.claim(str(step.header["nonce"]), step.task, step.step):
            raise Refusal("replay", f"task {step.task!r} step {step.step} was already handled")

    def _guard_analysis_allowed(self, step: "TaskStep") -> None:
        name = step.header["analysis"]
        try:
            step.analysis = get_analysis(name)
        except UnknownAnalysis as exc:
            raise Refusal("unknown_analysis", str(exc)) from exc
        if name not in step.spec.analyses:
            raise Refusal("analysis_not_approved", f"analysis {name!r} is not approved for study {step.spec.id!r}")

    def _guard_parameters_valid(self, step: "TaskStep") -> None:
        """The body decodes; its parameters are valid for the analysis and its broadcast is a map.
        An "end" step carries neither: the task's first step pinned them."""
        try:
            step.body = step.envelope.body(self.config.max_message_bytes)
        except WireError as exc:
            raise Refusal("malformed", str(exc)) from exc
        if step.phase == "end":
            return
        raw = step.body.get("params", {})
        if not isinstance(raw, dict):
            raise Refusal("invalid_parameters", "parameters must be a map")
        try:
            step.params = step.analysis.parse_params(raw)
        except ValidationError as exc:
            raise Refusal("invalid_parameters", f"invalid parameters for {step.analysis.name}: {exc}") from exc
        except DisclosureRefused as exc:
            raise Refusal(exc.rule, exc.detail) from exc
        broadcast = step.body.get("broadcast", {})
        if not isinstance(broadcast, dict):
            raise Refusal("broadcast_malformed", "a broadcast must be a map")
        step.broadcast = broadcast

    def _guard_parties(self, step: "TaskStep") -> None:
        """Sites the parameters name are in the study (`site_not_in_study`), and this site, when
        named with a party role, holds that role in the approved study (`role_mismatch`)."""
        if step.params is None:
            return
        spec = step.spec
        parties = step.analysis.parties(step.params)
        outside = sorted(str(site)[:64] for site in parties if site not in spec.sites)
        if outside:
            raise Refusal("site_not_in_study", f"site(s) {outside} named by the parameters are not in study {spec.id!r}")
        wanted = parties.get(self.site)
        if wanted is not None and spec.role_of(self.site) != wanted:
            raise Refusal("role_mismatch", f"{self.site} is asked to act as {wanted!r}, but study {spec.id!r} gives "
                                           f"it the role {spec.role_of(self.site)!r}")

    def _guard_dataset_approved(self, step: "TaskStep") -> None:
        """The dataset (and any genotype dataset) is in the study's dataset map for this site,
        unless the step reads none here (an "end" step; a site the analysis reads no data at)."""
        spec, params = step.spec, step.params
        if step.phase == "end":
            return
        if params is not None:
            step.reads_data = step.analysis.reads_data_at(params, self.site, spec.role_of(self.site))
            if not step.reads_data:
                return
        approved = spec.datasets_for(self.site)
        if step.dataset not in approved:
            raise Refusal("dataset_not_approved", f"dataset {step.dataset!r} is not approved for study {spec.id!r}")
        genotypes = None if params is None else step.analysis.genotype_dataset(params)
        if genotypes is not None and genotypes not in approved:
            raise Refusal("dataset_not_approved", f"dataset {genotypes!r} is not approved for study {spec.id!r}")

    def _guard_variables_approved(self, step: "TaskStep") -> None:
        if step.params is None:
            return
        step.variables = step.analysis.variables_at(step.params, self.site, step.spec.role_of(self.site))
        if not step.reads_data:
            if step.variables:
                raise Refusal("analysis_error", f"{step.analysis.name} reads no data at {self.site} but names variables")
            return
        outside = [v for v in step.variables if v not in step.spec.datasets_for(self.site)[step.dataset]]
        if outside:
            raise Refusal("variable_not_approved", f"variables {outside} are not approved for dataset "
                                                   f"{step.dataset!r} in study {step.spec.id!r}")
        config = self.config.datasets.get(step.dataset)
        if config is not None and config.kind == "images" and config.file_column in step.variables \
                and not step.analysis.reads_images:
            raise Refusal("image_file_column", f"column {config.file_column!r} of image dataset {step.dataset!r} "
                                               f"names files: only an analysis that reads the images may use it")

    def _guard_same_task(self, step: "TaskStep") -> None:
        """Every step of a task carries the study, analysis, dataset and parameters of its first step
        (an "end" step, which carries no parameters, the first three). A task this node has no
        record of gets a fresh state and an empty scratch."""
        params_sha256 = "" if step.params is None else \
            hashlib.sha256(canonical_json(step.params.model_dump(mode="json"))).hexdigest()
        state = self._task_state(step.task)
        if state is None:
            # A task new to this node starts with an empty scratch: what a refused first step under
            # this task id left (perhaps in another study, on another dataset) is never read back.
            self.scratch.delete(step.task)
            state = TaskState(step.task, step.spec.id, step.analysis.name, step.dataset, params_sha256)
        elif (state.study, state.analysis, state.dataset) != (step.spec.id, step.analysis.name, step.dataset) or (
                step.params is not None and state.params_sha256 != params_sha256):
            raise Refusal("task_mismatch", f"step {step.step} of task {step.task!r} changes its study, analysis, "
                                           "dataset or parameters")
        step.state, step.params_sha256 = state, params_sha256 or state.params_sha256

    def _guard_not_ended(self, step: "TaskStep") -> None:
        """Nothing runs in a task after its "end" step."""
        if step.state.memory.get("ended"):
            raise Refusal("task_ended", f"task {step.task!r} has ended at {self.site}")

    def _guard_in_order(self, step: "TaskStep") -> None:
        """Steps come in increasing order; compute rounds one after another from round 0; set-up
        steps of secure aggregation sit in round 0, and consistency and unmask steps in the last
        compute round, and the "end" step in the task's last round."""
        state, round_no = step.state, step.round_no
        if step.step <= state.last_step:
            raise Refusal("round_order", f"step {step.step} of task {step.task!r} comes after step {state.last_step}")
        expected = {"compute": state.last_round + 1, "consistency": state.last_round,
                    "unmask": state.last_round, "end": max(state.last_round, 0)}.get(step.phase, 0)
        if round_no != expected:
            raise Refusal("round_order", f"a {step.phase} step of task {step.task!r} must be in round {expected}, "
                                         f"not {round_no}")

    def _guard_columns_present(self, step: "TaskStep") -> None:
        missing = [v for v in step.variables if v not in step.data.columns]
        if missing:
            raise Refusal("missing_column", f"column(s) {missing} not found in dataset {step.dataset!r} at {self.site}")

    def _guard_broadcast_vouched(self, step: "TaskStep") -> None:
        packed = pack_body(step.broadcast)
        step.broadcast_sha256 = hashlib.sha256(packed).hexdigest()
        size = len(packed)
        if size > self.config.policy.max_broadcast_bytes:
            raise Refusal("broadcast_too_large", f"the broadcast has {size} bytes, more than this site's limit of "
                                                 f"{self.config.policy.max_broadcast_bytes}")
        try:
            step.analysis.check_broadcast(step.params, step.round_no, step.broadcast, step.state.memory)
        except BroadcastRefused as exc:
            raise Refusal(exc.rule, exc.detail) from exc

    def _guard_differencing(self, step: "TaskStep") -> None:
        """Row sets (lifted back onto the base table's rows for a step on an alignment) must not
        differ from an earlier query's on the same dataset by fewer than the minimum count."""
        if not self.config.policy.differencing_guard or not step.reads_data:
            return
        try:
            row_sets = step.analysis.row_sets(step.params, step.data, step.round_no, step.broadcast,
                                              policy=self.config.policy)
        except (DisclosureRefused, BroadcastRefused) as exc:
            raise Refusal(exc.rule, exc.detail) from exc
        except (AnalysisError, ValueError, TypeError, KeyError) as exc:
            raise Refusal("analysis_error", str(exc)) from exc
        if row_sets and step.aligned_rows is not None:
            row_sets = [_lifted(np.asarray(mask, dtype=bool), step.aligned_rows, step.base_rows) for mask in row_sets]
        if row_sets:
            self._check_differencing(step.spec, step.dataset, row_sets)

    def _guard_query_budget(self, step: "TaskStep") -> None:
        """Rule query_budget_exhausted: an analysis with a `budget_group` (the beacon) costs one query
        of the researcher's total budget for that group here, charged before it computes anything.
        The count is durable and never resets (a daily budget would let a membership probe go on
        the next day); it is kept under the researcher's name and under their signing key and charged
        to both, so a new study, task id, name or key does not refill it. Every charge and refusal
        is audited."""
        group = getattr(step.analysis, "budget_group", None)
        if group is None:
            return
        from medveil.runtime.services import charge_budget, researcher_identities  # services builds on this module

        spec, limit = step.spec, self.query_budget(group)
        used, charged = charge_budget(self.store, group, researcher_identities(spec), 1, limit)
        self.audit.append("query_budget", study=spec.id, task=step.task, analysis=step.analysis.name, group=group,
                          researcher=spec.researcher, used=used + int(charged), limit=limit, charged=charged)
        if not charged:
            raise Refusal("query_budget_exhausted", f"researcher {spec.researcher!r} has used all {limit} queries "
                                                    f"of budget {group!r} at {self.site}")

    def query_budget(self, group: str) -> int:
        """The total queries of a budget group one researcher may send this site (the policy's
        variant_query_budget)."""
        return self.config.policy.variant_query_budget

    def _guard_messages(self, step: "TaskStep") -> None:
        """Payloads other sites sealed to this site (body "messages", a list), each opened with this
        site's encryption key and checked: structure (`payload_malformed`), addressed to this site
        in this study and task (`payload_misaddressed`), signed by the sender's pinned identity key
        and decrypting (`payload_forged`), never consumed before in this task (`payload_replayed`),
        made in an earlier round of this task (`payload_misaddressed`), and in the round just before
        this one (`payload_stale`: a researcher who withheld a payload cannot hand it in later, in
        place of the sender's current one), one per sender."""
        sealed_list = step.body.get("messages")
        if sealed_list is None or sealed_list == []:
            return
        if not isinstance(sealed_list, list) or len(sealed_list) > len(step.spec.sites):
            raise Refusal("payload_malformed", f"messages must be a list of at most {len(step.spec.sites)} "
                                               "sealed payloads")
        private_key = self._encryption_key()
        sender_keys = {site: step.spec.site_key(site) for site in step.spec.sites if site != self.site}
        consumed = set(step.state.memory.get("consumed_payloads", []))
        for sealed in sealed_list:
            try:
                sender, context, payload = open_payload(sealed, recipient=self.site, private_key=private_key,
                                                        sender_keys=sender_keys, study=step.spec.id, task=step.task)
            except SealedPayloadError as exc:
                raise Refusal(exc.rule, str(exc)) from exc
            digest = hashlib.sha256(sealed["ct"]).hexdigest()
            if digest in consumed:
                raise Refusal("payload_replayed", f"a payload from {sender!r} was already consumed in this task")
            if context["task"] != step.task or context["round"] >= step.round_no:
                raise Refusal("payload_misaddressed", f"a payload from {sender!r} was made for round "
                                                      f"{context['round']}, not before round {step.round_no} of "
                                                      "this task")
            if context["round"] != step.round_no - 1:
                raise Refusal("payload_stale", f"a payload from {sender!r} was made in round {context['round']}; "
                                               f"round {step.round_no} takes only those of round "
                                               f"{step.round_no - 1}")
            if sender in step.messages:
                raise Refusal("payload_malformed", f"two payloads from {sender!r} in one step")
            consumed.add(digest)
            step.messages[sender] = payload
            step.message_digests.append({"sender": sender, "sha256": digest})

    def _encryption_key(self) -> bytes:
        """This site's X25519 private key (config.encryption_key), read once."""
        if self._encryption_private is None:
            if self.config.encryption_key is None:
                raise Refusal("payload_misaddressed", f"{self.site} holds no encryption key: it receives no payloads")
            try:
                self._encryption_private = read_encryption_key(self.config.encryption_key)
            except KeyFileError as exc:
                log.warning("%s: encryption key unusable: %s", self.site, exc)
                raise Refusal("payload_misaddressed", f"{self.site} cannot use its encryption key") from exc
        return self._encryption_private

    def _seal_payloads(self, step: "TaskStep", payloads: Any) -> dict[str, dict[str, Any]]:
        """Seal each payload of a release to its recipient's pinned encryption key (rule
        `payload_recipient`: the recipient must be another site of the study with a pinned key)."""
        if not payloads:
            return {}
        if not isinstance(payloads, dict):
            raise Refusal("analysis_error", "a release's payloads must map recipient sites to maps")
        spec = step.spec
        context = {"study": spec.id, "task": step.task, "step": step.step, "round": step.round_no}
        sealed: dict[str, dict[str, Any]] = {}
        for recipient, payload in payloads.items():
            if recipient not in spec.sites or recipient == self.site or not spec.site_encryption_keys.get(recipient):
                raise Refusal("payload_recipient", f"a payload may go only to another site of study {spec.id!r} "
                                                   f"with a pinned encryption key, not to {str(recipient)[:64]!r}")
            try:
                sealed[recipient] = seal_payload(payload, sender=self.site, recipient=recipient, context=context,
                                                 recipient_key=spec.site_encryption_keys[recipient],
                                                 signer=self.client.key)
            except (TypeError, ValueError) as exc:
                raise Refusal("analysis_error", f"a payload for {recipient!r} cannot be sealed: {exc}") from exc
        return sealed

    def _compute(self, step: "TaskStep") -> tuple[dict[str, Any], list[str]]:
        """Run the LOCAL step on its SiteContext, charge any DP noise it drew, seal its payloads,
        mask the sums, record the release."""
        spec, analysis, round_no = step.spec, step.analysis, step.round_no
        charger = self._privacy_charger(spec)
        noise = self._dp_noise(spec, analysis, charger)
        genotype_name = analysis.genotype_dataset(step.params)
        context = SiteContext(
            site=self.site, data=step.data, policy=self.config.policy, scratch=self.scratch.task(step.task),
            memory=MappingProxyType(step.state.memory), noise=noise,
            genotypes=None if genotype_name is None else self._genotypes(genotype_name),
            messages=step.messages, role=spec.role_of(self.site), data_sites=tuple(spec.data_sites()),
            study_salt=spec.study_salt(), study_models=tuple(spec.models), charge_privacy=charger,
            dp_required=spec.dp_rho_per_release is not None, privacy_remaining=self._privacy_remaining(spec),
            images=self._images(step.dataset) if step.reads_data else None)
        decision_id = self.audit.append(
            "decision", decision="run", study=spec.id, task=step.task, step=step.step, round=round_no,
            analysis=analysis.name, dataset=step.dataset, variables=step.variables,
            secure_aggregation=spec.secure_aggregation, params_sha256=step.params_sha256,
            broadcast_sha256=step.broadcast_sha256, **({"messages": step.message_digests} if step.messages else {}))
        try:
            release = analysis.local(step.params, round_no, step.broadcast, context)
        except (DisclosureRefused, BroadcastRefused) as exc:
            raise Refusal(exc.rule, exc.detail) from exc
        except FixedPointOverflow as exc:
            raise Refusal("analysis_error", "a value is too large to be released") from exc
        except DataError as exc:
            raise Refusal("data_error", f"{self.site}: {exc}") from exc
        except (AnalysisError, ValueError, TypeError) as exc:
            raise Refusal("analysis_error", str(exc)) from exc
        sums = {k: np.asarray(v) for k, v in release.sums.items()}  # dtypes kept: ints stay ints
        if any(v.dtype.kind not in "biuf" for v in sums.values()):
            raise Refusal("analysis_error", "a released sum is not an array of numbers")
        sealed = self._seal_payloads(step, release.payloads)
        alignment_id = self._keep_alignment(step, release.alignment) if release.alignment is not None else None
        if charger.charged:
            release.public["dp_rho"] = charger.charged
        payload = self._mask_release(spec, step.task, step.step, step.body, sums) if spec.secure_aggregation and sums \
            else {"sums": sums}
        payload["public"] = release.public
        if (spec.secure_aggregation and analysis.releases_sums) or self.scratch.holds(step.task):
            payload["keeps_state"] = True  # so the researcher tells this site when the task ends
        if sealed:
            payload["payloads"] = sealed
        if step.message_digests:
            step.state.memory.setdefault("consumed_payloads", []).extend(d["sha256"] for d in step.message_digests)
        self._advance(step, released=release.public)
        release_id = self.audit.append(
            "release", study=spec.id, task=step.task, step=step.step, round=round_no, analysis=analysis.name,
            arrays={k: list(v.shape) for k, v in sums.items()}, public=summarised(release.public),
            masked=bool(spec.secure_aggregation and sums),
            digest=hashlib.sha256(b"".join(k.encode() + v.tobytes() for k, v in sorted(sums.items()))).hexdigest(),
            **({"payloads": [{"recipient": r, "sha256": hashlib.sha256(p["ct"]).hexdigest()}
                             for r, p in sorted(sealed.items())]} if sealed else {}),
        )
        return payload, [decision_id, release_id] + ([alignment_id] if alignment_id else [])

    def _task_data(self, step: "TaskStep") -> pd.DataFrame:
        """The table a compute step runs on: none at a site that reads no data, the dataset's rows,
        or those of the alignment the analysis names, in its agreed order (`alignment_unknown`,
        `alignment_peers`: made with a site that is not among this analysis' other parties,
        `alignment_dataset`, `alignment_stale`)."""
        if not step.reads_data:
            return pd.DataFrame()
        base = self._data(step.dataset)
        alignment_id = step.analysis.alignment(step.params)
        if alignment_id is None:
            return base
        alignment = self.alignments.load(step.spec.id, alignment_id)
        if alignment is None:
            raise Refusal("alignment_unknown", f"{self.site} keeps no alignment {str(alignment_id)[:64]!r} "
                                               f"for study {step.spec.id!r}")
        others = set(step.analysis.parties(step.params)) - {self.site}
        if others and not set(alignment.peers) <= others:
            raise Refusal("alignment_peers", f"alignment {alignment_id!r} was made with {list(alignment.peers)}, "
                                             f"who are not the other parties of this {step.analysis.name}")
        if alignment.dataset != step.dataset:
            raise Refusal("alignment_dataset", f"alignment {alignment_id!r} was made on dataset {alignment.dataset!r}, "
                                               f"not {step.dataset!r}")
        if alignment.data_version != self._data_version(step.dataset) or \
                (alignment.rows.size and alignment.rows.max() >= len(base)):
            raise Refusal("alignment_stale", f"dataset {step.dataset!r} changed at {self.site} since alignment "
                                             f"{alignment_id!r} was made; run the intersection again")
        step.aligned_rows, step.base_rows = alignment.rows, len(base)
        return base.iloc[alignment.rows].reset_index(drop=True)

    def _keep_alignment(self, step: "TaskStep", raw: Any) -> str:
        """Keep a LOCAL step's alignment under the task's id (never sent); return its audit id."""
        if not step.reads_data or step.aligned_rows is not None:
            raise Refusal("analysis_error", "an alignment is kept only from a step on a dataset's own rows")
        try:
            alignment = new_alignment(step.task, step.spec.id, step.dataset, self._data_version(step.dataset), raw,
                                      len(step.data))
        except ValueError as exc:
            raise Refusal("analysis_error", str(exc)) from exc
        self.alignments.save(alignment)
        return self.audit.append("alignment", study=step.spec.id, task=step.task, dataset=step.dataset,
                                 column=alignment.column, peers=list(alignment.peers), reveal=alignment.reveal,
                                 rows=int(alignment.rows.size))

    def _end(self, step: "TaskStep") -> tuple[dict[str, Any], list[str]]:
        """A task's last step: delete its scratch and secure-aggregation record, mark it ended (later
        steps are refused `task_ended`)."""
        self._forget_task(step.spec, step.task)
        step.state.memory["ended"] = True
        self._advance(step, released=None)
        end_id = self.audit.append("task_end", study=step.spec.id, task=step.task, step=step.step,
                                   round=step.round_no, analysis=step.analysis.name)
        return {"public": {}}, [end_id]

    def _forget_task(self, spec: StudySpec, task: str) -> None:
        self.scratch.delete(task)
        if spec.secure_aggregation:
            self._secure_aggregation().forget_task(task)

    def _end_announced(self, step: "TaskStep") -> None:
        """End the tasks a step's body announces as finished ("ended": task ids; the researcher's
        notice rides on its next step instead of costing a message of its own). Only tasks of the
        step's own study are ended (their researcher signed the step); other ids are skipped."""
        announced = step.body.get("ended", [])
        if not isinstance(announced, list) or len(announced) > MAX_ENDED_PER_STEP \
                or not all(is_id(task) for task in announced):
            raise Refusal("malformed", f"'ended' must list at most {MAX_ENDED_PER_STEP} task ids")
        for task in announced:
            state = self._task_state(task)
            if task == step.task or state is None or state.study != step.spec.id or state.memory.get("ended"):
                continue
            self._forget_task(step.spec, task)
            state.memory["ended"] = True
            self.store.save_task_state(state, None)
            self.audit.append("task_end", study=step.spec.id, task=task, announced_in=step.task)

    def _task_state(self, task: str) -> TaskState | None:
        cached = self._tasks.get(task)
        if cached is None:
            cached = self.store.task_state(task)
            if cached is not None:
                self._remember_task(cached)
        return cached

    def _remember_task(self, state: TaskState, keep: int = 16) -> None:
        self._tasks[state.task] = state
        self._tasks.move_to_end(state.task)
        while len(self._tasks) > keep:
            self._tasks.popitem(last=False)

    def _advance(self, step: "TaskStep", released: dict[str, Any] | None) -> None:
        """Record that this step was handled (and, for a compute step, what it released)."""
        state = step.state
        state.last_step = step.step
        released_round = None
        if step.phase == "compute":
            state.last_round = step.round_no
            state.memory.setdefault("released", {})[step.round_no] = released
            released_round = step.round_no
        self.store.save_task_state(state, released_round)
        self._remember_task(state)

    def _genotypes(self, dataset: str) -> GenotypeFile:
        config = self.config.datasets.get(dataset)
        if config is None or config.kind != "plink":
            raise Refusal("unknown_dataset", f"genotype dataset {dataset!r} is not registered at {self.site}")
        key = f"genotypes:{dataset}"
        cached = self._cache.get(key)
        if cached is None or cached[0] != config.fingerprint():
            try:
                cached = (config.fingerprint(), GenotypeFile(dataset, config.path))
            except DataError as exc:
                raise Refusal("data_error", f"{self.site}: {exc}") from exc
            self._cache[key] = cached
        return cached[1]

    def _data_version(self, dataset: str) -> str:
        config = self.config.datasets.get(dataset)
        return repr(config.fingerprint()) if config is not None and dataset not in self.frames else f"frame:{dataset}"

    def _check_differencing(self, spec: StudySpec, dataset: str, row_sets: list[np.ndarray]) -> None:
        """Compare with every row set released earlier on this dataset to the same researcher, in
        any of their studies: kept under their name and under their signing key (as budgets are),
        so a second study, or a second key under one name, differences nothing."""
        from medveil.runtime.services import researcher_identities  # services builds on this module

        version, accounts = self._data_version(dataset), [f"researcher:{i}" for i in researcher_identities(spec)]
        earlier = [row_set for account in accounts for row_set in self.store.row_sets(account, dataset, version)]
        try:
            check_differencing_many(row_sets, earlier, self.config.policy)
        except DisclosureRefused as exc:
            raise Refusal(exc.rule, exc.detail) from exc
        for account in accounts:
            self.store.add_row_sets(account, dataset, version, row_sets)

    def dp_account(self, spec: StudySpec) -> str:
        """The budget a DP release of this study is charged to: its researcher's account here."""
        return dp_account(spec.researcher)

    def _privacy_charger(self, spec: StudySpec) -> PrivacyCharger:
        """What a local step charges its differential privacy to: the study's researcher's budget
        here (`dp_budget_exhausted` once a charge would pass the policy's dp_budget_rho)."""
        account, budget = self.dp_account(spec), self.config.policy.dp_budget_rho

        def charge(rho: float) -> None:
            try:
                self.store.charge_budget(account, rho, budget)
            except OverflowError as exc:
                exhausted = BudgetExhausted(spec.researcher, float(exc.args[0]), rho, budget)
                raise DisclosureRefused(exhausted.rule, exhausted.detail) from exc

        return PrivacyCharger(charge)

    def _privacy_remaining(self, spec: StudySpec) -> float:
        """The zCDP rho the study's researcher has left at this site (never below 0)."""
        return max(0.0, self.config.policy.dp_budget_rho - self.store.budget_spent(self.dp_account(spec)))

    def _dp_noise(self, spec: StudySpec, analysis: Any, charger: PrivacyCharger) -> "ChargedNoise | None":
        """OpenDP noise for the local step when the study asks for DP; it charges the budget as it
        is drawn, so a release refused after its noise was drawn is still paid for."""
        rho = spec.dp_rho_per_release
        if rho is None:
            return None
        if not analysis.supports_dp:
            raise Refusal("dp_unsupported", f"analysis {analysis.name!r} has no differentially private release yet")
        spent, budget = self.store.budget_spent(self.dp_account(spec)), self.config.policy.dp_budget_rho
        if spent + rho > budget * (1 + 1e-12):
            exhausted = BudgetExhausted(spec.researcher, spent, rho, budget)
            raise Refusal(exhausted.rule, exhausted.detail)
        return ChargedNoise(gaussian_count_noise(rho), rho, charger)

    def _images(self, dataset: str) -> ImageFolder | None:
        """The dataset's image folder (labels read, pixels not yet), when it is one (`data_error`)."""
        config = self.config.datasets.get(dataset)
        if config is None or config.kind != "images" or dataset in self.frames:
            return None
        key = f"images:{dataset}"
        cached = self._cache.get(key)
        if cached is None or cached[0] != config.fingerprint():
            try:
                cached = (config.fingerprint(), ImageFolder.from_config(dataset, config))
            except DataError as exc:
                raise Refusal("data_error", f"{self.site}: {exc}") from exc
            self._cache[key] = cached
        return cached[1]

    # --- secure aggregation (the site's side) ------------------------------------------------

    def _secure_aggregation(self) -> SiteSecureAggregation:
        """This site's half of secure aggregation (runtime/secure_aggregation.py), made on first use;
        it keeps its key sets and masking records in the node's store and signs the dropouts it
        agrees to with the node's identity key."""
        agent = getattr(self, "_secagg_agent", None)
        if agent is None:
            agent = SiteSecureAggregation(self.site, self.store, senders=self._hub_senders,
                                          hub_key=self.client.public_key, sign=self.client.key.sign,
                                          max_bytes=self.config.max_message_bytes,
                                          allow_dropouts=self.config.policy.secagg_dropouts)
            self._secagg_agent = agent
        return agent

    def _hub_senders(self, task: str, step: int) -> set[str]:
        """Which sites' replies the relay says it holds for a step (a second check, never relied on):
        the `senders` the node was given, else the hub's answer."""
        if self._senders is not None:
            return set(self._senders(task, step))
        return self.client.senders(task, step)

    def _guard_secure_participants(self, step: "TaskStep") -> None:
        """Rule secagg_participants (and the key set's study): a compute step of a secure study covers
        exactly the key set's sites less this task's recorded dropouts, checked before any data are read."""
        if not (step.spec.secure_aggregation and step.analysis.releases_sums):
            return
        try:
            self._secure_aggregation().check_compute(step.spec, step.task, step.body.get("secagg"),
                                                     step.header.get("recipients"))
        except SecureAggregationRefused as exc:
            raise Refusal(exc.rule, str(exc)) from exc

    def _mask_release(self, spec: StudySpec, task: str, step: int, body: dict[str, Any],
                      sums: dict[str, np.ndarray]) -> dict[str, Any]:
        """The double-masked payload of a compute step's sums, with the encrypted shares of its self mask
        (the fixed-point encoding takes float64, so integer sums are cast here, and only here)."""
        floats = {k: np.asarray(v, dtype=np.float64) for k, v in sums.items()}
        try:
            return self._secure_aggregation().mask(spec, task, step, body.get("secagg"), floats)
        except SecureAggregationRefused as exc:
            raise Refusal(exc.rule, str(exc)) from exc

    def _secure_step(self, spec: StudySpec, phase: str, task: str, step: int,
                     body: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """The key step, the consistency step and the unmask step of secure aggregation."""
        agent, request = self._secure_aggregation(), body.get("secagg")
        try:
            if phase == "keys":
                public = agent.new_keys(spec, request)
                detail: dict[str, Any] = {"keyset": public["keyset"]}
            elif phase == "consistency":
                public = agent.consistency(spec, task, request)
                detail = {"of_step": public["of_step"], "agreed_dropouts": public["dropped"]}
            elif phase == "unmask":
                public = agent.unmask(spec, task, request)
                detail = {"of_step": request["of_step"], "self_mask_shares_of": sorted(public["self_mask_shares"]),
                          "dropped_seeds_of": sorted(public["dropped_seeds"])}
            else:
                raise Refusal("malformed", f"unknown secure-aggregation phase {phase[:32]!r}")
        except SecureAggregationRefused as exc:
            raise Refusal(exc.rule, str(exc)) from exc
        decision_id = self.audit.append("secure_aggregation", phase=phase, study=spec.id, task=task, step=step,
                                        **detail)
        return {"sums": {}, "public": public}, [decision_id]

    # --- data ------------------------------------------------------------------------------

    def _data(self, dataset: str) -> pd.DataFrame:
        if dataset in self.frames:
            return self.frames[dataset]
        config = self.config.datasets.get(dataset)
        if config is None:
            raise Refusal("unknown_dataset", f"dataset {dataset!r} is not registered at {self.site}")
        fingerprint = config.fingerprint()
        cached = self._cache.get(dataset)
        if cached is not None and cached[0] == fingerprint and config.kind != "sql":
            return cached[1]
        try:
            frame = load_dataset(dataset, config)
        except DataError as exc:
            raise Refusal("data_error", f"{self.site}: {exc}") from exc
        self._cache[dataset] = (fingerprint, frame)
        return frame

    # --- the polling loop ------------------------------------------------------------------

    def poll_once(self, wait: float) -> int:
        """Fetch waiting tasks (long-poll up to `wait` s), handle and answer them; return how many.

        A message the node fails on is quarantined and skipped, so no message can stop the node."""
        cursor = int(self.store.get("cursor", 0))
        items = self.client.inbox(cursor, wait)
        for seq, raw in items:
            try:
                reply = self.handle(raw)
                if reply is not None:
                    self._deliver(reply)
            except Exception as exc:  # noqa: BLE001 - a hostile message must never stop the loop
                self._quarantine(seq, raw, exc)
            self.store.put("cursor", seq)
        return len(items)

    def _quarantine(self, seq: int, raw: bytes, error: Exception) -> None:
        """Keep a message the node failed on for the steward to inspect (0600, never run again)."""
        folder = self.config.state_dir / "quarantine"
        folder.mkdir(mode=0o700, exist_ok=True)
        path = folder / f"{int(seq)}.msg"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(raw)
        detail = f"{type(error).__name__}: {error}"[:500]
        log.warning("%s: message %s quarantined: %s", self.site, seq, detail)
        self.audit.append("quarantine", seq=int(seq), path=path.name, detail=detail,
                          sha256=hashlib.sha256(raw).hexdigest())

    def _deliver(self, reply: Envelope) -> None:
        try:
            self.client.post_until_accepted_message(reply, stop=self._stop)
        except HubError as exc:
            stopping = self._stop is not None and self._stop.is_set()  # shutting down: the hub may be gone first
            log.log(logging.INFO if stopping else logging.WARNING, "%s: reply to task %s not delivered: %s",
                    self.site, reply.header.get("task"), exc)

    def serve(self, stop: threading.Event) -> None:
        """Poll until `stop` is set, reconnecting with backoff when the hub is away; an unexpected
        error is logged and retried, never the end of the loop."""
        backoff = 0.05
        self._stop = stop
        (self.config.state_dir / "polling").write_text(str(time.time()))
        while not stop.is_set():
            try:
                self.poll_once(self.config.poll_wait_s)
                backoff = 0.05
            except Exception as exc:  # noqa: BLE001 - the loop outlives any one failure
                if stop.is_set():
                    return
                level = logging.DEBUG if isinstance(exc, HubError) else logging.WARNING
                log.log(level, "%s: polling failed (%s); retrying in %.2fs", self.site, exc, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)


def _lifted(mask: np.ndarray, aligned_rows: np.ndarray, base_rows: int) -> np.ndarray:
    """A row-set mask over an alignment's rows as a mask over the base table's rows."""
    full = np.zeros(base_rows, dtype=bool)
    full[aligned_rows[mask]] = True
    return full
