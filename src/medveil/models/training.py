"""Local training and evaluation for horizontal federated learning, over flat weight vectors.

A model's weights travel as one float64 vector in `named_parameters` order, so sites can sum
`rows * weights` under secure aggregation and the researcher learns only the weighted mean.
`evaluate` returns only sums over rows (counts, summed clipped losses, histograms of predicted
probabilities), which sites add under secure aggregation: the researcher learns pooled metrics,
no site's own. With `dp`, training is DP-SGD through Opacus (Poisson sampling, per-sample
clipping, Gaussian noise): the weights a site releases are then differentially private for its
rows, at the price `medveil.privacy.dpsgd` charges.

`X` is a numpy array or a `LazyRows` (images read on demand: a batch at a time, never all rows
at once). torch and Opacus are imported inside each function: importing this module needs neither.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel

from medveil.models.metrics import bin_sums
from medveil.models.registry import ModelRecipe

# torch draws initial weights, shuffles and dropout masks from its process-global generator (seeded
# inside fork_rng): training in threads of one process (sites simulated as threads) must not interleave.
_TORCH_RNG = threading.RLock()

MAX_CLASSES = 1_000
MAX_ROW_LOSS = 20.0  # nats: one row moves a summed loss by at most this much (evaluate clips each row's loss)
MAX_LOGIT = 50.0  # evaluate clamps logits to +-this (NaN to 0): any weights give finite losses and probabilities
PHYSICAL_BATCH = 256  # image rows (or lazily read rows) through the network at once
MAX_BINS = 1_000

if TYPE_CHECKING:
    import torch


@runtime_checkable
class LazyRows(Protocol):
    """Rows read on demand (an image folder): `batch(indices)` returns float32 rows, for images
    of shape (len(indices), channels, size, size) with values in [0, 1]."""

    def __len__(self) -> int: ...

    def batch(self, indices: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class DPSGD:
    """DP-SGD's parameters: Gaussian noise of standard deviation noise_multiplier * max_grad_norm
    added to each step's sum of per-sample gradients, each clipped to L2 norm max_grad_norm."""

    noise_multiplier: float
    max_grad_norm: float

    def __post_init__(self) -> None:
        for name in ("noise_multiplier", "max_grad_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise ValueError(f"DP-SGD {name} must be a positive finite number, got {value!r}")


@dataclass(frozen=True)
class LocalUpdate:
    """One site's local training: the new weights, the mean loss of the global weights on its rows
    before training (None when not measured), its rows, the optimizer steps taken and the
    sampling rate (Opacus' Poisson rate under DP: what DP accounting needs)."""

    weights: np.ndarray
    loss_before: float | None
    rows: int
    steps: int
    sample_rate: float


def outputs_for(classes: int) -> int:
    """How many logits a model for `classes` classes gives: 1 for two, K for K >= 3."""
    if isinstance(classes, bool) or not isinstance(classes, (int, np.integer)) or not 2 <= int(classes) <= MAX_CLASSES:
        raise ValueError(f"classes must be an int in 2..{MAX_CLASSES}, got {classes!r}")
    return 1 if int(classes) == 2 else int(classes)


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


def model_inputs(recipe: ModelRecipe, hyper: BaseModel | dict[str, Any] | None, n_features: int) -> int:
    """The `n_inputs` to build the recipe with: the feature count for a tabular recipe, the
    hyperparameters' channel count for an image recipe (which takes no feature columns)."""
    if recipe.inputs == "image":
        return int(parse_hyper(recipe, hyper).channels)
    return n_features


def build_module(recipe: ModelRecipe, n_inputs: int, hyper: BaseModel | dict[str, Any] | None,
                 outputs: int = 1) -> torch.nn.Module:
    """The recipe's network for `n_inputs` features (image recipes: channels) and `outputs` logits
    with validated hyperparameters (building draws torch's default initialisation from the global
    generator, so it holds the generator's lock)."""
    with _TORCH_RNG:
        return recipe.build(n_inputs, parse_hyper(recipe, hyper), outputs)


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


def init_weights(recipe: ModelRecipe, n_inputs: int, hyper: BaseModel | dict[str, Any] | None, seed: int,
                 outputs: int = 1) -> np.ndarray:
    """The model's initial weights from `seed`: the same vector at every site (same torch version),
    without disturbing the process' global torch random state."""
    import torch

    with _TORCH_RNG, torch.random.fork_rng(devices=[]):
        torch.manual_seed(_check_seed(seed))
        return flatten(build_module(recipe, n_inputs, hyper, outputs))


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    return int(seed)


class _Rows:
    """Uniform access to an array or a LazyRows, checking every batch: the shape the recipe reads
    ((features,) or (channels, size, size)), finite, and images in [0, 1]."""

    def __init__(self, recipe: ModelRecipe, hyper: BaseModel, X: np.ndarray | LazyRows) -> None:
        self.image = recipe.inputs == "image"
        self.lazy = not isinstance(X, np.ndarray) and callable(getattr(X, "batch", None))
        if self.lazy:
            self.source = X
            self.n = len(X)
            if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
                raise ValueError(f"lazy rows must have a positive int length, got {self.n!r}")
        else:
            self.array = np.ascontiguousarray(np.asarray(X, dtype=np.float32))
            if self.array.ndim < 1 or self.array.shape[0] == 0:
                raise ValueError(f"need at least one row, got X of shape {self.array.shape}")
            self.n = int(self.array.shape[0])
        if self.image:
            self.row_shape: tuple[int, ...] = (int(hyper.channels), int(hyper.image_size), int(hyper.image_size))
        elif self.lazy:
            self.row_shape = tuple(np.asarray(X.batch(np.array([0]))).shape[1:])
        else:
            self.row_shape = tuple(self.array.shape[1:])
        if not self.image and len(self.row_shape) != 1:
            raise ValueError(f"a tabular model needs X of shape (rows, features), got rows of shape {self.row_shape}")
        if not self.lazy:
            self._check(self.array, self.n)

    @property
    def n_inputs(self) -> int:
        return self.row_shape[0]

    def _check(self, batch: np.ndarray, rows: int) -> np.ndarray:
        if batch.shape != (rows, *self.row_shape):
            raise ValueError(f"rows must have shape {(rows, *self.row_shape)}, got {batch.shape}")
        if not np.all(np.isfinite(batch)):
            raise ValueError("X must be finite")
        if self.image and batch.size and (batch.min() < 0 or batch.max() > 1):
            raise ValueError("image pixels must lie in [0, 1]")
        return batch

    def get(self, indices: np.ndarray | None = None) -> torch.Tensor:
        """The rows at `indices` (None: all rows; only for arrays) as a float32 tensor."""
        import torch

        if not self.lazy:
            return torch.from_numpy(self.array if indices is None else self.array[indices])
        if indices is None:
            raise ValueError("lazy rows are read in batches")
        indices = np.asarray(indices, dtype=np.int64)
        batch = np.ascontiguousarray(np.asarray(self.source.batch(indices), dtype=np.float32))
        return torch.from_numpy(self._check(batch, int(indices.size)))

    def chunks(self, indices: np.ndarray | None) -> list[np.ndarray | None]:
        """`indices` (None: all rows) in pieces small enough to run at once: tabular arrays whole,
        images and lazy rows PHYSICAL_BATCH rows at a time."""
        if not (self.lazy or self.image):
            return [indices]
        indices = np.arange(self.n) if indices is None else np.asarray(indices)
        return [indices[i:i + PHYSICAL_BATCH] for i in range(0, indices.size, PHYSICAL_BATCH)]


def _labels(y: np.ndarray, rows: int, classes: int) -> torch.Tensor:
    """0/1 float32 labels for two classes, int64 labels 0..K-1 for K >= 3."""
    import torch

    y = np.asarray(y)
    if y.ndim != 1 or y.shape[0] != rows:
        raise ValueError(f"need y of shape ({rows},), got {y.shape}")
    if y.dtype.kind not in "fiub" or not np.all(np.isfinite(y)):
        raise ValueError("y must be finite numbers")
    if not (np.all(y == np.round(y)) and y.min() >= 0 and y.max() <= classes - 1):
        raise ValueError(f"y must hold class labels 0..{classes - 1}")
    if classes == 2:
        return torch.from_numpy(y.astype(np.float32))
    return torch.from_numpy(y.astype(np.int64))


def _loss_fn(classes: int, reduction: str = "mean"):
    import torch

    if classes == 2:
        return torch.nn.BCEWithLogitsLoss(reduction=reduction)
    return torch.nn.CrossEntropyLoss(reduction=reduction)


def _prepared(recipe: ModelRecipe, hyper, weights: np.ndarray, X, y, classes: int):
    """Validated hyperparameters, rows, labels (None without y) and the module holding `weights`."""
    import torch

    outputs = outputs_for(classes)
    hyper = parse_hyper(recipe, hyper)
    rows = _Rows(recipe, hyper, X)
    labels = None if y is None else _labels(y, rows.n, int(classes))
    with _TORCH_RNG, torch.random.fork_rng(devices=[]):  # building draws throwaway initial weights
        module = build_module(recipe, rows.n_inputs, hyper, outputs)
    load_flat(module, weights)
    return hyper, rows, labels, module


def _logits(module, rows: _Rows) -> torch.Tensor:
    """The module's logits on every row, a chunk at a time, without gradients (eval mode)."""
    import torch

    module.eval()
    with torch.no_grad():
        parts = [module(rows.get(chunk)) for chunk in rows.chunks(None)]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _check_training(epochs, batch_size, lr, algorithm, mu, dp) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be None or a positive int, got {batch_size!r}")
    if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if algorithm not in ("fedavg", "fedprox"):
        raise ValueError(f"algorithm must be 'fedavg' or 'fedprox', got {algorithm!r}")
    if isinstance(mu, bool) or not (isinstance(mu, (int, float)) and math.isfinite(mu) and mu >= 0):
        raise ValueError(f"mu must be a non-negative finite number, got {mu!r}")
    if dp is not None and not isinstance(dp, DPSGD):
        raise TypeError(f"dp must be a DPSGD or None, got {type(dp).__name__}")
    if dp is not None and algorithm == "fedprox":
        raise ValueError("fedprox with DP-SGD is not supported: Opacus clips per-sample gradients and the "
                         "proximal term is not a per-sample loss; use fedavg")


def train_local(
    recipe: ModelRecipe,
    hyper: BaseModel | dict[str, Any] | None,
    weights: np.ndarray,
    X: np.ndarray | LazyRows,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int | None,
    lr: float,
    algorithm: Literal["fedavg", "fedprox"],
    mu: float,
    seed: int,
    classes: int = 2,
    dp: DPSGD | None = None,
    measure_loss: bool = True,
) -> LocalUpdate:
    """Train from the global `weights` on one site's rows.

    Plain SGD (no momentum) on the mean cross-entropy (binary with logits for two classes, `y`
    0/1; softmax for K >= 3, `y` integer labels); `batch_size` None is full batch. FedProx adds
    mu/2 * ||w - w_global||^2 to every batch's loss. With `dp`, DP-SGD through Opacus: each step's
    batch is a Poisson sample of rate 1 / ceil(rows / batch_size) (1 for full batch), per-sample
    gradients are clipped and noised. Shuffling, sampling, dropout and noise draw from `seed`
    (same seed, same weights); under DP that seed must be secret from the researcher (derive it
    from a site secret), since noise drawn from a known seed can be recomputed and subtracted
    (Opacus warns that its secure RNG is off). Diverging training (too large a `lr`) returns non-finite weights:
    the caller checks them before releasing anything.
    """
    import torch

    _check_training(epochs, batch_size, lr, algorithm, mu, dp)
    seed = _check_seed(seed)
    hyper, rows, labels, module = _prepared(recipe, hyper, weights, X, y, classes)
    loss_fn = _loss_fn(int(classes))
    loss_before = float(loss_fn(_logits(module, rows), labels)) if measure_loss else None

    with _TORCH_RNG, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if dp is None:
            steps, sample_rate = _train_plain(module, rows, labels, loss_fn, epochs=epochs, batch_size=batch_size,
                                              lr=float(lr), mu=float(mu) if algorithm == "fedprox" else None)
        else:
            steps, sample_rate = _train_dp(recipe, module, rows, labels, loss_fn, epochs=epochs,
                                           batch_size=batch_size, lr=float(lr), dp=dp, seed=seed)
    return LocalUpdate(weights=flatten(module), loss_before=loss_before, rows=rows.n, steps=steps,
                       sample_rate=sample_rate)


def _train_plain(module, rows: _Rows, labels, loss_fn, *, epochs: int, batch_size: int | None, lr: float,
                 mu: float | None) -> tuple[int, float]:
    """SGD over shuffled minibatches (or the full batch); a batch too large to run at once is run
    in chunks whose gradients add up to the batch's (each chunk's mean loss weighted by its share)."""
    import torch

    anchors = [p.detach().clone() for p in module.parameters()]
    optimizer = torch.optim.SGD(module.parameters(), lr=lr, momentum=0.0)
    step = rows.n if batch_size is None else min(batch_size, rows.n)
    steps = 0
    module.train()
    for _ in range(epochs):
        if batch_size is None:
            batches: list[np.ndarray | None] = [None]
        else:
            order = torch.randperm(rows.n).numpy()
            batches = [order[i:i + step] for i in range(0, rows.n, step)]
        for batch in batches:
            optimizer.zero_grad()
            size = rows.n if batch is None else len(batch)
            for chunk in rows.chunks(batch):
                chunk_labels = labels if chunk is None else labels[torch.from_numpy(np.asarray(chunk))]
                loss = loss_fn(module(rows.get(chunk)), chunk_labels)
                if chunk is not None and len(chunk) != size:
                    loss = loss * (len(chunk) / size)
                loss.backward()
            if mu is not None:
                ((mu / 2) * sum(((p - a) ** 2).sum() for p, a in zip(module.parameters(), anchors))).backward()
            optimizer.step()
            steps += 1
    return steps, step / rows.n


def _torch_dataset(rows: _Rows, labels):
    """The rows as a torch map-style Dataset whose `__getitems__` reads a whole batch at once."""
    from torch.utils.data import Dataset

    class RowsDataset(Dataset):
        def __len__(self) -> int:
            return rows.n

        def __getitem__(self, index: int):
            return rows.get(np.array([index]))[0], labels[index]

        def __getitems__(self, indices: list[int]):
            if len(indices) == 0:
                return []
            batch = rows.get(np.asarray(indices, dtype=np.int64))
            return list(zip(batch, labels[list(indices)]))

    return RowsDataset()


def _train_dp(recipe: ModelRecipe, module, rows: _Rows, labels, loss_fn, *, epochs: int, batch_size: int | None,
              lr: float, dp: DPSGD, seed: int) -> tuple[int, float]:
    """DP-SGD with Opacus' PrivacyEngine; returns the steps and the sample rate its accountant
    recorded. Opacus' BatchMemoryManager runs each Poisson batch in physical pieces of at most
    PHYSICAL_BATCH rows (one optimizer step per logical batch), so lazy rows are never all read."""
    import torch
    from opacus import PrivacyEngine
    from opacus.utils.batch_memory_manager import BatchMemoryManager
    from opacus.validators import ModuleValidator

    module.train()
    problems = ModuleValidator.validate(module, strict=False)
    if problems:
        raise ValueError(f"model {recipe.key} cannot be trained with DP-SGD: {problems[0]}")
    sampling_seed, noise_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2, dtype=np.uint64) >> 1)
    loader = torch.utils.data.DataLoader(
        _torch_dataset(rows, labels), batch_size=rows.n if batch_size is None else min(batch_size, rows.n),
        generator=torch.Generator().manual_seed(sampling_seed))
    optimizer = torch.optim.SGD(module.parameters(), lr=lr, momentum=0.0)
    engine = PrivacyEngine(accountant="rdp")
    private, optimizer, loader = engine.make_private(
        module=module, optimizer=optimizer, data_loader=loader, noise_multiplier=float(dp.noise_multiplier),
        max_grad_norm=float(dp.max_grad_norm), poisson_sampling=True,
        noise_generator=torch.Generator().manual_seed(noise_seed))
    private.train()
    for _ in range(epochs):
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=PHYSICAL_BATCH,
                                optimizer=optimizer) as physical:
            for X_batch, y_batch in physical:
                optimizer.zero_grad()
                loss_fn(private(X_batch), y_batch).backward()
                optimizer.step()
    history = engine.accountant.history
    private.remove_hooks()
    return sum(int(entry[2]) for entry in history), float(history[0][1])


def evaluate(recipe: ModelRecipe, hyper: BaseModel | dict[str, Any] | None, weights: np.ndarray,
             X: np.ndarray | LazyRows, y: np.ndarray, *, classes: int = 2, bins: int = 20) -> dict[str, np.ndarray]:
    """Sums over rows for pooled metrics (dropout off): "rows", "loss" (cross-entropy, each row's
    clipped at MAX_ROW_LOSS), "correct", and per class column (one for two classes: P(class 1);
    K one-vs-rest otherwise) "hist_pos"/"hist_neg" (rows whose label is / is not that class, by
    bin of the predicted probability) and "prob_sum" (summed probabilities per bin). Sites add
    them under secure aggregation; `medveil.models.metrics.pooled_metrics` turns the sums into metrics.

    Whatever the weights (a hostile broadcast may overflow a float32 logit to inf, or give
    inf - inf = NaN for one row only), each logit is taken in float64 with NaN as 0 and clamped
    to [-MAX_LOGIT, MAX_LOGIT] before the loss and probabilities: every row's loss is finite and
    at most MAX_ROW_LOSS, every probability in [0, 1], so one row moves each sum by a bounded
    amount (the sensitivities DP noise is scaled to) and no row can make evaluation fail. An
    honest model's logits beyond +-50 give the same bins and a loss already clipped."""
    import torch

    if isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= MAX_BINS:
        raise ValueError(f"bins must be an int in 1..{MAX_BINS}, got {bins!r}")
    _, rows, labels, module = _prepared(recipe, hyper, weights, X, y, classes)
    logits = torch.nan_to_num(_logits(module, rows).to(torch.float64), nan=0.0, posinf=MAX_LOGIT, neginf=-MAX_LOGIT)
    logits = logits.clamp(-MAX_LOGIT, MAX_LOGIT)
    if classes == 2:
        losses = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.to(torch.float64), reduction="none")
        probabilities = torch.sigmoid(logits).numpy()[:, None]
        predicted = (logits > 0).numpy().astype(np.int64)
    else:
        losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        probabilities = torch.softmax(logits, dim=1).numpy()
        predicted = logits.argmax(dim=1).numpy()
    truth = labels.numpy().astype(np.int64)
    sums = {"rows": np.array([rows.n], dtype=np.int64),
            "loss": np.array([float(losses.clamp(max=MAX_ROW_LOSS).sum())]),
            "correct": np.array([int(np.sum(predicted == truth))], dtype=np.int64)}
    return sums | bin_sums(probabilities, truth, classes=int(classes), bins=bins)


def predict_logits(recipe: ModelRecipe, hyper: BaseModel | dict[str, Any] | None, weights: np.ndarray,
                   X: np.ndarray | LazyRows, *, classes: int = 2) -> np.ndarray:
    """float64 logits for each row of X with the given weights (dropout off): shape (rows,) for
    two classes, (rows, K) for K >= 3."""
    _, rows, _, module = _prepared(recipe, hyper, weights, X, None, classes)
    return _logits(module, rows).numpy().astype(np.float64)
