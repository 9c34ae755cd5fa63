"""SimplePIR: correctness on random databases, the parameter table, the noise margin, single-use
query state, an index-independent server transcript and exact kernels.

References are computed here: uint64 numpy products, AES-ECB counter blocks, the discrete
Gaussian in float64 and SimplePIR's parameter formula; nothing is copied from the code under test.
"""

from __future__ import annotations

import inspect
import math
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from medveil.crypto import pir, pir_kernels
from medveil.crypto.pir import (
    PARAMS_TABLE,
    PirClient,
    PirError,
    PirParams,
    answer,
    answer_batch,
    index_layout,
    locate,
    matrix_a,
    pack_index_db,
    plaintext_modulus,
    sample_error,
    setup,
    unpack,
)

MASK = np.uint64(0xFFFFFFFF)


def reference(db: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """db @ queries mod 2^32 in uint64 (exact: every sum here is below 2^64)."""
    return (db.astype(np.uint64) @ queries.astype(np.uint64) & MASK).astype(np.uint32)


@settings(max_examples=20, deadline=None)
@given(n_records=st.integers(1, 600), max_rows=st.sampled_from([64, 256, 1024, 16384]), data=st.data())
def test_random_databases_return_the_record_asked_for(n_records, max_rows, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    records = rng.integers(0, 256, size=(n_records, 64), dtype=np.uint8)
    db = pack_index_db(records, max_rows)
    params, hint = setup(db)
    client = PirClient(PirParams.from_dict(params.to_dict()), hint)
    wanted = {0, n_records - 1, data.draw(st.integers(0, n_records - 1), label="index")}
    states, queries, slots = [], [], []
    for index in sorted(wanted):
        column, slot = locate(index, n_records, 64, max_rows)
        state, query = client.query(column)
        assert query.dtype == np.uint32 and query.shape == (db.shape[1],)
        states.append(state)
        queries.append(query)
        slots.append(slot)
    method = data.draw(st.sampled_from(["numba", "gemm"]), label="method")
    answers = [answer(db, queries[0])]
    if len(queries) > 1:
        answers.extend(answer_batch(db, np.stack(queries[1:]), method=method))
    for index, state, response, slot in zip(sorted(wanted), states, answers, slots):
        assert np.array_equal(unpack(client.recover(state, response), slot), records[index])


def test_every_record_round_trips_through_the_layout():
    records = np.random.default_rng(1).integers(0, 256, size=(777, 64), dtype=np.uint8)
    db = pack_index_db(records, 1024)
    assert db.shape == (1024, 49) and index_layout(777, 64, 1024) == (16, 1024, 49)
    for index in range(777):
        column, slot = locate(index, 777, 64, 1024)
        assert np.array_equal(unpack(db[:, column].copy(), slot), records[index])
    for empty in range(777, 16 * 49):  # the padding slots hold zeros
        assert not unpack(db[:, empty % 49].copy(), empty // 49).any()


def test_benchmark_layout_meets_the_size_goals():
    records_per_column, rows, cols = index_layout(3_152_508)
    assert (records_per_column, rows, cols) == (256, 16384, 12315)
    assert 4 * rows <= 64 * 1024 and 4 * rows * pir.LWE_N <= 64 * 2**20 and plaintext_modulus(cols) == 833


def test_parameter_table_follows_from_the_failure_bound():
    """p = floor(sqrt(q / (sqrt(2) sigma sqrt(m) sqrt(ln(2 / d))))) with d = 2^-40 (SimplePIR's)."""
    delta = 2.0**pir.CORRECTNESS_LOG2
    for log_m, p in PARAMS_TABLE.items():
        m = 2**log_m
        expected = math.floor(math.sqrt(2**32 / (math.sqrt(2) * 6.4 * math.sqrt(m) * math.sqrt(math.log(2 / delta)))))
        assert p == expected
        assert plaintext_modulus(m) == p and plaintext_modulus(m // 2 + 1) == p
    assert plaintext_modulus(1) == 991
    with pytest.raises(PirError):
        plaintext_modulus(2**21 + 1)
    # centred bytes at the benchmark's shapes are far inside the table's 2^-40
    assert pir.failure_log2_bound(16384) < -400 and pir.failure_log2_bound(12315) < -400


def test_noise_margin_over_200_queries():
    """y = ans - 128 sum(qu) - H s equals Delta D[:, c] + D e exactly, and |D e| < Delta / 8."""
    m, rows, k = 16384, 64, 200
    db = np.random.default_rng(5).integers(0, 256, size=(rows, m), dtype=np.uint8)
    db[:, :64] = 255  # a column whose centred entries are all +127 and one of all -128
    db[:, 64:128] = 0
    params, hint = setup(db)
    a = matrix_a(params.seed, m)
    secrets = np.frombuffer(os.urandom(4 * pir.LWE_N * k), dtype="<u4").reshape(pir.LWE_N, k)
    errors = np.stack([sample_error(m) for _ in range(k)], axis=1)
    columns = np.array([0, 64, m - 1, *np.random.default_rng(6).integers(0, m, k - 3)])
    queries = (a.astype(np.uint64) @ secrets.astype(np.uint64) + (errors % 2**32).astype(np.uint64)) & MASK
    queries[columns, np.arange(k)] += np.uint64(params.delta)
    queries = (queries & MASK).astype(np.uint32)
    answers = answer_batch(db, np.ascontiguousarray(queries.T))
    centred = db.astype(np.int64) - 128
    worst = 0
    for t in range(k):
        offset = 128 * int(queries[:, t].sum(dtype=np.uint64)) % 2**32
        hs = hint.astype(np.uint64) @ secrets[:, t].astype(np.uint64) & MASK
        y = ((answers[t].astype(np.int64) - offset - hs.astype(np.int64)) % 2**32).astype(np.uint32).view(np.int32)
        noise = y.astype(np.int64) - params.delta * centred[:, columns[t]]
        assert np.array_equal(noise, centred @ errors[:, t])
        worst = max(worst, int(np.abs(noise).max()))
    assert worst < params.delta / 8


def test_query_state_is_single_use_and_bound_to_its_client():
    db = np.random.default_rng(2).integers(0, 256, size=(128, 40), dtype=np.uint8)
    params, hint = setup(db)
    client, other = PirClient(params, hint), PirClient(params, hint)
    state, query = client.query(7)
    response = answer(db, query)
    with pytest.raises(PirError, match="another client"):
        other.recover(state, response)
    assert np.array_equal(client.recover(state, response), db[:, 7]) and state.used
    with pytest.raises(PirError, match="already used"):
        client.recover(state, response)
    fresh, _ = client.query(7)
    with pytest.raises(PirError, match="does not decode"):  # an answer to some other query
        client.recover(fresh, response)
    with pytest.raises(PirError, match="already used"):  # a failed recover also burns the state
        client.recover(fresh, response)


def test_queries_are_fresh_and_come_from_os_urandom(monkeypatch):
    db = np.random.default_rng(2).integers(0, 256, size=(64, 30), dtype=np.uint8)
    params, hint = setup(db)
    client = PirClient(params, hint)
    first, second = client.query(3)[1], client.query(3)[1]
    assert not np.array_equal(first, second)
    monkeypatch.setattr(pir.os, "urandom", lambda size: b"\xff" * size)
    _, query = client.query(3)  # s = all 2^32 - 1, e = +64 everywhere: only os.urandom drives them
    a = matrix_a(params.seed, 30).astype(np.uint64)
    expected = a.sum(axis=1) * np.uint64(2**32 - 1) + np.uint64(64)
    expected[3] += np.uint64(params.delta)
    assert np.array_equal(query, (expected & MASK).astype(np.uint32))


def test_transcript_does_not_depend_on_the_column():
    db = np.random.default_rng(4).integers(0, 256, size=(256, 50), dtype=np.uint8)
    params, hint = setup(db)
    client = PirClient(params, hint)
    assert list(inspect.signature(answer).parameters) == ["db", "query"]
    assert list(inspect.signature(answer_batch).parameters) == ["db", "queries", "method"]
    sizes = {client.query(c)[1].nbytes for c in range(params.cols)}
    assert sizes == {4 * params.cols}
    queries = {c: client.query(c)[1] for c in (0, params.cols - 1)}
    answer(db, queries[0])  # compiled or loaded from numba's cache before tracing

    def trace(query):
        lines = []

        def tracer(frame, event, arg):
            lines.append((frame.f_code.co_filename, frame.f_lineno, event))
            return tracer

        sys.settrace(tracer)
        try:
            response = answer(db, query)
        finally:
            sys.settrace(None)
        return lines, response

    (first, a0), (last, a1) = trace(queries[0]), trace(queries[params.cols - 1])
    assert first == last and any(path.endswith("pir_kernels.py") for path, _, _ in first)
    assert a0.nbytes == a1.nbytes == 4 * params.rows


@pytest.mark.parametrize(("rows", "cols", "k"), [(1, 1, 1), (7, 3 * pir_kernels.FLOAT_CHUNK + 5, 3),
                                                 (9, 300, 65), (64, 1000, 64)])
def test_kernels_equal_the_uint64_reference(rows, cols, k):
    rng = np.random.default_rng(rows * cols + k)
    db = rng.integers(0, 256, size=(rows, cols), dtype=np.uint8)
    queries = rng.integers(0, 2**32, size=(cols, k), dtype=np.uint64).astype(np.uint32)
    for d, q in ((db, queries), (np.full_like(db, 255), np.full_like(queries, 0xFFFFFFFF))):
        expected = reference(d, q)
        assert np.array_equal(pir_kernels.matmul_integer(d, q), expected)
        assert np.array_equal(pir_kernels.matmul_float(d, q), expected)
        assert np.array_equal(pir_kernels.matvec(d, np.ascontiguousarray(q[:, 0])), expected[:, 0])
        assert np.array_equal(answer_batch(d, np.ascontiguousarray(q.T), method="gemm"), expected.T)
        assert np.array_equal(answer_batch(d, np.ascontiguousarray(q.T), method="numba"), expected.T)


def test_float_chunk_is_the_largest_exact_one():
    chunk = pir_kernels.FLOAT_CHUNK
    assert chunk * 255 * (2**32 - 1) < 2**53 <= (chunk + 1) * 255 * (2**32 - 1)


def test_parallel_kernel_from_concurrent_threads():
    db = np.random.default_rng(8).integers(0, 256, size=(257, 500), dtype=np.uint8)
    queries = np.random.default_rng(9).integers(0, 2**32, size=(500, 16), dtype=np.uint64).astype(np.uint32)
    expected, results = reference(db, queries), []
    threads = [threading.Thread(target=lambda: results.append(pir_kernels.matmul_integer(db, queries)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == 4 and all(np.array_equal(r, expected) for r in results)


def test_numpy_fallback_without_numba():
    code = """
import sys
sys.modules["numba"] = None
import numpy as np
from medveil.crypto import pir, pir_kernels
assert not pir_kernels.have_numba()
rng = np.random.default_rng(3)
db = rng.integers(0, 256, size=(70, 9000), dtype=np.uint8)
q = rng.integers(0, 2**32, size=(9000, 5), dtype=np.uint64).astype(np.uint32)
expected = (db.astype(np.uint64) @ q.astype(np.uint64) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
assert np.array_equal(pir_kernels.matmul_integer(db, q), expected)
assert np.array_equal(pir_kernels.matvec(db, np.ascontiguousarray(q[:, 0])), expected[:, 0])
params, hint = pir.setup(db)
client = pir.PirClient(params, hint)
state, query = client.query(8999)
assert np.array_equal(client.recover(state, pir.answer(db, query)), db[:, 8999])
print("fallback ok")
"""
    completed = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "fallback ok" in completed.stdout


def test_matrix_a_is_the_aes_ctr_keystream():
    seed = bytes(range(16))
    a = matrix_a(seed, 3, 8)
    ecb = Cipher(algorithms.AES(seed), modes.ECB()).encryptor()
    blocks = ecb.update(b"".join(i.to_bytes(16, "big") for i in range(6))) + ecb.finalize()
    assert np.array_equal(a, np.frombuffer(blocks, dtype="<u4").reshape(3, 8))
    assert np.array_equal(matrix_a(seed, 3, 8), a) and not np.array_equal(matrix_a(bytes(16), 3, 8), a)


def test_error_table_is_the_discrete_gaussian():
    x = np.arange(-64, 65)
    weights = np.exp(-x.astype(np.float64) ** 2 / (2 * 6.4**2))
    cumulative = np.cumsum(weights / weights.sum())[:-1]
    assert np.abs(pir.CDT.astype(np.float64) / 2.0**64 - cumulative).max() < 1e-15
    assert np.all(np.diff(pir.CDT.astype(object)) >= 0)
    e = sample_error(200_000)
    assert e.dtype == np.int64 and abs(e.mean()) < 0.1 and abs(e.std() - 6.4) < 0.1 and np.abs(e).max() <= 64


@pytest.mark.parametrize("wire", [
    {"n": 512}, {"p": 991}, {"seed": "00" * 8}, {"seed": "zz" * 16}, {"cols": 2**20 + 1, "p": 247},
    {"scheme": "other"}, {"rows": 0}, {"rows": True}, {"extra": 1},
])
def test_parameters_from_the_wire_are_checked(wire):
    good = PirParams(rows=64, cols=12000, p=833, seed=bytes(16)).to_dict()
    assert PirParams.from_dict(good) == PirParams(rows=64, cols=12000, p=833, seed=bytes(16))
    with pytest.raises(PirError):
        PirParams.from_dict({**good, **wire})


def test_hostile_queries_and_answers_are_refused():
    db = np.random.default_rng(2).integers(0, 256, size=(64, 30), dtype=np.uint8)
    params, hint = setup(db)
    client = PirClient(params, hint)
    for bad in (np.zeros(29, np.uint32), np.zeros(30, np.int64), np.zeros((30, 1), np.uint32), [0] * 30):
        with pytest.raises(PirError):
            answer(db, bad)
    with pytest.raises(PirError):
        answer_batch(db, np.zeros((2, 31), np.uint32))
    with pytest.raises(PirError):
        answer(np.asfortranarray(db), np.zeros(30, np.uint32))
    for column in (-1, 30, True, 2.0):
        with pytest.raises(PirError):
            client.query(column)
    state, _ = client.query(1)
    with pytest.raises(PirError, match="shape"):
        client.recover(state, np.zeros(63, np.uint32))
    with pytest.raises(PirError):
        PirClient(params, hint[:-1])
