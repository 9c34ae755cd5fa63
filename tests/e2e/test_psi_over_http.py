"""End-to-end: private set intersection and the registry count through a real hub over loopback
HTTP, with the hub's traffic recorded. The results equal pandas on the pooled IDs, and nothing
the hub relayed holds an ID: not as typed, not normalised, not its SHA-256, not its point on the
curve under the study's salt (what a party hashes before blinding)."""

from __future__ import annotations

import hashlib
import unicodedata

import numpy as np
import pandas as pd
import pytest

import medveil as mv
from medveil.crypto.ids import normalise_id
from medveil.crypto.psi import hash_to_group
from medveil.privacy.disclosure import DisclosurePolicy

pytestmark = pytest.mark.e2e


def canonical(value: str) -> str:
    return unicodedata.normalize("NFKC", value).casefold().strip()


@pytest.fixture(scope="module")
def tables() -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(11)
    ids = {"hospital": [f"MRN-{i:05d}" for i in range(300)],
           "insurer": [f"ｍｒｎ-{i:05d}" for i in range(150, 420)] + ["MRN-00151", "MRN-00152"],  # duplicates
           "registry": [f"mrn-{i:05d} " for i in range(280, 500)]}
    return {site: pd.DataFrame({"patient_id": rng.permutation(values), "x": rng.normal(size=len(values))})
            for site, values in ids.items()}


@pytest.fixture(scope="module")
def fed(tables):
    with mv.Federation.simulate(tables, record_hub_traffic=True, timeout=60,
                                policy=DisclosurePolicy(differencing_guard=False)) as federation:
        yield federation


def test_psi_over_http_equals_pandas_and_the_parties_agree_on_the_order(fed, tables):
    result = fed.psi("hospital", "insurer", on="patient_id", reveal="both")
    keys = {site: frame["patient_id"].map(canonical) for site, frame in tables.items()}
    expected = set(keys["hospital"]) & set(keys["insurer"])
    assert result.size == len(expected) == 150
    kept = {site: fed.network.nodes[site].node.alignments.load(fed.study.id, result.alignment)
            for site in ("hospital", "insurer")}
    ordered = {site: keys[site].iloc[alignment.rows].tolist() for site, alignment in kept.items()}
    assert ordered["hospital"] == ordered["insurer"] and set(ordered["hospital"]) == expected
    assert fed.network.nodes["registry"].node.alignments.load(fed.study.id, result.alignment) is None


def test_distinct_patients_over_http_equals_pandas(fed, tables):
    counts = fed.distinct_patients(on="patient_id")
    pooled = pd.concat([frame.assign(site=site) for site, frame in tables.items()])
    held_by = pooled.assign(key=pooled["patient_id"].map(canonical)).groupby("key")["site"].nunique()
    assert counts.attrs["distinct"] == held_by.size == 500
    assert counts["count"].tolist() == held_by.value_counts().reindex([1, 2, 3], fill_value=0).tolist()


def test_the_hub_relayed_no_id_in_any_form(fed, tables):
    fed.psi("insurer", "registry", on="patient_id", reveal="left")
    fed.psi("hospital", "registry", on="patient_id", reveal="size")
    relayed = b"".join(envelope.encode() for envelope in fed.session.grid.relayed())
    kinds = {envelope.header.get("analysis") for envelope in fed.session.grid.relayed()}
    assert {"psi", "distinct_patients"} <= kinds
    typed = [value for frame in tables.values() for value in frame["patient_id"]]
    normalised = sorted({normalise_id(value) for value in typed})
    points = hash_to_group(normalised, fed.study.study_salt())
    needles = [value.encode() for value in typed] + [value.encode() for value in normalised]
    needles += [hashlib.sha256(value.encode()).digest() for value in normalised]
    needles += [hashlib.sha256(value.encode()).hexdigest().encode() for value in normalised]
    needles += [bytes(point) for point in points]
    found = [needle for needle in needles if needle in relayed]
    assert not found, f"{len(found)} ID forms in the hub's traffic"
