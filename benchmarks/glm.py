"""Logistic GLM, federated vs statsmodels on the pooled rows, in the same run.

Federated: `fed.glm` over 3 sites (threads), secure aggregation on, loopback HTTP; the timer
covers the fit call only (federation already up). Peers: statsmodels GLM (IRLS) and Logit
(Newton) fitted on the pooled DataFrame. Coefficients are compared to the GLM's.

    python benchmarks/glm.py [--rows 1000000] [--covariates 20]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import statsmodels.api as sm

import medveil as mv


def make_data(rows: int, covariates: int, seed: int = 2026) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, covariates))
    beta = rng.normal(scale=0.3, size=covariates)
    y = rng.random(rows) < 1 / (1 + np.exp(-(x @ beta - 0.5)))
    frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(covariates)])
    frame["y"] = y.astype(np.int8)
    return frame


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--covariates", type=int, default=20)
    args = parser.parse_args()
    frame = make_data(args.rows, args.covariates)
    formula = "y ~ " + " + ".join(f"x{i}" for i in range(args.covariates))
    thirds = np.array_split(np.arange(args.rows), 3)
    sites = {f"site_{i}": frame.iloc[idx] for i, idx in enumerate(thirds)}
    with mv.Federation.simulate(sites, timeout=600) as fed:
        start = time.perf_counter()
        federated = fed.glm(formula, family="binomial")
        t_fed = time.perf_counter() - start
    exog = sm.add_constant(frame.drop(columns="y"))
    start = time.perf_counter()
    glm = sm.GLM(frame["y"], exog, family=sm.families.Binomial()).fit()
    t_glm = time.perf_counter() - start
    start = time.perf_counter()
    sm.Logit(frame["y"], exog).fit(disp=0)
    t_logit = time.perf_counter() - start
    reference = glm.params.rename({"const": "Intercept"}).reindex(federated.params.index)
    max_rel = float(np.max(np.abs(federated.params / reference - 1)))
    print(f"logistic GLM, {args.rows:,} rows x {args.covariates} covariates, 3 sites, secure aggregation on")
    print(f"federated fed.glm:          {t_fed:7.2f} s  ({federated.iterations} IRLS iterations)")
    print(f"statsmodels GLM (IRLS):     {t_glm:7.2f} s  ratio federated/GLM   {t_fed / t_glm:.2f}")
    print(f"statsmodels Logit (Newton): {t_logit:7.2f} s  ratio federated/Logit {t_fed / t_logit:.2f}")
    print(f"max relative difference of coefficients vs statsmodels GLM: {max_rel:.1e}")


if __name__ == "__main__":
    main()
