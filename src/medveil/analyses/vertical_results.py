"""VerticalGLMResults: statsmodels-like results of a vertical GLM, with the site owning each coefficient."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pandas as pd

from medveil.analyses.glm_results import GLMResults


@dataclass(frozen=True)
class VerticalGLMResults(GLMResults):
    """GLMResults plus `owner`: coefficient name -> the site whose columns it belongs to."""

    owner: pd.Series | None = None

    def with_owner(self, owner: pd.Series) -> "VerticalGLMResults":
        return dataclasses.replace(self, owner=owner)

    def summary(self) -> str:
        """The GLM summary with a column naming each coefficient's site."""
        lines = super().summary().splitlines()
        lines[0] = lines[0].replace("Federated GLM", "Vertical GLM", 1)
        for index, line in enumerate(lines):  # no sums across sites here: the cross terms are secret-shared
            if line.startswith("Converged:"):
                lines[index] = line.split("   secure aggregation:")[0] + "   cross terms: secret-shared (dealer-correlated)"
        if self.owner is not None:
            sites = ", ".join(f"{site}: {count} coefficients" for site, count in self.owner.value_counts().sort_index().items())
            lines.insert(1, f"coefficients by site: {sites}")
        return "\n".join(lines)
