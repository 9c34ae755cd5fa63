"""fl_train: horizontal federated learning (FedAvg, FedProx) of a registered model over secure aggregation.

The sites train only a model recipe installed at the site (`medveil.models`: a name and a
version, never code) and approved by the study (`StudySpec.models`, "name@version"); the
researcher sends the name and hyperparameters as data, which the site validates against the
recipe's own schema. A tabular recipe reads numeric `features`; an image recipe reads the image
files named in the labels column `image` of an image-folder dataset (`medveil.data.images`),
and anything else is refused (`model_input_mismatch`).

Rounds (docs/fl.md):
- 0: each site checks its table (numeric features or an image column, a target of `classes`
  levels, enough rows in each class), splits off a seeded hold-out of `validation_fraction` of
  its rows (`split_rows`: from the seed and the row count, so the node's differencing guard can
  recompute it, `FederatedTraining.row_sets`) and publishes its training and validation row
  counts; the researcher makes the initial weights from the seed (`medveil.models.init_weights`,
  the same at every site, which checks round 1's broadcast against it).
- 1..R: each site evaluates the broadcast weights on its validation rows (sums of the loss,
  correct predictions and binned class probabilities, `models.evaluate`) and, if the round's
  seeded draw of `sample_fraction` of the sites picks it, trains from them for `local_epochs`
  (plain SGD; FedProx adds mu/2 ||w - w_global||^2; DP-SGD through Opacus when `dp` is set),
  releasing n_k * w_k, n_k and n_k times its training loss before training; a site not drawn
  releases zeros, so secure aggregation still runs over every site. The new global weights are
  sum(n_k w_k) / sum(n_k). With one full-batch step per round and every site drawn this is
  exactly gradient descent on the pooled rows. A sample_fraction below 1 needs `dp`
  (`sample_fraction_needs_dp`): the researcher chooses the seed, hence the draws, and from round
  2 on the weights, so rounds drawing {a, b}, {b, c} and {a, c} at one weight vector would solve
  for each site's own update; under DP-SGD each site's update is private on its own.
- R+1 (when validation_fraction > 0): each site evaluates the final weights.

Differential privacy (`dp`): each drawn site trains with DP-SGD (per-sample clipping to
max_grad_norm, Gaussian noise of noise_multiplier z times it, Poisson sampling) and charges
rho = steps / (2 z^2) (`privacy.dpsgd.dpsgd_rho`: zCDP of the Gaussian mechanism, no
amplification by subsampling credited) to the researcher's budget at the site; no training loss
is released. Its validation sums are released with OpenDP Gaussian noise of the same multiplier
z (rho 1 / (2 z^2) per evaluation; `noised_validation` gives the sensitivities, which hold for
any broadcast: `models.evaluate` clamps every logit to +-MAX_LOGIT and every row's loss to
MAX_ROW_LOSS). A round's whole planned rho (its steps and its evaluation) is charged at the
start of its local step, before anything is computed, so no outcome of the round (a refusal
included) is free. DP-SGD's seed is the site's own secret (63 random bits). A study that
releases only DP results refuses a training without `dp` (`dp_required`); there round 0's
row counts are released through the node's DP count noise (charged), and each site weights its
update by its own noisy training count ñ_k (it releases ñ_k w_k and ñ_k, post-processing of DP
outputs; ñ_k is read back from what round 0 released, so every round and a resumed run use the
same value). Outside such a study the row counts are exact public facts, and under DP the
sampling rate each site publishes, 1 / ceil(rows / batch_size), reveals ceil(rows / batch_size).
A site refuses a delta of 1 / (training rows) or more (`dp_delta_too_large`). Each site
publishes its steps and Poisson sampling rate per round, so the researcher reports epsilon from
Opacus' RDP accountant beside the zCDP conversion (`FLResult.privacy`).

Secure aggregation: the sums are fixed-point encoded (round(x * 2**52) in a 112-bit two's
complement ring, crypto/secagg.py), so each n_k * w_k is carried to 2**-53 absolute (exactly,
once |n_k w_k| >= 1) and the sum over sites is exact in the ring; a value above 2**50 in
magnitude (e.g. weights of 1e9 at 1e6 rows, a diverged training) is refused (`secagg_overflow`
or `analysis_error`) rather than wrapped. A broadcast weight above MAX_WEIGHT in magnitude is
refused (`broadcast_malformed`).

What each party learns: the researcher learns, per round, the row-weighted sum of the drawn
sites' trained weights, their total rows and pooled training loss (hence the global model and
its loss curve; no loss under DP), the pooled validation sums (loss, accuracy, binned class
probabilities, hence AUC and calibration; noised under DP), and, per site, its training and
validation row counts (round 0; noisy in a DP-only study) and, under DP, its DP-SGD steps,
sampling rate and rho charged; a site learns the parameters and the global weights of every
round; the hub learns nothing beyond masked vectors and those public facts. A round draws at
least two sites (or every site, when fewer take part), and secure aggregation decodes a sum only
over at least its threshold of surviving sites; within one round no sum is one site's own.

Residual risks: (1) across rounds or tasks with different survivor sets the researcher can
difference two sums: a hub that drops one site's reply in one round (with dropouts allowed) and
a second task, or a repeated broadcast, with every site gives that site's own update as the
difference of the two sums. This is generic to secure aggregation with dropouts; DP-SGD is the
defence (each site's update is then private on its own). (2) From round 2 on the researcher
chooses the broadcast weights, and the pooled update at weights of its choosing is a pooled
gradient, from which crafted weights (e.g. a ReLU unit active on one row only) can reconstruct a
row exactly when it stands alone in a site's batch ("Robbing the Fed", Fowl et al. 2022). Sites
check only that the weights are finite, at most MAX_WEIGHT in magnitude, of the model's size,
and the agreed initial ones in round 1; DP-SGD is the defence. The binned validation sums
likewise describe the rows at weights of the researcher's choosing.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from medveil.analyses.base import (
    Aggregated,
    Analysis,
    AnalysisError,
    BroadcastRefused,
    Finished,
    NextRound,
    Params,
    Release,
    SiteContext,
    finite_array,
    register,
    released_in,
)
from medveil.models.registry import MODEL_NAME, MODEL_VERSION
from medveil.privacy.disclosure import (
    DisclosurePolicy,
    DisclosureRefused,
    public_count,
    require_min_count,
)

if TYPE_CHECKING:
    from medveil.models import ModelRecipe

COLUMN = r"^[^\x00-\x1f]{1,200}$"
MAX_SEED = 2**31 - 1
MAX_CLASSES = 1000
BINS = 20  # equal-width probability bins of the validation sums (AUC, calibration)
MIN_DRAWN = 2  # sites trained per round at least (all of them when fewer take part)
MAX_WEIGHT = 1e6  # largest broadcast weight magnitude a site accepts (honest trainings stay far below)
VALIDATION_PREFIX = "val_"
HISTORY = ("round", "rows", "train_loss", "val_rows", "val_loss", "val_accuracy", "val_auc", "val_ece")


class DPParams(Params):
    """DP-SGD's settings: Gaussian noise of `noise_multiplier` times the per-sample clipping norm
    `max_grad_norm`, and the delta at which epsilon is reported."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    noise_multiplier: float = Field(ge=0.1, le=100)
    max_grad_norm: float = Field(gt=0, le=100)
    delta: float = Field(1e-5, gt=0, le=1e-2)


class FLParams(Params):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    model: str = Field(pattern=MODEL_NAME, description="a model recipe registered at the sites")
    version: str = Field("1", pattern=MODEL_VERSION)
    features: list[str] = Field(default_factory=list, max_length=500, description="numeric columns (tabular)")
    image: str | None = Field(None, pattern=COLUMN, description="the labels column naming each row's image file")
    target: str = Field(pattern=COLUMN, description="0/1 for two classes, 0..classes-1 otherwise")
    classes: int = Field(2, ge=2, le=MAX_CLASSES)
    hyper: dict[str, Any] = Field(default_factory=dict, description="checked against the recipe's Hyper schema")
    rounds: int = Field(10, ge=1, le=1000)
    local_epochs: int = Field(1, ge=1, le=100)
    batch_size: int | None = Field(None, ge=1, le=65536, description="None: full batch")
    lr: float = Field(0.1, gt=0, le=10)
    algorithm: Literal["fedavg", "fedprox"] = "fedavg"
    mu: float = Field(0.0, ge=0, le=100, description="FedProx's proximal weight")
    validation_fraction: float = Field(0.2, ge=0, le=0.5, description="each site's seeded hold-out")
    sample_fraction: float = Field(1.0, gt=0, le=1, description="sites drawn to train in each round")
    dp: DPParams | None = None
    seed: int = Field(0, ge=0, le=MAX_SEED)

    @model_validator(mode="after")
    def _distinct_columns(self) -> FLParams:
        if any(not isinstance(name, str) or not 1 <= len(name) <= 200 for name in self.features):
            raise ValueError("features must be column names of 1 to 200 characters")
        if len(set(self.features)) != len(self.features) or self.target in self.features:
            raise ValueError("features must be distinct and must not include the target")
        if self.image is None and not self.features:
            raise ValueError("a tabular model needs features; an image model needs image (the file column)")
        if self.image is not None and (self.features or self.image == self.target):
            raise ValueError("an image model reads the image column and the target only: no features, "
                             "and the image column is not the target")
        if self.dp is not None and self.algorithm == "fedprox":
            raise ValueError("DP-SGD trains with fedavg only: Opacus clips per-sample gradients and FedProx's "
                             "proximal term is not a per-sample loss")
        return self

    @property
    def key(self) -> str:
        return f"{self.model}@{self.version}"

    @property
    def outputs(self) -> int:
        """The network's outputs: one logit for two classes, K for K >= 3."""
        return 1 if self.classes == 2 else self.classes

    @property
    def final_round(self) -> int:
        """The last round: R, or R+1 when the final weights are evaluated."""
        return self.rounds + (1 if self.validation_fraction > 0 else 0)


def recipe_of(params: FLParams) -> ModelRecipe:
    """The recipe installed here for the parameters' model, or the refusal `unknown_model`."""
    from medveil.models import UnknownModel, get_model

    try:
        return get_model(params.model, params.version)
    except UnknownModel as exc:
        raise DisclosureRefused("unknown_model", str(exc)) from None


def hyper_of(params: FLParams) -> BaseModel:
    """The hyperparameters validated by the recipe's schema (a pydantic ValidationError otherwise)."""
    return recipe_of(params).Hyper.model_validate(params.hyper)


def n_inputs(params: FLParams) -> int:
    """What the recipe is built for: the number of features, or an image model's channels."""
    return int(hyper_of(params).channels) if params.image is not None else len(params.features)


def initial_weights(params: FLParams) -> np.ndarray:
    """Round 1's global weights: the recipe's deterministic initialisation from the seed."""
    from medveil.models import init_weights

    recipe, hyper = recipe_of(params), hyper_of(params)
    return np.asarray(init_weights(recipe, n_inputs(params), hyper, params.seed, outputs=params.outputs),
                      dtype=np.float64)


def round_seed(seed: int, round_no: int) -> int:
    """The shuffling seed of one round (the same at every site; a different stream every round)."""
    return (seed * 1_000_003 + round_no) % MAX_SEED


def drawn_sites(sites: Sequence[str], fraction: float, seed: int, round_no: int) -> list[str]:
    """The sites that train in a round: sample_fraction of them (nearest count, at least
    MIN_DRAWN or all), drawn from the seed and the round, the same draw at every site."""
    ordered = sorted(set(sites))
    count = min(len(ordered), max(MIN_DRAWN, int(math.floor(fraction * len(ordered) + 0.5))))
    picked = np.random.default_rng([seed, round_no]).choice(len(ordered), size=count, replace=False)
    return [ordered[i] for i in sorted(picked)]


def split_rows(rows: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) row positions of a site's complete rows, in table order: a seeded
    hold-out of round(fraction * rows) rows, drawn from the seed and the row count only, so the
    node's differencing guard recomputes it from the parameters and the table
    (`FederatedTraining.row_sets`) and a resumed run gets the same split."""
    held = int(round(fraction * rows))
    order = np.random.default_rng([seed, rows]).permutation(rows)
    return np.sort(order[held:]), np.sort(order[:held])


def _complete_rows(params: FLParams, data: pd.DataFrame) -> np.ndarray:
    """Boolean mask of the table's rows complete in every column the training reads."""
    columns = [*params.features, *([params.image] if params.image else []), params.target]
    return data[columns].notna().all(axis=1).to_numpy()


def _require_isolated_classes(y: np.ndarray, classes: int, policy: DisclosurePolicy) -> None:
    """Each class holds none or at least min_cell_count rows: a site's lone positive would
    otherwise stand alone behind its share of every gradient."""
    counts = np.bincount(y.astype(np.int64), minlength=classes)
    if np.any((counts > 0) & (counts < policy.min_cell_count)):
        raise DisclosureRefused("indicator_isolation", f"a class of the target holds fewer than "
                                                       f"{policy.min_cell_count} rows at this site")


def _target(params: FLParams, values: pd.Series) -> np.ndarray:
    """The target as float labels 0..classes-1 (a clear error for anything else)."""
    if not (pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values)):
        raise AnalysisError(f"column {params.target!r} is not numeric (dtype {values.dtype})")
    y = values.to_numpy(np.float64)
    if not np.all((y == np.round(y)) & (y >= 0) & (y < params.classes)):
        levels = "0 or 1" if params.classes == 2 else f"an integer label 0..{params.classes - 1}"
        raise AnalysisError(f"the target {params.target!r} must be {levels}")
    return y


@dataclass
class SiteRows:
    """A site's complete rows split for training and validation: X is a float32 array (tabular)
    or lazily read images (models.training.LazyRows); y holds the labels."""

    X_train: Any
    y_train: np.ndarray
    X_val: Any
    y_val: np.ndarray
    dropped: int


def site_rows(params: FLParams, context: SiteContext) -> SiteRows:
    """The site's training and validation rows: complete rows only, numeric features (or image
    files read lazily at the model's size and channels), enough rows in each part and class."""
    policy = context.policy
    if params.image is None:
        frame = context.data[[*params.features, params.target]]
        for name in params.features:
            if not (pd.api.types.is_numeric_dtype(frame[name]) or pd.api.types.is_bool_dtype(frame[name])):
                raise AnalysisError(f"column {name!r} is not numeric (dtype {frame[name].dtype})")
    else:
        if context.images is None:
            raise AnalysisError("an image model needs an image-folder dataset; this dataset is a table")
        frame = context.data[[params.image, params.target]]
    complete = frame[_complete_rows(params, context.data)]
    y = _target(params, complete[params.target])
    require_min_count(len(y), policy, "this site's training set")
    train, val = split_rows(len(y), params.validation_fraction, params.seed)
    require_min_count(len(train), policy, "this site's training set")
    if params.validation_fraction > 0:
        require_min_count(len(val), policy, "this site's validation set")
    _require_isolated_classes(y[train], params.classes, policy)
    if params.image is None:
        x = complete[params.features].to_numpy(np.float64)
        if not np.all(np.isfinite(x)):
            raise AnalysisError("a feature has values that are not finite")
        x = x.astype(np.float32)
        X_train, X_val = x[train], x[val]
    else:
        hyper = hyper_of(params)
        files = [str(name) for name in complete[params.image].tolist()]
        X_train = context.images.rows([files[i] for i in train], int(hyper.channels), int(hyper.image_size))
        X_val = context.images.rows([files[i] for i in val], int(hyper.channels), int(hyper.image_size))
    return SiteRows(X_train, y[train].astype(np.float32), X_val, y[val].astype(np.float32),
                    len(frame) - len(complete))


def noised_validation(sums: Mapping[str, np.ndarray], noise_multiplier: float) -> tuple[dict[str, np.ndarray], float]:
    """Validation sums with OpenDP Gaussian noise, and the zCDP rho it spends.

    Adding or removing one row moves, in L2: "rows" and "correct" by at most 1, "loss" by at most
    MAX_ROW_LOSS (each row's loss is clipped there), the histograms "hist_pos" and "hist_neg"
    together by sqrt(C') (one count per one-vs-rest column: C' = 1 for two classes, K
    otherwise), and "prob_sum" by at most 1 (its probabilities, one per column, sum to at most
    1 in L2). Each of these five groups is divided by its sensitivity, so the joined vector has
    L2 sensitivity sqrt(5), and noise of scale z * sqrt(5) is added: rho = 1 / (2 z^2), the
    cost of one DP-SGD step at the same multiplier. These bounds hold for any weights because
    `models.evaluate` clamps each logit to +-MAX_LOGIT (NaN to 0) and each row's loss to
    MAX_ROW_LOSS; a vector that is still not finite is refused (AnalysisError) before noising,
    since OpenDP's Gaussian does not check its input's domain when invoked. Clipping and
    rounding afterwards (in `validation_metrics`) are post-processing."""
    import opendp.prelude as dp

    from medveil.models.training import MAX_ROW_LOSS

    columns = int(np.asarray(sums["hist_pos"]).shape[0])
    scales = {"rows": 1.0, "loss": float(MAX_ROW_LOSS), "correct": 1.0, "hist_pos": math.sqrt(columns),
              "hist_neg": math.sqrt(columns), "prob_sum": 1.0}
    parts = [np.asarray(sums[key], dtype=np.float64) for key in scales]
    vector = np.concatenate([part.ravel() / scales[key] for part, key in zip(parts, scales)])
    if not np.all(np.isfinite(vector)):
        raise AnalysisError("the validation sums are not finite; they are not released")
    sensitivity = math.sqrt(5.0)
    dp.enable_features("contrib")
    measurement = dp.m.make_gaussian(dp.vector_domain(dp.atom_domain(T=float, nan=False)), dp.l2_distance(T=float),
                                     scale=float(noise_multiplier) * sensitivity)
    rho = float(measurement.map(sensitivity))
    noisy = np.asarray(measurement(vector.tolist()), dtype=np.float64)
    out, offset = {}, 0
    for part, key in zip(parts, scales):
        out[key] = noisy[offset:offset + part.size].reshape(part.shape) * scales[key]
        offset += part.size
    return out, rho


def validation_metrics(sums: Mapping[str, np.ndarray], noisy: bool = False) -> dict[str, Any] | None:
    """Pooled validation metrics (`models.metrics.pooled_metrics`) from a round's summed
    "val_*" arrays, None when the round evaluated nothing. Noisy sums (under DP) are first
    rounded and clipped to what real sums can be (post-processing)."""
    from medveil.models.metrics import pooled_metrics

    picked = {key[len(VALIDATION_PREFIX):]: np.asarray(value) for key, value in sums.items()
              if key.startswith(VALIDATION_PREFIX)}
    if not picked:
        return None
    if noisy:
        rows = max(float(np.rint(picked["rows"][0])), 1.0)
        picked = {"rows": np.array([rows], dtype=np.int64),
                  "loss": np.clip(picked["loss"], 0, None),
                  "correct": np.clip(np.rint(picked["correct"]), 0, rows).astype(np.int64),
                  "hist_pos": np.clip(np.rint(picked["hist_pos"]), 0, None).astype(np.int64),
                  "hist_neg": np.clip(np.rint(picked["hist_neg"]), 0, None).astype(np.int64),
                  "prob_sum": np.clip(picked["prob_sum"], 0, None)}
    if float(picked["rows"][0]) <= 0:
        return None
    return pooled_metrics(picked)


def round_summary(sums: Mapping[str, np.ndarray], noisy: bool = False) -> str:
    """One line on a round's pooled sums (a progress bar's text): validation AUC and loss of the
    weights the round started from, and the pooled training loss where it was released."""
    parts = []
    metrics = validation_metrics(sums, noisy=noisy)
    if metrics is not None:
        parts.append(f"val AUC {float(metrics['auc']):.3f}  val loss {float(metrics['loss']):.4f}")
    if "loss" in sums and "rows" in sums and float(sums["rows"][0]) > 0:
        parts.append(f"train loss {float(sums['loss'][0]) / float(sums['rows'][0]):.4f}")
    return "  ".join(parts)


@dataclass(frozen=True, eq=False)
class FLResult:
    """A federated model: its recipe (name, version, hyperparameters), final flat weights, the
    metric history (one row per round: rows trained, the pooled training loss before the round's
    local training, and the pooled validation loss, accuracy, AUC and expected calibration error
    of the weights the round started from; the evaluation round R+1 holds the final weights'),
    the final weights' calibration table, the privacy spent under DP (per site) and provenance."""

    model: dict[str, Any]
    features: list[str]
    target: str
    weights: np.ndarray
    history: pd.DataFrame
    provenance: dict[str, Any] = field(default_factory=dict)
    image: str | None = None
    classes: int = 2
    calibration: pd.DataFrame | None = None
    privacy: pd.DataFrame | None = None

    def _recipe(self) -> ModelRecipe:
        from medveil.models import get_model

        return get_model(self.model["name"], self.model["version"])

    @property
    def _outputs(self) -> int:
        return 1 if self.classes == 2 else self.classes

    def _inputs(self) -> int:
        return int(self.model["hyper"]["channels"]) if self.image is not None else len(self.features)

    def module(self):
        """The trained torch module, rebuilt from the recipe installed here, in eval mode."""
        from medveil.models import build_module, load_flat

        module = build_module(self._recipe(), self._inputs(), self.model["hyper"], outputs=self._outputs)
        load_flat(module, self.weights)
        return module.eval()

    def state_dict(self) -> dict[str, Any]:
        """The trained weights as a torch state dict."""
        return self.module().state_dict()

    def predict_proba(self, data: pd.DataFrame | np.ndarray | Any) -> np.ndarray:
        """Class probabilities: P(target = 1) per row, shape (rows,), for two classes; (rows, K)
        for K >= 3. `data`: a table holding the feature columns (tabular), or images as a float32
        array (rows, channels, S, S) in [0, 1] or lazily read rows (`ImageFolder.rows`)."""
        from medveil.models import predict_logits

        X = data[self.features].to_numpy(np.float32) if isinstance(data, pd.DataFrame) else data
        logits = np.asarray(predict_logits(self._recipe(), self.model["hyper"], self.weights, X,
                                           classes=self.classes), dtype=np.float64)
        if self._outputs == 1:
            return 1.0 / (1.0 + np.exp(-logits))
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)

    def plot(self, path: str | Path | None = None):
        """Loss (training and validation) and validation AUC by round, two panels (a matplotlib
        Figure), saved to `path` if given."""
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        figure, (loss_axes, auc_axes) = plt.subplots(1, 2, figsize=(10, 4))
        history = self.history
        for column, label in (("train_loss", "training (before the round)"), ("val_loss", "validation")):
            if history[column].notna().any():
                loss_axes.plot(history["round"], history[column], marker="o", label=label)
        loss_axes.set_xlabel("round")
        loss_axes.set_ylabel("pooled mean loss")
        loss_axes.legend()
        auc_axes.plot(history["round"], history["val_auc"], marker="o", color="tab:green")
        auc_axes.set_xlabel("round")
        auc_axes.set_ylabel("validation AUC (binned" + (", macro one-vs-rest)" if self.classes > 2 else ")"))
        figure.suptitle(f"{self.model['name']}@{self.model['version']}: federated training")
        if path is not None:
            figure.savefig(path, bbox_inches="tight")
        return figure


def _site_accounting(public: Mapping[str, Any]) -> tuple[float, int, float | None]:
    """(rho charged, DP-SGD steps, sampling rate) a site published for a round."""
    rho = public.get("dp_rho", 0.0)
    steps = public.get("dp_steps", 0)
    rate = public.get("dp_sample_rate")
    return (float(rho) if isinstance(rho, (int, float)) else 0.0, int(steps) if isinstance(steps, int) else 0,
            float(rate) if isinstance(rate, (int, float)) else None)


def privacy_table(params: FLParams, accounts: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Per site: rho charged (as its node published it), DP-SGD steps, sampling rate and noisy
    evaluations, epsilon at delta by Opacus' RDP accountant over that history (the steps
    subsampled at the site's rate, each evaluation a Gaussian mechanism of the same multiplier,
    a DP-only study's noisy round-0 counts one Gaussian release of the rho charged for them)
    and by the zCDP conversion of the rho charged (`privacy.dpsgd.rho_epsilon`), which is larger:
    it credits no amplification by subsampling."""
    # Opacus' accountant directly, not privacy.dpsgd.opacus_epsilon: the history composes two
    # mechanisms (subsampled steps and full-rate evaluations), which that function's one triple cannot.
    from opacus.accountants import RDPAccountant

    from medveil.privacy.dpsgd import rho_epsilon

    z, delta = params.dp.noise_multiplier, params.dp.delta
    rows = []
    for site in sorted(accounts):
        account = accounts[site]
        accountant = RDPAccountant()
        if account["steps"]:
            accountant.history.append((z, float(account["sample_rate"]), int(account["steps"])))
        if account["evaluations"]:
            accountant.history.append((z, 1.0, int(account["evaluations"])))
        if account.get("count_rho", 0.0) > 0:  # round 0's noisy counts: sensitivity 1, sigma 1 / sqrt(2 rho)
            accountant.history.append((1 / math.sqrt(2 * float(account["count_rho"])), 1.0, 1))
        epsilon = accountant.get_epsilon(delta) if accountant.history else 0.0
        rows.append({"site": site, "rho": float(account["rho"]), "steps": int(account["steps"]),
                     "sample_rate": account["sample_rate"], "evaluations": int(account["evaluations"]),
                     "delta": delta, "epsilon": float(epsilon),
                     "epsilon_zcdp": float(rho_epsilon(account["rho"], delta)) if account["rho"] > 0 else 0.0})
    return pd.DataFrame(rows).set_index("site")


def dp_steps_per_round(params: FLParams, train_rows: int) -> int:
    """DP-SGD's steps in one round a site is drawn: local_epochs times Opacus' Poisson batches,
    ceil(rows / batch_size) (one for full batch)."""
    batch = train_rows if params.batch_size is None else min(params.batch_size, train_rows)
    return params.local_epochs * math.ceil(train_rows / batch)


def round_rho(params: FLParams, round_no: int, site: str, sites: Sequence[str], train_rows: int) -> float:
    """The zCDP rho one DP round charges at `site`: DP-SGD's steps if the round's seeded draw
    picks it (`dp_steps_per_round`), and one noisy evaluation when validation_fraction > 0."""
    from medveil.privacy.dpsgd import dpsgd_rho

    z = params.dp.noise_multiplier
    trains = round_no <= params.rounds and site in drawn_sites(sites, params.sample_fraction, params.seed, round_no)
    training = dpsgd_rho(z, dp_steps_per_round(params, train_rows)) if trains else 0.0
    return training + (1 / (2 * z * z) if params.validation_fraction > 0 else 0.0)


def planned_rho(params: FLParams, site: str, sites: Sequence[str], train_rows: int) -> float:
    """The zCDP rho a whole DP training charges at `site`: `round_rho` summed over its rounds."""
    return sum(round_rho(params, r, site, sites, train_rows) for r in range(1, params.final_round + 1))


def _noisy_counts(context: SiteContext) -> bool:
    """Whether this site releases its row counts with DP noise: in a study that releases only DP
    results, where the node hands the step its (charged) count noise."""
    return context.dp_required and context.noise is not None


def _round_zero_counts(context: SiteContext, rows: SiteRows) -> dict[str, Any]:
    """Round 0's public counts: training, validation and dropped rows. In a DP-only study they
    go through the node's count noise as one vector (one row, added or removed, moves one of the
    three by 1: L2 sensitivity 1), charged by the node; elsewhere they are exact public facts
    (rows_dropped withheld when small, like any small cell)."""
    if _noisy_counts(context):
        noisy = np.asarray(context.noise(np.array([len(rows.y_train), len(rows.y_val), rows.dropped])))
        return {"rows": int(noisy[0]), "validation_rows": int(noisy[1]), "rows_dropped": int(noisy[2])}
    return {"rows": len(rows.y_train), "validation_rows": len(rows.y_val),
            "rows_dropped": public_count(rows.dropped, context.policy)}


def _fedavg_rows(context: SiteContext, train_rows: int) -> int:
    """n_k, the weight of this site's update in FedAvg: its training rows, or in a DP-only study
    its noisy training count as round 0 released it (at least 1), so that neither n_k w_k nor the
    summed n_k carries an exact count and every round (and a resumed run) uses the same value."""
    if not _noisy_counts(context):
        return train_rows
    released = released_in(dict(context.memory), 0).get("rows")
    if isinstance(released, bool) or not isinstance(released, int):
        raise AnalysisError("this site recorded no noisy row count in round 0 of this task")
    return max(released, 1)


def _require_dp_for_sampling(params: FLParams) -> None:
    """sample_fraction below 1 only with DP: the researcher picks the seed, hence each round's
    draw, and from round 2 on the weights, so three rounds drawing {a, b}, {b, c}, {a, c} at
    one weight vector would solve for each site's own update (under DP-SGD it is private)."""
    if params.sample_fraction < 1 and params.dp is None:
        raise DisclosureRefused("sample_fraction_needs_dp", f"sample_fraction below 1 needs dp (got "
                                                            f"{params.sample_fraction:g}): without DP-SGD, rounds "
                                                            f"drawing different sites would give each site's own "
                                                            f"update")


def _require_planned_budget(params: FLParams, context: SiteContext, train_rows: int) -> None:
    """Round 0 under DP: refuse (`dp_budget_exhausted`) a training whose planned charges at this
    site exceed what is left of the researcher's budget here (the whole budget where the node does
    not say); every round's charge is checked again by the node, so a training that outruns the
    budget (another task spending it meanwhile) stops there."""
    planned = planned_rho(params, context.site, context.data_sites or (context.site,), train_rows)
    left = context.policy.dp_budget_rho if context.privacy_remaining is None else context.privacy_remaining
    if planned > left * (1 + 1e-12):
        raise DisclosureRefused("dp_budget_exhausted", f"the planned training charges rho={planned:g} at this "
                                                       f"site, more than the {left:g} left of the budget: fewer "
                                                       f"rounds, epochs or steps, or a larger noise_multiplier")


@register
class FederatedTraining(Analysis[FLParams]):
    name = "fl_train"
    Params = FLParams
    reads_images = True  # image mode names the labels' file column
    supports_dp = True  # DP-SGD and noisy validation sums, charged through context.charge_privacy

    def parse_params(self, raw: dict[str, Any]) -> FLParams:
        """Typed parameters whose model is registered here (`unknown_model`), whose
        hyperparameters the recipe's schema accepts (a ValidationError: `invalid_parameters`),
        whose recipe reads what the parameters give it (`model_input_mismatch`) and which sample
        sites only with DP (`sample_fraction_needs_dp`)."""
        params = super().parse_params(raw)
        _require_dp_for_sampling(params)
        hyper_of(params)
        reads = recipe_of(params).inputs
        if (params.image is not None) != (reads == "image"):
            given = "an image column" if params.image is not None else "tabular features"
            raise DisclosureRefused("model_input_mismatch", f"model {params.key} reads {reads} inputs, "
                                                            f"the parameters give {given}")
        return params

    def variables(self, params: FLParams) -> list[str]:
        return sorted({*params.features, params.target, *([params.image] if params.image else [])})

    def row_sets(self, params: FLParams, data: pd.DataFrame, round_no: int = 0,
                 broadcast: dict[str, Any] | None = None, policy: DisclosurePolicy | None = None
                 ) -> list[np.ndarray]:
        """Round 0: the complete rows, the training rows and the validation rows (`split_rows`),
        as masks over `data`'s rows; the guard then refuses a task whose split differs from an
        earlier one's by a few rows (nested hold-outs of two validation fractions or seeds would
        otherwise give those rows' labels and features from two tasks' validation sums). Later
        rounds rest on the same rows."""
        if round_no != 0:
            return []
        complete = _complete_rows(params, data)
        positions = np.flatnonzero(complete)
        masks = [complete]
        for part in split_rows(len(positions), params.validation_fraction, params.seed):
            mask = np.zeros(len(data), dtype=bool)
            mask[positions[part]] = True
            masks.append(mask)
        return masks

    def progress(self, params: FLParams, state: dict[str, Any]) -> tuple[int, int] | None:
        return len(state.get("history", {}).get("round", [])), params.final_round

    def check_broadcast(self, params: FLParams, round_no: int, broadcast: dict[str, Any],
                        memory: dict[str, Any]) -> None:
        """Round 0: nothing. Rounds 1..final: exactly {"weights"}, finite, of the model's size,
        each at most MAX_WEIGHT in magnitude; in round 1, exactly the initial weights of the agreed seed. No round after the last."""
        if round_no == 0:
            super().check_broadcast(params, round_no, broadcast, memory)
            return
        if round_no > params.final_round:
            raise BroadcastRefused("rounds_exceeded", f"fl_train has {params.final_round} rounds, "
                                                      f"not {round_no}")
        if set(broadcast) != {"weights"}:
            raise BroadcastRefused("broadcast_malformed", f"round {round_no} of fl_train expects ['weights'], "
                                                          f"got {sorted(map(str, broadcast))[:10]}")
        if round_no == 1 or "fl_size" not in memory:
            initial = initial_weights(params)
            memory["fl_size"] = int(initial.size)
        weights = finite_array(broadcast["weights"], (memory["fl_size"],))
        if weights.size and float(np.max(np.abs(weights))) > MAX_WEIGHT:
            raise BroadcastRefused("broadcast_malformed", f"round {round_no}'s weights exceed {MAX_WEIGHT:g} in "
                                                          f"magnitude (no honest training reaches that)")
        if round_no == 1 and not np.array_equal(weights, initial):
            raise BroadcastRefused("broadcast_not_initial", "round 1's weights are not the initial weights of "
                                                            "the agreed seed")

    def local(self, params: FLParams, round_no: int, broadcast: dict[str, Any], context: SiteContext) -> Release:
        if params.key not in context.study_models:
            raise DisclosureRefused("model_not_approved", f"model {params.key} is not approved for this study")
        if context.dp_required and params.dp is None:
            raise DisclosureRefused("dp_required", "this study releases only differentially private results: "
                                                   "train with dp={noise_multiplier, max_grad_norm, delta}")
        _require_dp_for_sampling(params)
        if params.dp is not None and context.charge_privacy is None:
            raise AnalysisError("this node cannot charge differential privacy to a budget")
        rows = site_rows(params, context)
        train_rows = len(rows.y_train)
        if params.dp is not None and not params.dp.delta < 1.0 / train_rows:
            raise DisclosureRefused("dp_delta_too_large", f"delta={params.dp.delta:g} is not below 1 / "
                                                          f"{train_rows} (this site's training rows)")
        sites = context.data_sites or (context.site,)
        if round_no == 0:
            if params.dp is not None:
                _require_planned_budget(params, context, train_rows)
            return Release(public={**_round_zero_counts(context, rows), "inputs": n_inputs(params)})
        from medveil.models import evaluate, train_local

        weights = finite_array(broadcast["weights"], (int(context.memory.get("fl_size", -1)),))
        recipe, hyper = recipe_of(params), hyper_of(params)
        rho = 0.0 if params.dp is None else round_rho(params, round_no, context.site, sites, train_rows)
        if rho > 0:
            # The whole round is paid before anything is computed from the rows: no outcome of it
            # (a refusal after a crafted broadcast included) is a free answer about them.
            context.charge_privacy(rho)
        sums: dict[str, np.ndarray] = {}
        public: dict[str, Any] = {}
        if params.validation_fraction > 0:
            evaluated = evaluate(recipe, hyper, weights, rows.X_val, rows.y_val, classes=params.classes, bins=BINS)
            if params.dp is not None:
                evaluated, _ = noised_validation(evaluated, params.dp.noise_multiplier)
            sums.update({VALIDATION_PREFIX + key: np.asarray(value) for key, value in evaluated.items()})
        if round_no <= params.rounds:
            if context.site in drawn_sites(sites, params.sample_fraction, params.seed, round_no):
                dp, seed = None, round_seed(params.seed, round_no)
                if params.dp is not None:
                    from medveil.models.training import DPSGD

                    dp = DPSGD(noise_multiplier=params.dp.noise_multiplier, max_grad_norm=params.dp.max_grad_norm)
                    # DP-SGD's noise and Poisson sample must be secret: drawn from the researcher's seed, the
                    # researcher could replay the noise and subtract it. The site draws its own 63-bit seed.
                    seed = secrets.randbits(63)
                update = train_local(recipe, hyper, weights, rows.X_train, rows.y_train, epochs=params.local_epochs,
                                     batch_size=params.batch_size, lr=params.lr, algorithm=params.algorithm,
                                     mu=params.mu, seed=seed, classes=params.classes, dp=dp,
                                     measure_loss=params.dp is None)
                trained = np.asarray(update.weights, dtype=np.float64)
                loss = 0.0 if update.loss_before is None else float(update.loss_before)
                if not (np.all(np.isfinite(trained)) and np.isfinite(loss)):
                    raise AnalysisError("local training diverged (weights or loss not finite): lower the learning rate")
                if params.dp is not None and int(update.steps) != dp_steps_per_round(params, train_rows):
                    raise AnalysisError(f"DP-SGD took {update.steps} steps, not the "
                                        f"{dp_steps_per_round(params, train_rows)} charged; nothing is released")
                n = _fedavg_rows(context, int(update.rows))
                sums.update({"weighted": n * trained, "rows": np.array([n], dtype=np.int64)})
                if params.dp is None:
                    sums["loss"] = np.array([n * loss])
                else:
                    public.update({"dp_steps": int(update.steps), "dp_sample_rate": float(update.sample_rate)})
            else:
                sums.update({"weighted": np.zeros_like(weights), "rows": np.zeros(1, dtype=np.int64)})
                if params.dp is None:
                    sums["loss"] = np.zeros(1)
        return Release(sums=sums, public=public)

    def global_step(self, params: FLParams, round_no: int, aggregated: Aggregated,
                    state: dict[str, Any]) -> NextRound | Finished:
        if round_no == 0:
            weights = initial_weights(params)
            # a DP-only study's noisy round-0 counts are charged too (one Gaussian count release)
            accounts = {site: {"rho": _site_accounting(aggregated.public[site])[0], "steps": 0, "sample_rate": None,
                               "evaluations": 0} for site in aggregated.sites}
            for account in accounts.values():
                account["count_rho"] = account["rho"]
            return NextRound({"weights": weights}, {"weights": weights, "history": {key: [] for key in HISTORY},
                                                    "accounts": accounts})
        history = {key: list(values) for key, values in state["history"].items()}
        accounts = {site: dict(account) for site, account in state["accounts"].items()}
        noisy = params.dp is not None
        for site, facts in aggregated.public.items():
            rho, steps, rate = _site_accounting(facts)
            account = accounts.setdefault(site, {"rho": 0.0, "steps": 0, "sample_rate": None, "evaluations": 0})
            account["rho"] += rho
            account["steps"] += steps
            if rate is not None:
                account["sample_rate"] = rate
            if noisy and params.validation_fraction > 0:
                account["evaluations"] += 1
        metrics = validation_metrics(aggregated.sums, noisy=noisy)
        training = round_no <= params.rounds
        rows = int(round(float(aggregated.sums["rows"][0]))) if training else 0
        if training and rows <= 0:
            raise AnalysisError("no rows took part in this round")
        history["round"].append(round_no)
        history["rows"].append(rows)
        history["train_loss"].append(float(aggregated.sums["loss"][0]) / rows if training and not noisy else math.nan)
        evaluated = aggregated.sums.get(VALIDATION_PREFIX + "rows")
        history["val_rows"].append(0 if evaluated is None else max(int(np.rint(float(evaluated[0]))), 0))
        for key in ("loss", "accuracy", "auc", "ece"):
            history[f"val_{key}"].append(float(metrics[key]) if metrics else math.nan)
        weights = (np.asarray(aggregated.sums["weighted"], dtype=np.float64) / rows if training
                   else np.asarray(state["weights"], dtype=np.float64))
        next_state = {"weights": weights, "history": history, "accounts": accounts}
        if round_no < params.final_round:
            return NextRound({"weights": weights}, next_state)
        hyper = hyper_of(params).model_dump(mode="json")
        calibration = None if metrics is None else pd.DataFrame(metrics["calibration"])
        return Finished(FLResult(model={"name": params.model, "version": params.version, "hyper": hyper},
                                 features=list(params.features), target=params.target, weights=weights,
                                 history=pd.DataFrame(history, columns=list(HISTORY)), image=params.image,
                                 classes=params.classes, calibration=calibration,
                                 privacy=None if params.dp is None else privacy_table(params, accounts)))
