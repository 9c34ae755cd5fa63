"""The built-in model recipes: logistic regression ("logistic" v1) and a multilayer perceptron
("mlp" v1), both binary classifiers giving one logit per row. torch is imported inside `build`
only, so the registry (and the node) import without it."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from medveil.models.registry import ModelRecipe

MAX_INPUTS = 100_000


class NoHyper(BaseModel):
    """Logistic regression has no hyperparameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class MLPHyper(BaseModel):
    """A multilayer perceptron's shape: 1..4 hidden layers of 1..4096 units each."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    hidden: list[Annotated[int, Field(strict=True, ge=1, le=4096)]] = Field(
        default_factory=lambda: [32], min_length=1, max_length=4)
    dropout: float = Field(default=0.0, ge=0.0, le=0.9)
    activation: Literal["relu", "tanh"] = "relu"


def _check_inputs(n_inputs: int) -> int:
    if isinstance(n_inputs, bool) or not isinstance(n_inputs, int) or not 1 <= n_inputs <= MAX_INPUTS:
        raise ValueError(f"n_inputs must be an int in 1..{MAX_INPUTS}, got {n_inputs!r}")
    return n_inputs


def build_logistic(n_inputs: int, hyper: NoHyper):
    """One linear layer: logit = x @ w + b, shape (rows,)."""
    from torch import nn

    return nn.Sequential(nn.Linear(_check_inputs(n_inputs), 1), nn.Flatten(start_dim=0))


def build_mlp(n_inputs: int, hyper: MLPHyper):
    """Linear, activation and dropout per hidden layer, then a linear layer to one logit per row."""
    from torch import nn

    activation = {"relu": nn.ReLU, "tanh": nn.Tanh}[hyper.activation]
    layers: list[nn.Module] = []
    width = _check_inputs(n_inputs)
    for units in hyper.hidden:
        layers += [nn.Linear(width, units), activation()]
        if hyper.dropout > 0:
            layers.append(nn.Dropout(hyper.dropout))
        width = units
    layers += [nn.Linear(width, 1), nn.Flatten(start_dim=0)]
    return nn.Sequential(*layers)


LOGISTIC = ModelRecipe(
    name="logistic", version="1", Hyper=NoHyper, build=build_logistic,
    description="Logistic regression: one linear layer, one logit per row.")
MLP = ModelRecipe(
    name="mlp", version="1", Hyper=MLPHyper, build=build_mlp,
    description="Multilayer perceptron: 1..4 hidden layers (relu or tanh, optional dropout), one logit per row.")
BUILTIN_RECIPES = (LOGISTIC, MLP)
