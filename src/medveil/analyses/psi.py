"""psi and distinct_patients: private set intersection of patient IDs, and the registry count.

psi (two parties, ECDH-PSI over crypto.psi, 3 rounds). `left` and `right` each normalise their
IDs (crypto.ids; duplicates collapse to their first row), hash them to the group with the
study's salt, blind them with a fresh key and shuffle them (keeping the permutation):
 r0: each party sends its blinded points H(x)^a to the other, with its policy's min_cell_count;
 r1: each raises the points it got to its own key; right returns X^ab to left (in left's order,
     shuffled again when reveal == "size"); when reveal == "both" left returns Y^ba to right in
     right's order;
 r2: the learning parties (left; right too when "both") match the doubly blinded points, order
     the matched rows by those points' bytes (both hold the same points, so the same order), and
     release the intersection size, keeping the aligned rows at the site (`Release.alignment`).
Every payload carries a digest of the parameters its sender runs the task with, and its recipient
refuses another (`psi_params_mismatch`). Each party refuses a set (its own or its peer's, which
must not repeat a point) of fewer distinct IDs than the stricter of the two parties'
min_cell_count (`psi_set_too_small`) and an intersection of 1 to that minimum less one
(`psi_intersection_too_small`: nothing kept, no size released).
What each party learns: left, the peer's set size and, with "left"/"both", which of its own IDs
are in the intersection ("size": only how many); right, left's set size and, with "both", which
of its IDs are in the intersection; the researcher and the hub, sealed payloads whose sizes give
both set sizes, the intersection size, and each party's count of rows skipped for invalid IDs.
No party sees a peer's ID, hash or singly blinded point it could test a guess against: a guess
needs the peer's key. A bystander site of the study reads no data and learns nothing.

distinct_patients (every site of the ring, N + 1 rounds). Each site blinds its distinct IDs with
a fresh key and sends them to the next site in sorted order; each hop raises the batch to its
own key, shuffles it and passes it on; a batch that carries every site's key goes to `counter`,
which counts the fully blinded points held by exactly 1, 2, ..., N sites and releases the number
of distinct patients and those counts; when any count is small, every count is hidden (the total
and the public set sizes give two equations in the hidden ones), and a count whose repeat
sightings (the set sizes' sum less the total; for two sites, the intersection) are 1 to
min_cell_count - 1 is refused (`distinct_overlap_too_small`), as psi refuses a small
intersection. What each party learns: the counter, how the fully blinded batches overlap by
origin (the Venn counts of the sites' sets), never an ID; every site, each other site's set size
(batch sizes); the researcher and the hub, the set sizes (payload sizes) and the released
counts. A hop never holds a batch it could test a guess against: a guess needs the keys of every
site that blinded the batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from medveil.analyses.base import (
    Aggregated,
    Analysis,
    AnalysisError,
    BroadcastRefused,
    Finished,
    NextRound,
    Params,
    Release,
    SiteContext,
    SiteName,
    params_digest,
    register,
)
from medveil.crypto.ids import IdKind, InvalidId, normalise_ids
from medveil.crypto.psi import POINT_BYTES, PsiError, blind, hash_and_blind, new_key
from medveil.privacy.disclosure import DisclosurePolicy, DisclosureRefused

Column = Annotated[str, Field(min_length=1, max_length=256)]
Reveal = Literal["left", "both", "size"]


class PsiParams(Params):
    left: SiteName
    right: SiteName
    on: Column
    reveal: Reveal = "both"
    id_kind: IdKind = "plain"
    invalid: Literal["error", "skip"] = "error"

    @model_validator(mode="after")
    def _two_parties(self) -> PsiParams:
        if self.left == self.right:
            raise ValueError("left and right must be two different sites")
        return self


@dataclass(frozen=True)
class PsiResult:
    """A finished intersection: its size, the two parties, what was revealed, and the alignment
    id (the PSI task id, for `vertical_glm(aligned=...)`; None when only the size was revealed)."""

    size: int
    left: str
    right: str
    reveal: str
    alignment: str | None = None
    skipped: dict[str, int] = field(default_factory=dict)  # rows skipped for invalid IDs, per party
    provenance: dict[str, Any] = field(default_factory=dict)


# --- shared steps ----------------------------------------------------------------------------

def _normalised(data: pd.DataFrame, on: str, kind: IdKind, invalid: str) -> tuple[list[str | None], int]:
    """Each row's normalised ID (None where skipped) and how many rows were skipped; an invalid ID
    under invalid="error" is refused (`invalid_id`), naming its row, never its value."""
    try:
        normalised, skipped = normalise_ids(data[on].tolist(), kind, invalid)  # type: ignore[arg-type]
    except InvalidId as exc:
        raise DisclosureRefused("invalid_id", f"column {on!r}, row {exc.row} (0-based): {exc.reason}") from None
    return normalised, len(skipped)


def _distinct_ids(data: pd.DataFrame, on: str, kind: IdKind, invalid: str) -> tuple[list[str], np.ndarray, int]:
    """The table's distinct normalised IDs (in order of first occurrence), the row each first
    occurs in, and how many rows were skipped as invalid."""
    normalised, skipped = _normalised(data, on, kind, invalid)
    firsts = pd.Series(normalised, dtype=object).dropna().drop_duplicates(keep="first")
    return firsts.tolist(), firsts.index.to_numpy(dtype=np.int64), skipped


def _used_rows(data: pd.DataFrame, on: str, kind: IdKind, invalid: str) -> np.ndarray:
    """Rows whose ID takes part (valid): the row set behind every count these analyses release."""
    normalised, _ = _normalised(data, on, kind, invalid)
    return np.array([text is not None for text in normalised], dtype=bool)


def _permutation(n: int) -> np.ndarray:
    """A uniformly random permutation from the OS's cryptographic generator (a row order must not
    be guessable from a seeded PRNG's state)."""
    return np.argsort(np.frombuffer(os.urandom(8 * n), dtype=np.uint64), kind="stable")


def _points(payload: Any, key: str, sender: str, rows: int | None = None) -> np.ndarray:
    """A peer's array of group elements: (n, 32) uint8, n == `rows` when given (`psi_malformed`)."""
    value = payload.get(key) if isinstance(payload, dict) else None
    if not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.ndim != 2 \
            or value.shape[1] != POINT_BYTES or (rows is not None and value.shape[0] != rows):
        expected = f"({rows}, {POINT_BYTES})" if rows is not None else f"(n, {POINT_BYTES})"
        raise BroadcastRefused("psi_malformed", f"{sender} sent {key!r} that is not a {expected} array of points")
    return value


def _same_params(payload: dict[str, Any], params: Params, sender: str) -> None:
    if payload.get("params") != params_digest(params):
        raise BroadcastRefused("psi_params_mismatch", f"{sender} runs this task with other parameters than this "
                                                      "site (the researcher sent the two different steps)")


def _distinct_points(points: np.ndarray, what: str) -> None:
    """Refuse points that repeat (`psi_malformed`): distinct IDs blind to distinct points, so a
    repeat pads a set past the minimum size, or inflates the count of patients seen twice."""
    if np.unique(np.ascontiguousarray(points).view(f"S{POINT_BYTES}").ravel()).size != len(points):
        raise BroadcastRefused("psi_malformed", f"{what} repeats a point")


def _peer_min_count(payload: dict[str, Any], sender: str) -> int:
    value = payload.get("min_cell_count")
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BroadcastRefused("psi_malformed", f"{sender} sent no valid min_cell_count")
    return value


def _raised(points: np.ndarray, key: bytes, sender: str) -> np.ndarray:
    """`points` raised to this site's key; a point that is not a valid group element is refused."""
    try:
        return blind(points, key)
    except PsiError as exc:
        raise BroadcastRefused("psi_malformed", f"{sender} sent an invalid point: {exc}") from None


def _message(context: SiteContext, sender: str, round_no: int) -> dict[str, Any]:
    """The one payload this round takes, from `sender` (`psi_payload_missing`, `psi_payload_unexpected`)."""
    unexpected = sorted(set(context.messages) - {sender})
    if unexpected:
        raise BroadcastRefused("psi_payload_unexpected", f"round {round_no} at {context.site} takes a payload from "
                                                         f"{sender} only, not from {unexpected}")
    if sender not in context.messages:
        raise BroadcastRefused("psi_payload_missing", f"round {round_no} at {context.site} needs the payload of "
                                                      f"{sender}")
    return context.messages[sender]


def _no_messages(context: SiteContext, round_no: int) -> None:
    if context.messages:
        raise BroadcastRefused("psi_payload_unexpected", f"round {round_no} at {context.site} takes no payloads, "
                                                         f"got some from {sorted(context.messages)}")


def _kept(context: SiteContext, *names: str) -> list[Any]:
    """Values this site kept in its task scratch in earlier rounds (`psi_state_lost` if gone)."""
    missing = [name for name in names if name not in context.scratch]
    if missing:
        raise BroadcastRefused("psi_state_lost", f"{context.site} no longer holds {missing} of this task; "
                               "run it again")
    return [context.scratch[name] for name in names]


def _require_set_size(n: int, minimum: int, whose: str) -> None:
    if n < minimum:
        raise DisclosureRefused("psi_set_too_small", f"{whose} holds fewer than the minimum of {minimum} distinct IDs")


def _order_by_points(points: np.ndarray) -> np.ndarray:
    """Positions of `points` sorted by their bytes (fixed-width, so the S32 view orders bytewise)."""
    return np.argsort(np.ascontiguousarray(points).view(f"S{POINT_BYTES}").ravel(), kind="stable")


def _member(points: np.ndarray, of: np.ndarray) -> np.ndarray:
    """Which rows of `points` are rows of `of` (byte equality)."""
    as_bytes = f"S{POINT_BYTES}"
    return np.isin(np.ascontiguousarray(points).view(as_bytes).ravel(),
                   np.ascontiguousarray(of).view(as_bytes).ravel())


def _forward_all(aggregated: Aggregated) -> dict[str, list[dict]]:
    """Every sealed payload of a round, by recipient, to be handed on in the next."""
    messages: dict[str, list[dict]] = {}
    for sender in sorted(aggregated.payloads):
        for recipient, sealed in sorted(aggregated.payloads[sender].items()):
            messages.setdefault(recipient, []).append(sealed)
    return messages


# --- psi -------------------------------------------------------------------------------------

ROUNDS = 3


@register
class PrivateSetIntersection(Analysis[PsiParams]):
    name = "psi"
    Params = PsiParams
    releases_sums = False

    def variables(self, params: PsiParams) -> list[str]:
        return [params.on]

    def variables_at(self, params: PsiParams, site: str, role: str | None) -> list[str]:
        return [params.on] if site in (params.left, params.right) else []

    def reads_data_at(self, params: PsiParams, site: str, role: str | None) -> bool:
        return site in (params.left, params.right)

    def parties(self, params: PsiParams) -> dict[str, str | None]:
        return {params.left: None, params.right: None}

    def row_sets(self, params: PsiParams, data: pd.DataFrame, round_no: int = 0,
                 broadcast: dict[str, Any] | None = None, policy: DisclosurePolicy | None = None
                 ) -> list[np.ndarray]:
        """The rows whose ID takes part, in round 0 (what the released size rests on)."""
        return [_used_rows(data, params.on, params.id_kind, params.invalid)] if round_no == 0 else []

    def local(self, params: PsiParams, round_no: int, broadcast: dict[str, Any], context: SiteContext) -> Release:
        if context.site not in (params.left, params.right):
            _no_messages(context, round_no)
            return Release()
        is_left = context.site == params.left
        peer = params.right if is_left else params.left
        if round_no == 0:
            return self._blind_own(params, peer, context)
        if round_no == 1:
            return self._raise_peers(params, is_left, peer, context)
        if round_no == 2:
            return self._match(params, is_left, peer, context)
        raise BroadcastRefused("round_order", f"psi has {ROUNDS} rounds, not {round_no + 1}")

    def _blind_own(self, params: PsiParams, peer: str, context: SiteContext) -> Release:
        """r0: own distinct IDs, hashed with the study salt, blinded and shuffled, to the peer."""
        _no_messages(context, 0)
        ids, rows, skipped = _distinct_ids(context.data, params.on, params.id_kind, params.invalid)
        _require_set_size(len(ids), context.policy.min_cell_count, context.site)
        key, order = new_key(), _permutation(len(ids))
        points = hash_and_blind([ids[i] for i in order], context.study_salt, key)
        context.scratch.update(key=key, sent_rows=rows[order])
        return Release(public={"rows": len(context.data) - skipped, "skipped": skipped},
                       payloads={peer: {"points": points, "min_cell_count": context.policy.min_cell_count,
                                        "params": params_digest(params)}})

    def _raise_peers(self, params: PsiParams, is_left: bool, peer: str, context: SiteContext) -> Release:
        """r1: the peer's points raised to this site's key; right returns them to left, left returns
        them to right only when both learn the intersection."""
        payload = _message(context, peer, 1)
        points = _points(payload, "points", peer)
        minimum = max(context.policy.min_cell_count, _peer_min_count(payload, peer))
        _distinct_points(points, f"the set from {peer}")
        _require_set_size(len(points), minimum, peer)
        key, = _kept(context, "key")
        doubled = _raised(points, key, peer)
        _same_params(payload, params, peer)
        context.scratch.update(minimum=minimum)
        if is_left:
            context.scratch.update(peer_doubled=doubled)
            return Release(payloads={peer: {"doubled": doubled}} if params.reveal == "both" else {})
        if params.reveal == "both":
            context.scratch.update(peer_doubled=doubled)
        returned = doubled[_permutation(len(doubled))] if params.reveal == "size" else doubled
        return Release(payloads={peer: {"doubled": returned}})

    def _match(self, params: PsiParams, is_left: bool, peer: str, context: SiteContext) -> Release:
        """r2: a learning party matches its own doubly blinded points against the peer's."""
        if not is_left and params.reveal != "both":
            _no_messages(context, 2)
            return Release()
        sent_rows, minimum, peer_doubled = _kept(context, "sent_rows", "minimum", "peer_doubled")
        own_doubled = _points(_message(context, peer, 2), "doubled", peer, rows=len(sent_rows))
        matched = _member(own_doubled, np.asarray(peer_doubled))
        size = int(np.count_nonzero(matched))
        if 0 < size < minimum:
            raise DisclosureRefused("psi_intersection_too_small", f"the intersection holds fewer than the minimum "
                                                                  f"of {minimum} IDs; nothing is kept")
        if params.reveal == "size":
            return Release(public={"size": size})
        order = _order_by_points(own_doubled[matched])
        rows = np.asarray(sent_rows, dtype=np.int64)[matched][order]
        return Release(public={"size": size},
                       alignment={"rows": rows, "column": params.on, "peers": [peer], "reveal": params.reveal})

    def global_step(self, params: PsiParams, round_no: int, aggregated: Aggregated,
                    state: dict[str, Any]) -> NextRound | Finished:
        if round_no == 0:
            state["skipped"] = {site: int(aggregated.public.get(site, {}).get("skipped", 0))
                                for site in (params.left, params.right)}
            return NextRound({}, state=state, messages={
                params.right: [_sealed(aggregated, params.left, params.right)],
                params.left: [_sealed(aggregated, params.right, params.left)]})
        if round_no == 1:
            messages = {params.left: [_sealed(aggregated, params.right, params.left)]}
            if params.reveal == "both":
                messages[params.right] = [_sealed(aggregated, params.left, params.right)]
            return NextRound({}, state=state, messages=messages)
        learners = [params.left, params.right] if params.reveal == "both" else [params.left]
        sizes = {site: aggregated.public.get(site, {}).get("size") for site in learners}
        if any(not isinstance(size, int) for size in sizes.values()):
            raise AnalysisError(f"psi: {sorted(s for s, size in sizes.items() if not isinstance(size, int))} "
                                "released no intersection size")
        if len(set(sizes.values())) != 1:
            raise AnalysisError(f"psi: the parties report different intersection sizes {sizes}")
        return Finished(PsiResult(size=sizes[params.left], left=params.left, right=params.right,
                                  reveal=params.reveal, skipped=dict(state.get("skipped", {}))))


def _sealed(aggregated: Aggregated, sender: str, recipient: str) -> dict:
    sealed = aggregated.payloads.get(sender, {}).get(recipient)
    if sealed is None:
        raise AnalysisError(f"{sender} sent nothing to {recipient}")
    return sealed


# --- distinct_patients -----------------------------------------------------------------------

class DistinctParams(Params):
    on: Column
    sites: list[SiteName] = Field(min_length=2, max_length=1000)  # the study's sites bar dealers (the API fills them in)
    counter: SiteName | None = None
    id_kind: IdKind = "plain"
    invalid: Literal["error", "skip"] = "error"

    @model_validator(mode="after")
    def _ring(self) -> DistinctParams:
        if len(set(self.sites)) != len(self.sites):
            raise ValueError("sites must be distinct")
        if self.counter is not None and self.counter not in self.sites:
            raise ValueError("the counter must be one of the sites")
        return self

    @property
    def ring(self) -> list[str]:
        return sorted(self.sites)

    @property
    def counting_site(self) -> str:
        return self.counter or self.ring[0]


@register
class DistinctPatients(Analysis[DistinctParams]):
    """The registry de-duplication count over every site, by a ring of commutative blindings."""

    name = "distinct_patients"
    Params = DistinctParams
    releases_sums = False

    def variables(self, params: DistinctParams) -> list[str]:
        return [params.on]

    def variables_at(self, params: DistinctParams, site: str, role: str | None) -> list[str]:
        return [params.on] if site in params.sites else []

    def reads_data_at(self, params: DistinctParams, site: str, role: str | None) -> bool:
        return site in params.sites

    def parties(self, params: DistinctParams) -> dict[str, str | None]:
        return {site: None for site in params.sites}

    def row_sets(self, params: DistinctParams, data: pd.DataFrame, round_no: int = 0,
                 broadcast: dict[str, Any] | None = None, policy: DisclosurePolicy | None = None
                 ) -> list[np.ndarray]:
        return [_used_rows(data, params.on, params.id_kind, params.invalid)] if round_no == 0 else []

    def local(self, params: DistinctParams, round_no: int, broadcast: dict[str, Any],
              context: SiteContext) -> Release:
        ring, site = params.ring, context.site
        if context.data_sites and sorted(context.data_sites) != ring or not (site in ring or context.data_sites):
            raise DisclosureRefused("ring_incomplete", "distinct_patients runs over every site of the study but "
                                                       f"dealers; the ring {ring[:8]} is not that")
        if site not in ring:  # a dealer of the study: it holds no IDs
            return Release()
        n, position = len(ring), ring.index(site)
        after, before = ring[(position + 1) % n], ring[position - 1]
        if round_no == 0:
            return self._blind_own(params, after, context)
        if round_no < n:
            return self._hop(params, round_no, before, after if round_no < n - 1 else params.counting_site, context)
        if round_no == n:
            if site != params.counting_site:
                _no_messages(context, round_no)
                return Release()
            return Release(public=self._count(params, context))
        raise BroadcastRefused("round_order", f"distinct_patients over {n} sites has {n + 1} rounds, "
                                              f"not {round_no + 1}")

    def _blind_own(self, params: DistinctParams, after: str, context: SiteContext) -> Release:
        """r0: own distinct IDs, hashed, blinded and shuffled, to the next site, with this site's
        minimum (each batch carries the largest minimum of the sites it passed)."""
        _no_messages(context, 0)
        minimum = context.policy.min_cell_count
        ids, _, skipped = _distinct_ids(context.data, params.on, params.id_kind, params.invalid)
        _require_set_size(len(ids), minimum, context.site)
        key = new_key()
        context.scratch.update(key=key)
        batch = hash_and_blind([ids[i] for i in _permutation(len(ids))], context.study_salt, key)
        return Release(public={"rows": len(context.data) - skipped, "skipped": skipped},
                       payloads={after: {"batch": batch, "min_cell_count": minimum, "params": params_digest(params)}})

    def _hop(self, params: DistinctParams, round_no: int, before: str, to: str, context: SiteContext) -> Release:
        """r1..N-1: the batch from the previous site raised to this site's key and shuffled, on to
        the next site or, once it carries every key, to the counter (the counter keeps its own)."""
        payload = _message(context, before, round_no)
        batch = _points(payload, "batch", before)
        minimum = max(context.policy.min_cell_count, _peer_min_count(payload, before))
        _require_set_size(len(batch), minimum, f"the batch from {before}")
        key, = _kept(context, "key")
        raised = _raised(batch, key, before)
        _same_params(payload, params, before)
        passed_on = {"batch": raised[_permutation(len(batch))], "min_cell_count": minimum,
                     "params": params_digest(params)}
        if to == context.site:
            context.scratch.update(complete=passed_on)
            return Release()
        return Release(payloads={to: passed_on})

    def _count(self, params: DistinctParams, context: SiteContext) -> dict[str, Any]:
        """At the counter: multiplicities of the fully blinded points over the N complete batches,
        suppressed by the largest minimum of every site's policy (each batch passed every site)."""
        unexpected = sorted(set(context.messages) - set(params.ring))
        missing = sorted(set(params.ring) - set(context.messages) - {context.site})
        if unexpected or missing:
            raise BroadcastRefused("psi_payload_missing" if missing else "psi_payload_unexpected",
                                   f"the count needs one complete batch from each other site; missing {missing}, "
                                   f"unexpected {unexpected}")
        own, = _kept(context, "complete")
        payloads = {context.site: own, **context.messages}
        minimum = max([context.policy.min_cell_count] + [_peer_min_count(p, s) for s, p in payloads.items()])
        keys = []
        for sender, payload in sorted(payloads.items()):
            batch = _points(payload, "batch", sender)
            _require_set_size(len(batch), minimum, f"the complete batch from {sender}")
            _distinct_points(batch, f"the complete batch from {sender}")
            keys.append(np.ascontiguousarray(batch).view(f"S{POINT_BYTES}").ravel())
        for sender, payload in sorted(payloads.items()):
            _same_params(payload, params, sender)
        _, held_by = np.unique(np.concatenate(keys), return_counts=True)
        seen_at = np.bincount(held_by, minlength=len(keys) + 1)[1:]
        # The set sizes are public (row counts, payload sizes), so the researcher knows the sum over
        # j of j * seen_at[j] as well as the total: the repeat sightings (sum of set sizes less the
        # total; for two sites, the intersection) are released implicitly and must not be small,
        # and hiding fewer than every count would leave two equations in the hidden ones.
        repeats = int(sum(len(k) for k in keys)) - len(held_by)
        if 0 < repeats < minimum:
            raise DisclosureRefused("distinct_overlap_too_small", f"fewer than {minimum} sightings of patients at "
                                                                  "more than one site; nothing is released")
        small = bool(((seen_at > 0) & (seen_at < minimum)).any())
        return {"distinct": len(held_by), "seen_at": [None if small else int(c) for c in seen_at]}

    def global_step(self, params: DistinctParams, round_no: int, aggregated: Aggregated,
                    state: dict[str, Any]) -> NextRound | Finished:
        n = len(params.ring)
        if round_no < n:
            return NextRound({}, messages=_forward_all(aggregated))
        facts = aggregated.public.get(params.counting_site, {})
        seen_at, distinct = facts.get("seen_at"), facts.get("distinct")
        if not isinstance(distinct, int) or not isinstance(seen_at, list) or len(seen_at) != n:
            raise AnalysisError(f"distinct_patients: {params.counting_site} released no count")
        table = pd.DataFrame({"count": pd.array(seen_at, dtype="Int64")},
                             index=pd.Index(range(1, n + 1), name="sites"))
        table["suppressed"] = table["count"].isna()
        table.attrs["distinct"] = distinct
        table.attrs["counter"] = params.counting_site
        return Finished(table)
