"""SimplePIR over 3,152,508 records x 64 bytes: preprocessing, server time per query, sizes.

The database holds seeded random bytes in the index layout of `medveil.crypto.pir` (256 records
per column: l = 16384 rows, m = 12315 columns, 201.8 MB of uint8), and a second database of the
keyword service's shape (l = 16384, m = 16384, 268.4 MB; random bytes: the server's work depends
only on the shape). Measured, each a median of --repeats runs in this process:
- preprocessing: A's AES-CTR expansion and the hint H = (D - 128) A (numba kernel, all threads);
- one query on one core (`numba.set_num_threads(1)`; the single-query kernel is serial anyway);
- 64 queries batched, amortised per query: the integer kernel with 1 and 2 numba threads, and
  the exact float64 GEMM with 1 and 2 OpenBLAS threads (threadpoolctl);
- the client's side (query, recover), query/answer/hint sizes, and a plaintext look-up
  (searchsorted over sorted 64-bit tags + a 64-byte copy) for the ratio.
Every answer is checked: the 64 batched answers decode to the records asked for.

    python benchmarks/pir.py [--records 3152508] [--keyword-cols 16384] [--repeats 5]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import numba
import numpy as np
from threadpoolctl import threadpool_limits

from medveil.crypto import pir, pir_kernels

BATCH = 64


def timed(function, repeats: int) -> float:
    """Median seconds of `repeats` calls (after one untimed warm-up call)."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def server_times(db: np.ndarray, queries: np.ndarray, repeats: int) -> dict[str, float]:
    """Seconds for one query on one core and per query amortised over a batch, by kernel and threads."""
    out = {}
    numba.set_num_threads(1)
    out["single, 1 core"] = timed(lambda: pir.answer(db, queries[0]), repeats)
    batch_repeats = max(1, repeats // 2)
    for threads in (1, 2):
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        out[f"batch {len(queries)}, integer kernel, {threads} thread(s)"] = timed(
            lambda: pir.answer_batch(db, queries, method="numba"), batch_repeats) / len(queries)
        with threadpool_limits(threads, user_api="blas"):
            out[f"batch {len(queries)}, float64 GEMM, {threads} thread(s)"] = timed(
                lambda: pir.answer_batch(db, queries, method="gemm"), batch_repeats) / len(queries)
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    return out


def plaintext_lookup(records: np.ndarray, lookups: int, seed: int) -> float:
    """Seconds per plaintext look-up: find a 64-bit tag by binary search, copy its 64-byte record."""
    rng = np.random.default_rng(seed)
    tags = rng.integers(0, 2**63, size=len(records), dtype=np.int64)
    order = np.argsort(tags)
    sorted_tags = tags[order]
    wanted = tags[rng.integers(0, len(records), size=lookups)].tolist()
    start = time.perf_counter()
    for tag in wanted:
        record = records[order[sorted_tags.searchsorted(tag)]].tobytes()
    elapsed = time.perf_counter() - start
    assert len(record) == records.shape[1]
    return elapsed / lookups


def layout_run(name: str, db: np.ndarray, repeats: int, check: np.ndarray | None, slots: list[int] | None) -> dict:
    """Preprocessing, the client's steps and the server times for one database."""
    rows, cols = db.shape
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    start = time.perf_counter()
    pir.matrix_a(b"\0" * 16, cols)
    expand = time.perf_counter() - start
    start = time.perf_counter()
    params, hint = pir.setup(db)
    preprocessing = time.perf_counter() - start
    client = pir.PirClient(params, hint)
    rng = np.random.default_rng(cols)
    columns = rng.integers(0, cols, size=BATCH)
    columns[0], columns[-1] = 0, cols - 1
    start = time.perf_counter()
    made = [client.query(int(c)) for c in columns]
    query_time = (time.perf_counter() - start) / BATCH
    queries = np.stack([q for _, q in made])
    answers = pir.answer_batch(db, queries)
    start = time.perf_counter()
    recovered = [client.recover(state, a) for (state, _), a in zip(made, answers)]
    recover_time = (time.perf_counter() - start) / BATCH
    for c, column in zip(columns, recovered):
        assert np.array_equal(column, db[:, c])
        if check is not None and slots is not None:
            for slot in slots:
                index = slot * cols + int(c)
                if index < len(check):
                    assert np.array_equal(pir.unpack(column, slot), check[index])
    times = server_times(db, queries, repeats)
    assert np.array_equal(pir.answer(db, queries[5]), answers[5])
    return {"name": name, "rows": rows, "cols": cols, "p": params.p, "db_bytes": db.nbytes, "expand": expand,
            "preprocessing": preprocessing, "query": query_time, "recover": recover_time, "times": times,
            "query_bytes": queries[0].nbytes, "answer_bytes": answers[0].nbytes, "hint_bytes": hint.nbytes}


def report(run: dict, plaintext: float) -> None:
    print(f"\n{run['name']}: l = {run['rows']:,} rows x m = {run['cols']:,} columns, p = {run['p']}, "
          f"D = {run['db_bytes'] / 1e6:.1f} MB uint8")
    print(f"  preprocessing (hint, numba, {numba.config.NUMBA_NUM_THREADS} threads): {run['preprocessing']:.2f} s "
          f"(of which A's AES-CTR expansion {run['expand']:.2f} s)")
    print(f"  sizes: query {run['query_bytes']:,} B, answer {run['answer_bytes']:,} B "
          f"(goal <= 65,536), hint {run['hint_bytes'] / 2**20:.2f} MiB (goal <= 64)")
    print(f"  client: query {run['query'] * 1e3:.1f} ms, recover {run['recover'] * 1e3:.1f} ms per query")
    for label, seconds in run["times"].items():
        print(f"  server, {label}: {seconds * 1e3:.2f} ms per query ({run['db_bytes'] / seconds / 1e9:.2f} GB/s "
              f"equivalent), {seconds / plaintext:,.0f}x a plaintext look-up")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=3_152_508)
    parser.add_argument("--keyword-cols", type=int, default=16384, help="columns of the keyword-shaped run; 0: skip")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"numba {numba.__version__} ({'kernels' if pir_kernels.have_numba() else 'numpy fallback'}), "
          f"threading layer threads {numba.config.NUMBA_NUM_THREADS}, numpy {np.__version__}")
    warm = np.zeros((8, 8), np.uint8)  # load the compiled kernels from numba's cache before timing
    pir.answer_batch(warm, np.zeros((2, 8), np.uint32))
    pir.answer(warm, np.zeros(8, np.uint32))
    rng = np.random.default_rng(2026)
    records = rng.integers(0, 256, size=(args.records, 64), dtype=np.uint8)
    start = time.perf_counter()
    db = pir.pack_index_db(records)
    print(f"{args.records:,} records x 64 B packed in {time.perf_counter() - start:.2f} s")
    plaintext = plaintext_lookup(records, 100_000, 7)
    print(f"plaintext look-up (searchsorted over {args.records:,} tags + 64-byte copy): {plaintext * 1e6:.2f} us")
    runs = [layout_run("index layout", db, args.repeats, records, [0, db.shape[0] // 64 - 1])]
    del db
    if args.keyword_cols:
        keyword = rng.integers(0, 256, size=(16384, args.keyword_cols), dtype=np.uint8)
        runs.append(layout_run("keyword layout (shape only)", keyword, args.repeats, None, None))
        del keyword
    for run in runs:
        report(run, plaintext)
    print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")


if __name__ == "__main__":
    main()
