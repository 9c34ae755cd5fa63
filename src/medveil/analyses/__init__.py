"""Registered analyses; each module holds one LOCAL + GLOBAL pair."""

from __future__ import annotations

import importlib

BUILTIN_MODULES = (
    "medveil.analyses.ping",
    "medveil.analyses.describe",
    "medveil.analyses.crosstab",
    "medveil.analyses.histogram",
    "medveil.analyses.glm",
    "medveil.analyses.survival",
    "medveil.analyses.cox",
    "medveil.analyses.gwas",
    "medveil.analyses.pca",
    "medveil.analyses.psi",
    "medveil.analyses.vertical",
    "medveil.analyses.fl",
    "medveil.analyses.beacon",
)


def load_builtin() -> None:
    """Import the built-in analysis modules so they register (no work at package import)."""
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
