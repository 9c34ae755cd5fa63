"""Red-team tests of the variant_profile service: a hostile researcher sends hand-made PIR
queries straight to a real node. Malformed, oversized, wrong-typed and wrong-sized queries, too
many vectors and stale build ids are refused with a named rule before anything is charged;
probing past the total look-up budget is refused and logged. A vector crafted to read two
columns at once works (inherent to SimplePIR: the answer is linear in the query), and what it
reads is still only disclosure-checked records: no sub-threshold variant and no small count is
anywhere in the database a query reads from."""

from __future__ import annotations

import os
import time
import uuid

import numpy as np
import pytest

from medveil.crypto import pir
from medveil.crypto.pir_keyword import RECORD_BYTES, bucket_and_tag, unpack_record
from medveil.runtime.audit import read_audit_log
from medveil.runtime.grid import RefusedError
from medveil.runtime.wire import seal
from tests.runtime.test_pir_service import (
    ALICE,
    MIN,
    NEW_KEY,
    SITE,
    asker,
    build,
    expected_records,
    fetch,
    handle,
    prepared_site,
)


@pytest.fixture
def site(tmp_path):
    node = prepared_site(tmp_path)
    yield node
    node.close()


def _hint(node) -> dict:
    return asker(node)({"op": "hint"})


def _vectors(hint: dict, k: int) -> list[bytes]:
    client = pir.PirClient(pir.PirParams.from_dict(hint["params"]), hint["hint"])
    return [client.query(i % hint["params"]["cols"])[1].tobytes() for i in range(k)]


def _refusals(node) -> list[str]:
    return [e["rule"] for e in read_audit_log(node.audit.path) if e.get("kind") == "refusal"]


def test_malformed_queries_are_refused_with_named_rules_and_cost_nothing(site):
    build(site, queries_total=3)
    hint = _hint(site)
    size = 4 * hint["params"]["cols"]
    good = _vectors(hint, 1)[0]
    cases = [
        ({"op": "read"}, "invalid_query"),
        ({"op": "hint", "build": hint["build"]}, "invalid_query"),
        ({"op": "hint", "extra": 1}, "invalid_query"),
        ({"op": "answer", "queries": [good]}, "invalid_query"),  # no build
        ({"op": "answer", "build": hint["build"]}, "invalid_query"),  # no vectors
        ({"op": "answer", "build": hint["build"], "queries": []}, "invalid_query"),
        ({"op": "answer", "build": hint["build"], "queries": [good] * 65}, "invalid_query"),  # over 64
        ({"op": "answer", "build": hint["build"], "queries": ["AAAA" * (size // 4)]}, "invalid_query"),  # text
        ({"op": "answer", "build": hint["build"], "queries": [list(range(size // 4))]}, "invalid_query"),
        ({"op": "answer", "build": hint["build"], "queries": np.zeros((1, size // 4), np.uint32)}, "invalid_query"),
        ({"op": "answer", "build": hint["build"], "queries": [np.zeros(size // 4, np.uint32)]}, "invalid_query"),
        ({"op": "answer", "build": hint["build"], "queries": [np.zeros(size // 4, np.float64)]}, "invalid_query"),
        ({"op": "answer", "build": hint["build"], "queries": [good[:-4]]}, "pir_query_size"),
        ({"op": "answer", "build": hint["build"], "queries": [good + bytes(4)]}, "pir_query_size"),
        ({"op": "answer", "build": hint["build"], "queries": [good, good[:-1]]}, "pir_query_size"),
        ({"op": "answer", "build": "../../etc", "queries": [good]}, "invalid_query"),
        ({"op": "answer", "build": hint["build"].upper(), "queries": [good]}, "invalid_query"),
        ({"op": "answer", "build": "0" * 64, "queries": [good]}, "pir_build_changed"),
        ({"op": "answer", "build": hint["build"], "queries": [good], "column": 3}, "invalid_query"),
    ]
    for query, rule in cases:
        status, body = handle(site, query)
        assert (status, body.get("rule")) == ("refused", rule), query if not isinstance(query, dict) else query.get("op")
    assert _refusals(site) == [rule for _, rule in cases]
    assert len(fetch(asker(site), ["1:1000:A:G"] * 3, hint=hint)[0]) == 3  # the whole budget is still there


def test_an_oversized_or_non_map_body_is_refused(site):
    build(site)
    hint = _hint(site)
    size = 4 * hint["params"]["cols"]
    limit = 64 * size + 64 * 1024
    header = {"kind": "task", "sender": "alice", "issued_at": time.time(), "study": "s1", "step": 0, "round": 0,
              "phase": "query", "analysis": "service", "dataset": "variant_profile", "recipients": ["site_a"]}
    for body in ({"query": {"op": "answer", "build": hint["build"], "queries": [os.urandom(limit)]}},
                 {"query": [1, 2]}, {"query": {"op": "hint"}, "more": 1}):
        raw = seal(ALICE, {**header, "nonce": uuid.uuid4().hex, "task": f"query-{uuid.uuid4().hex[:12]}"}, body)
        reply = site.handle(raw.encode())
        reply.verify(SITE.verify_key)
        assert (reply.header["status"], reply.body()["rule"]) == ("refused", "invalid_query")


def test_probing_past_the_budget_is_refused_and_logged(site):
    build(site, queries_total=20)
    hint = _hint(site)
    expected = expected_records(*site.truth)
    keys = sorted(expected)[:20]
    for start in (0, 8, 16):  # 8 + 8 + 4 look-ups, found or not alike
        batch = keys[start:start + 8]
        assert fetch(asker(site), batch, hint=hint)[0] == [expected[k] for k in batch]
    with pytest.raises(RefusedError) as refused:
        fetch(asker(site), ["1:1000:A:G"], hint=hint)  # the 21st look-up
    assert refused.value.rule == "query_budget_exhausted"
    # a new study under the researcher's name with another key is the same researcher
    with pytest.raises(RefusedError) as refused:
        fetch(asker(site, study="rekeyed", signer=NEW_KEY), ["1:1000:A:G"], hint=hint)
    assert refused.value.rule == "query_budget_exhausted"
    entries = read_audit_log(site.audit.path)
    refusals = [e for e in entries if e.get("kind") == "refusal" and e["rule"] == "query_budget_exhausted"]
    assert len(refusals) == 2 and all("variant_queries" in e["detail"] for e in refusals)
    queried = [e for e in entries if e.get("kind") == "service_query" and e.get("budget_group") == "variant_queries"]
    assert queried[-1]["quota_used"] == 20 and queried[-1]["quota_limit"] == 20


def test_a_vector_aimed_at_two_columns_reads_their_sum_and_nothing_beyond_checked_records(site):
    """SimplePIR's answer is linear in the query, so Delta in two positions decodes to the sum
    of two columns (inherent to the scheme; it costs one look-up like any vector and the server
    cannot tell). Bounded because every record the database holds, in any column, is a
    disclosure-checked aggregate: that is checked here over the whole database."""
    build(site)
    hint = _hint(site)
    params = pir.PirParams.from_dict(hint["params"])
    m, delta = params.cols, params.delta
    assert m >= 2
    a = pir.matrix_a(params.seed, m)
    secret = np.frombuffer(os.urandom(4 * params.n), "<u4").astype(np.uint32)
    vector = a @ secret + (pir.sample_error(m) % 2**32).astype(np.uint32)
    vector[[0, m - 1]] += np.uint32(delta)
    reply = asker(site)({"op": "answer", "build": hint["build"], "queries": [vector.tobytes()]})
    offset = np.uint32(128 * int(vector.sum(dtype=np.uint64)) % 2**32)
    noisy = (reply["answers"][0] - offset - hint["hint"] @ secret).view(np.int32).astype(np.int64)
    decoded = np.floor_divide(noisy + delta // 2, delta)
    db = site.services._load("variant_profile").state["db"]
    assert np.array_equal(decoded, db[:, 0].astype(np.int64) + db[:, m - 1] - 256)

    expected = expected_records(*site.truth)
    by_tag = {bucket_and_tag(key, hint["layout"]["salt"], m)[1]: key for key in expected}
    held = set()
    for column in range(m):
        for slot in db[:, column].reshape(-1, RECORD_BYTES):
            if not slot[:8].any():
                assert not slot.any()  # an empty slot is all zero
                continue
            record = unpack_record(slot.tobytes())
            key = by_tag[record["tag"]]
            assert expected[key] is not None  # never a variant below the minimum, nor a duplicated one
            assert {k: record[k] for k in ("total", "hom_alt", "genotyped", "groups")} == expected[key]
            cells = [record["hom_alt"], *record["groups"]]
            assert not any(c is not None and (0 < c < MIN or 0 < record["total"] - c < MIN) for c in cells)
            held.add(key)
    assert held == {key for key, record in expected.items() if record is not None}
    assert expected["1:2000:A:G"] is None and "1:2000:A:G" not in held


def test_a_replayed_query_is_refused(site):
    build(site)
    header = {"kind": "task", "sender": "alice", "nonce": uuid.uuid4().hex, "issued_at": time.time(), "study": "s1",
              "task": f"query-{uuid.uuid4().hex[:12]}", "step": 0, "round": 0, "phase": "query",
              "analysis": "service", "dataset": "variant_profile", "recipients": ["site_a"]}
    raw = seal(ALICE, header, {"query": {"op": "hint"}}).encode()
    assert site.handle(raw).header["status"] == "ok"
    assert site.handle(raw).body()["rule"] == "replay"
