"""Shared fixtures: real public datasets split unevenly across sites."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest


def split_uneven(frame: pd.DataFrame, shares=(0.5, 0.3, 0.2), seed: int = 7) -> dict[str, pd.DataFrame]:
    shuffled = frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    cuts = np.round(np.cumsum(shares)[:-1] * len(frame)).astype(int)
    bounds = [0, *cuts, len(frame)]
    return {f"site_{chr(97 + i)}": shuffled.iloc[bounds[i]:bounds[i + 1]].reset_index(drop=True)
            for i in range(len(shares))}


@pytest.fixture(scope="session")
def gbsg2() -> pd.DataFrame:
    lifelines_datasets = pytest.importorskip("lifelines.datasets")
    return lifelines_datasets.load_gbsg2()
