"""The variant_profile service: built by the steward from a synthetic PLINK fileset (written with
bed-reader) and a phenotype table, looked up by SimplePIR through a real hub, suppressing small
counts so that a rare variant reads as absent, surviving a restart without a rebuild, refusing a
tampered state, and relaying nothing the hub could read a variant or a record from."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from bed_reader import to_bed

import medveil as mv
from medveil.crypto import pir
from medveil.crypto.pir_keyword import bucket_and_tag, find_in_column, normalise_variant
from medveil.crypto.signing import SigningKey
from medveil.data.sources import DatasetConfig
from medveil.privacy.disclosure import DisclosurePolicy, secondary_suppression
from medveil.runtime.audit import read_audit_log
from medveil.runtime.config import SiteConfig
from medveil.runtime.grid import HubGrid, RefusedError
from medveil.runtime.node import Node
from medveil.runtime.pir_service import VariantProfile
from medveil.runtime.services import (
    ServiceError,
    ServiceHost,
    query_service,
    query_step,
)
from medveil.runtime.study import StudySpec, sign_approval
from medveil.runtime.wire import seal

GROUPS = ["HP_0001250", "HP_0001263"]
MIN = 5
N_FAM, N_COHORT = 90, 80


def synthetic_site(folder: Path, seed: int) -> tuple[Path, pd.DataFrame, pd.DataFrame, np.ndarray]:
    """A PLINK fileset and a phenotype table: (bed path, table, variants (CHROM, POS, A1, A2),
    A1 dosages of the cohort's samples in table order, NaN missing). The first variants are
    made to order (a common one, a rare one, a small group cell, a split multi-allelic site, an
    indel, a symbolic allele, a duplicated row pair, an X variant coded 23), the rest random."""
    rng = np.random.default_rng(seed)
    made = [("1", 1000, "G", "A"), ("1", 2000, "G", "A"), ("1", 3000, "G", "A"), ("1", 4000, "G", "A"),
            ("1", 4000, "T", "A"), ("1", 5000, "CT", "CTT"), ("1", 5500, "0", "A"), ("1", 6000, "C", "T"),
            ("1", 6000, "C", "T"), ("23", 7000, "T", "C")]
    filler = [("2", 10_000 + 10 * i, "G", "A") for i in range(60)]
    variants = pd.DataFrame(made + filler, columns=["CHROM", "POS", "A1", "A2"])
    dosage = rng.choice([0.0, 1.0, 2.0], size=(N_FAM, len(variants)), p=[0.7, 0.25, 0.05])
    dosage[rng.random(dosage.shape) < 0.02] = np.nan
    dosage[:, 1] = 0
    dosage[[4, 9, 30], 1] = 1  # three carriers: below the minimum
    dosage[:, 2] = 0
    dosage[np.arange(0, 24, 2), 2] = 1  # twelve carriers
    iids = np.array([f"p{seed}-{i}" for i in range(N_FAM)])
    folder.mkdir(parents=True, exist_ok=True)
    bed = folder / f"geno{seed}.bed"
    to_bed(bed, dosage.astype(np.float32), properties={
        "iid": iids, "fid": iids, "sid": [f"v{i}" for i in range(len(variants))],
        "chromosome": variants["CHROM"].tolist(), "bp_position": variants["POS"].to_numpy(),
        "allele_1": variants["A1"].tolist(), "allele_2": variants["A2"].tolist()})
    cohort = rng.permutation(N_FAM)[:N_COHORT]  # ten genotyped samples are not in the approved table
    table = pd.DataFrame({"iid": list(iids[cohort]) + ["not-genotyped-1", "not-genotyped-2"],
                          GROUPS[0]: list((cohort % 2 == 0).astype(int)) + [1, 0],
                          GROUPS[1]: list(np.where(cohort % 3 == 0, 1.0, 0.0)) + [np.nan, 1.0],
                          "age": rng.normal(8, 3, N_COHORT + 2)})
    table.loc[3, GROUPS[1]] = np.nan  # a missing indicator: not in the group
    return bed, table, variants, dosage[cohort]


def expected_records(table: pd.DataFrame, variants: pd.DataFrame, dosage: np.ndarray, minimum: int = MIN,
                     ref_allele: str = "A2") -> dict[str, dict | None]:
    """What the site should publish per key, computed from the dosages here: None for a variant
    with fewer than `minimum` carriers; a cell hidden (None) when it or its complement among the
    carriers or in its group is in 1..minimum-1, with secondary suppression where the group cells
    sum to the total; every count hidden when the non-carriers are 1..minimum-1."""
    ref, alt = ("A2", "A1") if ref_allele == "A2" else ("A1", "A2")
    cohort = table.iloc[:N_COHORT]
    keys = {}
    for j, row in variants.iterrows():
        try:
            keys.setdefault(normalise_variant(row["CHROM"], row["POS"], row[ref], row[alt]), []).append(j)
        except ValueError:
            continue
    out: dict[str, dict | None] = {}
    for key, rows in keys.items():
        if len(rows) > 1:
            out[key] = None  # a duplicated variant is left out
            continue
        d = dosage[:, rows[0]]
        a = d if ref_allele == "A2" else 2 - d
        carrier = a >= 1
        total = int(carrier.sum())

        genotyped = int((~np.isnan(d)).sum())

        def small(*values: int) -> bool:
            return any(0 < v < minimum for v in values)

        if total < minimum:
            out[key] = None
            continue
        if small(len(cohort) - total, genotyped - total):  # few non-carriers: every count hidden
            out[key] = {"total": None, "hom_alt": None, "genotyped": None, "groups": [None] * len(GROUPS)}
            continue
        hom = int((a == 2).sum())
        members = [cohort[g].to_numpy() == 1 for g in GROUPS]
        cells = np.array([int((carrier & member).sum()) for member in members])
        hidden = np.array([small(c, total - c, int(member.sum()) - c) for c, member in zip(cells, members)])
        if cells.sum() == total and hidden.any():  # the groups cover each carrier once: a line total
            hidden = secondary_suppression(cells, hidden, DisclosurePolicy(min_cell_count=minimum))
        out[key] = {"total": total, "hom_alt": None if small(hom, total - hom) else hom, "genotyped": genotyped,
                    "groups": [None if off else int(c) for c, off in zip(cells, hidden)]}
    return out


def fetch(ask: Callable[[dict], dict], keys: list[str], hint: dict | None = None) -> tuple[list[dict | None], dict]:
    """The researcher's side: one hint (unless given), then one batched answer request for
    `keys`; returns each key's record (None: not found) and the hint."""
    hint = hint or ask({"op": "hint"})
    layout = hint["layout"]
    client = pir.PirClient(pir.PirParams.from_dict(hint["params"]), hint["hint"])
    states, vectors = [], []
    for key in keys:
        state, vector = client.query(bucket_and_tag(key, layout["salt"], layout["m"])[0])
        states.append(state)
        vectors.append(vector.tobytes())
    reply = ask({"op": "answer", "build": hint["build"], "queries": vectors})
    found = []
    for key, state, answer in zip(keys, states, reply["answers"]):
        record = find_in_column(client.recover(state, answer), key, layout["salt"])
        found.append(None if record is None else {k: record[k] for k in ("total", "hom_alt", "genotyped", "groups")})
    return found, hint


# --- through a real hub ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sites")
    sites = {}
    for seed, site in enumerate(("north", "south")):
        bed, table, variants, dosage = synthetic_site(folder / site, seed)
        table.to_csv(folder / site / "pheno.csv", index=False)
        sites[site] = {"pheno": folder / site / "pheno.csv", "geno": bed, "_truth": (table, variants, dosage)}
    truth = {site: data.pop("_truth") for site, data in sites.items()}
    with mv.Federation.simulate(sites, record_hub_traffic=True, timeout=120,
                                policy=DisclosurePolicy(min_cell_count=MIN, variant_query_budget=60)) as fed:
        network = fed.network
        spec = network.add_study("profiles", {"pheno": ["iid"]}, services=["variant_profile"])
        for site in spec.sites:
            node = Node.from_config_file(network.workdir / site / "site.yaml")
            try:
                node.build_service("variant_profile", "pheno", {"genotypes": "geno", "group_columns": ",".join(GROUPS),
                                                                "slots": 4, "queries_total": 60},
                                   SigningKey.from_pem(network.steward_key_path(site).read_bytes()))
            finally:
                node.close()
        fed.profiles = HubGrid(network.researcher, spec)
        fed.truth = truth
        yield fed


def _asker(grid: HubGrid, site: str) -> Callable[[dict], dict]:
    def ask(query: dict) -> dict:
        def send(task: str, body: dict) -> dict:
            return grid.exchange(query_step(site, "variant_profile", task, body), timeout=120)[site].body

        return query_service(send, "variant_profile", query)

    return ask


@pytest.mark.e2e
def test_each_site_answers_its_own_counts_through_the_hub_and_small_ones_read_as_absent(federation):
    for site in ("north", "south"):
        expected = expected_records(*federation.truth[site])
        keys = sorted(expected)[:20] + ["1:1000:A:G", "1:2000:A:G", "1:3000:A:G", "1:4000:A:T", "1:5000:CT:C",
                                        "X:7000:C:T", "1:6000:T:C", "9:1:A:G"]
        found, hint = fetch(_asker(federation.profiles, site), keys)
        assert hint["groups"] == GROUPS and hint["min_count"] == MIN
        assert found == [expected.get(key) for key in keys]
        by_key = dict(zip(keys, found))
        assert by_key["1:1000:A:G"] is not None and by_key["1:4000:A:T"] is not None  # split multi-allelic
        # of twelve carriers in the fileset only those the approved table lists are counted
        assert by_key["1:3000:A:G"]["total"] == int((federation.truth[site][2][:, 2] >= 1).sum()) <= 12
        assert by_key["1:2000:A:G"] is None and by_key["9:1:A:G"] is None  # three carriers / not held: alike
        assert by_key["1:6000:T:C"] is None  # a duplicated variant row pair


@pytest.mark.e2e
def test_suppressed_and_absent_get_the_same_answer_and_the_hub_sees_no_key_nor_record(federation):
    grid = federation.profiles
    started = len(grid.relayed())
    keys = ["1:2000:A:G", "9:1:A:G", "1:1000:A:G"]  # three carriers, absent, common
    found, hint = fetch(_asker(grid, "north"), keys)
    assert found[0] is None and found[1] is None and found[2] is not None
    relayed = grid.relayed()[started:]
    answers = [e for e in relayed if e.header["kind"] == "reply" and b"answers" in e.body_bytes]
    queries = [e for e in relayed if e.header["kind"] == "task" and e.header.get("phase") == "query"]
    assert answers and queries
    m, rows = hint["params"]["cols"], hint["params"]["rows"]
    body = answers[-1].body()["public"]
    assert body["answers"].shape == (3, rows) and body["answers"].dtype == np.uint32
    assert all(len(v) == 4 * m for v in queries[-1].body()["query"]["queries"])
    db_record = pack_like(found[2])
    for envelope in relayed:
        raw = envelope.header_bytes + envelope.body_bytes
        for key in keys:
            assert key.encode() not in raw
            assert bucket_and_tag(key, hint["layout"]["salt"], m)[1] not in raw
        assert db_record not in raw


def pack_like(record: dict) -> bytes:
    """The 20 count bytes of a record ([10:16] and two group cells) as the database holds them."""
    cells = [record["total"], record["hom_alt"], record["genotyped"], *record["groups"]]
    return b"".join((0xFFFF if c is None else c).to_bytes(2, "little") for c in cells)


# --- at one node ------------------------------------------------------------------------------------

SITE, STEWARD, ALICE, NEW_KEY = (SigningKey.generate() for _ in range(4))


def spec(study: str = "s1", researcher: str = "alice", key: SigningKey = ALICE) -> StudySpec:
    return StudySpec(id=study, researcher=researcher, researcher_key=key.verify_key.to_text(), sites=["site_a"],
                     site_keys={"site_a": SITE.verify_key.to_text()}, datasets={"pheno": ["iid"]},
                     analyses=["describe"], services=["variant_profile"])


def make_node(tmp_path: Path, min_cell_count: int = MIN, variant_query_budget: int = 20) -> Node:
    config = SiteConfig(site="site_a", hub="http://127.0.0.1:9", state_dir=tmp_path / "state",
                        policy=DisclosurePolicy(min_cell_count=min_cell_count,
                                                variant_query_budget=variant_query_budget),
                        datasets={"geno": DatasetConfig(kind="plink", path=tmp_path / "data" / "geno0.bed"),
                                  "pheno": DatasetConfig(kind="csv", path=tmp_path / "data" / "pheno.csv")})
    node = Node(config, SITE, STEWARD.verify_key)
    for s in (spec(), spec("alias", "alice-2"), spec("rekeyed", key=NEW_KEY)):
        node.store.save_approval(s.id, s.model_dump(), sign_approval(s, "site_a", STEWARD, time.time()))
    return node


def prepared_site(tmp_path: Path) -> Node:
    """A node over a fresh synthetic site's files; `node.truth` holds (table, variants, dosages)."""
    _, table, variants, dosage = synthetic_site(tmp_path / "data", 0)
    table.to_csv(tmp_path / "data" / "pheno.csv", index=False)
    node = make_node(tmp_path, variant_query_budget=1000)  # the tests here read many records
    node.truth = (table, variants, dosage)
    return node


@pytest.fixture
def site(tmp_path):
    node = prepared_site(tmp_path)
    yield node
    node.close()


def build(node: Node, **options: Any) -> dict:
    return node.build_service("variant_profile", "pheno", {"genotypes": "geno", "group_columns": GROUPS, "slots": 4,
                                                           "queries_total": 1000, **options}, STEWARD)


def handle(node: Node, query: dict, *, study: str = "s1", sender: str = "alice", signer: SigningKey = ALICE,
           at: float | None = None) -> tuple[str, dict]:
    """Send one query envelope (issued `at`, default now) through `node.handle`; (status, reply body)."""
    header = {"kind": "task", "sender": sender, "nonce": uuid.uuid4().hex, "study": study,
              "issued_at": time.time() if at is None else at,
              "task": f"query-{uuid.uuid4().hex[:12]}", "step": 0, "round": 0, "phase": "query",
              "analysis": "service", "dataset": "variant_profile", "recipients": ["site_a"]}
    reply = node.handle(seal(signer, header, {"query": query}).encode())
    reply.verify(SITE.verify_key)
    return reply.header["status"], reply.body()


def asker(node: Node, **who: Any) -> Callable[[dict], dict]:
    """Ask the node's variant_profile as the researcher would (`who`: handle's keywords)."""
    def ask(query: dict) -> dict:
        status, body = handle(node, VariantProfile().wire_query(VariantProfile.Query.model_validate(query)), **who)
        if status != "ok":
            raise RefusedError([("site_a", body["rule"], body["message"])])
        return body["public"]

    return ask


def test_the_build_records_its_layout_and_inputs(site):
    manifest = build(site)
    summary = manifest["summary"]
    expected = expected_records(*site.truth)
    assert summary["records"] == sum(r is not None for r in expected.values())
    assert summary["samples"] == N_COHORT and summary["not_keyed"] == 1 and summary["duplicate_keys"] == 2
    assert summary["groups"] == GROUPS and summary["min_count"] == MIN and summary["slots"] == 4
    assert summary["hint_bytes"] == 4 * 256 * 1024 and summary["answer_bytes"] == 4 * 256
    assert summary["query_bytes"] == 4 * summary["m"]
    assert set(manifest["inputs"]) == {"dataset", "genotypes"}
    assert site.services.status("variant_profile")["stale"] is False


def test_a_stricter_min_count_and_the_a1_reference_convention(site):
    build(site, min_count=8, ref_allele="A1")
    expected = expected_records(*site.truth, minimum=8, ref_allele="A1")
    keys = sorted(expected)[:24]
    found, hint = fetch(asker(site), keys)
    assert hint["min_count"] == 8 and found == [expected[key] for key in keys]


def test_a_restarted_node_answers_from_the_saved_state_without_a_rebuild(site, tmp_path, monkeypatch):
    manifest = build(site)
    keys = ["1:1000:A:G", "1:2000:A:G", "1:3000:A:G"]
    before, hint = fetch(asker(site), keys)
    site.close()

    def no_rebuild(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the service was rebuilt")

    monkeypatch.setattr(VariantProfile, "build", no_rebuild)
    restarted = make_node(tmp_path)
    try:
        after, _ = fetch(asker(restarted), keys, hint=hint)  # the old hint still serves: same build
        assert after == before and after[0] is not None
        status = restarted.services.status("variant_profile")
        assert status["built_at"] == manifest["built_at"] and status["summary"]["build"] == hint["build"]
    finally:
        restarted.close()


def test_a_tampered_state_is_refused(site):
    build(site)
    path = site.config.state_dir / "services" / "variant_profile" / "service.bin"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # a bit inside the database or the hint
    path.write_bytes(bytes(data))
    status, body = handle(site, {"op": "hint"})
    assert (status, body["rule"]) == ("refused", "service_corrupt")


def test_changed_data_make_it_stale_until_the_steward_rebuilds_and_old_builds_are_refused(site, tmp_path):
    build(site)
    _, hint = fetch(asker(site), ["1:1000:A:G"])
    bim = tmp_path / "data" / "geno0.bim"
    stat = bim.stat()
    os.utime(bim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    status = site.services.status("variant_profile")
    assert status["stale"] is True and status["changed"] == ["genotypes"]
    assert fetch(asker(site), ["1:1000:A:G"], hint=hint)[0][0] is not None  # still served until rebuilt
    build(site)
    assert site.services.status("variant_profile")["stale"] is False
    with pytest.raises(RefusedError) as refused:
        fetch(asker(site), ["1:1000:A:G"], hint=hint)
    assert refused.value.rule == "pir_build_changed"
    assert fetch(asker(site), ["1:1000:A:G"])[0][0] is not None  # with the new hint


def test_a_build_under_a_weaker_policy_than_todays_is_not_served(site, tmp_path):
    build(site)
    site.close()
    stricter = make_node(tmp_path, min_cell_count=10)
    try:
        status, body = handle(stricter, {"op": "hint"})
        assert (status, body["rule"]) == ("refused", "pir_policy_changed")
    finally:
        stricter.close()


def later(node: Node, days: float) -> Callable[..., Callable[[dict], dict]]:
    """The node's services `days` from now, and an asker whose queries are issued then."""
    at = time.time() + days * 86400
    node._services = ServiceHost(node, clock=lambda: at)
    return lambda **who: asker(node, at=at, **who)


def test_the_lookup_budget_is_a_total_shared_by_name_and_key(site):
    build(site, queries_total=5)
    ask = asker(site)
    hint = ask({"op": "hint"})
    fetch(ask, ["1:1000:A:G"] * 3, hint=hint)
    with pytest.raises(RefusedError) as refused:
        fetch(ask, ["1:1000:A:G"] * 3, hint=hint)  # 3 + 3 > 5: refused whole, and not charged
    assert refused.value.rule == "query_budget_exhausted"
    fetch(ask, ["1:1000:A:G"] * 2, hint=hint)
    days_later = later(site, 3)  # a total: days later it is still spent
    for who in ({}, {"study": "alias", "sender": "alice-2"}):
        with pytest.raises(RefusedError) as refused:
            fetch(days_later(**who), ["1:1000:A:G"], hint=hint)
        assert refused.value.rule == "query_budget_exhausted"
    entries = read_audit_log(site.audit.path)
    charged = [e for e in entries if e.get("kind") == "service_query" and e.get("budget_group") == "variant_queries"]
    assert [e["quota_used"] for e in charged] == [3, 3, 5, 5, 5]
    assert all(e["quota_total"] and e["quota_limit"] == 5 for e in charged)


def test_hints_are_limited_per_day_and_not_charged_to_the_lookups(site):
    build(site, hints_per_day=2, queries_total=1)
    assert [handle(site, {"op": "hint"})[0] for _ in range(2)] == ["ok", "ok"]
    status, body = handle(site, {"op": "hint"})
    assert (status, body["rule"]) == ("refused", "service_quota_exhausted")
    tomorrow = later(site, 1)()
    hint = tomorrow({"op": "hint"})
    assert fetch(tomorrow, ["1:1000:A:G"], hint=hint)[0][0] is not None  # the one look-up is still there


def _write_table(tmp_path: Path, table: pd.DataFrame) -> None:
    table.to_csv(tmp_path / "data" / "pheno.csv", index=False)


def test_build_refuses_a_table_that_does_not_fit(site, tmp_path):
    table = site.truth[0]
    with pytest.raises(ServiceError) as caught:
        build(site, group_columns=["HP_missing"])
    assert caught.value.rule == "missing_column"
    _write_table(tmp_path, table.assign(HP_0001250=table["HP_0001250"] * 2))
    with pytest.raises(ServiceError) as caught:
        build(site)
    assert caught.value.rule == "invalid_group_column"
    _write_table(tmp_path, pd.concat([table, table.iloc[:1]]))
    with pytest.raises(ServiceError) as caught:
        build(site)
    assert caught.value.rule == "invalid_iid_column"
    _write_table(tmp_path, table.assign(iid=[f"x{i}" for i in range(len(table))]))
    with pytest.raises(ServiceError) as caught:
        build(site)
    assert caught.value.rule == "no_samples"
    _write_table(tmp_path, table)
    with pytest.raises(ServiceError) as caught:
        build(site, partition=True)  # the two HPO columns overlap
    assert caught.value.rule == "not_a_partition"
    for bad in ({"group_columns": ["a"] * 2}, {"group_columns": [f"g{i}" for i in range(25)]}, {"slots": 0},
                {"ref_allele": "REF"}, {"queries_total": 0}, {"budget_group": "../x"}, {"genotypes": ""}):
        with pytest.raises(ServiceError) as caught:
            build(site, **bad)
        assert caught.value.rule == "invalid_options"


def test_groups_declared_a_partition_get_secondary_suppression(site, tmp_path):
    table = site.truth[0]
    cohort = table.iloc[:N_COHORT]
    female = (np.arange(N_COHORT) % 4 == 0).astype(int)
    _write_table(tmp_path, pd.concat([cohort.assign(F=female, M=1 - female), table.iloc[N_COHORT:].assign(F=1, M=0)]))
    build(site, group_columns=["F", "M"], partition=True)
    _, variants, dosage = site.truth
    keys, truths = [], []
    for j, row in variants.iterrows():
        carrier = dosage[:, j] >= 1
        f = int((carrier & (female == 1)).sum())
        if row["CHROM"] == "2" and carrier.sum() >= MIN:
            keys.append(normalise_variant(row["CHROM"], row["POS"], row["A2"], row["A1"]))
            truths.append((int(carrier.sum()), f))
    found, _ = fetch(asker(site), keys[:30])
    for record, (total, f) in zip(found, truths):
        shown = [c for c in record["groups"] if c is not None]
        hidden = [c is None for c in record["groups"]]
        assert record["total"] == total
        if 0 < f < MIN or 0 < total - f < MIN:
            assert all(hidden)  # one hidden cell of two would be the total minus the other
        else:
            assert shown == [f, total - f]
