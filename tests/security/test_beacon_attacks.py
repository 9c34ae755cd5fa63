"""A hostile researcher against the beacon: hostile variant strings and granularities, a genotype
dataset the study does not approve, and every way round the total query budget (new task ids,
other spellings of one variant, absent variants, a second signing key or name, a restarted node,
the private look-up service); each refused with its named rule and audited."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pandas as pd
import pytest

import medveil as mv
from medveil.analyses.beacon import BUDGET_GROUP, carriers, parse_variant
from medveil.crypto.signing import SigningKey
from medveil.data.genotypes import GenotypeFile
from medveil.data.sources import DatasetConfig
from medveil.privacy.disclosure import DisclosurePolicy
from medveil.runtime.audit import read_audit_log
from medveil.runtime.client import HubClient
from medveil.runtime.config import SiteConfig
from medveil.runtime.grid import HubGrid, RefusedError
from medveil.runtime.node import Node
from medveil.runtime.session import ResearcherSession
from medveil.runtime.study import StudySpec, sign_approval
from medveil.runtime.wire import seal

VARIANT_QUERY_BUDGET = DisclosurePolicy().variant_query_budget

bed_reader = pytest.importorskip("bed_reader")

SITE, SITE_KEY, STEWARD = "site_a", SigningKey.generate(), SigningKey.generate()
ALICE = SigningKey.generate()
N = 60


def write_genotypes(folder):
    """60 samples; variants: 1:1000 G>A carried by 12, 1:2000 G>A by 3, a split multi-allelic site
    1:3000 (C>T by 8 in one row, C>G by 6 in the next), an unnormalised MNP 1:4000 ACG/ATG (= 1:4001:C:T)
    carried by 7, and X (coded 23) 5000 T>C carried by 9. A1 = ALT except at 1:2000 (A1 = REF)."""
    rows = [("1", 1000, "A", "G"), ("1", 2000, "G", "A"), ("1", 3000, "T", "C"), ("1", 3000, "G", "C"),
            ("1", 4000, "ATG", "ACG"), ("23", 5000, "C", "T")]
    carried = [12, 3, 8, 6, 7, 9]
    a1 = np.zeros((N, len(rows)), np.float32)
    for j, k in enumerate(carried):
        a1[:k, j] = 1
    a1[0, 0] = 2  # one homozygous carrier still counts once
    a1[20, 0] = np.nan  # missing is not a carrier
    a1[:, 1] = 2 - a1[:, 1]  # A1 = REF there: dosage of A1 is 2 - ALT copies
    iid = np.array([f"s{i}" for i in range(N)])
    bed = folder / "geno.bed"
    bed_reader.to_bed(bed, a1, properties={"iid": iid, "fid": iid, "sid": [f"v{j}" for j in range(len(rows))],
                                           "chromosome": [r[0] for r in rows], "bp_position": [r[1] for r in rows],
                                           "allele_1": [r[2] for r in rows], "allele_2": [r[3] for r in rows]})
    (folder / "other.bed").write_bytes(bed.read_bytes())
    for suffix in (".bim", ".fam"):
        (folder / f"other{suffix}").write_bytes(bed.with_suffix(suffix).read_bytes())
    return bed, pd.DataFrame({"IID": iid})


def spec(study: str = "s1", researcher: str = "alice", key: SigningKey = ALICE, geno: str = "geno") -> StudySpec:
    return StudySpec(id=study, researcher=researcher, researcher_key=key.verify_key.to_text(), sites=[SITE],
                     site_keys={SITE: SITE_KEY.verify_key.to_text()}, datasets={"default": ["IID"], geno: []},
                     analyses=["beacon"], secure_aggregation=False)


STUDIES = {"s1": ("alice", ALICE), "s2": ("alice", SigningKey.generate()), "s3": ("alias", ALICE)}


def start_node(folder) -> Node:
    config = SiteConfig(site=SITE, hub="http://127.0.0.1:9", state_dir=folder / "state",
                        policy=DisclosurePolicy(min_cell_count=5),
                        datasets={"geno": DatasetConfig(kind="plink", path=folder / "geno.bed"),
                                  "other": DatasetConfig(kind="plink", path=folder / "other.bed")})
    node = Node(config, SITE_KEY, STEWARD.verify_key, frames={"default": pd.read_csv(folder / "table.csv")},
                client=HubClient("http://127.0.0.1:9", SITE, SITE_KEY))
    for study, (name, key) in STUDIES.items():
        s = spec(study, name, key)
        node.store.save_approval(s.id, s.model_dump(), sign_approval(s, SITE, STEWARD, time.time()))
    return node


@pytest.fixture
def node(tmp_path):
    _, table = write_genotypes(tmp_path)
    table.to_csv(tmp_path / "table.csv", index=False)
    started = start_node(tmp_path)
    started.folder = tmp_path
    yield started
    started.close()


def ask(node: Node, params: dict, *, study: str = "s1", task: str | None = None) -> tuple[str, dict]:
    """One raw beacon step, signed by the study's researcher as a hostile one could send it."""
    name, key = STUDIES[study]
    header = {"kind": "task", "sender": name, "nonce": uuid.uuid4().hex, "issued_at": time.time(), "study": study,
              "task": task or f"t-{uuid.uuid4().hex[:12]}", "step": 0, "phase": "compute", "round": 0,
              "analysis": "beacon", "dataset": "default", "recipients": [SITE]}
    reply = node.handle(seal(key, header, {"params": params, "broadcast": {}}).encode())
    reply.verify(SITE_KEY.verify_key)
    return reply.header["status"], reply.body()


def count(node: Node, variant: str, **kwargs) -> tuple[str, object]:
    status, body = ask(node, {"variant": variant, "granularity": "count", "genotypes": "geno"}, **kwargs)
    return status, body["sums"]["carriers"][0] if status == "ok" else body["rule"]


def used(node: Node) -> int:
    """The queries of the budget spent, as the node's last budget entry in its audit log says."""
    entries = [e for e in read_audit_log(node.config.state_dir / "audit.jsonl") if e["kind"] == "query_budget"]
    assert all(e["group"] == BUDGET_GROUP for e in entries)
    return entries[-1]["used"] if entries else 0


def test_counts_follow_the_genotypes_whatever_the_spelling_or_allele_order(node):
    assert count(node, "1:1000:G:A") == ("ok", 12)  # hom and missing handled
    assert count(node, "chr1:1000:g:a") == ("ok", 12)
    assert count(node, "1:2000:G:A") == ("ok", 0)  # 3 carriers: suppressed, as if absent
    assert count(node, "1:3000:C:T") == ("ok", 8) and count(node, "1:3000:C:G") == ("ok", 6)  # split site
    assert count(node, "1:4000:ACG:ATG") == ("ok", 7) and count(node, "1:4001:C:T") == ("ok", 7)  # parsimony
    assert count(node, "X:5000:T:C") == ("ok", 9) and count(node, "23:5000:T:C") == ("ok", 9)
    assert count(node, "1:1000:A:G") == ("ok", 0)  # REF carriers: N - 2, whose complement (2) is suppressed
    assert count(node, "7:1:A:G") == ("ok", 0)  # absent
    genotypes = GenotypeFile("geno", node.folder / "geno.bed")
    assert carriers(genotypes, parse_variant("1:2000:G:A"), np.arange(N)) == 3  # what suppression hid


@pytest.mark.parametrize("variant", [
    "1:1000:G", "1:1000:G:A:T", "1:-5:G:A", "1:0:G:A", "1:abc:G:A", "1:1000:<DEL>:A", "1:1000:G:G", "1:1000:0:A",
    "1:1000:.:A", "1:1000:G:A\n1:2000:G:A", "1;1000;G;A", "chr1:1000:G:A'; DROP TABLE", "Ω:1000:G:A", "", "x" * 5000,
    12345, None, ["1", 1000, "G", "A"], {"$ne": ""}])
def test_hostile_variant_strings_are_refused_and_never_charged(node, variant):
    status, body = ask(node, {"variant": variant, "granularity": "boolean", "genotypes": "geno"})
    assert status == "refused" and body["rule"] == "invalid_parameters"
    assert used(node) == 0


@pytest.mark.parametrize("granularity", ["BOOLEAN", "record", "aggregated", "", None, 1, True, ["count"]])
def test_hostile_granularities_are_refused(node, granularity):
    status, body = ask(node, {"variant": "1:1000:G:A", "granularity": granularity, "genotypes": "geno"})
    assert status == "refused" and body["rule"] == "invalid_parameters" and used(node) == 0


@pytest.mark.parametrize("genotypes, rule", [("other", "dataset_not_approved"), ("../geno", "invalid_parameters"),
                                             ("default", "unknown_dataset"), ("nowhere", "dataset_not_approved")])
def test_a_genotype_dataset_the_study_does_not_approve_is_refused(node, genotypes, rule):
    status, body = ask(node, {"variant": "1:1000:G:A", "granularity": "count", "genotypes": genotypes})
    assert status == "refused" and body["rule"] == rule
    assert used(node) == 0 or rule == "unknown_dataset"  # a plink dataset that is a table fails after the charge


def test_extra_parameters_and_broadcasts_are_refused(node):
    status, body = ask(node, {"variant": "1:1000:G:A", "genotypes": "geno", "min_count": 1})
    assert status == "refused" and body["rule"] == "invalid_parameters"


def test_the_budget_cannot_be_evaded(node):
    spellings = ["1:1000:G:A", "chr1:1000:G:A", "1:1000:g:a", "01:1000:G:A", "1:1000:GT:AT", "1:01000:G:A"]
    for i in range(VARIANT_QUERY_BUDGET):
        # a fresh task id each time, the same variant spelled six ways, absent variants, the other key's study
        variant = spellings[i % len(spellings)] if i % 4 else f"9:{i + 1}:A:G"
        assert count(node, variant, study="s2" if i % 5 == 0 else "s1")[0] == "ok"
    assert used(node) == VARIANT_QUERY_BUDGET
    for study in ("s1", "s2", "s3"):  # same name, a second key; same key, another name
        assert count(node, "1:3000:C:T", study=study) == ("refused", "query_budget_exhausted")
    assert used(node) == VARIANT_QUERY_BUDGET  # refusals cost nothing and stay refused
    node.close()
    restarted = start_node(node.folder)
    try:
        assert count(restarted, "1:1000:G:A", task="t-after-restart") == ("refused", "query_budget_exhausted")
    finally:
        restarted.close()
    entries = read_audit_log(node.folder / "state" / "audit.jsonl")
    refusals = [e for e in entries if e["kind"] == "refusal" and e["rule"] == "query_budget_exhausted"]
    assert len(refusals) == 4 and {e["study"] for e in refusals} == {"s1", "s2", "s3"}
    charges = [e for e in entries if e["kind"] == "query_budget"]
    assert sum(e["charged"] for e in charges) == VARIANT_QUERY_BUDGET and len(charges) == VARIANT_QUERY_BUDGET + 4


@pytest.mark.e2e
def test_beacon_queries_and_private_look_ups_share_one_budget(tmp_path):
    """Through a real hub: 15 beacon queries leave 5 look-ups for variant_profile, and a beacon
    query after them is refused; the look-up's answer agrees with the beacon's count."""
    from tests.runtime.test_pir_service import (
        GROUPS,
        MIN,
        expected_records,
        synthetic_site,
    )

    bed, table, variants, dosage = synthetic_site(tmp_path / "north", 0)
    table.to_csv(tmp_path / "north" / "pheno.csv", index=False)
    expected = expected_records(table, variants, dosage)
    present = [k for k, v in sorted(expected.items()) if v is not None][:6]
    with mv.Federation.simulate({"north": {"pheno": tmp_path / "north" / "pheno.csv", "geno": bed}}, timeout=120,
                                policy=DisclosurePolicy(min_cell_count=MIN)) as fed:
        network = fed.network
        lookups = network.add_study("lookups", {"pheno": ["iid"], "geno": []}, services=["variant_profile"],
                                    secure_aggregation=False)  # one site: nothing to hide a sum among
        node = Node.from_config_file(network.workdir / "north" / "site.yaml")
        try:
            node.build_service("variant_profile", "pheno", {"genotypes": "geno", "group_columns": GROUPS, "slots": 4},
                               SigningKey.from_pem(network.steward_key_path("north").read_bytes()))
        finally:
            node.close()
        with mv.Federation(ResearcherSession(HubGrid(network.researcher, lookups), lookups, timeout=120)) as other:
            counts = [other.beacon(present[0], "count", genotypes="geno", data="pheno", iid="iid")
                      for _ in range(VARIANT_QUERY_BUDGET - 5)]
            assert counts == [{"count": expected[present[0]]["total"]}] * len(counts)
            with pytest.raises(RefusedError) as refused:  # six look-ups do not fit in the five left
                other.private_lookup("north", present)
            assert refused.value.rule == "query_budget_exhausted"
            found = other.private_lookup("north", present[:5] + [present[0]])  # a repeat is asked once
            assert found.attrs["queries"] == 5 and list(found["found"]) == [True] * 6
            assert list(found["carriers"]) == [expected[k]["total"] for k in present[:5] + [present[0]]]
            assert "whole column" in found.attrs["note"]
            with pytest.raises(RefusedError) as refused:
                other.beacon(present[1], "boolean", genotypes="geno", data="pheno", iid="iid")
            assert refused.value.rule == "query_budget_exhausted"


def test_the_store_counter_is_all_or_nothing_shared_by_identities_and_durable(tmp_path):
    from medveil.runtime.node_store import NodeStore

    store = NodeStore(tmp_path / "node.db")
    assert store.charge_queries("g", ["alice", "key:k1"], 15, 20) == (0, True)
    assert store.charge_queries("g", ["alice", "key:k2"], 6, 20) == (15, False)  # all or nothing
    assert store.charge_queries("g", ["alias", "key:k1"], 5, 20) == (15, True)  # the key remembers
    assert store.queries_used("g", ["alice"]) == 15 and store.queries_used("g", ["alias", "key:k2"]) == 20
    assert store.charge_queries("other", ["alice"], 1, 1) == (0, True)  # groups are separate
    assert store.charge_queries("d", ["alice"], 1, 1, day="2025-01-01") == (0, True)
    assert store.charge_queries("d", ["alice"], 1, 1, day="2025-01-01") == (1, False)
    assert store.charge_queries("d", ["alice"], 1, 1, day="2025-01-02") == (0, True)  # a daily count restarts
    with pytest.raises(ValueError):
        store.charge_queries("g", [], 1, 20)
    store.close()
    reopened = NodeStore(tmp_path / "node.db")
    assert reopened.queries_used("g", ["key:k1"]) == 20
    reopened.close()
