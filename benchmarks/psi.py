"""Private set intersection, medveil vs openmined-psi, on the same two ID sets in the same run.

Sets of 2^k IDs each, half of them shared. Peers, all revealing the intersection:
- openmined-psi (`private_set_intersection.python`, P-256, one thread): server setup (RAW, exact),
  client request, server response, client intersection; the client learns which of its IDs match.
- medveil crypto only: both parties' steps of the protocol run one after the other in this
  process (hash_and_blind own IDs, blind the peer's points, match doubly blinded points, both
  sides learn the intersection), with `--workers` processes (default: all cores) and with one.
- medveil end to end: `fed.psi(left, right, reveal="both")` over loopback HTTP
  (`Federation.simulate`, two sites), federation already up; skipped if the API has no `psi`.

    python benchmarks/psi.py [--sizes 16 20] [--workers N] [--no-end-to-end]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import private_set_intersection.python as openmined

import medveil as mv
from medveil.crypto.psi import blind, hash_and_blind, new_key


def make_sets(size: int, seed: int = 2026) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    numbers = rng.permutation(np.arange(size + size // 2) * 7919 + 100_000_000)
    ids = [f"P{n}" for n in numbers]
    return ids[:size], ids[size // 2:size + size // 2]


def openmined_psi(left: list[str], right: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    server = openmined.server.CreateWithNewKey(True)
    client = openmined.client.CreateWithNewKey(True)
    setup = server.CreateSetupMessage(1e-9, len(left), right, openmined.DataStructure.RAW)
    response = server.ProcessRequest(client.CreateRequest(left))
    found = client.GetIntersection(setup, response)
    return time.perf_counter() - start, len(found)


def _members(points: np.ndarray, others: np.ndarray) -> np.ndarray:
    other = {bytes(p) for p in others}
    return np.fromiter((bytes(p) in other for p in points), dtype=bool, count=len(points))


def medveil_crypto(left: list[str], right: list[str], workers: int | None) -> tuple[float, int]:
    salt, key_left, key_right = new_key(), new_key(), new_key()
    start = time.perf_counter()
    sent_by_left = hash_and_blind(left, salt, key_left, workers)
    sent_by_right = hash_and_blind(right, salt, key_right, workers)
    left_double = blind(sent_by_left, key_right, workers)  # right returns these to left
    right_double = blind(sent_by_right, key_left, workers)  # left returns these to right
    left_rows = np.flatnonzero(_members(left_double, right_double))
    right_rows = np.flatnonzero(_members(right_double, left_double))
    elapsed = time.perf_counter() - start
    assert len(left_rows) == len(right_rows)
    return elapsed, len(left_rows)


def medveil_end_to_end(left: list[str], right: list[str]) -> tuple[float, int] | str:
    if not hasattr(mv.Federation, "psi"):
        return "skipped: Federation.psi does not exist yet"
    sites = {"left_site": pd.DataFrame({"patient_id": left}), "right_site": pd.DataFrame({"patient_id": right})}
    with mv.Federation.simulate(sites, timeout=3600) as fed:
        start = time.perf_counter()
        try:
            result = fed.psi("left_site", "right_site", on="patient_id", reveal="both")
        except Exception as error:  # report it in the table and keep the other columns
            return f"failed: {type(error).__name__}: {str(error)[:200]}"
        return time.perf_counter() - start, result.size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 20], help="log2 of each set's size")
    parser.add_argument("--workers", type=int, default=None, help="processes for medveil (default: all cores)")
    parser.add_argument("--no-end-to-end", action="store_true")
    args = parser.parse_args()
    hash_and_blind([f"warm-{i}" for i in range(8192)], b"warm", new_key(), args.workers)  # start the pool
    rows = []
    for exponent in args.sizes:
        left, right = make_sets(2**exponent)
        expected = len(set(left) & set(right))
        t_open, k_open = openmined_psi(left, right)
        t_crypto, k_crypto = medveil_crypto(left, right, args.workers)
        t_one, k_one = medveil_crypto(left, right, 1)
        end_to_end = "skipped (--no-end-to-end)" if args.no_end_to_end else medveil_end_to_end(left, right)
        assert k_open == k_crypto == k_one == expected, (k_open, k_crypto, k_one, expected)
        if not isinstance(end_to_end, str):
            assert end_to_end[1] == expected, (end_to_end[1], expected)
        rows.append((exponent, expected, t_open, t_crypto, t_one, end_to_end))
        shown = end_to_end if isinstance(end_to_end, str) else f"{end_to_end[0]:.2f} s"
        print(f"2^{exponent}: openmined {t_open:.2f} s, crypto {t_crypto:.2f} s, 1 core {t_one:.2f} s,"
              f" end to end {shown}", flush=True)
    print("PSI, two sets of 2^k IDs, 50% shared, intersection revealed; times in seconds")
    print("ratio = openmined-psi time / medveil time (above 1: medveil faster)")
    print(f"{'size':>8} {'shared':>8} {'openmined':>10} {'crypto':>8} {'ratio':>6} {'1 core':>8} {'ratio':>6}"
          f" {'end to end':>11} {'ratio':>6}")
    for exponent, shared, t_open, t_crypto, t_one, end_to_end in rows:
        line = (f"{'2^' + str(exponent):>8} {shared:>8,} {t_open:>10.2f} {t_crypto:>8.2f} {t_open / t_crypto:>6.2f}"
                f" {t_one:>8.2f} {t_open / t_one:>6.2f}")
        if isinstance(end_to_end, str):
            line += f"  end to end {end_to_end}"
        else:
            line += f" {end_to_end[0]:>11.2f} {t_open / end_to_end[0]:>6.2f}"
        print(line)


if __name__ == "__main__":
    main()
