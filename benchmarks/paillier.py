"""Why vertical GLM uses additive shares with dealt correlations instead of Paillier.

Measures, in one run, the per-element cost of Paillier (python-paillier `phe` with gmpy2, and
SecretFlow's `sf-heu` arrays where that package is importable) and the cost of the ring
cross-product the vertical protocol does instead (numpy uint64 matrix product mod 2^64), then
projects both onto one Newton iteration of a vertical logistic fit with `--rows` aligned rows and
`--label-columns` + `--feature-columns` columns: with Paillier the label holder must encrypt its
n x m per-row block every iteration; with shares each party does one n x k by n x m product.

    python benchmarks/paillier.py --rows 100000 --label-columns 10 --feature-columns 10
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _phe_costs(samples: int) -> dict[str, float] | None:
    try:
        from phe import paillier
    except ImportError:
        return None

    public, private = paillier.generate_paillier_keypair(n_length=2048)
    values = np.linspace(-1, 1, samples).tolist()
    start = time.perf_counter()
    encrypted = [public.encrypt(v) for v in values]
    encrypt = (time.perf_counter() - start) / samples
    start = time.perf_counter()
    scaled = [c * 0.37 for c in encrypted]
    multiply = (time.perf_counter() - start) / samples
    start = time.perf_counter()
    for c in scaled[: max(samples // 10, 1)]:
        private.decrypt(c)
    decrypt = (time.perf_counter() - start) / max(samples // 10, 1)
    return {"encrypt": encrypt, "scalar multiply": multiply, "decrypt": decrypt}


def _heu_costs(samples: int) -> dict[str, float] | None:
    try:
        from heu import numpy as hnp
        from heu import phe
    except ImportError:
        return None
    kit = hnp.setup(phe.SchemaType.ZPaillier, 2048)
    plain = kit.array(np.arange(samples, dtype=np.int64).reshape(-1, 1), phe.IntegerEncoder(phe.SchemaType.ZPaillier))
    start = time.perf_counter()
    encrypted = kit.encryptor().encrypt(plain)
    encrypt = (time.perf_counter() - start) / samples
    start = time.perf_counter()
    kit.evaluator().mul(encrypted, plain)
    multiply = (time.perf_counter() - start) / samples
    return {"encrypt": encrypt, "scalar multiply": multiply}


def _ring_product_seconds(rows: int, k: int, m: int) -> float:
    rng = np.random.default_rng(1)
    left = rng.integers(0, 2**63, size=(rows, k), dtype=np.uint64)
    right = rng.integers(0, 2**63, size=(rows, m), dtype=np.uint64)
    start = time.perf_counter()
    left.T @ right  # wraps mod 2^64, as the protocol's shares do
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--label-columns", type=int, default=10)
    parser.add_argument("--feature-columns", type=int, default=10)
    parser.add_argument("--samples", type=int, default=200, help="Paillier operations timed per kind")
    args = parser.parse_args()
    n, p_label, p_feature = args.rows, args.label_columns + 1, args.feature_columns
    k = p_feature + p_feature * (p_feature + 1) // 2  # the feature holder's columns and their products
    m = p_label + 2  # the label holder's weighted columns, residual and weight
    ring = _ring_product_seconds(n, k, m)
    print(f"one iteration, {n} rows, label holder {p_label} columns (with intercept), feature holder {p_feature}")
    print(f"{'method':<28}{'encrypt/element':>18}{'projected s/iteration':>24}{'ratio to shares':>18}")
    print(f"{'additive shares (uint64)':<28}{'-':>18}{ring:>24.3f}{1.0:>18.1f}")
    for name, costs in (("phe + gmpy2 (2048-bit)", _phe_costs(args.samples)),
                        ("sf-heu arrays (2048-bit)", _heu_costs(max(args.samples * 20, 1000)))):
        if costs is None:
            print(f"{name:<28}{'not installed':>18}")
            continue
        # Encrypt the n x m block, then n*k*m homomorphic scalar multiplications to form U^T Enc(V).
        projected = n * m * costs["encrypt"] + n * k * m * costs["scalar multiply"]
        print(f"{name:<28}{costs['encrypt'] * 1e6:>16.1f}us{projected:>24.1f}{projected / ring:>18.0f}")


if __name__ == "__main__":
    main()
