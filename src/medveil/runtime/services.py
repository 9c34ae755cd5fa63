"""Site services: long-lived, registered services a node builds from its own data on its
steward's command and that answer researchers' queries arriving through the node's inbox.

A service is a registered class (`register_service`, like analyses) with typed build options
and a typed query schema. The steward builds it (`ServiceHost.build`, or `medveil service
build`): the node reads its own dataset, computes the service's state and keeps it under
state_dir/services/<name>/service.bin (wire-encoded, 0600, in a 0700 directory) with a manifest
the steward's key signs, so a service file altered at rest is refused. A query is a task
envelope with phase "query" (analysis "service", dataset = the service name, step 0, round 0,
a fresh task id per query) and body {"query": {...}}. It passes, in order, each refusal naming
its rule: is a well-formed query (`malformed`), the study approved by the steward
(`study_not_approved`), sent by the study's researcher (`wrong_researcher`), signed by them
(`bad_signature`), fresh (`stale`), not a replay (`replay`), the service listed in the study
(`service_not_approved`), registered (`unknown_service`) and built here (`service_not_built`),
a query that fits the service's schema and its built state (`invalid_query`, or a rule the
service names), and the researcher's quota: by default a daily quota per service, or, for a
service that says so, a total budget shared by every service of one budget group
(`Service.charge`); either is kept under both their name and their signing key, so an alias
does not refill it, counted durably across restarts and studies (`service_quota_exhausted`
daily, `query_budget_exhausted` for a total); then the service answers under the node's
disclosure policy (min_cell_count, never weakened by a service's options). A service that
reads genotypes names its PLINK dataset in its `genotypes` option, and the manifest records
the version (size and modification time) of each input, so `ServiceHost.status` reports a
service whose data changed since as stale; only the steward's rebuild refreshes it. The audit
log gets `service_build`, `service_query` (a keyed digest of the query; the query itself only
for services whose queries are not sensitive), and `service_answer` or `refusal`.

Built in: `count_lookup`, "how many patients have key K" (a diagnosis or variant code): a count
below the minimum cell count is answered as suppressed, and a key nobody has is answered exactly
the same way, so a researcher cannot tell absence from a small count, nor read one patient. And
`variant_profile` (runtime/pir_service.py): per-variant carrier counts by phenotype group,
looked up by single-server PIR so that the site never learns which variant was asked.

What each party learns: the researcher learns the answers its queries get (counts of at least
the minimum, never rows, and nothing that tells a small count from none). The hub relays the
query and the answer, which are signed but not encrypted: it learns who queried which site's
service, when, the message sizes, and can read both (TLS on every hop keeps them from the
network); a service whose queries must stay hidden from the hub seals them as per-recipient
payloads (crypto/sealed.py). The site learns every query (for `count_lookup` the key asked;
`variant_profile`'s PIR queries hide the variant from the site: runtime/pir_service.py). The audit log
holds a keyed digest of a sensitive query, so its readers cannot recover a key by hashing
candidates, while the node can confirm a given query (`ServiceHost.query_digest`). Residual
risk: rebuilding a service on changed data lets a researcher compare answers before and after
(a new patient with key K may move K's count from 5 to 6); stewards rebuild deliberately.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medveil.crypto.signing import (
    SignatureError,
    SigningKey,
    VerifyKey,
    b64decode,
    b64encode,
)
from medveil.privacy.disclosure import DisclosurePolicy
from medveil.runtime.audit import summarised
from medveil.runtime.config import make_private_dir, write_private_file
from medveil.runtime.grid import FederationError, Step
from medveil.runtime.node import MAX_TASK_AGE_S, Refusal
from medveil.runtime.study import StudySpec
from medveil.runtime.wire import (
    Envelope,
    WireError,
    canonical_json,
    pack_body,
    unpack_body,
)

if TYPE_CHECKING:
    from medveil.data.genotypes import GenotypeFile
    from medveil.runtime.node import Node
    from medveil.runtime.node_store import NodeStore

QUERY_PHASE = "query"
QUERY_ANALYSIS = "service"
MAX_QUERY_BYTES = 64 * 1024
MAX_SERVICE_FILE_BYTES = 4 * 1024 * 1024 * 1024
SERVICE_FILE = "service.bin"
AUDIT_KEY_SETTING = "services:audit_key"
DAILY_PREFIX, TOTAL_PREFIX = "services:quota:", "services:budget:"
QUERY_FIELDS = ("study", "task", "step", "round", "analysis", "dataset")
CONTEXT_FIELDS = ("study", "task", "sender", "nonce", "dataset")


class UnknownService(KeyError):
    """No service is registered under that name."""


class ServiceError(ValueError):
    """A steward's build command the node will not carry out; `rule` names why."""

    def __init__(self, rule: str, message: str):
        super().__init__(message)
        self.rule = rule


class ServiceOptions(BaseModel):
    """Build options every service has; a service's own options extend these."""

    model_config = ConfigDict(extra="forbid")

    queries_per_day: int = Field(1000, ge=1, le=10_000_000, description="queries one researcher may send this "
                                                                        "service per UTC day, across studies")


@dataclass(frozen=True)
class BuildInputs:
    """What a build reads besides the table: the site's policy and, for a service that
    `uses_genotypes`, the PLINK dataset its `genotypes` option names."""

    policy: DisclosurePolicy
    genotypes: GenotypeFile | None = None


@dataclass(frozen=True)
class Charge:
    """What one query costs: `amount` from the budget `group`, of at most `limit` queries per
    researcher, per UTC day or (`total`) ever."""

    group: str
    amount: int
    limit: int
    total: bool = False


class Service:
    """One registered service: subclasses set `name`, `Options`, `Query` and the three methods,
    and may refine the hooks below (query size, checks against the built state, the charge)."""

    name: ClassVar[str]
    Options: ClassVar[type[ServiceOptions]] = ServiceOptions
    Query: ClassVar[type[BaseModel]]
    sensitive_query: ClassVar[bool] = True  # the audit log then holds only a keyed digest of each query
    uses_genotypes: ClassVar[bool] = False  # its Options have `genotypes`, a PLINK dataset read at build

    def build(self, data: pd.DataFrame, options: ServiceOptions, inputs: BuildInputs) -> dict[str, Any]:
        """The service's state from the site's table: wire-encodable, kept at the site, never sent."""
        raise NotImplementedError

    def summary(self, state: dict[str, Any]) -> dict[str, Any]:
        """What the steward sees of a built service (`medveil service list`); never sent."""
        raise NotImplementedError

    def answer(self, state: dict[str, Any], query: BaseModel, options: ServiceOptions,
               policy: DisclosurePolicy) -> dict[str, Any]:
        """The public answer to one validated query, under the site's disclosure policy."""
        raise NotImplementedError

    def max_query_bytes(self, state: dict[str, Any]) -> int:
        """The largest query body this built service accepts."""
        return MAX_QUERY_BYTES

    def check(self, state: dict[str, Any], query: BaseModel, options: ServiceOptions,
              policy: DisclosurePolicy) -> None:
        """Refuse (raise a Refusal naming its rule) a schema-valid query the built state cannot
        answer, before it is charged."""

    def charge(self, query: BaseModel, options: ServiceOptions, policy: DisclosurePolicy | None = None) -> Charge:
        """What the query costs: one of the researcher's `queries_per_day` for this service (the
        node's `policy` may cap a service's limit)."""
        return Charge(self.name, 1, options.queries_per_day)

    def wire_query(self, query: BaseModel) -> dict[str, Any]:
        """The validated query as the researcher's side sends it (JSON-like values)."""
        return query.model_dump(mode="json")


_SERVICES: dict[str, Service] = {}


def register_service(cls: type[Service]) -> type[Service]:
    """Class decorator: make a service available to every node by its name."""
    if cls.name in _SERVICES:
        raise ValueError(f"service {cls.name!r} is registered twice")
    _SERVICES[cls.name] = cls()
    return cls


def get_service(name: str) -> Service:
    try:
        return _SERVICES[name]
    except (KeyError, TypeError):
        raise UnknownService(f"service {str(name)[:64]!r} is not registered") from None


def service_names() -> list[str]:
    return sorted(_SERVICES)


# --- count_lookup ---------------------------------------------------------------------------


class CountLookupOptions(ServiceOptions):
    key_column: str = Field(min_length=1, max_length=256, description="the column holding each patient's key "
                                                                      "(e.g. a diagnosis or variant code)")
    patient_column: str | None = Field(None, min_length=1, max_length=256,
                                       description="a patient id column, when a patient may have several rows: "
                                                   "patients are then counted once per key")
    min_count: int | None = Field(None, ge=1, description="a stricter minimum count than the site's "
                                                          "min_cell_count (never a weaker one)")


class CountLookupQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    key: str = Field(min_length=1, max_length=256)


def lookup_key(value: Any) -> str:
    """The text a key value is looked up by: stripped, with integral floats written as integers."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


@register_service
class CountLookup(Service):
    """How many patients have key K; small counts and unknown keys are answered alike as suppressed."""

    name = "count_lookup"
    Options = CountLookupOptions
    Query = CountLookupQuery

    def build(self, data: pd.DataFrame, options: ServiceOptions, inputs: BuildInputs) -> dict[str, Any]:
        assert isinstance(options, CountLookupOptions)
        columns = [options.key_column] + ([options.patient_column] if options.patient_column else [])
        missing = [c for c in columns if c not in data.columns]
        if missing:
            raise ServiceError("missing_column", f"column(s) {missing} are not in the dataset")
        rows = data[columns].dropna()
        keys = rows[options.key_column].map(lookup_key)
        if options.patient_column:
            counts = rows.assign(_key=keys).groupby("_key")[options.patient_column].nunique()
        else:
            counts = keys.value_counts()
        counts = counts[counts.index != ""]
        return {"counts": {str(k): int(v) for k, v in counts.items()}, "rows": len(rows)}

    def summary(self, state: dict[str, Any]) -> dict[str, Any]:
        return {"keys": len(state["counts"]), "rows": state["rows"]}

    def answer(self, state: dict[str, Any], query: BaseModel, options: ServiceOptions,
               policy: DisclosurePolicy) -> dict[str, Any]:
        assert isinstance(query, CountLookupQuery) and isinstance(options, CountLookupOptions)
        threshold = max(policy.min_cell_count, options.min_count or 0)
        count = state["counts"].get(query.key.strip(), 0)
        if count < threshold:
            return {"count": None, "suppressed": True, "min_count": threshold}
        return {"count": count, "suppressed": False, "min_count": threshold}


# --- the node's side --------------------------------------------------------------------------


@dataclass
class BuiltService:
    """A built service as loaded from disk, its manifest checked against the steward's key."""

    service: Service
    manifest: dict[str, Any]
    options: ServiceOptions
    state: dict[str, Any]


@dataclass
class Query:
    """One query as the guards see it; each guard fills in what the later ones use."""

    envelope: Envelope
    spec: StudySpec | None = None
    service: Service | None = None
    built: BuiltService | None = None
    query: BaseModel | None = None
    audit_ids: list[str] = field(default_factory=list)

    @property
    def header(self) -> dict[str, Any]:
        return self.envelope.header


class ServiceHost:
    """A node's services: builds them on the steward's command and answers queries through them."""

    def __init__(self, node: Node, *, clock: Callable[[], float] = time.time):
        self.node = node
        self.clock = clock
        self.directory = node.config.state_dir / "services"
        self._lock = threading.Lock()
        self._loaded: dict[str, tuple[tuple[int, int, int], BuiltService]] = {}

    # --- steward actions ----------------------------------------------------------------------

    def build(self, name: str, dataset: str, options: Mapping[str, Any], steward_key: SigningKey) -> dict[str, Any]:
        """Build (or rebuild) service `name` from this site's `dataset`; the steward's key signs the
        manifest. Returns the manifest. Raises SignatureError for a key that is not the steward's,
        ServiceError (with a rule) for a command the node refuses."""
        if steward_key.verify_key != self.node.steward:
            raise SignatureError("this is not the steward key configured for the site")
        try:
            service = get_service(name)
        except UnknownService as exc:
            raise ServiceError("unknown_service", str(exc)) from exc
        try:
            parsed = service.Options.model_validate(dict(options))
        except ValidationError as exc:
            raise ServiceError("invalid_options", f"invalid options for {name}: {_errors(exc)}") from exc
        try:
            data = self.node._data(dataset)
            genotypes = self.node._genotypes(parsed.genotypes) if service.uses_genotypes else None
        except Refusal as exc:
            raise ServiceError(exc.rule, str(exc)) from exc
        inputs = self._input_versions(dataset, parsed)
        state = service.build(data, parsed, BuildInputs(self.node.config.policy, genotypes))
        state_bytes = pack_body(state)
        manifest = {"service": name, "site": self.node.site, "dataset": dataset,
                    "options": parsed.model_dump(mode="json"), "built_at": self.clock(), "inputs": inputs,
                    "state_sha256": hashlib.sha256(state_bytes).hexdigest(), "summary": service.summary(state)}
        signature = steward_key.sign(canonical_json(manifest))
        self._write(name, pack_body({"manifest": manifest, "signature": b64encode(signature), "state": state_bytes}))
        self.node.audit.append("service_build", **manifest)
        return manifest

    def manifests(self) -> list[dict[str, Any]]:
        """The manifests of the services built here (what `medveil service list` shows)."""
        built = []
        for name in service_names():
            try:
                built.append(self._load(name).manifest)
            except Refusal as exc:
                if exc.rule != "service_not_built":
                    built.append({"service": name, "error": str(exc)})
        return built

    def status(self, name: str) -> dict[str, Any]:
        """A built service's manifest and whether it is `stale`: an input (the table, the genotype
        fileset) changed since the build, listed in `changed`; rebuilding is the steward's call.
        Raises a Refusal (service_not_built, service_corrupt) like a query would."""
        built = self._load(name)
        recorded = built.manifest.get("inputs") or {}
        current = self._input_versions(built.manifest["dataset"], built.options)
        changed = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
        return {**built.manifest, "stale": bool(changed), "changed": changed}

    def _input_versions(self, dataset: str, options: ServiceOptions) -> dict[str, Any]:
        """The version of each input a build reads: the stat (size, mtime) of its files; an
        in-memory table has no version ("frame:<name>")."""
        names = {"dataset": dataset}
        if isinstance(getattr(options, "genotypes", None), str):
            names["genotypes"] = options.genotypes
        versions: dict[str, Any] = {}
        for role, name in names.items():
            config = self.node.config.datasets.get(name)
            if config is None or name in self.node.frames or config.path is None:
                versions[role] = f"frame:{name}"
                continue
            paths = [config.path.with_suffix(s) for s in (".bed", ".bim", ".fam")] if config.kind == "plink" \
                else [config.path, *([config.labels_path] if config.kind == "images" else [])]
            versions[role] = [_file_version(path) for path in paths]
        return versions

    def _path(self, name: str) -> Path:
        return self.directory / name / SERVICE_FILE

    def _write(self, name: str, data: bytes) -> None:
        """Replace the service file atomically (written 0600 beside it, then renamed over it)."""
        make_private_dir(self.directory)
        folder = make_private_dir(self.directory / name)
        temporary = folder / f".{SERVICE_FILE}.{secrets.token_hex(8)}"
        write_private_file(temporary, data)
        os.replace(temporary, folder / SERVICE_FILE)
        with self._lock:
            self._loaded.pop(name, None)

    def _load(self, name: str) -> BuiltService:
        """The built service, re-read when its file changed; refused unless the steward signed it."""
        path = self._path(name)
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise Refusal("service_not_built", f"service {name!r} is not built at {self.node.site}") from None
        version = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        with self._lock:
            cached = self._loaded.get(name)
        if cached is not None and cached[0] == version:
            return cached[1]
        try:
            record = unpack_body(path.read_bytes(), MAX_SERVICE_FILE_BYTES)
            manifest, signature, state_bytes = record["manifest"], record["signature"], record["state"]
            self.node.steward.verify(b64decode(signature), canonical_json(manifest))
            if manifest["service"] != name or hashlib.sha256(state_bytes).hexdigest() != manifest["state_sha256"]:
                raise SignatureError("the service file does not match its signed manifest")
            service = get_service(name)
            built = BuiltService(service, manifest, service.Options.model_validate(manifest["options"]),
                                 unpack_body(state_bytes, MAX_SERVICE_FILE_BYTES))
        except (WireError, SignatureError, KeyError, TypeError, ValueError) as exc:
            raise Refusal("service_corrupt", f"service {name!r} at {self.node.site} fails its integrity check; "
                                             "the steward must rebuild it") from exc
        with self._lock:
            self._loaded[name] = (version, built)
        return built

    # --- queries ------------------------------------------------------------------------------

    def handle(self, envelope: Envelope) -> Envelope:
        """Check and answer one query (an opened task envelope with phase "query"); return the
        signed reply, an answer or a refusal naming its rule. Nothing a query holds raises out."""
        node, header = self.node, envelope.header
        context = {k: header.get(k) for k in CONTEXT_FIELDS}
        bound = {k: header.get(k) for k in ("study", "task", "step", "round")}
        query = Query(envelope)
        try:
            answer = self._run(query)
        except Exception as exc:  # noqa: BLE001 - nothing a query holds may raise out of the node
            # An unexpected error's text may hold data values: the researcher gets its type only.
            refusal = exc if isinstance(exc, Refusal) else Refusal(
                "internal_error", f"{type(exc).__name__} at {node.site}; the site's audit log has the details")
            detail = str(refusal) if isinstance(exc, Refusal) else f"{type(exc).__name__}: {exc}"
            refusal_id = node.audit.append("refusal", rule=refusal.rule, detail=detail, phase=QUERY_PHASE, **context)
            return node.client.seal("reply", {"rule": refusal.rule, "message": str(refusal)}, status="refused",
                                    audit_ids=[*query.audit_ids, refusal_id], audit_head=node.audit.head(), **bound)
        answer_id = node.audit.append("service_answer", service=query.service.name, study=query.spec.id,
                                      task=header["task"], answer=summarised(answer))
        return node.client.seal("reply", {"public": answer}, status="ok", audit_ids=[*query.audit_ids, answer_id],
                                audit_head=node.audit.head(), **bound)

    def query_guards(self) -> list[Callable[[Query], None]]:
        """The checks every query passes, in order; each raises a Refusal naming its rule."""
        return [self._guard_is_query, self._guard_study_approved, self._guard_sender_is_researcher,
                self._guard_signed_by_researcher, self._guard_fresh, self._guard_not_replayed,
                self._guard_service_approved, self._guard_service_built, self._guard_query_valid,
                self._guard_quota]

    def _run(self, query: Query) -> dict[str, Any]:
        for guard in self.query_guards():
            guard(query)
        built = query.built
        return built.service.answer(built.state, query.query, built.options, self.node.config.policy)

    def _guard_is_query(self, query: Query) -> None:
        """A query is a task in phase "query" of analysis "service", step 0 and round 0, naming the
        service as its dataset (and in `service`, if given) and addressed to this site."""
        header = query.header
        if query.envelope.kind != "task" or header.get("phase") != QUERY_PHASE:
            raise Refusal("malformed", "a service query is a task in phase 'query'")
        missing = [name for name in QUERY_FIELDS if header.get(name) is None]
        if missing:
            raise Refusal("malformed", f"a query header needs {missing}")
        if header["analysis"] != QUERY_ANALYSIS or header["step"] != 0 or header["round"] != 0:
            raise Refusal("malformed", f"a query has analysis {QUERY_ANALYSIS!r}, step 0 and round 0")
        if header.get("service") is not None and header["service"] != header["dataset"]:
            raise Refusal("malformed", "a query names its service as its dataset; the two differ")
        if self.node.site not in (header.get("recipients") or []):
            raise Refusal("malformed", f"the query is not addressed to {self.node.site}")

    def _guard_study_approved(self, query: Query) -> None:
        query.spec = self.node.approved_study(query.header["study"])

    def _guard_sender_is_researcher(self, query: Query) -> None:
        if query.envelope.sender != query.spec.researcher:
            raise Refusal("wrong_researcher",
                          f"{query.envelope.sender!r} is not the researcher of study {query.spec.id!r}")

    def _guard_signed_by_researcher(self, query: Query) -> None:
        try:
            query.envelope.verify(VerifyKey.from_text(query.spec.researcher_key))
        except SignatureError as exc:
            raise Refusal("bad_signature", str(exc)) from exc

    def _guard_fresh(self, query: Query) -> None:
        if abs(self.clock() - float(query.header["issued_at"])) > MAX_TASK_AGE_S:
            raise Refusal("stale", "the query was issued too long ago")

    def _guard_not_replayed(self, query: Query) -> None:
        if not self.node.store.claim(str(query.header["nonce"]), query.header["task"], 0):
            raise Refusal("replay", f"query {query.header['task']!r} was already handled")

    def _guard_service_approved(self, query: Query) -> None:
        name = query.header["dataset"]
        if name not in query.spec.services:
            raise Refusal("service_not_approved", f"service {name!r} is not approved for study {query.spec.id!r}")
        try:
            query.service = get_service(name)
        except UnknownService as exc:
            raise Refusal("unknown_service", str(exc)) from exc

    def _guard_service_built(self, query: Query) -> None:
        query.built = self._load(query.service.name)

    def _guard_query_valid(self, query: Query) -> None:
        """The body is {"query": map} of at most the service's max_query_bytes (MAX_QUERY_BYTES
        unless it says otherwise), the map fits the service's schema and its built state."""
        built = query.built
        limit = query.service.max_query_bytes(built.state)
        if len(query.envelope.body_bytes) > limit:
            raise Refusal("invalid_query", f"a query body has at most {limit} bytes")
        try:
            body = query.envelope.body(limit)
        except WireError as exc:
            raise Refusal("malformed", str(exc)) from exc
        if set(body) != {"query"} or not isinstance(body["query"], dict):
            raise Refusal("invalid_query", "a query body is {'query': {...}}")
        try:
            query.query = query.service.Query.model_validate(body["query"])
        except ValidationError as exc:
            raise Refusal("invalid_query", f"invalid query for {query.service.name}: {_errors(exc)}") from exc
        query.service.check(built.state, query.query, built.options, self.node.config.policy)

    def _guard_quota(self, query: Query) -> None:
        """Charge the query (`Service.charge`: by default one of the researcher's daily queries
        of the service; or several from a total budget shared by a group of services) durably,
        after recording the query; refused, uncharged, when the budget cannot cover it. The
        budget is kept twice, under the researcher's name and under their signing key, and a
        query is charged to both: a study that names the same key under another name (or the
        same name with a new key) finds it as spent as the researcher left it."""
        spec, service, built = query.spec, query.service, query.built
        cost = service.charge(query.query, built.options, self.node.config.policy)
        day = None if cost.total else datetime.fromtimestamp(self.clock(), tz=UTC).date().isoformat()
        used, charged = charge_budget(self.node.store, cost.group, researcher_identities(spec), cost.amount,
                                      cost.limit, day=day)
        plain = query.query.model_dump(mode="json")
        entry: dict[str, Any] = {"service": service.name, "study": spec.id, "task": query.header["task"],
                                 "researcher": spec.researcher, "query_digest": self._query_digest(service, plain),
                                 "quota_used": min(used + cost.amount if charged else used, cost.limit),
                                 "quota_limit": cost.limit, "charge": cost.amount, "budget_group": cost.group}
        entry.update({"quota_total": True} if cost.total else {"quota_day": day})
        if not service.sensitive_query:
            entry["query"] = plain
        query.audit_ids.append(self.node.audit.append("service_query", **entry))
        if charged:
            return
        if cost.total:
            raise Refusal("query_budget_exhausted", f"researcher {spec.researcher!r} has used {used} of the "
                                                    f"{cost.limit} look-ups of budget {cost.group!r} at "
                                                    f"{self.node.site}; this query needs {cost.amount}")
        raise Refusal("service_quota_exhausted", f"researcher {spec.researcher!r} has used all {cost.limit} "
                                                 f"queries of {cost.group!r} at {self.node.site} today (UTC)")

    def _query_digest(self, service: Service, query: dict[str, Any]) -> str:
        """HMAC-SHA256 of the query under a key kept in the node's store: readers of the audit log
        cannot test candidate keys against it; the node can confirm a given query."""
        with self._lock:
            key_hex = self.node.store.get(AUDIT_KEY_SETTING)
            if key_hex is None:
                key_hex = secrets.token_hex(32)
                self.node.store.put(AUDIT_KEY_SETTING, key_hex)
        message = canonical_json({"service": service.name, "query": query})
        return hmac.new(bytes.fromhex(key_hex), message, hashlib.sha256).hexdigest()

    def query_digest(self, service: str, query: Mapping[str, Any]) -> str:
        """The digest the audit log records for `query` to `service` (for a steward confirming one)."""
        parsed = get_service(service).Query.model_validate(dict(query))
        return self._query_digest(get_service(service), parsed.model_dump(mode="json"))


_BUDGET_LOCK = threading.Lock()


def researcher_identities(spec: StudySpec) -> list[str]:
    """The names a researcher's budgets are kept under: their name and their signing key."""
    return [spec.researcher, f"key:{spec.researcher_key}"]


def charge_budget(store: NodeStore, group: str, identities: Sequence[str], amount: int, limit: int, *,
                  day: str | None = None) -> tuple[int, bool]:
    """Charge `amount` to budget `group` of the researcher known by `identities` (all of them
    charged; the most spent of them counts), if it stays within `limit`: per `day` (a UTC date)
    or, with day None, in total, never reset. Returns (used before, whether it was charged);
    all or nothing, kept durably in the node's store."""
    prefix = DAILY_PREFIX if day is not None else TOTAL_PREFIX
    settings = [prefix + hashlib.sha256(f"{group}\0{who}".encode()).hexdigest()[:48] for who in identities]
    with _BUDGET_LOCK:
        stored = [store.get(setting) or {} for setting in settings]
        used = max((int(s.get("used", 0)) if s.get("day") == day else 0 for s in stored), default=0)
        charged = used + amount <= limit
        if charged:
            for setting in settings:
                store.put(setting, {"day": day, "used": used + amount} if day is not None else {"used": used + amount})
    return used, charged


def _file_version(path: Path) -> list[Any]:
    try:
        stat = path.stat()
    except OSError:
        return [path.name, None, None]
    return [path.name, stat.st_size, stat.st_mtime_ns]


def _errors(exc: ValidationError) -> str:
    """A validation error's locations and messages, without the input values (which may be sensitive)."""
    return "; ".join(f"{'.'.join(map(str, error['loc'])) or 'query'}: {error['msg']}"
                     for error in exc.errors(include_input=False, include_url=False))[:1000]


# --- the researcher's side ----------------------------------------------------------------------


def query_step(site: str, service: str, task: str, body: dict[str, Any]) -> Step:
    """The Grid step that carries one query to one site's service."""
    return Step(task=task, step=0, phase=QUERY_PHASE, round=0, analysis=QUERY_ANALYSIS, bodies={site: body},
                datasets={site: service})


def query_service(send: Callable[[str, dict[str, Any]], dict[str, Any]], service: str,
                  query: Mapping[str, Any]) -> dict[str, Any]:
    """Ask a site's service one query. `send(task, body)` delivers the query step for a fresh
    task id and returns the site's verified reply body (raising on a refusal), over any transport;
    the query is checked against the service's schema first (ValueError), the site checks it again."""
    try:
        parsed = get_service(service).Query.model_validate(dict(query))
    except ValidationError as exc:
        raise ValueError(f"invalid query for {service}: {_errors(exc)}") from exc
    body = send(f"query-{secrets.token_hex(12)}", {"query": get_service(service).wire_query(parsed)})
    answer = body.get("public") if isinstance(body, dict) else None
    if not isinstance(answer, dict):
        raise FederationError(f"the reply of service {service!r} holds no answer")
    return answer


from medveil.runtime import pir_service  # noqa: F401 - registers variant_profile (it builds on this module)

__all__ = [
    "MAX_QUERY_BYTES",
    "QUERY_ANALYSIS",
    "QUERY_PHASE",
    "BuildInputs",
    "Charge",
    "CountLookup",
    "CountLookupOptions",
    "CountLookupQuery",
    "Service",
    "ServiceError",
    "ServiceHost",
    "ServiceOptions",
    "UnknownService",
    "charge_budget",
    "get_service",
    "lookup_key",
    "query_service",
    "query_step",
    "register_service",
    "researcher_identities",
    "service_names",
]
