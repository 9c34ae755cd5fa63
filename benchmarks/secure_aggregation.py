"""Secure vs plain aggregation of 10 sites x 1e6 float64 through a real hub over loopback HTTP,
and the masking cost alone in process. Both paths run in the same process, side by side.

Each path: every site seals and POSTs its release (plain: float64 arrays; secure: fixed-point
limbs double-masked with one AES-CTR mask per peer and a self mask, with Shamir shares of the
self-mask seed), then the researcher GETs the replies, verifies every signature and combines
(plain: sum; secure: one more round trip, the unmask step, whose replies carry the shares that
remove the self masks; then ring sum and decode). The key step is timed separately (once per
key set, which a session reuses).

    python benchmarks/secure_aggregation.py [--sites 10] [--values 1000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
from relay import relay

from medveil.runtime.aggregation import aggregate
from medveil.runtime.secure_aggregation import CoordinatorState, MemoryStore, SiteSecureAggregation


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
        spec, held = hub.study, {}
        agents = {s: SiteSecureAggregation(s, MemoryStore(), senders=lambda task, step: held[step]) for s in names}
        coordinator = CoordinatorState("bench-keys", spec.id, names, spec.threshold())
        start = time.perf_counter()
        key_replies = hub.round("bench-setup", 0, lambda s: {"public": agents[s].new_keys(spec, {"keyset": "bench-keys"})},
                                {"secagg": {"keyset": "bench-keys"}})
        coordinator.record_keys({e.sender: (e, e.body()) for e in key_replies})
        setup = time.perf_counter() - start
        request = coordinator.compute_request(names)
        agents[names[0]].mask(spec, "bench-warm", 0, request, {"v": np.zeros(1)})  # verifies the key replies
        for s in names[1:]:
            agents[s].check_compute(spec, "bench-warm", request)

        plain_times, secure_times, step = [], [], 0
        for _ in range(args.repeats):
            start = time.perf_counter()
            replies = hub.round("bench-task", step, lambda s: {"sums": releases[s]})
            total = aggregate({e.sender: e.body()["sums"] for e in replies})["v"]
            plain_times.append(time.perf_counter() - start)
            step += 1
            assert np.allclose(total, expected, rtol=1e-12, atol=1e-12)
            start = time.perf_counter()
            replies = hub.round("bench-task", step, lambda s, st=step: agents[s].mask(spec, "bench-task", st, request,
                                                                                       releases[s]),
                                {"secagg": request})
            masked = {e.sender: e.body() for e in replies}
            held[step] = set(masked)
            unmask = coordinator.unmask_request(step, names, masked)
            answers = hub.round("bench-task", step + 1, lambda s: {"public": agents[s].unmask(spec, "bench-task", unmask)},
                                {"secagg": unmask})
            total = coordinator.combine(names, masked, {e.sender: e.body()["public"] for e in answers})["v"]
            secure_times.append(time.perf_counter() - start)
            step += 2
            assert np.max(np.abs(total - expected)) < 1e-12
        start = time.perf_counter()
        masked_one = agents[names[0]].mask(spec, "bench-one", 999, request, releases[names[0]])
        mask_one = time.perf_counter() - start
    plain, secure = statistics.median(plain_times), statistics.median(secure_times)
    megabytes = args.sites * args.values * 8 / 1e6
    print(f"{args.sites} sites x {args.values:,} float64 ({megabytes:.0f} MB of releases), median of {args.repeats}")
    print(f"plain  aggregation over HTTP: {plain:7.2f} s")
    print(f"secure aggregation over HTTP: {secure:7.2f} s   ratio secure/plain {secure / plain:.2f}")
    print(f"masking one site's release in process ({args.sites - 1} peers): {mask_one:.3f} s "
          f"({masked_one['masked'].nbytes / 1e6:.0f} MB masked)")
    print(f"key step over HTTP, once per key set (all sites): {setup:.3f} s")


if __name__ == "__main__":
    main()
