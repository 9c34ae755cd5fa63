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

from medveil.crypto.signing import SigningKey
from medveil.runtime.client import HubClient
from medveil.runtime.servers import HubServer
from medveil.runtime.study import StudySpec

SITES = ("a", "b", "c")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    values = int(args.mb * 1e6 / 8)
    arrays = {site: np.random.default_rng(i).normal(size=values) for i, site in enumerate(SITES)}
    with tempfile.TemporaryDirectory() as workdir:
        hub = HubServer(f"sqlite:///{workdir}/hub.db").start()
        researcher = HubClient(hub.url, "researcher", SigningKey.generate())
        researcher.register("researcher")
        sites = {site: HubClient(hub.url, site, SigningKey.generate()) for site in SITES}
        for client in sites.values():
            client.register("site")
        spec = StudySpec(id="bench", researcher="researcher", researcher_key=researcher.key.verify_key.to_text(),
                         sites=list(SITES), datasets={"default": []}, analyses=["ping"])
        researcher.post("/v1/studies", researcher.seal("study", {"spec": spec.model_dump()}, study="bench"))
        binary, as_json = [], []
        for repeat in range(args.repeats):
            task = f"t{repeat}"
            researcher.post("/v1/messages", researcher.seal("task", {}, study="bench", task=task, step=0,
                                                            analysis="ping", dataset="default", recipients=list(SITES)))
            start = time.perf_counter()
            for site, client in sites.items():
                client.post("/v1/messages", client.seal("reply", {"sums": {"x": arrays[site]}}, status="ok",
                                                        study="bench", task=task, step=0))
            total = 0
            for envelope in researcher.replies(task, 0, wait=30):
                envelope.verify(researcher.public_key(envelope.sender))
                total += envelope.body()["sums"]["x"].nbytes
            binary.append(total / (time.perf_counter() - start) / 1e6)
            start = time.perf_counter()
            decoded = [np.asarray(json.loads(json.dumps(arrays[site].tolist()))) for site in SITES]
            as_json.append(sum(a.nbytes for a in decoded) / (time.perf_counter() - start) / 1e6)
        hub.stop()
    best_binary, best_json = statistics.median(binary), statistics.median(as_json)
    print(f"{len(SITES)} sites x {args.mb:g} MB float64, median of {args.repeats}")
    print(f"binary framing, signed, through the hub over HTTP: {best_binary:8.1f} MB/s")
    print(f"JSON numbers, encode + decode only (no HTTP, no hub): {best_json:8.1f} MB/s")
    print(f"ratio binary/JSON: {best_binary / best_json:.1f}x")


if __name__ == "__main__":
    main()
