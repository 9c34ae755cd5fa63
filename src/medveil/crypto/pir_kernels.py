"""Server kernels for SimplePIR: D @ Q mod 2^32 for a uint8 database D, one query or a batch.

These are the server's whole online cost (one pass over D per call). Each kernel sees only D
and the query vectors, never which column a client wants; the loops run over the full shape,
so the work and the memory access pattern are the same for every query.

Why hand-written: no maintained library offers the LWE-PIR matrix-vector product mod 2^32 at
memory speed. numpy's integer matmul is not BLAS (about 3.4 s for a 200 MB uint8 database
against 28 ms here), BLAS has no integer GEMM, and SimplePIR's own kernel is C inside a Go
module. numba compiles the loops below to vectorised machine code.

Three paths, all exact mod 2^32 (the tests compare each with a uint64 reference, including the
worst case of an all-255 D against all-0xFFFFFFFF queries):
- `matvec`: one query, one pass, one core. The loop is memory-bound (7 GB/s measured on this
  machine), so splitting rows across threads gains nothing measurable (28.5 vs 27.8 ms) and the
  kernel stays serial.
- `matmul_integer`: a batch, four rows register-blocked and the queries tiled by 64 so the
  accumulators stay in registers; rows run in parallel on numba's threads.
- `matmul_float`: a batch as float64 GEMM through BLAS. A dot product of nonnegative integers
  is exact in float64 while the whole sum stays below 2^53, since every partial sum is then an
  integer below 2^53; with entries <= 255 and queries <= 2^32 - 1 that holds for inner chunks
  of FLOAT_CHUNK = 8224 columns. Each chunk's product is converted to uint64 and summed mod
  2^32. D is converted to float64 a block of rows at a time (50 MB), never whole (1.6 GB).
If numba fails to import, `matvec` and `matmul_integer` use `matmul_float`: slower, same result.
numba is imported on first use (its import costs ~0.3 s, which a node or the CLI that never
answers a PIR query should not pay).
"""

from __future__ import annotations

import functools
import threading
from types import SimpleNamespace

import numpy as np

MAX_ENTRY = 255
MAX_QUERY = 2**32 - 1
FLOAT_CHUNK = (2**53 - 1) // (MAX_ENTRY * MAX_QUERY)
"""Inner columns per float64 product: the largest c with c * 255 * (2^32 - 1) < 2^53 (8224)."""
FLOAT_ROW_BLOCK = 512
QUERY_TILE = 64
"""Queries per pass of the integer kernel: 4 rows x 64 uint32 accumulators fit in registers."""
_MASK = np.uint64(0xFFFFFFFF)
# numba's workqueue threading layer (used where neither OpenMP nor TBB is available) aborts on
# concurrent parallel launches from two Python threads, and nodes run in threads; the lock
# serialises parallel launches (each already uses every core, so nothing is lost).
_PARALLEL = threading.Lock()


def check_database(db: np.ndarray) -> None:
    """Raise ValueError unless db is a C-contiguous 2-D uint8 array (what the kernels read)."""
    if not isinstance(db, np.ndarray) or db.dtype != np.uint8 or db.ndim != 2 or not db.flags.c_contiguous:
        raise ValueError("the database must be a C-contiguous 2-D uint8 array")
    if db.shape[0] == 0 or db.shape[1] == 0:
        raise ValueError("the database is empty")


def _check_queries(db: np.ndarray, queries: np.ndarray, ndim: int) -> None:
    check_database(db)
    if not isinstance(queries, np.ndarray) or queries.dtype != np.uint32 or queries.ndim != ndim:
        raise ValueError(f"queries must be a {ndim}-D uint32 array")
    if queries.shape[0] != db.shape[1] or (ndim == 2 and queries.shape[1] == 0):
        raise ValueError(f"queries have {queries.shape[0]} entries, the database {db.shape[1]} columns")


@functools.cache
def _compiled() -> SimpleNamespace | None:
    """The numba kernels, or None where numba does not import."""
    try:
        from numba import njit, prange
    except ImportError:  # numba is a core dependency; this keeps PIR working on a platform without it
        return None

    @njit(boundscheck=False, cache=True, nogil=True)
    def _matvec_kernel(db, q, out):  # pragma: no cover (compiled)
        for i in range(db.shape[0]):
            acc = np.uint32(0)
            row = db[i]
            for j in range(row.shape[0]):
                acc += np.uint32(row[j]) * q[j]
            out[i] = acc

    @njit(parallel=True, boundscheck=False, cache=True, nogil=True)
    def _matmul_kernel(db, qt, out):  # pragma: no cover (compiled)
        rows, cols = db.shape
        k = qt.shape[1]
        last = rows - 1
        for block in prange((rows + 3) // 4):
            i0 = block * 4
            i1, i2, i3 = min(i0 + 1, last), min(i0 + 2, last), min(i0 + 3, last)
            a0 = np.zeros(k, np.uint32)
            a1 = np.zeros(k, np.uint32)
            a2 = np.zeros(k, np.uint32)
            a3 = np.zeros(k, np.uint32)
            for j in range(cols):
                d0, d1 = np.uint32(db[i0, j]), np.uint32(db[i1, j])
                d2, d3 = np.uint32(db[i2, j]), np.uint32(db[i3, j])
                for t in range(k):
                    v = qt[j, t]
                    a0[t] += d0 * v
                    a1[t] += d1 * v
                    a2[t] += d2 * v
                    a3[t] += d3 * v
            out[i0] = a0
            if i0 + 1 <= last:
                out[i0 + 1] = a1
            if i0 + 2 <= last:
                out[i0 + 2] = a2
            if i0 + 3 <= last:
                out[i0 + 3] = a3

    return SimpleNamespace(matvec=_matvec_kernel, matmul=_matmul_kernel)


def have_numba() -> bool:
    """Whether the compiled kernels are available (else every path is `matmul_float`)."""
    return _compiled() is not None


def matvec(db: np.ndarray, query: np.ndarray) -> np.ndarray:
    """db @ query mod 2^32 for uint8 db (l, m) and uint32 query (m,): uint32 (l,)."""
    _check_queries(db, query, 1)
    kernels = _compiled()
    if kernels is None:
        return matmul_float(db, query[:, None])[:, 0]
    out = np.empty(db.shape[0], np.uint32)
    kernels.matvec(db, np.ascontiguousarray(query), out)
    return out


def matmul_integer(db: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """db @ queries mod 2^32 for uint8 db (l, m) and uint32 queries (m, k): uint32 (l, k), numba."""
    _check_queries(db, queries, 2)
    kernels = _compiled()
    if kernels is None:
        return matmul_float(db, queries)
    out = np.empty((db.shape[0], queries.shape[1]), np.uint32)
    for t0 in range(0, queries.shape[1], QUERY_TILE):
        qt = np.ascontiguousarray(queries[:, t0:t0 + QUERY_TILE])
        part = np.empty((db.shape[0], qt.shape[1]), np.uint32)
        with _PARALLEL:
            kernels.matmul(db, qt, part)
        out[:, t0:t0 + qt.shape[1]] = part
    return out


def matmul_float(db: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """db @ queries mod 2^32 as exact float64 GEMM (see the module docstring): uint32 (l, k)."""
    _check_queries(db, queries, 2)
    rows, cols = db.shape
    qf = queries.astype(np.float64)
    out = np.empty((rows, queries.shape[1]), np.uint32)
    buffer = np.empty((min(FLOAT_ROW_BLOCK, rows), cols), np.float64)
    acc = np.empty((buffer.shape[0], queries.shape[1]), np.uint64)
    for r0 in range(0, rows, FLOAT_ROW_BLOCK):
        block = db[r0:r0 + FLOAT_ROW_BLOCK]
        b, a = buffer[:block.shape[0]], acc[:block.shape[0]]
        np.copyto(b, block)
        a[...] = 0
        for c0 in range(0, cols, FLOAT_CHUNK):
            a += (b[:, c0:c0 + FLOAT_CHUNK] @ qf[c0:c0 + FLOAT_CHUNK]).astype(np.uint64)
        out[r0:r0 + block.shape[0]] = a & _MASK
    return out
