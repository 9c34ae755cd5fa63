"""Vertical logistic GLM, medveil vs statsmodels on the joined table, in the same run.

Synthetic logistic data: a label holder with the response and `--label` features (plus the
intercept), a feature holder with `--features` features, a dealer with no table; the tables
share one row order (aligned=None). Federated: `fed.vertical_glm` over loopback HTTP
(`Federation.simulate`, threads); the timer covers the fit call only (federation already up).
Peer: statsmodels GLM (IRLS) on the joined DataFrame.

    python benchmarks/vertical.py [--rows 100000] [--label 10] [--features 10]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import statsmodels.api as sm

import medveil as mv


def make_data(rows: int, label: int, features: int, seed: int = 2026) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, label + features))
    beta = rng.normal(scale=0.3, size=label + features)
    y = rng.random(rows) < 1 / (1 + np.exp(-(x @ beta - 0.5)))
    label_table = pd.DataFrame(x[:, :label], columns=[f"l{i}" for i in range(label)])
    label_table["y"] = y.astype(np.int8)
    feature_table = pd.DataFrame(x[:, label:], columns=[f"f{i}" for i in range(features)])
    return label_table, feature_table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--label", type=int, default=10)
    parser.add_argument("--features", type=int, default=10)
    args = parser.parse_args()
    label_table, feature_table = make_data(args.rows, args.label, args.features)
    formula = "y ~ " + " + ".join(list(label_table.columns[:-1]) + list(feature_table.columns))
    sites = {"hospital": label_table, "lab": feature_table, "dealer": {}}
    roles = {"hospital": "label_holder", "lab": "feature_holder", "dealer": "dealer"}
    with mv.Federation.simulate(sites, roles=roles, timeout=600, secure_aggregation=False) as fed:
        start = time.perf_counter()
        federated = fed.vertical_glm(formula, family="binomial")
        t_fed = time.perf_counter() - start
        rounds = federated.provenance.get("rounds")
    joined = pd.concat([label_table, feature_table], axis=1)
    exog = sm.add_constant(joined.drop(columns="y"))
    start = time.perf_counter()
    glm = sm.GLM(joined["y"], exog, family=sm.families.Binomial()).fit(tol=1e-12)
    t_glm = time.perf_counter() - start
    reference = glm.params.rename({"const": "Intercept"}).reindex(federated.params.index)
    reference_bse = glm.bse.rename({"const": "Intercept"}).reindex(federated.params.index)
    max_rel = float(np.max(np.abs(federated.params / reference - 1)))
    max_rel_bse = float(np.max(np.abs(federated.bse / reference_bse - 1)))
    print(f"vertical logistic GLM, {args.rows:,} rows x ({args.label} + {args.features}) features, "
          "label holder + feature holder + dealer, loopback HTTP")
    print(f"medveil fed.vertical_glm:   {t_fed:7.2f} s  ({federated.iterations} Newton iterations, {rounds} rounds)")
    print(f"statsmodels GLM (IRLS):     {t_glm:7.2f} s  ratio medveil/statsmodels {t_fed / t_glm:.1f}")
    print(f"max relative difference vs statsmodels: coefficients {max_rel:.1e}, standard errors {max_rel_bse:.1e}")


if __name__ == "__main__":
    main()
