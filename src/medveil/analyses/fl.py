"""fl_train: horizontal federated learning (FedAvg, FedProx) of a registered model over secure aggregation.

The sites train only a model recipe installed at the site (`medveil.models`: a name and a
version, never code) and approved by the study (`StudySpec.models`, "name@version"); the
researcher sends the name and hyperparameters as data, which the site validates against the
recipe's own schema. Round 0 checks the table (numeric features, a 0/1 target, enough rows)
and counts rows; the researcher then makes the initial weights from the seed
(`medveil.models.init_weights`, the same at every site, which checks round 1's broadcast
against it). In every later round each site trains from the broadcast global weights for
`local_epochs` with plain SGD (FedProx adds mu/2 ||w - w_global||^2) and releases, summed
across sites, n_k * w_k, n_k and n_k times its mean loss before training; the new global
weights are sum(n_k w_k) / sum(n_k). With one full-batch step per round this is exactly
gradient descent on the pooled rows.

Secure aggregation: the sums are fixed-point encoded (round(x * 2**52) in a 112-bit two's
complement ring, crypto/secagg.py), so each n_k * w_k is carried to 2**-53 absolute (exactly,
once |n_k w_k| >= 1) and the sum over sites is exact in the ring; a value above 2**50 in
magnitude (e.g. weights of 1e9 at 1e6 rows, a diverged training) is refused (`secagg_overflow`
or `analysis_error`) rather than wrapped.

What each party learns: the researcher learns, per round, the row-weighted sum of the sites'
trained weights, the total rows and the pooled mean training loss (hence the global model and
its loss curve), and, per site, its row count (round 0); a site learns the parameters and the
global weights of every round; the hub learns nothing beyond masked vectors.

Residual risk: from round 2 on the researcher chooses the broadcast weights, and the pooled
update at weights of its choosing is a pooled gradient, from which crafted weights (e.g. a ReLU
unit active on one row only) can reconstruct a row exactly when it stands alone in a site's
batch ("Robbing the Fed", Fowl et al. 2022). Sites check only that the weights are finite, of
the model's size, and the agreed initial ones in round 1; DP-SGD (issue 12) is the defence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field, model_validator

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


class FLParams(Params):
    model: str = Field(pattern=MODEL_NAME, description="a model recipe registered at the sites")
    version: str = Field("1", pattern=MODEL_VERSION)
    features: list[str] = Field(min_length=1, max_length=500)
    target: str = Field(pattern=COLUMN, description="a 0/1 column")
    hyper: dict[str, Any] = Field(default_factory=dict, description="checked against the recipe's Hyper schema")
    rounds: int = Field(10, ge=1, le=1000)
    local_epochs: int = Field(1, ge=1, le=100)
    batch_size: int | None = Field(None, ge=1, le=65536, description="None: full batch")
    lr: float = Field(0.1, gt=0, le=10)
    algorithm: Literal["fedavg", "fedprox"] = "fedavg"
    mu: float = Field(0.0, ge=0, le=100, description="FedProx's proximal weight")
    seed: int = Field(0, ge=0, le=MAX_SEED)

    @model_validator(mode="after")
    def _distinct_columns(self) -> FLParams:
        if any(not isinstance(name, str) or not 1 <= len(name) <= 200 for name in self.features):
            raise ValueError("features must be column names of 1 to 200 characters")
        if len(set(self.features)) != len(self.features) or self.target in self.features:
            raise ValueError("features must be distinct and must not include the target")
        return self

    @property
    def key(self) -> str:
        return f"{self.model}@{self.version}"


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


def initial_weights(params: FLParams) -> np.ndarray:
    """Round 1's global weights: the recipe's deterministic initialisation from the seed."""
    from medveil.models import init_weights

    recipe, hyper = recipe_of(params), hyper_of(params)
    return np.asarray(init_weights(recipe, len(params.features), hyper, params.seed), dtype=np.float64)


def round_seed(seed: int, round_no: int) -> int:
    """The shuffling seed of one round (the same at every site; a different stream every round)."""
    return (seed * 1_000_003 + round_no) % MAX_SEED


def _require_isolated_classes(y: np.ndarray, policy: DisclosurePolicy) -> None:
    """Each class holds none or at least min_cell_count rows: a site's lone positive would
    otherwise stand alone behind its share of every gradient."""
    positives = int(np.count_nonzero(y))
    negatives = len(y) - positives
    if 0 < positives < policy.min_cell_count or 0 < negatives < policy.min_cell_count:
        raise DisclosureRefused("indicator_isolation", f"a class of the target holds fewer than "
                                                       f"{policy.min_cell_count} rows at this site")


def site_design(params: FLParams, data: pd.DataFrame, policy: DisclosurePolicy) -> tuple[np.ndarray, np.ndarray, int]:
    """(X float32, y float32, rows dropped for missing values) from the site's complete rows."""
    frame = data[[*params.features, params.target]]
    for name in frame.columns:
        if not (pd.api.types.is_numeric_dtype(frame[name]) or pd.api.types.is_bool_dtype(frame[name])):
            raise AnalysisError(f"column {name!r} is not numeric (dtype {frame[name].dtype})")
    complete = frame.dropna().astype(np.float64)
    x = complete[params.features].to_numpy(np.float64)
    y = complete[params.target].to_numpy(np.float64)
    if not np.all(np.isfinite(x)):
        raise AnalysisError("a feature has values that are not finite")
    if not np.all((y == 0) | (y == 1)):
        raise AnalysisError(f"the target {params.target!r} must be 0 or 1")
    require_min_count(len(y), policy, "this site's training set")
    _require_isolated_classes(y, policy)
    return x.astype(np.float32), y.astype(np.float32), len(frame) - len(complete)


@dataclass(frozen=True, eq=False)
class FLResult:
    """A federated model: its recipe (name, version, hyperparameters), final flat weights, the
    training history (round, train_loss: the pooled mean loss before that round's local
    training, rows) and provenance."""

    model: dict[str, Any]
    features: list[str]
    target: str
    weights: np.ndarray
    history: pd.DataFrame
    provenance: dict[str, Any] = field(default_factory=dict)

    def _recipe(self) -> ModelRecipe:
        from medveil.models import get_model

        return get_model(self.model["name"], self.model["version"])

    def module(self):
        """The trained torch module, rebuilt from the recipe installed here, in eval mode."""
        from medveil.models import build_module, load_flat

        module = build_module(self._recipe(), len(self.features), self.model["hyper"])
        load_flat(module, self.weights)
        return module.eval()

    def state_dict(self) -> dict[str, Any]:
        """The trained weights as a torch state dict."""
        return self.module().state_dict()

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        """P(target = 1) for each row of `frame` (which holds the feature columns)."""
        from medveil.models import predict_logits

        logits = predict_logits(self._recipe(), self.model["hyper"], self.weights,
                                frame[self.features].to_numpy(np.float32))
        return 1.0 / (1.0 + np.exp(-logits))

    def plot(self, path: str | Path | None = None):
        """The training loss by round (a matplotlib Figure), saved to `path` if given."""
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(6, 4))
        axes.plot(self.history["round"], self.history["train_loss"], marker="o")
        axes.set_xlabel("round")
        axes.set_ylabel("training loss (pooled mean, before the round)")
        axes.set_title(f"{self.model['name']}@{self.model['version']}: federated training")
        if path is not None:
            figure.savefig(path, bbox_inches="tight")
        return figure


@register
class FederatedTraining(Analysis[FLParams]):
    name = "fl_train"
    Params = FLParams

    def parse_params(self, raw: dict[str, Any]) -> FLParams:
        """Typed parameters whose model is registered here (`unknown_model`) and whose
        hyperparameters the recipe's schema accepts (a ValidationError: `invalid_parameters`)."""
        params = super().parse_params(raw)
        hyper_of(params)
        return params

    def variables(self, params: FLParams) -> list[str]:
        return sorted({*params.features, params.target})

    def progress(self, params: FLParams, state: dict[str, Any]) -> tuple[int, int] | None:
        return len(state.get("history", {}).get("round", [])), params.rounds

    def check_broadcast(self, params: FLParams, round_no: int, broadcast: dict[str, Any],
                        memory: dict[str, Any]) -> None:
        """Round 0: nothing. Later: exactly {"weights"}, finite, of the model's size; in round 1,
        exactly the initial weights of the agreed seed."""
        if round_no == 0:
            super().check_broadcast(params, round_no, broadcast, memory)
            return
        if set(broadcast) != {"weights"}:
            raise BroadcastRefused("broadcast_malformed", f"round {round_no} of fl_train expects ['weights'], "
                                                          f"got {sorted(map(str, broadcast))[:10]}")
        if round_no == 1 or "fl_size" not in memory:
            initial = initial_weights(params)
            memory["fl_size"] = int(initial.size)
        weights = finite_array(broadcast["weights"], (memory["fl_size"],))
        if round_no == 1 and not np.array_equal(weights, initial):
            raise BroadcastRefused("broadcast_not_initial", "round 1's weights are not the initial weights of "
                                                            "the agreed seed")

    def local(self, params: FLParams, round_no: int, broadcast: dict[str, Any], context: SiteContext) -> Release:
        if params.key not in context.study_models:
            raise DisclosureRefused("model_not_approved", f"model {params.key} is not approved for this study")
        x, y, dropped = site_design(params, context.data, context.policy)
        if round_no == 0:
            return Release(public={"rows": len(y), "rows_dropped": public_count(dropped, context.policy),
                                   "inputs": len(params.features)})
        from medveil.models import train_local

        weights = finite_array(broadcast["weights"], (int(context.memory.get("fl_size", -1)),))
        recipe, hyper = recipe_of(params), hyper_of(params)
        trained, loss, rows = train_local(
            recipe, hyper, weights, x, y, epochs=params.local_epochs, batch_size=params.batch_size,
            lr=params.lr, algorithm=params.algorithm, mu=params.mu, seed=round_seed(params.seed, round_no))
        trained = np.asarray(trained, dtype=np.float64)
        if not (np.all(np.isfinite(trained)) and np.isfinite(loss)):
            raise AnalysisError("local training diverged (weights or loss not finite): lower the learning rate")
        return Release(sums={"weighted": rows * trained, "rows": np.array([rows], dtype=np.int64),
                             "loss": np.array([rows * float(loss)])})

    def global_step(self, params: FLParams, round_no: int, aggregated: Aggregated,
                    state: dict[str, Any]) -> NextRound | Finished:
        if round_no == 0:
            weights = initial_weights(params)
            history = {"round": [], "train_loss": [], "rows": []}
            return NextRound({"weights": weights}, {"weights": weights, "history": history})
        rows = int(round(float(aggregated.sums["rows"][0])))
        if rows <= 0:
            raise AnalysisError("no rows took part in this round")
        weights = np.asarray(aggregated.sums["weighted"], dtype=np.float64) / rows
        history = {key: list(values) for key, values in state["history"].items()}
        history["round"].append(round_no)
        history["train_loss"].append(float(aggregated.sums["loss"][0]) / rows)
        history["rows"].append(rows)
        if round_no < params.rounds:
            return NextRound({"weights": weights}, {"weights": weights, "history": history})
        hyper = hyper_of(params).model_dump(mode="json")
        return Finished(FLResult(model={"name": params.model, "version": params.version, "hyper": hyper},
                                 features=list(params.features), target=params.target, weights=weights,
                                 history=pd.DataFrame(history)))

