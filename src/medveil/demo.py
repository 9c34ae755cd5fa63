"""`medveil demo`: three hospitals hold disjoint shares of the GBSG2 breast-cancer study
(German Breast Cancer Study Group, 686 patients, shipped by lifelines); federated statistics
are printed beside the same statistics computed on the pooled data, then what the hub saw."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

import medveil as mv
from medveil.crypto.signing import VerifyKey
from medveil.runtime.audit import verify_audit_log

NUMERIC = ["age", "tsize", "pnodes", "progrec", "estrec", "time"]
GLM_FORMULA = "cens ~ age + C(tgrade) + pnodes + C(horTh)"
SHARES = (0.45, 0.35, 0.20)


def load_gbsg2() -> pd.DataFrame:
    try:
        from lifelines.datasets import load_gbsg2 as lifelines_gbsg2
    except ImportError as exc:
        raise SystemExit("the demo data ships with lifelines: pip install 'medveil[demo]'") from exc
    return lifelines_gbsg2()


def split_sites(frame: pd.DataFrame, n_sites: int, seed: int = 2026) -> dict[str, pd.DataFrame]:
    """Disjoint, uneven shares (largest hospital first), as a registry's members would hold."""
    shuffled = frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    weights = np.array(SHARES if n_sites == 3 else np.linspace(2, 1, n_sites))
    cuts = np.round(np.cumsum(weights / weights.sum())[:-1] * len(frame)).astype(int)
    bounds = [0, *cuts, len(frame)]
    return {f"hospital_{chr(97 + i)}": shuffled.iloc[bounds[i]:bounds[i + 1]] for i in range(n_sites)}


def run_demo(console: Console, n_sites: int = 3, show_traffic: int = 4) -> None:
    started = time.monotonic()
    console = Console(width=max(console.width, 120))
    pooled = load_gbsg2()
    sites = split_sites(pooled, n_sites)
    console.rule("[bold]medveil demo: GBSG2 breast-cancer study across hospitals")
    console.print(", ".join(f"{name}: {len(df)} patients" for name, df in sites.items())
                  + f" (pooled {len(pooled)}); raw rows never leave a hospital")
    with console.status("starting a hub and one node per hospital on loopback HTTP..."):
        fed = mv.Federation.simulate(sites, record_hub_traffic=True)
    with fed:
        console.print("each hospital enrolled at the hub by the operator's invitation; the study pins their "
                      "identity keys: " + ", ".join(f"{site} {VerifyKey.from_text(key).fingerprint()[:14]}..."
                                                     for site, key in fed.study.site_keys.items()))
        with console.status("federated describe (3 rounds)..."):
            described = fed.describe(NUMERIC)
        console.print(_describe_table(described, pooled))
        with console.status("federated crosstab..."):
            table = fed.crosstab("tgrade", "horTh")
        console.print(_crosstab_table(table, pd.crosstab(pooled["tgrade"], pooled["horTh"])))
        with console.status("federated histogram..."):
            hist = fed.histogram("age", list(range(20, 90, 10)))
        console.print(_histogram_table(hist, pooled["age"]))
        with console.status("federated logistic regression (distributed IRLS)..."):
            model = fed.glm(GLM_FORMULA, family="binomial")
        console.print(_glm_table(model, pooled))
        with console.status("federated Kaplan-Meier by hormone therapy..."):
            curves = fed.kaplan_meier("time", "cens", by="horTh")
        medians = curves.median_survival_time
        console.print("median recurrence-free survival (days), federated: "
                      + ", ".join(f"horTh={group}: {value:g}" for group, value in medians.items()))
        try:
            curves.plot("medveil-demo-km.png")
            console.print("Kaplan-Meier curves drawn to medveil-demo-km.png")
        except ImportError:
            pass
        console.print(_traffic_table(fed.hub_traffic(), show_traffic))
        provenance = described.attrs["provenance"]
        console.print(f"provenance of describe: sites {provenance['sites']}, rows {provenance['rows']}, "
                      f"secure aggregation {'on' if provenance['secure_aggregation'] else 'off'}, "
                      f"audit ids e.g. {provenance['audit_ids'][fed.sites[0]][:3]}")
        workdir = fed.network.workdir
        for site in fed.sites:
            entries = verify_audit_log(workdir / site / "state" / "audit.jsonl")
            console.print(f"audit log of {site}: {entries} entries, hash chain intact")
    console.rule(f"done in {time.monotonic() - started:.1f} s")


def _describe_table(fed: pd.DataFrame, pooled: pd.DataFrame) -> Table:
    table = Table(title="describe: federated vs pooled (pandas)")
    for column in ("variable", "n", "mean (fed)", "mean (pooled)", "sd (fed)", "sd (pooled)",
                   "median (fed, protected)", "median (pooled)", "max |diff| mean/sd"):
        table.add_column(column, justify="right")
    for name, row in fed.iterrows():
        values = pooled[name].dropna()
        diff = max(abs(row["mean"] - values.mean()), abs(row["sd"] - values.std()))
        table.add_row(name, str(int(row["n"])), f"{row['mean']:.10g}", f"{values.mean():.10g}", f"{row['sd']:.10g}",
                      f"{values.std():.10g}", f"{row['50%']:.4g}", f"{values.median():.4g}", f"{diff:.1e}")
    return table


def _glm_table(model, pooled: pd.DataFrame) -> Table:
    import statsmodels.api as sm

    reference = sm.GLM.from_formula(GLM_FORMULA, pooled, family=sm.families.Binomial()).fit()
    table = Table(title=f"logistic GLM {GLM_FORMULA}: federated vs statsmodels on the pooled rows")
    for column in ("term", "coef (fed)", "coef (statsmodels)", "se (fed)", "se (statsmodels)", "p (fed)"):
        table.add_column(column, justify="right")
    for name in model.params.index:
        table.add_row(name, f"{model.params[name]:.10f}", f"{reference.params[name]:.10f}",
                      f"{model.bse[name]:.8f}", f"{reference.bse[name]:.8f}", f"{model.pvalues[name]:.3g}")
    return table


def _crosstab_table(fed: pd.DataFrame, pooled: pd.DataFrame) -> Table:
    table = Table(title="crosstab tgrade x horTh: federated | pooled")
    table.add_column("tgrade")
    for column in fed.columns:
        table.add_column(f"{column} (fed)", justify="right")
        table.add_column(f"{column} (pooled)", justify="right")
    for label in fed.index:
        cells = []
        for column in fed.columns:
            value = fed.loc[label, column]
            cells += ["suppressed" if value is pd.NA else str(value), str(pooled.loc[label, column])]
        table.add_row(str(label), *cells)
    return table


def _histogram_table(fed: pd.DataFrame, values: pd.Series) -> Table:
    table = Table(title="histogram of age: federated | pooled (a bin under 5 at any site is suppressed)")
    for column in ("bin", "federated", "pooled (numpy)"):
        table.add_column(column, justify="right")
    edges = fed["left"].to_numpy()[1:]
    inner, _ = np.histogram(values, bins=edges)
    pooled_counts = [int((values < edges[0]).sum()), *inner, int((values > edges[-1]).sum())]
    for (_, row), pooled_count in zip(fed.iterrows(), pooled_counts):
        count = "suppressed" if row["count"] is pd.NA else str(row["count"])
        table.add_row(f"{row['left']:g} to {row['right']:g}", count, str(pooled_count))
    return table


def _traffic_table(traffic: pd.DataFrame, limit: int) -> Table:
    table = Table(title=f"what the hub operator saw: {len(traffic)} messages relayed (a sample)")
    for column in ("kind", "sender", "analysis", "round", "bytes", "payload"):
        table.add_column(column)
    masked = traffic[traffic["body"].map(lambda body: "masked" in body)]
    sample = pd.concat([traffic[traffic["kind"] == "task"].head(1), masked.head(limit - 1)])
    for _, row in sample.iterrows():
        payload = repr(row["body"])
        table.add_row(row["kind"], row["sender"], str(row["analysis"] or ""), str(row["round"]), str(row["bytes"]),
                      payload[:90] + ("..." if len(payload) > 90 else ""))
    return table
