"""Secure vs plain aggregation of 10 sites x 1e6 float64 through a real hub over loopback HTTP,
and the masking cost alone in process. Both paths run in the same process, side by side.

Each path: every site seals and POSTs its release (plain: float64 arrays; secure: fixed-point
limbs masked with one AES-CTR mask per peer), then the researcher GETs the replies, verifies
every signature and combines (plain: sum; secure: ring sum and decode). The per-task key
exchange and share distribution are timed separately (they run once per analysis, not per round).

    python benchmarks/secure_aggregation.py [--sites 10] [--values 1000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np

from medveil.crypto.signing import SigningKey
from medveil.runtime.aggregation import aggregate
from medveil.runtime.client import HubClient
from medveil.runtime.secure_aggregation import (
    CoordinatorState,
    node_mask,
    node_new_keys,
    node_shares,
)
from medveil.runtime.servers import HubServer
from medveil.runtime.study import StudySpec


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--values", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    names = [f"site_{i:02d}" for i in range(args.sites)]
    releases = {s: {"v": np.random.default_rng(i).normal(size=args.values)} for i, s in enumerate(names)}
    expected = sum(r["v"] for r in releases.values())
    with tempfile.TemporaryDirectory() as workdir:
        hub = HubServer(f"sqlite:///{workdir}/hub.db").start()
        researcher = HubClient(hub.url, "researcher", SigningKey.generate())
        researcher.register("researcher")
        clients = {s: HubClient(hub.url, s, SigningKey.generate()) for s in names}
        for client in clients.values():
            client.register("site")
        spec = StudySpec(id="bench", researcher="researcher", researcher_key=researcher.key.verify_key.to_text(),
                         sites=names, datasets={"default": []}, analyses=["describe"])
        researcher.post("/v1/studies", researcher.seal("study", {"spec": spec.model_dump()}, study="bench"))

        start = time.perf_counter()
        keys, publics = {}, {}
        for s in names:
            keys[s], public = node_new_keys()
            publics[s] = public["secagg_public"]
        peer_keys = {s: __import__("base64").b64decode(p) for s, p in publics.items()}
        for s in names:
            node_shares(keys[s], s, "bench-task", peer_keys, spec.threshold())
        setup = time.perf_counter() - start
        coordinator = CoordinatorState("bench-task", names, spec.threshold(), public_keys=peer_keys, participants=names)

        def exchange(step: int, body_of) -> list:
            researcher.post("/v1/messages", researcher.seal("task", {}, study="bench", task="bench-task", step=step,
                                                            analysis="describe", dataset="default", recipients=names))
            for s in names:
                clients[s].post("/v1/messages", clients[s].seal("reply", body_of(s, step), status="ok",
                                                                study="bench", task="bench-task", step=step))
            replies = researcher.replies("bench-task", step, wait=60)
            for envelope in replies:
                envelope.verify(researcher.public_key(envelope.sender))
            return replies

        plain_times, secure_times, step = [], [], 0
        for _ in range(args.repeats):
            start = time.perf_counter()
            replies = exchange(step, lambda s, _: {"sums": releases[s]})
            total = aggregate({e.sender: e.body()["sums"] for e in replies})["v"]
            plain_times.append(time.perf_counter() - start)
            step += 1
            assert np.allclose(total, expected, rtol=1e-12, atol=1e-12)
            start = time.perf_counter()
            replies = exchange(step, lambda s, st: node_mask(keys[s], s, "bench-task", st, names, releases[s]))
            total = coordinator.combine({e.sender: e.body() for e in replies}, "bench-task", step, {})["v"]
            secure_times.append(time.perf_counter() - start)
            step += 1
            assert np.max(np.abs(total - expected)) < 1e-12
        start = time.perf_counter()
        masked = {s: node_mask(keys[s], s, "bench-task", 999, names, releases[s]) for s in names[:1]}
        mask_one = time.perf_counter() - start
        hub.stop()
    plain, secure = statistics.median(plain_times), statistics.median(secure_times)
    megabytes = args.sites * args.values * 8 / 1e6
    print(f"{args.sites} sites x {args.values:,} float64 ({megabytes:.0f} MB of releases), median of {args.repeats}")
    print(f"plain  aggregation over HTTP: {plain:7.2f} s")
    print(f"secure aggregation over HTTP: {secure:7.2f} s   ratio secure/plain {secure / plain:.2f}")
    print(f"masking one site's release in process ({args.sites - 1} peers): {mask_one:.3f} s "
          f"({masked[names[0]]['masked'].nbytes / 1e6:.0f} MB masked)")
    print(f"per-task key exchange + share distribution (all sites, in process): {setup:.3f} s")


if __name__ == "__main__":
    main()
