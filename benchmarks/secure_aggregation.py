"""Secure vs plain aggregation of 10 sites x 1e6 float64 through a real hub over loopback HTTP,
and the masking cost alone in process. Both paths run in the same process, side by side.

Each path: every site seals and POSTs its release (plain: float64 arrays; secure: fixed-point
limbs masked with one AES-CTR mask per peer), then the researcher GETs the replies, verifies
every signature and combines (plain: sum; secure: ring sum and decode). The key
exchange and share distribution are timed separately (once per key set, which a session reuses).

    python benchmarks/secure_aggregation.py [--sites 10] [--values 1000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import base64
import statistics
import tempfile
import time

import numpy as np
from relay import relay

from medveil.runtime.aggregation import aggregate
from medveil.runtime.secure_aggregation import (
    CoordinatorState,
    node_mask,
    node_new_keys,
    node_shares,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--values", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    names = [f"site_{i:02d}" for i in range(args.sites)]
    releases = {s: {"v": np.random.default_rng(i).normal(size=args.values)} for i, s in enumerate(names)}
    expected = sum(r["v"] for r in releases.values())
    with tempfile.TemporaryDirectory() as workdir, relay(workdir, names, "describe") as hub:
        threshold = hub.study.threshold()
        start = time.perf_counter()
        keys, peer_keys = {}, {}
        for s in names:
            keys[s], public = node_new_keys()
            peer_keys[s] = base64.b64decode(public["secagg_public"])
        for s in names:
            node_shares(keys[s], s, "bench-keys", peer_keys, threshold)
        setup = time.perf_counter() - start
        coordinator = CoordinatorState("bench-keys", names, threshold, public_keys=peer_keys, participants=names)

        plain_times, secure_times, step = [], [], 0
        for _ in range(args.repeats):
            start = time.perf_counter()
            replies = hub.round("bench-task", step, lambda s: {"sums": releases[s]})
            total = aggregate({e.sender: e.body()["sums"] for e in replies})["v"]
            plain_times.append(time.perf_counter() - start)
            step += 1
            assert np.allclose(total, expected, rtol=1e-12, atol=1e-12)
            start = time.perf_counter()
            replies = hub.round("bench-task", step,
                                lambda s, st=step: node_mask(keys[s], s, "bench-task", st, names, releases[s]))
            total = coordinator.combine({e.sender: e.body() for e in replies}, "bench-task", step, {})["v"]
            secure_times.append(time.perf_counter() - start)
            step += 1
            assert np.max(np.abs(total - expected)) < 1e-12
        start = time.perf_counter()
        masked = node_mask(keys[names[0]], names[0], "bench-task", 999, names, releases[names[0]])
        mask_one = time.perf_counter() - start
    plain, secure = statistics.median(plain_times), statistics.median(secure_times)
    megabytes = args.sites * args.values * 8 / 1e6
    print(f"{args.sites} sites x {args.values:,} float64 ({megabytes:.0f} MB of releases), median of {args.repeats}")
    print(f"plain  aggregation over HTTP: {plain:7.2f} s")
    print(f"secure aggregation over HTTP: {secure:7.2f} s   ratio secure/plain {secure / plain:.2f}")
    print(f"masking one site's release in process ({args.sites - 1} peers): {mask_one:.3f} s "
          f"({masked['masked'].nbytes / 1e6:.0f} MB masked)")
    print(f"key exchange + share distribution, once per key set (all sites, in process): {setup:.3f} s")


if __name__ == "__main__":
    main()
