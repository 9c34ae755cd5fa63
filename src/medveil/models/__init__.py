"""Models for federated learning: a registry of named, versioned recipes (built-ins and
site-installed plugins) and local training over flat weight vectors.

Pure layer: no runtime, API or CLI imports, and torch is imported only inside the functions that
build or train a network, so `import medveil.models` works without torch.
"""

from medveil.models.builtin import BUILTIN_RECIPES, LOGISTIC, MLP, MLPHyper, NoHyper
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
    build_module,
    evaluate,
    flatten,
    init_weights,
    load_flat,
    n_parameters,
    parse_hyper,
    predict_logits,
    shapes,
    train_local,
)

for _recipe in BUILTIN_RECIPES:
    register_model(_recipe)

__all__ = [
    "BUILTIN_RECIPES", "ENTRY_POINT_GROUP", "LOGISTIC", "MLP", "MLPHyper", "ModelRecipe", "NoHyper",
    "UnknownModel", "build_module", "evaluate", "flatten", "get_model", "init_weights", "load_flat",
    "load_plugins", "n_parameters", "parse_hyper", "predict_logits", "register_model",
    "registered_models", "shapes", "train_local",
]
