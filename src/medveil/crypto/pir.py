"""Single-server private information retrieval: SimplePIR (Henzinger et al., USENIX Security '23).

The database is a matrix D of l rows x m columns of 8-bit entries; one record of 64 bytes sits in
64 consecutive rows of one column. The client downloads a one-time hint H = D A mod 2^32 (A is
a public m x 1024 matrix expanded from a seed), then fetches a whole column c with one query:

    query  qu = A s + e + Delta u_c mod 2^32   (s uniform in Z_q^n, fresh per query; e Gaussian)
    answer ans = D qu mod 2^32                 (one pass over D; the server never sees c)
    recover   ans - H s = D e + Delta D[:, c]  (round to the nearest multiple of Delta)

What each party learns:
- The server learns nothing about c: the query is an LWE sample, pseudorandom without s, and
  its size (4m bytes) and the server's work and answer size (4l bytes) are the same for every
  column; `answer` takes no index and has no branch on one.
- The client learns the whole column c: every record stored in it (up to 256), not only the one
  it asked for. SimplePIR gives no database privacy, and the hint is a public linear function
  of D, so the records must be disclosure-checked aggregates that any client may see.
- Anyone learns the shape (l, m), the plaintext modulus p and the seed of A.

Parameters: LWE dimension n = 1024, q = 2^32, discrete Gaussian error sigma = 6.4 and the
plaintext modulus p from SimplePIR's table (`pir/params.csv` of github:ahenzinger/simplepir,
read by `PickParams(false, m)`: the first row with m <= 2^log(m)). Security: SimplePIR chooses
these for 128-bit security by the lattice estimator (Albrecht-Player-Scott) for the m <= 2^21 LWE
samples a query reveals (eprint 2022/949, Sec. 4.2, as the mpc4j port cites it; the paper's own
sentence could not be retrieved here). That is their estimate, not re-run here.

Correctness: the table's p is the largest with Delta/2 >= (p/2) sigma sqrt(m) sqrt(2 ln(2/d)),
d = 2^-40, a Gaussian tail bound for one noise entry sum_j D_ij e_j with |D_ij| <= p/2, so each
decoded entry fails with probability <= 2^-40. Here entries are bytes stored as uint8 and
centred (D = D' - 128, |D| <= 128, far below p/2 >= 128 for m <= 2^20), so the noise sd is at
most 128 sigma sqrt(m): at p = 833, m = 16384 that is 104,858 against Delta/2 = 2,577,980, a
z-score of 24.6 and a failure probability per entry below 2^-435 (`failure_log2_bound`).
Centring is what makes this work: uncentred bytes at the same p would fail about once in 2^9.
The server multiplies the stored bytes D'; the hint and the client remove the offset 128.

s and e come from os.urandom only: numpy's generators are not cryptographic, and a predictable
e or s reveals c. A QueryState is single-use: two queries under one s differ by
Delta (u_c1 - u_c2) plus small noise, which reveals both columns.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from decimal import Decimal, getcontext

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from medveil.crypto import pir_kernels

PARAMS_TABLE = {13: 991, 14: 833, 15: 701, 16: 589, 17: 495, 18: 416, 19: 350, 20: 294, 21: 247}
"""log2(max columns) -> SimplePIR's plaintext modulus p (`p_simple` of their pir/params.csv)."""
LWE_N, LOG_Q, SIGMA = 1024, 32, 6.4
CORRECTNESS_LOG2 = -40
"""SimplePIR's per-entry failure bound, from which their table's p follows."""
CENTRE = 128
MAX_COLUMNS = 2**20
"""The last table row whose p (294) still holds a byte: p >= 256, and 128 Delta < 2^31."""
SEED_BYTES = 16
ERROR_TAIL = 64
"""The error's support is [-64, 64]: the mass beyond is 6e-24, far below the table's 2^-64."""
SCHEME = "simplepir-u8-centred-v1"
_Q = 1 << LOG_Q


class PirError(ValueError):
    """A PIR message that cannot be used: wrong shape or type, a reused query, a bad answer."""


def plaintext_modulus(m: int) -> int:
    """SimplePIR's p for a database of m columns (their `PickParams`)."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise PirError(f"the column count must be a positive int, got {m!r}")
    for log_m in sorted(PARAMS_TABLE):
        if m <= 1 << log_m:
            return PARAMS_TABLE[log_m]
    raise PirError(f"SimplePIR has no parameters for {m} > 2^21 columns")


def failure_log2_bound(m: int, p: int | None = None) -> float:
    """log2 of a Gaussian tail bound on one decoded entry failing, for centred bytes (|D| <= 128)."""
    p = plaintext_modulus(m) if p is None else p
    z = (_Q // p / 2) / (CENTRE * SIGMA * math.sqrt(m))
    return math.log2(2.0) - z * z / 2 / math.log(2)


@dataclass(frozen=True)
class PirParams:
    """The public parameters of one database: its shape, p and the seed of A."""

    rows: int
    cols: int
    p: int
    seed: bytes
    n: int = LWE_N

    def __post_init__(self) -> None:
        for name in ("rows", "cols", "p", "n"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PirError(f"{name} must be a positive int")
        if self.cols > MAX_COLUMNS:
            raise PirError(f"at most {MAX_COLUMNS} columns hold 8-bit entries, got {self.cols}")
        if self.n != LWE_N:
            raise PirError(f"the LWE dimension must be {LWE_N}, got {self.n}")
        if self.p != plaintext_modulus(self.cols):
            raise PirError(f"p must be {plaintext_modulus(self.cols)} for {self.cols} columns, got {self.p}")
        if not isinstance(self.seed, bytes) or len(self.seed) != SEED_BYTES:
            raise PirError(f"the seed must be {SEED_BYTES} bytes")

    @property
    def delta(self) -> int:
        """Delta = floor(q / p), the scale of the selected column in a query."""
        return _Q // self.p

    def to_dict(self) -> dict:
        """A JSON- and msgpack-safe form for the wire and the service manifest."""
        return {"scheme": SCHEME, "rows": self.rows, "cols": self.cols, "p": self.p, "n": self.n,
                "seed": self.seed.hex()}

    @classmethod
    def from_dict(cls, data: object) -> PirParams:
        """Parse parameters a server sent: every field is checked, a weakened one is refused."""
        if not isinstance(data, dict) or set(data) != {"scheme", "rows", "cols", "p", "n", "seed"}:
            raise PirError("PIR parameters must be a dict of scheme, rows, cols, p, n and seed")
        if data["scheme"] != SCHEME:
            raise PirError(f"unknown PIR scheme {data['scheme']!r}")
        seed = data["seed"]
        if not isinstance(seed, str) or len(seed) != 2 * SEED_BYTES:
            raise PirError(f"the seed must be {2 * SEED_BYTES} hex characters")
        try:
            raw = bytes.fromhex(seed)
        except ValueError as error:
            raise PirError("the seed is not hex") from error
        return cls(rows=data["rows"], cols=data["cols"], p=data["p"], seed=raw, n=data["n"])


def matrix_a(seed: bytes, m: int, n: int = LWE_N) -> np.ndarray:
    """The public matrix A, uint32 (m, n): the AES-128-CTR keystream of the seed (counter 0),
    little-endian, row-major. q = 2^32, so every word is uniform and nothing is rejected."""
    if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
        raise PirError(f"the seed must be {SEED_BYTES} bytes")
    stream = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(4 * m * n))
    return np.frombuffer(stream, dtype="<u4").reshape(m, n)


def _cumulative_table() -> np.ndarray:
    """floor(2^64 P(X <= x)) for x = -64 .. 63, X the discrete Gaussian rho(x) = exp(-x^2 / 2 sigma^2),
    in 40-digit decimal arithmetic (float64's 53 bits would be coarser than the 64-bit table)."""
    context = getcontext().copy()
    context.prec = 40
    sigma = Decimal(str(SIGMA))
    weights = [context.exp(context.divide(-Decimal(x * x), 2 * sigma * sigma)) for x in range(-ERROR_TAIL,
                                                                                              ERROR_TAIL + 1)]
    total = sum(weights, Decimal(0))
    table, running = [], Decimal(0)
    for w in weights[:-1]:
        running = context.add(running, w)
        table.append(int(context.multiply(context.divide(running, total), Decimal(2**64))))
    return np.array(table, dtype=np.uint64)


CDT = _cumulative_table()
"""The error sampler's table: x = -64 + #(entries <= u) for u uniform on [0, 2^64)."""


def sample_error(m: int) -> np.ndarray:
    """m draws of the discrete Gaussian (sigma 6.4) by inverse CDF on os.urandom: int64 (m,).

    Timing is local to the client, so the vectorised search does not need to be constant-time."""
    u = np.frombuffer(os.urandom(8 * m), dtype="<u8")
    return np.searchsorted(CDT, u, side="right").astype(np.int64) - ERROR_TAIL


def setup(db: np.ndarray, seed: bytes | None = None, *, method: str = "auto") -> tuple[PirParams, np.ndarray]:
    """Public parameters and the hint H = (D' - 128) A mod 2^32, uint32 (l, n), for uint8 db (l, m).

    `method` picks the kernel for D' A (see `answer_batch`); the result does not depend on it."""
    pir_kernels.check_database(db)
    rows, cols = db.shape
    params = PirParams(rows=rows, cols=cols, p=plaintext_modulus(cols), seed=os.urandom(SEED_BYTES) if seed is None
                       else seed)
    a = matrix_a(params.seed, cols)
    hint = _product(db, a, method)
    column_sums = a.sum(axis=0, dtype=np.uint64).astype(np.uint32)
    hint -= column_sums * np.uint32(CENTRE)
    return params, hint


def _product(db: np.ndarray, queries: np.ndarray, method: str) -> np.ndarray:
    if method == "numba" or (method == "auto" and pir_kernels.have_numba()):
        return pir_kernels.matmul_integer(db, queries)
    if method in ("gemm", "auto"):
        return pir_kernels.matmul_float(db, queries)
    raise PirError(f"unknown method {method!r}: numba, gemm or auto")


def answer(db: np.ndarray, query: np.ndarray) -> np.ndarray:
    """The server's answer D' qu mod 2^32, uint32 (l,): one pass over the database, no index."""
    try:
        return pir_kernels.matvec(db, query)
    except ValueError as error:
        raise PirError(str(error)) from error


def answer_batch(db: np.ndarray, queries: np.ndarray, *, method: str = "auto") -> np.ndarray:
    """Answers to k queries at once, uint32 (k, l) for queries uint32 (k, m).

    method "numba" is the register-blocked integer kernel (parallel), "gemm" the exact float64
    BLAS product; "auto" takes numba when it imported (it measured faster here) and GEMM if not."""
    if not isinstance(queries, np.ndarray) or queries.ndim != 2:
        raise PirError("queries must be a 2-D uint32 array (k, m)")
    try:
        return np.ascontiguousarray(_product(db, queries.T, method).T)
    except ValueError as error:
        raise PirError(str(error)) from error


@dataclass(eq=False)
class QueryState:
    """The client's secret for one query: its LWE secret s, the column and the query's sum.

    Single-use: `PirClient.recover` consumes it, and a second use raises."""

    column: int
    _secret: np.ndarray | None = field(repr=False)
    _query_sum: int = field(repr=False)
    _owner: object = field(repr=False)

    @property
    def used(self) -> bool:
        return self._secret is None


class PirClient:
    """A client of one database: keeps its parameters, hint and A; makes queries, decodes answers."""

    def __init__(self, params: PirParams, hint: np.ndarray):
        if not isinstance(params, PirParams):
            raise PirError("params must be PirParams (PirParams.from_dict parses the wire form)")
        if not isinstance(hint, np.ndarray) or hint.dtype != np.uint32 or hint.shape != (params.rows, params.n):
            raise PirError(f"the hint must be uint32 of shape ({params.rows}, {params.n})")
        self.params = params
        self.hint = hint
        self._a = matrix_a(params.seed, params.cols, params.n)

    def query(self, column: int) -> tuple[QueryState, np.ndarray]:
        """A fresh query for `column`: its single-use state and the vector to send, uint32 (m,)."""
        if isinstance(column, bool) or not isinstance(column, (int, np.integer)) or not 0 <= column < self.params.cols:
            raise PirError(f"column must be an int in [0, {self.params.cols})")
        secret = np.frombuffer(os.urandom(4 * self.params.n), dtype="<u4").astype(np.uint32)
        vector = self._a @ secret
        vector += (sample_error(self.params.cols) % _Q).astype(np.uint32)
        vector[column:column + 1] += np.uint32(self.params.delta)  # an array op: wraps without a warning
        query_sum = int(vector.sum(dtype=np.uint64)) % _Q
        return QueryState(int(column), secret, query_sum, self), vector

    def recover(self, state: QueryState, response: np.ndarray) -> np.ndarray:
        """The column the query asked for, uint8 (l,), from the server's answer; consumes `state`."""
        if not isinstance(state, QueryState) or state._owner is not self:
            raise PirError("the query state belongs to another client")
        if state.used:
            raise PirError("this query state was already used: make a fresh query")
        secret, state._secret = state._secret, None
        if not isinstance(response, np.ndarray) or response.dtype != np.uint32 or response.shape != (self.params.rows,):
            raise PirError(f"the answer must be uint32 of shape ({self.params.rows},)")
        offset = np.uint32(CENTRE * state._query_sum % _Q)
        noisy = (response - offset - self.hint @ secret).view(np.int32).astype(np.int64)
        delta = self.params.delta
        entries = np.floor_divide(noisy + delta // 2, delta)
        if entries.min() < -CENTRE or entries.max() >= CENTRE or np.abs(noisy - entries * delta).max() >= delta // 4:
            raise PirError("the answer does not decode: it is not the answer to this query")
        return (entries + CENTRE).astype(np.uint8)


def index_layout(n_records: int, record_bytes: int = 64, max_rows: int = 16384) -> tuple[int, int, int]:
    """(records per column r, rows l, columns m) for n_records records of record_bytes bytes.

    One byte per entry, a record in record_bytes consecutive rows of one column, r as large as
    max_rows allows (the answer is 4 l bytes and the hint 4 l n: 16384 rows give 64 KiB and
    64 MiB), so m = ceil(n / r) is as small as it can be."""
    for name, value in (("n_records", n_records), ("record_bytes", record_bytes), ("max_rows", max_rows)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PirError(f"{name} must be a positive int")
    if max_rows < record_bytes:
        raise PirError(f"max_rows {max_rows} is below one record of {record_bytes} bytes")
    per_column = min(max_rows // record_bytes, n_records)
    cols = -(-n_records // per_column)
    if cols > MAX_COLUMNS:
        raise PirError(f"{n_records} records need {cols} columns, more than {MAX_COLUMNS}")
    return per_column, per_column * record_bytes, cols


def locate(index: int, n_records: int, record_bytes: int = 64, max_rows: int = 16384) -> tuple[int, int]:
    """(column, slot) of record `index` in `pack_index_db`'s layout: column index % m, slot index // m."""
    _, _, cols = index_layout(n_records, record_bytes, max_rows)
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < n_records:
        raise PirError(f"index must be an int in [0, {n_records})")
    return int(index) % cols, int(index) // cols


def pack_index_db(records: np.ndarray, max_rows: int = 16384) -> np.ndarray:
    """The database for uint8 records (N, record_bytes): uint8 (l, m), empty slots zero (as in
    SimplePIR's MakeDB: record i in column i mod m, rows (i div m) * record_bytes onwards)."""
    if not isinstance(records, np.ndarray) or records.dtype != np.uint8 or records.ndim != 2:
        raise PirError("records must be a 2-D uint8 array (N, record_bytes)")
    n_records, record_bytes = records.shape
    per_column, rows, cols = index_layout(n_records, record_bytes, max_rows)
    padded = np.zeros((per_column * cols, record_bytes), np.uint8)
    padded[:n_records] = records
    # slot-major (slot, column, byte) -> rows (slot, byte), columns
    return np.ascontiguousarray(padded.reshape(per_column, cols, record_bytes).transpose(0, 2, 1).reshape(rows, cols))


def unpack(column: np.ndarray, slot: int, record_bytes: int = 64) -> np.ndarray:
    """The record in `slot` of a recovered column: uint8 (record_bytes,)."""
    if not isinstance(column, np.ndarray) or column.ndim != 1 or column.dtype != np.uint8:
        raise PirError("the column must be a 1-D uint8 array")
    if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < column.shape[0] // record_bytes:
        raise PirError(f"slot must be an int in [0, {column.shape[0] // record_bytes})")
    return column[slot * record_bytes:(slot + 1) * record_bytes].copy()
