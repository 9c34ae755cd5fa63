"""Federated learning round, medveil vs Flower, in the same run: FedAvg of an MLP on tabular data.

Synthetic tabular data (seeded): `--sites` sites of `--rows` rows and `--features` features, a
0/1 target drawn from a random two-layer teacher network; the model is medveil's "mlp" recipe
with hidden layers `--hidden` (default [1000, 900] over 100 features: 1,002,801 parameters),
ReLU, one logit. Every site trains `--epochs` of plain SGD (batch `--batch-size`, `--lr`, no
momentum) from the global weights each round; FedAvg weighs the sites by rows. Both sides
start from the same initial weights (torch's default initialisation under the same seed, the
same torch version) and train the same rounds.

- medveil: `fed.train` over `Federation.simulate` (a real hub and one node per site on loopback
  HTTP; nodes as threads, or processes with `--processes`), secure aggregation on (fixed point,
  double-masked, unmasked by the session); `validation_fraction=0` where `fed.train` has it, so
  the rounds train only, as Flower's do.
- Flower: `flwr.simulation.run_simulation` (Ray backend, default client resources) with a
  NumPyClient doing the same local training, once with plain FedAvg, once with SecAgg+
  (`secaggplus_mod` on the ClientApp, `SecAggPlusWorkflow` in a LegacyContext, every client
  sharing with every other, the reconstruction threshold medveil uses: a majority).
  Flower pins old web libraries, so it runs in its own virtual environment as a subprocess of
  this script (`--flower-python`; default $MEDVEIL_FLOWER_PYTHON or /work/flower-venv/bin/python
  when it exists); without one, only medveil is measured.

Seconds per round: the time between the ends of consecutive training rounds (medveil: its
progress callback, after each round's checkpoint; Flower: the strategy's aggregate_fit), the
median over rounds 2.. (round 1 warms up: Ray's workers, torch, the key set). Sanity: the
pooled training loss of each side's final weights, computed here on all rows. Where medveil's
round goes: run this script under `py-spy record --nonblocking -f raw` (threads show per node).

    python benchmarks/fl.py [--sites 10] [--rows 2000] [--features 100] [--hidden 1000 900]
                            [--rounds 6] [--epochs 1] [--batch-size 200] [--lr 0.05]
                            [--processes] [--flower-python PATH | --no-flower]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_FLOWER_PYTHON = Path("/work/flower-venv/bin/python")
SEED = 2026
GOAL = 0.25  # medveil's secure round / Flower's plain FedAvg round (issue 12)
LOSS_TOLERANCE = 0.02  # same data, model, initial weights and SGD: only the shuffling differs


# --- shared by both sides (numpy and torch only: the Flower side has no medveil) --------------

def make_data(sites: int, rows: int, features: int, seed: int = SEED) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per site (X float32 (rows, features), y float32 0/1): a shared random teacher, site shifts."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(scale=1 / np.sqrt(features), size=(features, 16))
    w2 = rng.normal(scale=1.5, size=16)
    out = []
    for _ in range(sites):
        x = rng.normal(size=(rows, features)) + rng.normal(scale=0.2, size=features)
        logit = np.tanh(x @ w1) @ w2 - 0.2
        y = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.float32)
        out.append((x.astype(np.float32), y))
    return out


def build_mlp(features: int, hidden: list[int]):
    """The same layers as medveil's "mlp" recipe (Linear, ReLU per hidden layer, Linear to one logit)."""
    from torch import nn

    layers, width = [], features
    for units in hidden:
        layers += [nn.Linear(width, units), nn.ReLU()]
        width = units
    return nn.Sequential(*layers, nn.Linear(width, 1), nn.Flatten(start_dim=0))


def n_parameters(features: int, hidden: list[int]) -> int:
    widths = [features, *hidden, 1]
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


def initial_layers(features: int, hidden: list[int], seed: int) -> list[np.ndarray]:
    """torch's default initialisation under `seed` (what medveil's init_weights draws)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build_mlp(features, hidden)
    return [p.detach().numpy().copy() for p in module.parameters()]


def pooled_loss(layers: list[np.ndarray], data, features: int, hidden: list[int]) -> float:
    """Mean binary cross-entropy of the weights over every site's rows."""
    import torch

    module = build_mlp(features, hidden)
    with torch.no_grad():
        for p, value in zip(module.parameters(), layers):
            p.copy_(torch.from_numpy(np.asarray(value, dtype=np.float32).reshape(p.shape)))
        x = torch.from_numpy(np.concatenate([x for x, _ in data]))
        y = torch.from_numpy(np.concatenate([y for _, y in data]))
        return float(torch.nn.functional.binary_cross_entropy_with_logits(module(x), y))


def per_round(ends: list[float], start: float) -> list[float]:
    """Seconds of each round from the times their ends were seen (the first from `start`)."""
    marks = [start, *ends]
    return [b - a for a, b in zip(marks[:-1], marks[1:])]


# --- the Flower side (run in Flower's own venv) ----------------------------------------------

def flower_side(args: argparse.Namespace, mode: str) -> dict:
    """Run Flower's simulation (plain FedAvg or SecAgg+) and return round times and the final loss."""
    import torch
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import Context, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import Grid, LegacyContext, ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.simulation import run_simulation

    data = make_data(args.sites, args.rows, args.features)
    initial = initial_layers(args.features, args.hidden, args.seed)

    class Client(NumPyClient):
        def __init__(self, site: int):
            self.x, self.y = (torch.from_numpy(a.copy()) for a in data[site])

        def fit(self, parameters, config):
            module = build_mlp(args.features, args.hidden)
            with torch.no_grad():
                for p, value in zip(module.parameters(), parameters):
                    p.copy_(torch.from_numpy(np.asarray(value, dtype=np.float32)))
            optimizer = torch.optim.SGD(module.parameters(), lr=args.lr, momentum=0.0)
            loss_fn = torch.nn.BCEWithLogitsLoss()
            rows = len(self.y)
            module.train()
            for _ in range(args.epochs):
                order = torch.randperm(rows)
                for i in range(0, rows, args.batch_size):
                    batch = order[i:i + args.batch_size]
                    optimizer.zero_grad()
                    loss_fn(module(self.x[batch]), self.y[batch]).backward()
                    optimizer.step()
            return [p.detach().numpy().copy() for p in module.parameters()], rows, {}

    def client_fn(context: Context):
        return Client(int(context.node_config["partition-id"])).to_client()

    ends: list[float] = []
    final: list[list[np.ndarray]] = []

    class TimedFedAvg(FedAvg):
        def aggregate_fit(self, server_round, results, failures):
            aggregated = super().aggregate_fit(server_round, results, failures)
            if aggregated[0] is not None:
                final[:] = [parameters_to_ndarrays(aggregated[0])]
            ends.append(time.perf_counter())
            return aggregated

    strategy = TimedFedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=args.sites,
                           min_available_clients=args.sites, initial_parameters=ndarrays_to_parameters(initial))
    config = ServerConfig(num_rounds=args.rounds)
    if mode == "plain":
        client_app = ClientApp(client_fn=client_fn)
        server_app = ServerApp(server_fn=lambda context: ServerAppComponents(strategy=strategy, config=config))
    else:
        client_app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
        server_app = ServerApp()

        @server_app.main()
        def main(grid: Grid, context: Context) -> None:
            legacy = LegacyContext(context=context, config=config, strategy=strategy)
            workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
                num_shares=args.sites, reconstruction_threshold=args.sites // 2 + 1))
            workflow(grid, legacy)

    start = time.perf_counter()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=args.sites)
    if len(ends) != args.rounds or not final:
        raise RuntimeError(f"Flower ({mode}) finished {len(ends)} of {args.rounds} rounds")
    return {"seconds": per_round(ends, start), "loss": pooled_loss(final[0], data, args.features, args.hidden),
            "total": time.perf_counter() - start}


# --- the medveil side ------------------------------------------------------------------------

def medveil_side(args: argparse.Namespace) -> dict:
    """Train with fed.train over loopback HTTP under secure aggregation; round times and the final loss."""
    import inspect

    import pandas as pd

    import medveil as mv
    from medveil.models import get_model, init_weights

    data = make_data(args.sites, args.rows, args.features)
    columns = [f"f{i}" for i in range(args.features)]
    frames = {}
    for i, (x, y) in enumerate(data):
        frame = pd.DataFrame(x.astype(np.float64), columns=columns)
        frame["y"] = y.astype(np.int8)
        frames[f"site_{i:02d}"] = frame
    hyper = {"hidden": list(args.hidden)}
    initial = init_weights(get_model("mlp", "1"), args.features, hyper, args.seed)
    expected = np.concatenate([a.ravel() for a in initial_layers(args.features, args.hidden, args.seed)])
    if not np.array_equal(initial.astype(np.float32), expected):
        raise RuntimeError("medveil's initial weights differ from the Flower side's")
    marks: list[float] = []
    extra = {"validation_fraction": 0.0} if "validation_fraction" in inspect.signature(mv.Federation.train).parameters \
        else {}
    with mv.Federation.simulate(frames, timeout=600, processes=args.processes) as fed:
        start = time.perf_counter()
        result = fed.train("mlp", target="y", features=columns, hyper=hyper, rounds=args.rounds,
                           local_epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                           progress=lambda done, total: marks.append(time.perf_counter()), **extra)
        total = time.perf_counter() - start
    if not result.provenance.get("secure_aggregation"):
        raise RuntimeError("medveil trained without secure aggregation")
    # the first mark ends round 0 (row counts); the next args.rounds end the training rounds
    training = marks[-args.rounds:]
    layers, offset = [], 0
    for shape in (a.shape for a in initial_layers(args.features, args.hidden, args.seed)):
        size = int(np.prod(shape))
        layers.append(result.weights[offset:offset + size].reshape(shape))
        offset += size
    return {"seconds": per_round(training, marks[-args.rounds - 1]), "loss": pooled_loss(layers, data, args.features,
                                                                                          args.hidden),
            "total": total, "validation_off": bool(extra)}


def flower_python(args: argparse.Namespace) -> str | None:
    if args.no_flower:
        return None
    if args.flower_python:
        return args.flower_python
    if os.environ.get("MEDVEIL_FLOWER_PYTHON"):
        return os.environ["MEDVEIL_FLOWER_PYTHON"]
    return str(DEFAULT_FLOWER_PYTHON) if DEFAULT_FLOWER_PYTHON.exists() else None


def run_flower(python: str, argv: list[str], mode: str) -> dict:
    """This script's Flower side in Flower's venv; its last stdout line is the JSON result."""
    completed = subprocess.run([python, __file__, *argv, "--flower-side", mode], capture_output=True, text=True,
                               timeout=3600, env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    if completed.returncode != 0:
        raise RuntimeError(f"Flower ({mode}) failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def summary(seconds: list[float]) -> float:
    """Median seconds per round after the warm-up round (all rounds when there is only one)."""
    return statistics.median(seconds[1:] if len(seconds) > 1 else seconds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--features", type=int, default=100)
    parser.add_argument("--hidden", type=int, nargs="+", default=[1000, 900])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--flower-python", default=None)
    parser.add_argument("--no-flower", action="store_true")
    parser.add_argument("--processes", action="store_true", help="medveil's nodes as processes (default: threads)")
    parser.add_argument("--flower-side", choices=["plain", "secagg"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flower_side:
        print(json.dumps(flower_side(args, args.flower_side)))
        return
    argv = sys.argv[1:]
    params = n_parameters(args.features, args.hidden)
    print(f"FedAvg, {args.sites} sites x {args.rows:,} rows x {args.features} features, MLP {args.hidden} "
          f"({params:,} parameters), {args.rounds} rounds of {args.epochs} epoch(s), batch {args.batch_size}, "
          f"lr {args.lr}; nproc {os.cpu_count()}")
    medveil = medveil_side(args)
    ours = summary(medveil["seconds"])
    note = "" if medveil["validation_off"] else " (fed.train has no validation_fraction here)"
    print(f"{'medveil fed.train, secure aggregation, loopback HTTP:':<52}{ours:7.2f} s/round  "
          f"final pooled loss {medveil['loss']:.4f}{note}")
    print(f"  rounds (s): {' '.join(f'{s:.2f}' for s in medveil['seconds'])}")
    python = flower_python(args)
    if python is None:
        print("Flower not measured (no --flower-python, $MEDVEIL_FLOWER_PYTHON or /work/flower-venv)")
        return
    ratios = {}
    for mode, label in (("plain", "Flower run_simulation, FedAvg:"), ("secagg", "Flower run_simulation, SecAgg+:")):
        flower = run_flower(python, argv, mode)
        theirs = summary(flower["seconds"])
        ratios[mode] = ours / theirs
        print(f"{label:<52}{theirs:7.2f} s/round  final pooled loss {flower['loss']:.4f}  "
              f"ratio medveil/Flower {ratios[mode]:.2f}")
        print(f"  rounds (s): {' '.join(f'{s:.2f}' for s in flower['seconds'])}")
        gap = abs(flower["loss"] - medveil["loss"]) / flower["loss"]
        if gap > LOSS_TOLERANCE:
            print(f"  sanity: final losses differ by {gap:.1%} (more than {LOSS_TOLERANCE:.0%}): not the same training?")
    verdict = "met" if ratios["plain"] <= GOAL else "missed"
    print(f"goal: medveil's round at most {GOAL}x Flower's plain FedAvg round: {verdict} ({ratios['plain']:.2f}x)")


if __name__ == "__main__":
    main()
