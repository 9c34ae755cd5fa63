"""The node's support for two-party protocols: per-site variables, sites that read no data, party
roles checked against the approved study, and alignments kept at a site and run on later."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

import medveil as mv
from medveil.analyses import base
from medveil.analyses.base import Aggregated, Analysis, Finished, Params, Release, SiteContext


class AlignmentProbeParams(Params):
    keeper: str
    reader: str
    mode: str = "keep"  # keep: the keeper keeps rows [order]; read: the reader sums column "x" on `aligned`
    order: list[int] = []
    aligned: str | None = None
    column: str = "x"


class AlignmentProbe(Analysis[AlignmentProbeParams]):
    """Test analysis: one site keeps an alignment; later a site releases its aligned column in order."""

    name = "alignment_probe"
    Params = AlignmentProbeParams
    releases_sums = False

    def variables(self, params: AlignmentProbeParams) -> list[str]:
        return [params.column]

    def variables_at(self, params: AlignmentProbeParams, site: str, role: str | None) -> list[str]:
        return [params.column] if self.reads_data_at(params, site, role) else []

    def reads_data_at(self, params: AlignmentProbeParams, site: str, role: str | None) -> bool:
        return site == (params.keeper if params.mode == "keep" else params.reader)

    def parties(self, params: AlignmentProbeParams) -> dict[str, str | None]:
        return {params.keeper: "label_holder", params.reader: None}

    def alignment(self, params: AlignmentProbeParams) -> str | None:
        return params.aligned

    def row_sets(self, params, data, round_no=0, broadcast=None, policy=None):
        return []

    def local(self, params: AlignmentProbeParams, round_no: int, broadcast: dict[str, Any],
              context: SiteContext) -> Release:
        if context.site == params.keeper and params.mode == "keep":
            return Release(public={"kept": len(params.order)},
                           alignment={"rows": np.asarray(params.order, dtype=np.int64), "column": params.column,
                                      "peers": [params.reader], "reveal": "both"})
        if context.site == params.reader and params.mode == "read":
            return Release(public={"values": [float(v) for v in context.data[params.column]],
                                   "rows": len(context.data), "salt": context.study_salt.hex()})
        return Release(public={"empty_table": bool(context.data.empty)})

    def global_step(self, params: AlignmentProbeParams, round_no: int, aggregated: Aggregated,
                    state: dict[str, Any]) -> Finished:
        return Finished(aggregated.public)


TABLE = pd.DataFrame({"x": [10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0]})


@pytest.fixture()
def fed():
    base.register(AlignmentProbe)
    try:
        with mv.Federation.in_process({"hospital": TABLE, "lab": TABLE.rename(columns={"x": "y"}), "dealer": {}},
                                      roles={"hospital": "label_holder", "lab": "feature_holder", "dealer": "dealer"},
                                      secure_aggregation=False) as federation:
            yield federation
    finally:
        base._REGISTRY.pop(AlignmentProbe.name, None)


def test_a_kept_alignment_gives_its_rows_in_order_and_a_dealer_reads_nothing(fed):
    kept = fed.run("alignment_probe", keeper="hospital", reader="lab", column="x", order=[4, 1, 6], mode="keep")
    assert kept.result["hospital"] == {"kept": 3}
    assert kept.result["dealer"] == {"empty_table": True}
    alignment = kept.provenance["task"]
    read = fed.run("alignment_probe", keeper="hospital", reader="hospital", column="x", mode="read", aligned=alignment)
    assert read.result["hospital"]["values"] == [14.0, 11.0, 16.0]
    assert read.result["dealer"] == {"empty_table": True}


def test_the_study_salt_is_the_same_at_every_site_and_bound_to_the_study(fed):
    first = fed.run("alignment_probe", keeper="hospital", reader="lab", column="y", mode="read",
                    order=[]).result["lab"]["salt"]
    assert first == fed.study.study_salt().hex()
    assert len(bytes.fromhex(first)) == 32


def test_a_site_named_with_a_role_the_study_does_not_give_it_is_refused(fed):
    with pytest.raises(mv.RefusedError, match="role_mismatch"):
        fed.run("alignment_probe", keeper="lab", reader="hospital", column="y", order=[0, 1, 2, 3, 4])


def test_a_site_outside_the_study_is_refused(fed):
    with pytest.raises(mv.RefusedError, match="site_not_in_study"):
        fed.run("alignment_probe", keeper="hospital", reader="elsewhere", column="x", order=[0])


def test_a_party_reading_a_column_approved_only_at_its_peer_is_refused(fed):
    with pytest.raises(mv.RefusedError, match="variable_not_approved"):
        fed.run("alignment_probe", keeper="hospital", reader="lab", column="x", mode="read", order=[])


def test_an_unknown_alignment_is_refused(fed):
    with pytest.raises(mv.RefusedError, match="alignment_unknown"):
        fed.run("alignment_probe", keeper="hospital", reader="hospital", column="x", mode="read",
                aligned="0" * 32)


def test_an_alignment_outside_the_table_is_not_kept(fed):
    with pytest.raises(mv.RefusedError, match="distinct positions"):
        fed.run("alignment_probe", keeper="hospital", reader="lab", column="x", order=[0, 99], mode="keep")
