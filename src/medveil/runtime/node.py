"""The node: a site's enforcement point, polling its hub for tasks over outbound connections.

Threat model: the hub and the researcher may be malicious. For each task the node checks the
researcher's signature, that its own steward signed an approval of exactly this study, that
the analysis is registered and allowed, that the dataset and variables are approved, and that
the message was never seen before. Only aggregates that pass the site's disclosure policy
leave, and every request, decision and release is written to the hash-chained audit log.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import ValidationError

from medveil.analyses.base import AnalysisError, UnknownAnalysis, get_analysis
from medveil.crypto.secagg import FixedPointOverflow
from medveil.crypto.signing import SignatureError, SigningKey, VerifyKey
from medveil.data.genotypes import GenotypeFile
from medveil.data.sources import DataError, load_dataset
from medveil.privacy.disclosure import DisclosureRefused, check_differencing
from medveil.privacy.dp import BudgetExhausted, gaussian_count_noise
from medveil.runtime.audit import AuditLog, summarised
from medveil.runtime.client import HubClient, HubError
from medveil.runtime.config import SiteConfig, load_site_config
from medveil.runtime.node_store import NodeStore
from medveil.runtime.secure_aggregation import (
    NodeTaskKeys,
    node_mask,
    node_new_keys,
    node_reveal,
    node_shares,
)
from medveil.runtime.study import StudySpec, sign_approval, verify_approval
from medveil.runtime.wire import Envelope, WireError, open_envelope

log = logging.getLogger("medveil.node")
MAX_TASK_AGE_S = 3600.0


class Refusal(Exception):
    """A task the node will not run; `rule` names why."""

    def __init__(self, rule: str, message: str):
        super().__init__(message)
        self.rule = rule


class Node:
    """Runs approved analyses on local data and replies with what policy lets out."""

    def __init__(self, config: SiteConfig, identity: SigningKey, steward: VerifyKey, *,
                 frames: dict[str, pd.DataFrame] | None = None, client: HubClient | None = None):
        self.config = config
        self.site = config.site
        self.steward = steward
        self.frames = dict(frames or {})
        self.client = client or HubClient(config.hub, config.site, identity, max_bytes=config.max_message_bytes)
        self.store = NodeStore(config.state_dir / "node.db")
        self.audit = AuditLog(config.state_dir / "audit.jsonl", config.site)
        self._cache: dict[str, tuple[tuple, Any]] = {}
        self._verified: dict[str, tuple[str, StudySpec]] = {}
        self._scratch: OrderedDict[str, dict[str, Any]] = OrderedDict()

    @classmethod
    def from_config_file(cls, path: Path) -> "Node":
        config = load_site_config(path)
        identity = SigningKey.from_pem(config.identity.read_bytes())
        steward = VerifyKey.from_text(config.steward_key.read_text().strip())
        return cls(config, identity, steward)

    def close(self) -> None:
        self.client.close()
        self.store.close()

    def dataset_names(self) -> list[str]:
        return sorted(set(self.frames) | set(self.config.datasets))

    # --- steward actions -------------------------------------------------------------------

    def register(self) -> None:
        self.client.register("site")

    def approve(self, study_id: str, steward_key: SigningKey) -> StudySpec:
        """Steward approves a study as published on the hub, after checking the researcher signed it."""
        if steward_key.verify_key != self.steward:
            raise SignatureError("this is not the steward key configured for the site")
        envelope = self.client.study_envelope(study_id)
        spec = StudySpec.model_validate(envelope.body()["spec"])
        envelope.verify(VerifyKey.from_text(spec.researcher_key))
        if self.site not in spec.sites:
            raise ValueError(f"study {study_id!r} does not include site {self.site!r}")
        approval = sign_approval(spec, self.site, steward_key, time.time())
        self.store.save_approval(spec.id, spec.model_dump(), approval)
        self.audit.append("approval", study=spec.id, spec_sha256=spec.digest(), datasets=spec.datasets,
                          analyses=spec.analyses, researcher=spec.researcher)
        self.client.post(f"/v1/studies/{spec.id}/approvals",
                         self.client.seal("approval", {"approval": approval}, study=spec.id))
        return spec

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

    # --- task handling ---------------------------------------------------------------------

    def handle(self, raw: bytes) -> Envelope | None:
        """Check and run one task message; return the signed reply (a release or a refusal)."""
        try:
            envelope = open_envelope(raw, self.config.max_message_bytes)
        except WireError as exc:
            self.audit.append("refusal", rule="malformed", detail=str(exc))
            return None
        header = envelope.header
        context = {k: header.get(k) for k in ("study", "task", "step", "phase", "round", "analysis", "sender", "nonce")}
        request_id = self.audit.append("request", **context)
        bound = {"study": header.get("study"), "task": header.get("task"), "step": header.get("step"),
                 "round": header.get("round")}
        try:
            if envelope.kind != "task":
                raise Refusal("malformed", f"expected a task, got {envelope.kind!r}")
            release, decision_ids = self._run(envelope)
        except Exception as exc:
            refusal = exc if isinstance(exc, Refusal) else Refusal("internal_error", f"{type(exc).__name__}: {exc}")
            refusal_id = self.audit.append("refusal", rule=refusal.rule, detail=str(refusal), **context)
            log.info("%s refused %s: [%s] %s", self.site, header.get("task"), refusal.rule, refusal)
            return self.client.seal("reply", {"rule": refusal.rule, "message": str(refusal)}, status="refused",
                                    audit_ids=[request_id, refusal_id], **bound)
        return self.client.seal("reply", release, status="ok", audit_ids=[request_id, *decision_ids], **bound)

    def _run(self, envelope: Envelope) -> tuple[dict[str, Any], list[str]]:
        header = envelope.header
        spec = self.approved_study(str(header.get("study")))
        if header.get("sender") != spec.researcher:
            raise Refusal("wrong_researcher", f"{header.get('sender')!r} is not the researcher of study {spec.id!r}")
        try:
            envelope.verify(VerifyKey.from_text(spec.researcher_key))
        except SignatureError as exc:
            raise Refusal("bad_signature", str(exc)) from exc
        if abs(time.time() - float(header["issued_at"])) > MAX_TASK_AGE_S:
            raise Refusal("stale", "task was issued too long ago")
        task, step = str(header.get("task")), int(header.get("step", -1))
        if not self.store.claim(str(header["nonce"]), task, step):
            raise Refusal("replay", f"task {task!r} step {step} was already handled")
        name = str(header.get("analysis"))
        try:
            analysis = get_analysis(name)
        except UnknownAnalysis as exc:
            raise Refusal("unknown_analysis", str(exc)) from exc
        if name not in spec.analyses:
            raise Refusal("analysis_not_approved", f"analysis {name!r} is not approved for study {spec.id!r}")
        body = envelope.body(self.config.max_message_bytes)
        try:
            params = analysis.parse_params(body.get("params", {}))
        except ValidationError as exc:
            raise Refusal("invalid_parameters", f"invalid parameters for {name}: {exc}") from exc
        dataset = str(header.get("dataset"))
        if dataset not in spec.datasets:
            raise Refusal("dataset_not_approved", f"dataset {dataset!r} is not approved for study {spec.id!r}")
        wanted = analysis.variables(params)
        outside = [v for v in wanted if v not in spec.datasets[dataset]]
        if outside:
            raise Refusal("variable_not_approved",
                          f"variables {outside} are not approved for dataset {dataset!r} in study {spec.id!r}")
        genotype_name = analysis.genotype_dataset(params)
        if genotype_name is not None and genotype_name not in spec.datasets:
            raise Refusal("dataset_not_approved", f"dataset {genotype_name!r} is not approved for study {spec.id!r}")
        phase = str(header.get("phase", "compute"))
        if phase != "compute":
            return self._secure_step(spec, phase, task, step, body)
        data = self._data(dataset)
        missing = [v for v in wanted if v not in data.columns]
        if missing:
            raise Refusal("missing_column", f"column(s) {missing} not found in dataset {dataset!r} at {self.site}")
        round_no = int(header["round"])
        row_sets = analysis.row_sets(params, data) if round_no == 0 and self.config.policy.differencing_guard else []
        if row_sets:
            self._check_differencing(spec.id, dataset, row_sets)
        extra = self._dp_noise(spec, analysis)
        if analysis.uses_scratch:
            extra["scratch"] = self._task_scratch(task)
        if genotype_name is not None:
            extra["genotypes"] = self._genotypes(genotype_name)
        decision_id = self.audit.append("decision", decision="run", study=spec.id, task=task, step=step,
                                        round=round_no, analysis=name, dataset=dataset, variables=wanted,
                                        secure_aggregation=spec.secure_aggregation)
        try:
            release = analysis.local(params, round_no, body.get("broadcast", {}), data, self.config.policy, **extra)
        except DisclosureRefused as exc:
            raise Refusal(exc.rule, exc.detail) from exc
        except (AnalysisError, ValueError, TypeError) as exc:
            raise Refusal("analysis_error", str(exc)) from exc
        sums = {k: np.asarray(v, dtype=np.float64) for k, v in release.sums.items()}
        if "noise" in extra and sums:
            release.public["dp_rho"] = self._charge(spec)
        if spec.secure_aggregation and sums:
            secure = body.get("secagg", {})
            participants = list(secure.get("participants", []))
            keys = self._keyset(str(secure.get("keyset")))
            if self.site not in participants or not set(participants) <= set(keys.peers):
                raise Refusal("secure_aggregation", "participants do not match the key exchange")
            try:
                payload = node_mask(keys, self.site, task, step, participants, sums)
            except (FixedPointOverflow, PermissionError) as exc:
                raise Refusal("secure_aggregation", f"release cannot be masked: {exc}") from exc
        else:
            payload = {"sums": sums}
        payload["public"] = release.public
        release_id = self.audit.append(
            "release", study=spec.id, task=task, step=step, round=round_no, analysis=name,
            arrays={k: list(v.shape) for k, v in sums.items()}, public=summarised(release.public),
            masked=bool(spec.secure_aggregation and sums),
            digest=hashlib.sha256(b"".join(k.encode() + v.tobytes() for k, v in sorted(sums.items()))).hexdigest(),
        )
        return payload, [decision_id, release_id]

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

    def _task_scratch(self, task: str, keep: int = 4) -> dict[str, Any]:
        """Per-task working memory at the site (e.g. a design matrix reused across rounds); never sent."""
        if task not in self._scratch:
            self._scratch[task] = {}
            while len(self._scratch) > keep:
                self._scratch.popitem(last=False)
        self._scratch.move_to_end(task)
        return self._scratch[task]

    def _data_version(self, dataset: str) -> str:
        config = self.config.datasets.get(dataset)
        return repr(config.fingerprint()) if config is not None and dataset not in self.frames else f"frame:{dataset}"

    def _check_differencing(self, study: str, dataset: str, row_sets: list[np.ndarray]) -> None:
        version = self._data_version(dataset)
        earlier = self.store.row_sets(study, dataset, version)
        try:
            for row_set in row_sets:
                check_differencing(row_set, earlier, self.config.policy)
        except DisclosureRefused as exc:
            raise Refusal(exc.rule, exc.detail) from exc
        for row_set in row_sets:
            self.store.add_row_set(study, dataset, version, row_set)

    def _dp_noise(self, spec: StudySpec, analysis: Any) -> dict[str, Any]:
        """Keyword arguments for the local step: OpenDP noise when the study asks for DP."""
        rho = spec.dp_rho_per_release
        if rho is None:
            return {}
        if not analysis.supports_dp:
            raise Refusal("dp_unsupported", f"analysis {analysis.name!r} has no differentially private release yet")
        spent = self.store.budget_spent(spec.id)
        if spent + rho > self.config.policy.dp_budget_rho * (1 + 1e-12):
            exhausted = BudgetExhausted(spec.id, spent, rho, self.config.policy.dp_budget_rho)
            raise Refusal(exhausted.rule, exhausted.detail)
        return {"noise": gaussian_count_noise(rho)}

    def _charge(self, spec: StudySpec) -> float:
        rho = float(spec.dp_rho_per_release or 0.0)
        try:
            self.store.charge_budget(spec.id, rho, self.config.policy.dp_budget_rho)
        except OverflowError as exc:
            exhausted = BudgetExhausted(spec.id, float(exc.args[0]), rho, self.config.policy.dp_budget_rho)
            raise Refusal(exhausted.rule, exhausted.detail) from exc
        return rho

    def _keyset(self, keyset: str) -> NodeTaskKeys:
        stored = self.store.get(f"secagg:{keyset}")
        if stored is None:
            raise Refusal("secure_aggregation", f"no key exchange {keyset!r} at {self.site}")
        return NodeTaskKeys.from_json(stored)

    def _secure_step(self, spec: StudySpec, phase: str, task: str, step: int,
                     body: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """The key exchange, share distribution and unmasking steps of secure aggregation."""
        if not spec.secure_aggregation:
            raise Refusal("secure_aggregation", f"study {spec.id!r} does not use secure aggregation")
        secure = body.get("secagg", {})
        keyset = str(secure.get("keyset"))
        if phase == "keys":
            if self.store.get(f"secagg:{keyset}") is not None:
                raise Refusal("secure_aggregation", f"key set {keyset!r} already exists")
            keys, public = node_new_keys()
            public["keyset"] = keyset
        elif phase == "shares":
            keys = self._keyset(keyset)
            peers = self._verified_peer_keys(keyset, secure.get("key_envelopes", {}), spec)
            public = node_shares(keys, self.site, keyset, peers, spec.threshold())
        elif phase == "unmask":
            keys = self._keyset(keyset)
            of_step = int(secure["of_step"])
            submitted = set(self.client.get_json(f"/v1/tasks/{task}/rounds/{of_step}/senders"))
            try:
                public = node_reveal(keys, self.site, keyset, list(secure["dropped"]),
                                     secure["ciphertexts"].get(self.site, {}), submitted)
            except PermissionError as exc:
                raise Refusal("secure_aggregation", str(exc)) from exc
        else:
            raise Refusal("malformed", f"unknown phase {phase!r}")
        self.store.put(f"secagg:{keyset}", keys.to_json())
        decision_id = self.audit.append("secure_aggregation", phase=phase, study=spec.id, task=task, step=step,
                                        detail=sorted(public))
        return {"sums": {}, "public": public}, [decision_id]

    def _verified_peer_keys(self, keyset: str, envelopes: dict[str, bytes], spec: StudySpec) -> dict[str, bytes]:
        """Each peer's key must come in that peer's own signed reply to this key set's key step."""
        peers = {}
        for site, raw in envelopes.items():
            envelope = open_envelope(raw, self.config.max_message_bytes)
            try:
                envelope.verify(self.client.public_key(site))
            except SignatureError as exc:
                raise Refusal("secure_aggregation", f"key of {site!r} is not signed by {site!r}") from exc
            public = envelope.body()["public"]
            if envelope.sender != site or public.get("keyset") != keyset or site not in spec.sites:
                raise Refusal("secure_aggregation", f"key envelope of {site!r} is bound to another key set or site")
            peers[site] = base64.b64decode(public["secagg_public"])
        if self.site not in peers:
            raise Refusal("secure_aggregation", f"the key exchange does not include {self.site}")
        return peers

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
        """Fetch waiting tasks (long-poll up to `wait` s), handle and answer them; return how many."""
        cursor = int(self.store.get("cursor", 0))
        items = self.client.inbox(cursor, wait)
        for seq, raw in items:
            reply = self.handle(raw)
            if reply is not None:
                self._deliver(reply)
            self.store.put("cursor", seq)
        return len(items)

    def _deliver(self, reply: Envelope) -> None:
        try:
            self.client.post_until_accepted("/v1/messages", reply)
        except HubError as exc:
            log.warning("%s: reply to task %s not delivered: %s", self.site, reply.header.get("task"), exc)

    def serve(self, stop: threading.Event) -> None:
        """Poll until `stop` is set, reconnecting with backoff when the hub is away."""
        backoff = 0.05
        (self.config.state_dir / "polling").write_text(str(time.time()))
        while not stop.is_set():
            try:
                self.poll_once(self.config.poll_wait_s)
                backoff = 0.05
            except HubError as exc:
                if stop.is_set():
                    return
                log.debug("%s: hub unavailable (%s); retrying in %.2fs", self.site, exc, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
