"""GLMResults: read-only statsmodels-like results of a federated GLM, built from sums only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats


@dataclass(frozen=True)
class GLMResults:
    """Coefficients and fit statistics as statsmodels' GLMResults names them; no row-level data."""

    formula: str
    family: str
    params: pd.Series
    cov_params_matrix: pd.DataFrame
    scale: float
    nobs: float
    df_model: float
    df_resid: float
    deviance: float
    null_deviance: float
    pearson_chi2: float
    llf: float
    converged: bool
    iterations: int
    provenance: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_sums(cls, *, params: Any, beta: np.ndarray, xtwx: np.ndarray, columns: list[str], nobs: float,
                  sum_log_weights: float, deviance: float, null_deviance: float, pearson: float, ssr: float, loglike: float,
                  iterations: int, converged: bool, family: Any) -> "GLMResults":
        rank = int(np.linalg.matrix_rank(xtwx))
        df_resid = nobs - rank
        gaussian = params.family == "gaussian"
        scale = pearson / df_resid if gaussian else 1.0
        if gaussian:
            scale_llf = ssr / nobs
            llf = -0.5 * (ssr / scale_llf + nobs * np.log(scale_llf) - sum_log_weights + nobs * np.log(2 * np.pi))
        else:
            llf = loglike
        cov = np.linalg.pinv(xtwx) * scale
        return cls(
            formula=params.formula, family=params.family, params=pd.Series(beta, index=columns),
            cov_params_matrix=pd.DataFrame(cov, index=columns, columns=columns), scale=scale, nobs=nobs,
            df_model=float(rank - 1), df_resid=float(df_resid), deviance=deviance, null_deviance=null_deviance,
            pearson_chi2=pearson, llf=float(llf), converged=converged, iterations=iterations,
        )

    @property
    def bse(self) -> pd.Series:
        return pd.Series(np.sqrt(np.diag(self.cov_params_matrix)), index=self.params.index)

    @property
    def tvalues(self) -> pd.Series:
        return self.params / self.bse

    @property
    def pvalues(self) -> pd.Series:
        return pd.Series(2 * stats.norm.sf(np.abs(self.tvalues)), index=self.params.index)

    @property
    def aic(self) -> float:
        return -2 * self.llf + 2 * (self.df_model + 1)

    @property
    def bic(self) -> float:
        """BIC from the log-likelihood, as statsmodels' `bic` (bic_llf)."""
        return -2 * self.llf + (self.df_model + 1) * np.log(self.nobs)

    def cov_params(self) -> pd.DataFrame:
        return self.cov_params_matrix

    def conf_int(self, alpha: float = 0.05) -> pd.DataFrame:
        quantile = stats.norm.ppf(1 - alpha / 2)
        return pd.DataFrame({0: self.params - quantile * self.bse, 1: self.params + quantile * self.bse})

    def summary(self) -> str:
        """A readable coefficient table with the fit statistics."""
        ci = self.conf_int()
        table = pd.DataFrame({"coef": self.params, "std err": self.bse, "z": self.tvalues,
                              "P>|z|": self.pvalues, "[0.025": ci[0], "0.975]": ci[1]})
        sites = self.provenance.get("sites", [])
        lines = [
            f"Federated GLM ({self.family})   {self.formula}",
            f"sites: {', '.join(sites) or '-'}   rows per site: {self.provenance.get('rows', {})}",
            f"No. observations: {self.nobs:.0f}   Df residuals: {self.df_resid:.0f}   Df model: {self.df_model:.0f}",
            f"Deviance: {self.deviance:.6g}   Null deviance: {self.null_deviance:.6g}   Pearson chi2: "
            f"{self.pearson_chi2:.6g}   Scale: {self.scale:.6g}",
            f"Log-likelihood: {self.llf:.6g}   AIC: {self.aic:.6g}   BIC: {self.bic:.6g}",
            f"Converged: {self.converged} after {self.iterations} IRLS iterations   secure aggregation: "
            f"{'on' if self.provenance.get('secure_aggregation') else 'off'}",
            "",
            table.to_string(float_format=lambda v: f"{v:.6g}"),
        ]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()
