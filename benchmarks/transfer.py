"""Throughput of a large aggregate: 3 sites each send a 10 MB float64 array through the hub to the
researcher, who verifies every signature and decodes. Binary framing (msgpack + raw little-endian
arrays) against the same arrays as JSON numbers, in the same run.

    python benchmarks/transfer.py [--mb 10] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import numpy as np
from relay import relay

SITES = ("a", "b", "c")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    values = int(args.mb * 1e6 / 8)
    arrays = {site: np.random.default_rng(i).normal(size=values) for i, site in enumerate(SITES)}
    binary, as_json = [], []
    with tempfile.TemporaryDirectory() as workdir, relay(workdir, list(SITES), "ping") as hub:
        for repeat in range(args.repeats):
            start = time.perf_counter()
            replies = hub.round(f"t{repeat}", 0, lambda site: {"sums": {"x": arrays[site]}})
            total = sum(envelope.body()["sums"]["x"].nbytes for envelope in replies)
            binary.append(total / (time.perf_counter() - start) / 1e6)
            start = time.perf_counter()
            decoded = [np.asarray(json.loads(json.dumps(arrays[site].tolist()))) for site in SITES]
            as_json.append(sum(a.nbytes for a in decoded) / (time.perf_counter() - start) / 1e6)
    best_binary, best_json = statistics.median(binary), statistics.median(as_json)
    print(f"{len(SITES)} sites x {args.mb:g} MB float64, median of {args.repeats}")
    print(f"binary framing, signed, through the hub over HTTP: {best_binary:8.1f} MB/s")
    print(f"JSON numbers, encode + decode only (no HTTP, no hub): {best_json:8.1f} MB/s")
    print(f"ratio binary/JSON: {best_binary / best_json:.1f}x")


if __name__ == "__main__":
    main()
