"""The analysis framework: a LOCAL step at each site and a GLOBAL step over the aggregates.

An analysis runs in rounds. In each round every site's LOCAL step turns its data (plus what
the previous GLOBAL step broadcast) into a `Release`: arrays to be summed across sites through
the `aggregate` seam, a few public per-site facts (rows used, levels that passed the
disclosure rules) and, for two-party protocols, payloads addressed to single sites, which the
node encrypts end to end and which are never summed. The LOCAL step gets everything its node
gives it in one `SiteContext` (table, policy, durable scratch, DP noise, genotypes, the
payloads addressed to it). The GLOBAL step sees only the cross-site sums, those public facts
and the sealed payloads it may forward, and either broadcasts the next round (its state
wire-encodable, so a run can be checkpointed after every round) or finishes with a result.
Both steps are pure.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Generic, TypeVar

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from medveil.crypto.encoding import canonical_json
from medveil.data.genotypes import GenotypeFile
from medveil.data.images import ImageFolder
from medveil.privacy.disclosure import DisclosurePolicy

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"  # a site, study or researcher name (runtime.study uses it)
SiteName = Annotated[str, Field(pattern=NAME_PATTERN)]


class AnalysisError(Exception):
    """The data or the parameters do not allow this analysis (not a disclosure refusal)."""


class UnknownAnalysis(AnalysisError):
    pass


class BroadcastRefused(Exception):
    """A broadcast the site cannot vouch for (never released by it, out of order, too large);
    `rule` names the check, as a node refusal quotes it."""

    def __init__(self, rule: str, message: str):
        super().__init__(f"[{rule}] {message}")
        self.rule = rule
        self.detail = message


class Params(BaseModel):
    """Base class of every analysis' typed parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)


P = TypeVar("P", bound=Params)


@dataclass
class SiteContext:
    """What a site's LOCAL step gets from its node, instead of keyword arguments."""

    site: str  # this site's name
    data: pd.DataFrame  # the approved dataset's table
    policy: DisclosurePolicy
    scratch: MutableMapping[str, Any]  # durable per-task working memory at the site: disk-backed,
    # bounded per task, deleted when the task ends; never sent. Values must be wire-encodable, and a
    # value may be dropped (over the bound): read back only what you check is there.
    memory: Mapping[str, Any]  # node-held task state; memory["released"][r] = what was released in round r
    noise: Callable[[np.ndarray], np.ndarray] | None = None  # DP noise for counts, charged as drawn
    genotypes: GenotypeFile | None = None  # the approved PLINK dataset, when the analysis reads one
    messages: dict[str, dict[str, Any]] = field(default_factory=dict)  # payloads addressed to this site,
    # decrypted and verified, by sender site
    role: str | None = None  # this site's party role in the study (StudySpec.roles)
    data_sites: tuple[str, ...] = ()  # the approved study's sites that hold data (all but dealers)
    study_salt: bytes = b""  # 32 bytes from the study id and approved spec: the same at every site of one
    # study, different in every other (salt for hashing identifiers in private set intersection)
    study_models: tuple[str, ...] = ()  # the model recipes ("name@version") the approved study may train
    charge_privacy: Callable[[float], None] | None = None  # charge zCDP rho to the researcher's budget at
    # this site before releasing what it pays for; raises DisclosureRefused("dp_budget_exhausted")
    privacy_remaining: float | None = None  # zCDP rho the researcher has left at this site (None: not known)
    dp_required: bool = False  # the study releases only differentially private results (dp_rho_per_release set)
    images: ImageFolder | None = None  # the approved dataset's images, read lazily, when it is an image folder


@dataclass
class Release:
    """What one site lets out in one round: `sums` are added up across sites (dtype kept: ints
    stay ints), `public` facts are shown per site, and `payloads` (recipient site -> a
    wire-encodable map) are never summed: the node seals each end to end to its recipient.
    `alignment` ({"rows": int array of table positions in an agreed order, "column", "peers",
    "reveal"}) is kept at the site, never sent: the node records it under the task's id so later
    tasks of the study can run on those rows (`Analysis.alignment`)."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    public: dict[str, Any] = field(default_factory=dict)
    payloads: dict[str, dict[str, Any]] = field(default_factory=dict)
    alignment: dict[str, Any] | None = None


@dataclass
class Aggregated:
    """The global step's view of a round: cross-site sums, each site's public facts, and the
    sealed payloads each site addressed to others (sender -> recipient -> opaque sealed map)."""

    sums: dict[str, np.ndarray]
    public: dict[str, dict[str, Any]]
    payloads: dict[str, dict[str, dict]] = field(default_factory=dict)

    @property
    def sites(self) -> list[str]:
        return sorted(self.public)


@dataclass
class NextRound:
    """The next round's broadcast; `state` (wire-encodable: it is checkpointed every round), extra
    broadcast keys for single sites (`per_site`), and sealed payloads to forward, by recipient."""

    broadcast: dict[str, Any]
    state: dict[str, Any] = field(default_factory=dict)
    per_site: dict[str, dict[str, Any]] = field(default_factory=dict)
    messages: dict[str, list[dict]] = field(default_factory=dict)


@dataclass
class Finished:
    result: Any


class Analysis(ABC, Generic[P]):
    """One registered analysis; subclasses set `name` and `Params` and the two steps."""

    name: ClassVar[str]
    Params: ClassVar[type[Params]]
    releases_sums: ClassVar[bool] = True  # False: nothing to add up, so no secure-aggregation set-up
    supports_dp: ClassVar[bool] = False  # True: `local` uses `context.noise` for its released counts
    reads_images: ClassVar[bool] = False  # True: `local` reads `context.images`; only such an analysis may
    # name an image dataset's file column (file names can be identifying: never a level or a statistic)

    def parse_params(self, raw: dict[str, Any]) -> P:
        return self.Params.model_validate(raw)  # type: ignore[return-value]

    @abstractmethod
    def variables(self, params: P) -> list[str]:
        """Columns the analysis reads; the node checks them against the approved list."""

    def variables_at(self, params: P, site: str, role: str | None) -> list[str]:
        """Columns the analysis reads at `site` (whose study role is `role`): in two-party protocols
        each party reads its own columns. The node checks them against the study's approved
        variables for that site. Default: `variables(params)` everywhere."""
        return self.variables(params)

    def reads_data_at(self, params: P, site: str, role: str | None) -> bool:
        """Whether `site` reads a dataset in this task; a site that does not (a dealer of correlated
        randomness, a study site not taking part) gets an empty table and skips the dataset checks."""
        return True

    def parties(self, params: P) -> dict[str, str | None]:
        """Sites the parameters name, with the study role each must hold (None: any). The node
        refuses a named site outside the study and its own site named with a role its steward did
        not approve."""
        return {}

    def alignment(self, params: P) -> str | None:
        """Id of an alignment (a finished private set intersection's task id) whose rows, in their
        agreed order, the analysis runs on; None: the dataset's own rows."""
        return None

    def genotype_dataset(self, params: P) -> str | None:
        """Name of a genotype dataset (PLINK) the analysis reads beside its table, if any; the node
        checks it is approved and passes it to `local` as `context.genotypes`."""
        return None

    def row_sets(self, params: P, data: pd.DataFrame, round_no: int = 0, broadcast: dict[str, Any] | None = None,
                 policy: DisclosurePolicy | None = None) -> list[np.ndarray]:
        """Boolean masks of the rows each statistic released in this round rests on (each bin, each
        cell), for the differencing guard; the node calls it before every compute round, with its
        policy (which decides, e.g., which cells are suppressed and so release nothing).

        By default one set, in round 0: rows complete in every variable the analysis reads."""
        names = self.variables(params)
        if not names or round_no != 0:
            return []
        return [data[names].notna().all(axis=1).to_numpy()]

    def check_broadcast(self, params: P, round_no: int, broadcast: dict[str, Any], memory: dict[str, Any]) -> None:
        """Refuse, with `BroadcastRefused`, a broadcast this site cannot vouch for.

        The node calls it before `local` in every compute round, after checking the rounds come
        in order. `memory` is the task's state held by this node (wire-encodable, kept on disk):
        `memory["released"][r]` is what this site released publicly in round r; an analysis may
        record there what later rounds must match (agreed levels, grids, batches). An analysis
        that overrides nothing accepts no broadcast at all."""
        if broadcast:
            raise BroadcastRefused("unexpected_broadcast",
                                   f"{self.name} expects no broadcast, got keys {sorted(broadcast)[:10]}")

    def progress(self, params: P, state: dict[str, Any]) -> tuple[int, int] | None:
        """(units done, units in all) after a round, for long analyses that can say; None otherwise."""
        return None

    @abstractmethod
    def local(self, params: P, round_no: int, broadcast: dict[str, Any], context: SiteContext) -> Release:
        """Site step: the context's data -> release, applying the context's disclosure policy."""

    @abstractmethod
    def global_step(
        self, params: P, round_no: int, aggregated: Aggregated, state: dict[str, Any]
    ) -> NextRound | Finished:
        """Researcher-side step: sums -> next broadcast or the final result."""


def params_digest(params: Params) -> str:
    """A digest of a task's parameters as this site got them. Two-party protocols put it in every
    payload and the recipient refuses a different one: the researcher signs each site's step
    separately, so it could give the parties of one task different parameters (PSI reveal modes,
    ID kinds, a vertical model's alignment). A "sites" list counts as a set (a ring is sorted)."""
    fields = params.model_dump(mode="json")
    if isinstance(fields.get("sites"), list):
        fields["sites"] = sorted(fields["sites"])
    return hashlib.sha256(canonical_json(fields)).hexdigest()


_REGISTRY: dict[str, Analysis] = {}


def register(cls: type[Analysis]) -> type[Analysis]:
    """Class decorator adding an analysis to the registry under its `name`."""
    if cls.name in _REGISTRY:
        raise ValueError(f"analysis {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def get_analysis(name: str) -> Analysis:
    from medveil.analyses import load_builtin

    load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownAnalysis(f"analysis {name!r} is not registered") from None


def registered_names() -> list[str]:
    from medveil.analyses import load_builtin

    load_builtin()
    return sorted(_REGISTRY)


def numeric_column(data: pd.DataFrame, column: str) -> pd.Series:
    """The non-missing numeric values of a column, or a clear error."""
    series = data[column]
    if not (pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series)):
        raise AnalysisError(f"variable {column!r} is not numeric (dtype {series.dtype})")
    return series.dropna().astype(np.float64)


def categorical_column(data: pd.DataFrame, column: str) -> pd.Series:
    """The non-missing values of a column as level labels (strings)."""
    series = data[column].dropna()
    if pd.api.types.is_float_dtype(series) and (series == series.round()).all():
        series = series.astype(np.int64)
    return series.astype(str)


def union_of_levels(public: dict[str, dict[str, Any]], key: str) -> list[str]:
    """The sorted union of the level lists that sites released under `key`."""
    return sorted(set().union(*(facts.get(key, []) for facts in public.values())))


def check_collinearity(xtx: np.ndarray, names: list[str]) -> None:
    """Name the columns that are linear combinations of the others (rank-revealing eigenvectors)."""
    scale = np.sqrt(np.clip(np.diag(xtx), 1e-300, None))
    correlation = xtx / np.outer(scale, scale)
    values, vectors = np.linalg.eigh(correlation)
    null = values < 1e-10 * max(values.max(), 1.0)
    if null.any():
        involved = sorted({names[i] for k in np.where(null)[0] for i in np.where(np.abs(vectors[:, k]) > 1e-6)[0]})
        raise AnalysisError(f"the design is collinear: columns {involved} are linearly dependent "
                            f"(rank {int((~null).sum())} of {len(names)})")


def released_in(memory: dict[str, Any], round_no: int) -> dict[str, Any]:
    """What this site released publicly in a round of the task, as its node recorded it ({} if nothing)."""
    facts = memory.get("released", {}).get(round_no)
    return facts if isinstance(facts, dict) else {}


def finite_array(value: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A broadcast array of finite numbers of exactly `shape` (a numeric array, or nested lists of
    ints and floats; never bools or strings), as float64, or a refusal."""
    if not isinstance(value, np.ndarray):
        flat = np.ravel(np.asarray(value, dtype=object)) if isinstance(value, list) else None
        if flat is None or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat):
            raise BroadcastRefused("broadcast_malformed", "a broadcast array is not numeric")
        value = np.asarray(value, dtype=np.float64)
    if value.dtype.kind not in "fiu":
        raise BroadcastRefused("broadcast_malformed", "a broadcast array is not numeric")
    if value.shape != shape or not np.all(np.isfinite(value)):
        raise BroadcastRefused("broadcast_malformed", f"a broadcast array must be finite with shape {shape}")
    return value.astype(np.float64)


def frame_to_wire(frame: pd.DataFrame) -> dict[str, Any]:
    """A table as a wire-encodable map (for state that is checkpointed): its column names, each
    numeric or bool column as an array of its dtype, any other column as a list of values, and
    the index when it is not the default 0..n-1. `frame_from_wire` rebuilds an equal table."""
    columns = {}
    for name in frame.columns:
        series = frame[name]
        dtype = series.dtype
        if isinstance(dtype, np.dtype) and dtype.kind in "biuf":
            columns[str(name)] = series.to_numpy()
        else:
            columns[str(name)] = {"dtype": str(dtype), "values": [_plain(v) for v in series.tolist()]}
    wire: dict[str, Any] = {"columns": [str(name) for name in frame.columns], "data": columns}
    index = frame.index
    if not isinstance(index, pd.RangeIndex) or index.start != 0 or index.step != 1:
        levels = {f"level_{i}": index.get_level_values(i) for i in range(index.nlevels)}
        wire["index"] = frame_to_wire(pd.DataFrame(levels).reset_index(drop=True))
        wire["index_names"] = [None if name is None else str(name) for name in index.names]
    return wire


def frame_from_wire(wire: dict[str, Any]) -> pd.DataFrame:
    """The table `frame_to_wire` encoded (columns, dtypes and index as they were)."""
    data = {}
    for name in wire["columns"]:
        column = wire["data"][name]
        if isinstance(column, dict):
            values = pd.Series(column["values"], dtype=object)
            data[name] = values if column["dtype"] == "object" else values.astype(column["dtype"])
        else:
            data[name] = pd.Series(np.array(column))
    frame = pd.DataFrame(data, columns=list(wire["columns"]))
    if "index" in wire:
        levels, names = frame_from_wire(wire["index"]), wire["index_names"]
        frame.index = (pd.Index(levels.iloc[:, 0], name=names[0]) if len(names) == 1
                       else pd.MultiIndex.from_frame(levels, names=names))
    return frame


def frame_rows(wire: dict[str, Any], rows: slice | np.ndarray) -> pd.DataFrame:
    """Rows of a table `frame_to_wire` encoded (a slice or an array of positions), as a table
    indexed 0..k-1, without decoding the rest (a GWAS's agreed variants run to millions)."""
    part: dict[str, Any] = {"columns": wire["columns"], "data": {}}
    for name in wire["columns"]:
        column = wire["data"][name]
        if isinstance(column, dict):
            values = column["values"]
            picked = values[rows] if isinstance(rows, slice) else [values[int(i)] for i in rows]
            part["data"][name] = {"dtype": column["dtype"], "values": picked}
        else:
            part["data"][name] = np.asarray(column)[rows]
    return frame_from_wire(part)


def frame_length(wire: dict[str, Any]) -> int:
    """How many rows a table `frame_to_wire` encoded holds."""
    if not wire["columns"]:
        return 0
    column = wire["data"][wire["columns"][0]]
    return len(column["values"]) if isinstance(column, dict) else len(column)


def _plain(value: Any) -> Any:
    """A cell as msgpack carries it: numpy scalars as Python ones, pandas' NA as None."""
    if value is pd.NA or value is pd.NaT:
        return None
    return value.item() if isinstance(value, np.generic) else value
