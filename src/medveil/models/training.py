"""Local training for horizontal federated learning, over flat weight vectors.

A model's weights travel as one float64 vector in `named_parameters` order, so sites can sum
`rows * weights` under secure aggregation and the researcher learns only the weighted mean.
torch is imported inside each function: importing this module never needs it.
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel

from medveil.models.registry import ModelRecipe

# torch draws initial weights, shuffles and dropout masks from its process-global generator (seeded
# inside fork_rng): training in threads of one process (sites simulated as threads) must not interleave.
_TORCH_RNG = threading.RLock()

if TYPE_CHECKING:
    import torch


def parse_hyper(recipe: ModelRecipe, hyper: BaseModel | dict[str, Any] | None) -> BaseModel:
    """The recipe's validated hyperparameters from an instance, a dict or None (the defaults);
    a dict that breaks the schema raises pydantic.ValidationError."""
    if isinstance(hyper, recipe.Hyper):
        return hyper
    if hyper is None:
        hyper = {}
    if not isinstance(hyper, dict):
        raise TypeError(f"hyperparameters must be a dict or {recipe.Hyper.__name__}, got {type(hyper).__name__}")
    return recipe.Hyper.model_validate(hyper)


def build_module(recipe: ModelRecipe, n_inputs: int, hyper: BaseModel | dict[str, Any] | None) -> torch.nn.Module:
    """The recipe's network for `n_inputs` features with validated hyperparameters (building draws
    torch's default initialisation from the global generator, so it holds the generator's lock)."""
    with _TORCH_RNG:
        return recipe.build(n_inputs, parse_hyper(recipe, hyper))


def shapes(module: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter, in the order `flatten` lays them out."""
    return [(name, tuple(p.shape)) for name, p in module.named_parameters()]


def n_parameters(module: torch.nn.Module) -> int:
    """How many numbers `flatten` returns for this module."""
    return sum(p.numel() for p in module.parameters())


def flatten(module: torch.nn.Module) -> np.ndarray:
    """All parameters as one float64 vector, in `named_parameters` order."""
    parts = [p.detach().cpu().numpy().astype(np.float64).ravel() for _, p in module.named_parameters()]
    return np.concatenate(parts) if parts else np.zeros(0)


def load_flat(module: torch.nn.Module, vector: np.ndarray) -> None:
    """Set the module's parameters from a `flatten` vector; refuses a wrong size or non-finite value."""
    import torch

    vector = np.asarray(vector)
    if vector.ndim != 1 or vector.dtype.kind not in "fiu":
        raise ValueError("weights must be a 1-D numeric vector")
    expected = n_parameters(module)
    if vector.size != expected:
        raise ValueError(f"weights have {vector.size} values, the model has {expected} parameters")
    if not np.all(np.isfinite(vector)):
        raise ValueError("weights must be finite")
    offset = 0
    with torch.no_grad():
        for p in module.parameters():
            chunk = vector[offset:offset + p.numel()].reshape(tuple(p.shape))
            p.copy_(torch.from_numpy(np.ascontiguousarray(chunk)).to(p.dtype))
            offset += p.numel()


def init_weights(recipe: ModelRecipe, n_inputs: int, hyper: BaseModel | dict[str, Any] | None, seed: int) -> np.ndarray:
    """The model's initial weights from `seed`: the same vector at every site (same torch version),
    without disturbing the process' global torch random state."""
    import torch

    with _TORCH_RNG, torch.random.fork_rng(devices=[]):
        torch.manual_seed(_check_seed(seed))
        return flatten(build_module(recipe, n_inputs, hyper))


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    return int(seed)


def _tensors(X: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.float32)
    if X.ndim != 2 or y.ndim != 1 or X.shape[0] != y.shape[0] or X.shape[0] == 0:
        raise ValueError(f"need X of shape (rows, features) and y of shape (rows,), rows >= 1; got {X.shape}, {y.shape}")
    if not (np.all(np.isfinite(X)) and np.all(np.isfinite(y))):
        raise ValueError("X and y must be finite")
    return torch.from_numpy(np.ascontiguousarray(X)), torch.from_numpy(np.ascontiguousarray(y))


def _prepared(recipe: ModelRecipe, hyper, weights: np.ndarray, X: np.ndarray, y: np.ndarray):
    Xt, yt = _tensors(X, y)
    module = build_module(recipe, int(Xt.shape[1]), hyper)
    load_flat(module, weights)
    return module, Xt, yt


def train_local(
    recipe: ModelRecipe,
    hyper: BaseModel | dict[str, Any] | None,
    weights: np.ndarray,
    X: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int | None,
    lr: float,
    algorithm: Literal["fedavg", "fedprox"],
    mu: float,
    seed: int,
) -> tuple[np.ndarray, float, int]:
    """Train from the global `weights` on one site's rows; returns (new weights, mean loss of the
    global weights on these rows before training, rows).

    Plain SGD (no momentum) on the mean binary cross-entropy with logits; `batch_size` None is full
    batch. FedProx adds mu/2 * ||w - w_global||^2 to every batch's loss. Shuffling and dropout draw
    from `seed` inside a forked torch random state. Diverging training (too large a `lr`) returns
    non-finite weights: the caller checks them before releasing anything.
    """
    import torch

    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be None or a positive int, got {batch_size!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if algorithm not in ("fedavg", "fedprox"):
        raise ValueError(f"algorithm must be 'fedavg' or 'fedprox', got {algorithm!r}")
    if not (isinstance(mu, (int, float)) and math.isfinite(mu) and mu >= 0):
        raise ValueError(f"mu must be a non-negative finite number, got {mu!r}")
    seed = _check_seed(seed)

    module, Xt, yt = _prepared(recipe, hyper, weights, X, y)
    rows = int(Xt.shape[0])
    loss_fn = torch.nn.BCEWithLogitsLoss(reduction="mean")
    module.eval()
    with torch.no_grad():
        loss_before = float(loss_fn(module(Xt), yt))

    anchors = [p.detach().clone() for p in module.parameters()]
    optimizer = torch.optim.SGD(module.parameters(), lr=float(lr), momentum=0.0)
    step = rows if batch_size is None else min(batch_size, rows)
    module.train()
    with _TORCH_RNG, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(epochs):
            if batch_size is None:
                batches = [(Xt, yt)]
            else:
                order = torch.randperm(rows)
                batches = [(Xt[order[i:i + step]], yt[order[i:i + step]]) for i in range(0, rows, step)]
            for X_batch, y_batch in batches:
                optimizer.zero_grad()
                loss = loss_fn(module(X_batch), y_batch)
                if algorithm == "fedprox":
                    loss = loss + (mu / 2) * sum(((p - a) ** 2).sum() for p, a in zip(module.parameters(), anchors))
                loss.backward()
                optimizer.step()
    return flatten(module), loss_before, rows


def evaluate(recipe: ModelRecipe, hyper: BaseModel | dict[str, Any] | None, weights: np.ndarray,
             X: np.ndarray, y: np.ndarray) -> dict[str, float | int]:
    """Sums for pooled metrics: {"loss": summed BCE-with-logits, "correct": rows whose logit sign
    matches the 0/1 label, "rows": rows}; dropout is off."""
    import torch

    module, Xt, yt = _prepared(recipe, hyper, weights, X, y)
    module.eval()
    with torch.no_grad():
        logits = module(Xt)
        loss = float(torch.nn.functional.binary_cross_entropy_with_logits(logits, yt, reduction="sum"))
        correct = int(((logits > 0).to(yt.dtype) == yt).sum())
    return {"loss": loss, "correct": correct, "rows": int(Xt.shape[0])}


def predict_logits(recipe: ModelRecipe, hyper: BaseModel | dict[str, Any] | None, weights: np.ndarray,
                   X: np.ndarray) -> np.ndarray:
    """One float64 logit per row of X with the given weights (dropout off)."""
    import torch

    Xt, _ = _tensors(X, np.zeros(np.asarray(X).shape[0] if np.ndim(X) else 0))
    module = build_module(recipe, int(Xt.shape[1]), hyper)
    load_flat(module, weights)
    module.eval()
    with torch.no_grad():
        return module(Xt).numpy().astype(np.float64)
