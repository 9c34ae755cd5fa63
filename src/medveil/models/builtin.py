"""The built-in model recipes: logistic regression ("logistic" v1) and a multilayer perceptron
("mlp" v1) for tabular rows, a small convolutional network ("cnn" v1) and a ResNet-18-style
network ("resnet18" v1) for images. Each gives one logit per row for two classes and K logits
for K >= 3 classes. torch is imported inside `build` only, so the registry (and the node)
import without it.

The image networks normalise with GroupNorm, never BatchNorm: DP-SGD needs per-sample gradients
(BatchNorm mixes the rows of a batch) and FedAvg has no way to average running statistics.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from medveil.models.registry import ModelRecipe

MAX_INPUTS = 100_000
MAX_OUTPUTS = 1_000
MIN_IMAGE_SIZE = 8
MAX_IMAGE_SIZE = 512
GROUPS = 32  # GroupNorm groups at most (Wu and He's default)


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


class CNNHyper(BaseModel):
    """A small CNN: 1..4 blocks (3x3 convolution, GroupNorm, ReLU, 2x2 max-pool while the map is
    larger than 2x2, so every GroupNorm sees several pixels) of 1..256 channels each, global
    average pooling, dropout, a linear head."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    image_size: int = Field(default=32, strict=True, ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE)
    channels: Literal[1, 3] = 1
    widths: list[Annotated[int, Field(strict=True, ge=1, le=256)]] = Field(
        default_factory=lambda: [16, 32], min_length=1, max_length=4)
    dropout: float = Field(default=0.0, ge=0.0, le=0.9)


class ResNet18Hyper(BaseModel):
    """ResNet-18's shape: BasicBlocks [2, 2, 2, 2] of base_width, 2x, 4x and 8x channels. The
    "imagenet" stem is a 7x7 stride-2 convolution and a max-pool (as torchvision's), the "small"
    one a 3x3 stride-1 convolution (for images of a few dozen pixels); "auto" picks "imagenet"
    from 128 pixels up."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    image_size: int = Field(default=32, strict=True, ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE)
    channels: Literal[1, 3] = 1
    base_width: int = Field(default=64, strict=True, ge=4, le=128)
    stem: Literal["auto", "small", "imagenet"] = "auto"


def _check_count(what: str, value: int, most: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise ValueError(f"{what} must be an int in 1..{most}, got {value!r}")
    return value


def _check_outputs(outputs: int) -> int:
    outputs = _check_count("outputs", outputs, MAX_OUTPUTS)
    if outputs == 2:
        raise ValueError("outputs must be 1 (two classes, one logit) or K >= 3")
    return outputs


def _check_channels(n_inputs: int, hyper: CNNHyper | ResNet18Hyper) -> int:
    if n_inputs != hyper.channels:
        raise ValueError(f"an image model built for {hyper.channels} channel(s) got n_inputs={n_inputs!r}")
    return n_inputs


def _head(width: int, outputs: int) -> list:
    """A linear layer to the logits; with one output the trailing axis is dropped: (rows,)."""
    from torch import nn

    return [nn.Linear(width, outputs)] + ([nn.Flatten(start_dim=0)] if outputs == 1 else [])


def _group_norm(channels: int):
    """GroupNorm with up to 32 groups of at least 2 channels each: on a 1x1 map (an 8-pixel image
    deep in the network) a one-channel group would normalise a single value to a constant."""
    from torch import nn

    return nn.GroupNorm(math.gcd(GROUPS, channels // 2) if channels >= 2 else 1, channels)


def build_logistic(n_inputs: int, hyper: NoHyper, outputs: int = 1):
    """One linear layer: logit = x @ w + b, shape (rows,) (multinomial: (rows, K))."""
    from torch import nn

    return nn.Sequential(*_head(_check_count("n_inputs", n_inputs, MAX_INPUTS), _check_outputs(outputs)))


def build_mlp(n_inputs: int, hyper: MLPHyper, outputs: int = 1):
    """Linear, activation and dropout per hidden layer, then a linear layer to the logits."""
    from torch import nn

    activation = {"relu": nn.ReLU, "tanh": nn.Tanh}[hyper.activation]
    layers: list[nn.Module] = []
    width = _check_count("n_inputs", n_inputs, MAX_INPUTS)
    outputs = _check_outputs(outputs)
    for units in hyper.hidden:
        layers += [nn.Linear(width, units), activation()]
        if hyper.dropout > 0:
            layers.append(nn.Dropout(hyper.dropout))
        width = units
    return nn.Sequential(*layers, *_head(width, outputs))


def build_cnn(n_inputs: int, hyper: CNNHyper, outputs: int = 1):
    """The small CNN of `CNNHyper` for (rows, channels, image_size, image_size) inputs."""
    from torch import nn

    width = _check_channels(n_inputs, hyper)
    outputs = _check_outputs(outputs)
    layers: list[nn.Module] = []
    size = hyper.image_size
    for channels in hyper.widths:
        layers += [nn.Conv2d(width, channels, 3, padding=1), _group_norm(channels), nn.ReLU()]
        if size > 2:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        width = channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if hyper.dropout > 0:
        layers.append(nn.Dropout(hyper.dropout))
    return nn.Sequential(*layers, *_head(width, outputs))


def _basic_block(width_in: int, width: int, stride: int):
    """ResNet's BasicBlock (two 3x3 convolutions and a shortcut) with GroupNorm."""
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(width_in, width, 3, stride=stride, padding=1, bias=False)
            self.norm1 = _group_norm(width)
            self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
            self.norm2 = _group_norm(width)
            self.relu = nn.ReLU()
            self.shortcut = (nn.Sequential(nn.Conv2d(width_in, width, 1, stride=stride, bias=False), _group_norm(width))
                             if stride != 1 or width_in != width else nn.Identity())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.relu(self.norm1(self.conv1(x)))
            return self.relu(self.norm2(self.conv2(out)) + self.shortcut(x))

    return BasicBlock()


def build_resnet18(n_inputs: int, hyper: ResNet18Hyper, outputs: int = 1):
    """ResNet-18 (He et al. 2016; torchvision's layout) with GroupNorm in place of BatchNorm."""
    from torch import nn

    width = _check_channels(n_inputs, hyper)
    outputs = _check_outputs(outputs)
    base = hyper.base_width
    stem = hyper.stem if hyper.stem != "auto" else ("imagenet" if hyper.image_size >= 128 else "small")
    if stem == "imagenet":
        layers: list[nn.Module] = [nn.Conv2d(width, base, 7, stride=2, padding=3, bias=False), _group_norm(base),
                                   nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1)]
    else:
        layers = [nn.Conv2d(width, base, 3, padding=1, bias=False), _group_norm(base), nn.ReLU()]
    width = base
    for stage, multiple in enumerate((1, 2, 4, 8)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(_basic_block(width, base * multiple, stride))
            width = base * multiple
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers, *_head(width, outputs))


LOGISTIC = ModelRecipe(
    name="logistic", version="1", Hyper=NoHyper, build=build_logistic,
    description="Logistic regression: one linear layer (multinomial for K >= 3 classes).")
MLP = ModelRecipe(
    name="mlp", version="1", Hyper=MLPHyper, build=build_mlp,
    description="Multilayer perceptron: 1..4 hidden layers (relu or tanh, optional dropout).")
CNN = ModelRecipe(
    name="cnn", version="1", Hyper=CNNHyper, build=build_cnn, inputs="image",
    description="Small CNN for images of 8..512 pixels: 1..4 convolution blocks with GroupNorm.")
RESNET18 = ModelRecipe(
    name="resnet18", version="1", Hyper=ResNet18Hyper, build=build_resnet18, inputs="image",
    description="ResNet-18-style network (BasicBlocks [2, 2, 2, 2], GroupNorm) for images of 8..512 pixels.")
BUILTIN_RECIPES = (LOGISTIC, MLP, CNN, RESNET18)
