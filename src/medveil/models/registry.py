"""The model registry: named, versioned model recipes a study may approve and a site may train.

A researcher names a model ("mlp", version "1") and sends hyperparameters; the site builds the
network from its own installed recipe, never from anything the researcher sends, so no code
crosses the wire. Site-installed plugins join the registry through the entry-point group
"medveil.models"; a broken plugin is logged and skipped, never crashes the node.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "medveil.models"
MODEL_NAME = r"^[a-z][a-z0-9_\-]{0,63}$"
MODEL_VERSION = r"^[0-9A-Za-z][0-9A-Za-z.\-]{0,31}$"
MODEL_KEY = MODEL_NAME[:-1] + "@" + MODEL_VERSION[1:]  # "name@version", as a study lists a model
_NAME = re.compile(MODEL_NAME)
_VERSION = re.compile(MODEL_VERSION)


class UnknownModel(KeyError):
    """No registered recipe has this name (and version)."""

    def __str__(self) -> str:  # KeyError quotes its argument; a message reads better
        return str(self.args[0]) if self.args else "unknown model"


@dataclass(frozen=True)
class ModelRecipe:
    """How a site builds one named model version: its hyperparameter schema and its network.

    `Hyper` is a pydantic model (extra="forbid", bounded fields) that validates the researcher's
    hyperparameters; `build(n_inputs, hyper, outputs)` returns a torch module. `inputs` says what
    it reads: "tabular" rows (rows, n_inputs) of features, or "image" batches (rows, n_inputs
    channels, S, S) in [0, 1] with S = hyper.image_size (an image recipe's Hyper has `image_size`
    and `channels`). outputs = 1 gives one logit per row, shape (rows,) (binary); outputs = K >= 3
    gives (rows, K) logits.
    """

    name: str
    version: str
    Hyper: type[BaseModel]
    build: Callable[[int, Any, int], torch.nn.Module]
    description: str = ""
    inputs: Literal["tabular", "image"] = "tabular"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValueError(f"model name {self.name!r} must match {_NAME.pattern}")
        if not isinstance(self.version, str) or not _VERSION.fullmatch(self.version):
            raise ValueError(f"model version {self.version!r} must match {_VERSION.pattern}")
        if not (isinstance(self.Hyper, type) and issubclass(self.Hyper, BaseModel)):
            raise TypeError("Hyper must be a pydantic BaseModel subclass")
        if not callable(self.build):
            raise TypeError("build must be callable")
        if self.inputs not in ("tabular", "image"):
            raise ValueError(f"model inputs must be 'tabular' or 'image', got {self.inputs!r}")
        if self.inputs == "image" and not {"image_size", "channels"} <= set(self.Hyper.model_fields):
            raise TypeError("an image recipe's Hyper must have the fields image_size and channels")

    @property
    def key(self) -> str:
        """The "name@version" string a study lists to approve this recipe."""
        return f"{self.name}@{self.version}"


_recipes: dict[str, dict[str, ModelRecipe]] = {}
_lock = threading.RLock()
_plugins_loaded = False


def register_model(recipe: ModelRecipe) -> None:
    """Add a recipe; registering the same recipe again is a no-op, a different one under a taken
    name and version is refused (a plugin may not shadow a built-in)."""
    if not isinstance(recipe, ModelRecipe):
        raise TypeError(f"expected a ModelRecipe, got {type(recipe).__name__}")
    with _lock:
        versions = _recipes.setdefault(recipe.name, {})
        existing = versions.get(recipe.version)
        if existing is not None and existing != recipe:
            raise ValueError(f"model {recipe.key} is already registered")
        versions[recipe.version] = recipe


def _version_key(version: str) -> tuple:
    """Orders versions naturally: "10" after "9", "1.10" after "1.9"."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"[.\-]", version))


def get_model(name: str, version: str | None = None) -> ModelRecipe:
    """The recipe registered as `name` at `version` (None: the newest); `UnknownModel` if none."""
    load_plugins()
    with _lock:
        versions = _recipes.get(name) if isinstance(name, str) else None
        if not versions:
            raise UnknownModel(f"no model named {name!r} is registered")
        if version is None:
            return versions[max(versions, key=_version_key)]
        if not isinstance(version, str) or version not in versions:
            raise UnknownModel(f"model {name!r} has no version {version!r} (have: {sorted(versions)})")
        return versions[version]


def registered_models() -> list[tuple[str, str]]:
    """Every registered (name, version), sorted."""
    load_plugins()
    with _lock:
        return sorted(((n, v) for n, vs in _recipes.items() for v in vs), key=lambda nv: (nv[0], _version_key(nv[1])))


def load_plugins(entry_points: Iterable[metadata.EntryPoint] | None = None) -> list[str]:
    """Register the recipes that site-installed packages expose in the "medveil.models" group.

    Without `entry_points` this runs once per process (later calls return []); with them (tests,
    a node re-scanning) it loads exactly those. Each entry point must load to a ModelRecipe; one
    that fails to import, is not a recipe or collides with a registered one is logged and skipped.
    Returns the "name@version" keys it registered.
    """
    global _plugins_loaded
    with _lock:
        if entry_points is None:
            if _plugins_loaded:
                return []
            _plugins_loaded = True
            try:
                entry_points = metadata.entry_points(group=ENTRY_POINT_GROUP)
            except Exception:  # a corrupt installed distribution must not stop the node
                log.exception("could not list %s entry points", ENTRY_POINT_GROUP)
                return []
        loaded = []
        for entry_point in entry_points:
            try:
                recipe = entry_point.load()
                if not isinstance(recipe, ModelRecipe):
                    raise TypeError(f"loads a {type(recipe).__name__}, not a ModelRecipe")
                register_model(recipe)
            except Exception:  # any failure in third-party code: skip that plugin only
                log.exception("skipping model plugin %r (%s)", getattr(entry_point, "name", "?"),
                              getattr(entry_point, "value", "?"))
                continue
            loaded.append(recipe.key)
        return loaded
