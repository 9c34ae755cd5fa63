"""Cost of one round: a no-op task (`ping`) from the researcher through the hub to 3 nodes and back,
over loopback HTTP with every signature, approval and audit entry checked and written.

Side by side in the same run: a bare HTTP GET to the same hub (the floor any round pays at
least twice), so the ratio is meaningful on a noisy 2-core machine.

    python benchmarks/round_latency.py [--rounds 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx
import numpy as np
import pandas as pd

import medveil as mv


def median_ms(action, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    frame = pd.DataFrame({"x": np.arange(100.0)})
    print(f"{'nodes as':<10} {'ping round (ms)':>16} {'describe, 3 rounds (ms)':>24} {'bare HTTP GET (ms)':>19} {'round / GET':>12}")
    for processes in (False, True):
        with mv.Federation.simulate({"a": frame, "b": frame, "c": frame}, processes=processes) as fed:
            for _ in range(10):
                fed.ping()
            ping = median_ms(fed.ping, args.rounds)
            describe = median_ms(lambda: fed.describe("x"), max(args.rounds // 4, 10))
            with httpx.Client(base_url=fed.network.hub.url) as http:
                bare = median_ms(lambda: http.get("/v1/health"), args.rounds)
        label = "processes" if processes else "threads"
        print(f"{label:<10} {ping:>16.1f} {describe:>24.1f} {bare:>19.2f} {ping / bare:>12.1f}")


if __name__ == "__main__":
    main()
