"""Cox PH, federated vs lifelines' CoxPHFitter on the pooled rows, in the same run.

100,000 rows x 10 covariates, integer day times over 10 years, 3 sites (threads), secure
aggregation on, loopback HTTP; the timer covers the fit call only (federation already up).

    python benchmarks/cox.py [--rows 100000] [--covariates 10]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from lifelines import CoxPHFitter

import medveil as mv
from medveil.analyses.survival import released_durations
from medveil.privacy.disclosure import DisclosurePolicy


def make_data(rows: int, covariates: int, seed: int = 2026) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, covariates))
    beta = rng.normal(scale=0.2, size=covariates)
    event_time = rng.exponential(scale=2000 * np.exp(-(x @ beta)))
    censor_time = rng.uniform(0, 3650, rows)
    frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(covariates)])
    frame["time"] = np.ceil(np.minimum(event_time, censor_time)).clip(1, 3650)
    frame["event"] = (event_time <= censor_time).astype(int)
    return frame


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--covariates", type=int, default=10)
    args = parser.parse_args()
    frame = make_data(args.rows, args.covariates)
    covariates = [f"x{i}" for i in range(args.covariates)]
    thirds = np.array_split(np.arange(args.rows), 3)
    with mv.Federation.simulate({f"site_{i}": frame.iloc[idx] for i, idx in enumerate(thirds)}, timeout=600) as fed:
        start = time.perf_counter()
        federated = fed.coxph("time", "event", covariates, max_time=3650)
        t_fed = time.perf_counter() - start
    start = time.perf_counter()
    CoxPHFitter().fit(frame, "time", "event")
    t_ref = time.perf_counter() - start
    # What the federated fit equals: lifelines on the times as each site coarsens them.
    released = pd.concat([released_durations(frame.iloc[idx], "time", "event", DisclosurePolicy().min_cell_count,
                                             max_time=3650) for idx in thirds]).dropna(subset=["time"])
    reference = CoxPHFitter().fit(released, "time", "event")
    max_rel = float(np.max(np.abs(federated.params / reference.params_ - 1)))
    print(f"Cox PH (Efron), {args.rows:,} rows x {args.covariates} covariates, "
          f"{int(frame['event'].sum()):,} events on {frame['time'].nunique():,} distinct days, 3 sites, secure on")
    print(f"federated fed.coxph:         {t_fed:7.2f} s  ({federated.iterations} Newton iterations)")
    print(f"lifelines CoxPHFitter:       {t_ref:7.2f} s  ratio federated/lifelines {t_fed / t_ref:.2f}")
    print(f"max relative difference of coefficients vs lifelines on the coarsened times: {max_rel:.1e}")


if __name__ == "__main__":
    main()
