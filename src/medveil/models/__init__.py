"""Models for federated learning: a registry of named, versioned recipes (built-ins and
site-installed plugins), local training (plain SGD or DP-SGD) over flat weight vectors, and
pooled evaluation metrics from sums over rows.

Pure layer: no runtime, API or CLI imports, and torch and Opacus are imported only inside the
functions that build, train or evaluate a network, so `import medveil.models` works without them.
"""

from medveil.models.builtin import (
    BUILTIN_RECIPES,
    CNN,
    LOGISTIC,
    MLP,
    RESNET18,
    CNNHyper,
    MLPHyper,
    NoHyper,
    ResNet18Hyper,
)
from medveil.models.metrics import bin_sums, binned_auc, pooled_metrics, score_bins
from medveil.models.registry import (
    ENTRY_POINT_GROUP,
    ModelRecipe,
    UnknownModel,
    get_model,
    load_plugins,
    register_model,
    registered_models,
)
from medveil.models.training import (
    DPSGD,
    MAX_ROW_LOSS,
    LazyRows,
    LocalUpdate,
    build_module,
    evaluate,
    flatten,
    init_weights,
    load_flat,
    model_inputs,
    n_parameters,
    outputs_for,
    parse_hyper,
    predict_logits,
    shapes,
    train_local,
)

for _recipe in BUILTIN_RECIPES:
    register_model(_recipe)

__all__ = [
    "BUILTIN_RECIPES",
    "CNN",
    "DPSGD",
    "ENTRY_POINT_GROUP",
    "LOGISTIC",
    "MAX_ROW_LOSS",
    "MLP",
    "RESNET18",
    "CNNHyper",
    "LazyRows",
    "LocalUpdate",
    "MLPHyper",
    "ModelRecipe",
    "NoHyper",
    "ResNet18Hyper",
    "UnknownModel",
    "bin_sums",
    "binned_auc",
    "build_module",
    "evaluate",
    "flatten",
    "get_model",
    "init_weights",
    "load_flat",
    "load_plugins",
    "model_inputs",
    "n_parameters",
    "outputs_for",
    "parse_hyper",
    "pooled_metrics",
    "predict_logits",
    "register_model",
    "registered_models",
    "score_bins",
    "shapes",
    "train_local",
]
