"""Shared by the tests that run every registered analysis: three sites with a clinical table and
a PLINK fileset of the same samples, and an exact comparison of two results."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

SITE_SIZES = {"site_a": 260, "site_b": 190, "site_c": 150}


def clinical_and_genotype_sites(directory: Path, seed: int) -> dict[str, tuple[pd.DataFrame, Path]]:
    """Each site's table (IID, age, bmi, stage, sex, death, time, event, case) and the path of its
    PLINK .bed of 120 variants for the same samples, written under `directory`."""
    import bed_reader

    rng = np.random.default_rng(seed)
    sites = {}
    for site, n in SITE_SIZES.items():
        age = rng.normal(60, 9, n)
        stage = rng.choice(["I", "II", "III"], n, p=[0.4, 0.35, 0.25])
        risk = -6 + 0.09 * age + (stage == "III") * 0.8
        iid = np.array([f"{site}-{i}" for i in range(n)])
        frame = pd.DataFrame({
            "IID": iid, "age": age, "bmi": rng.normal(26, 4, n), "stage": stage, "sex": rng.choice(["f", "m"], n),
            "death": (rng.random(n) < 1 / (1 + np.exp(-risk))).astype(int),
            "time": np.ceil(rng.exponential(900, n)), "event": (rng.random(n) < 0.6).astype(int),
            "case": rng.integers(0, 2, n),
        })
        m = 120
        dosages = rng.binomial(2, rng.uniform(0.1, 0.5, m), (n, m)).astype(np.float32)
        props = {"iid": iid, "fid": iid, "sid": [f"rs{j}" for j in range(m)], "chromosome": np.repeat(["1"], m),
                 "bp_position": np.arange(m) * 100 + 1000, "allele_1": ["A"] * m, "allele_2": ["G"] * m}
        bed = directory / f"{site}.bed"
        bed_reader.to_bed(bed, dosages, properties=props)
        sites[site] = (frame, bed)
    return sites


def assert_identical(a: Any, b: Any, where: str, *, skip: Collection[str] = ()) -> None:
    """`a` equals `b` to the last digit, NaN equal to NaN, recursing into frames (and their attrs),
    series, arrays, dataclasses, dicts and sequences; `skip` names attrs keys and dataclass fields
    left out (e.g. "provenance", whose task ids differ between two runs)."""
    assert type(a) is type(b), where
    if isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=where)
        assert_identical({k: v for k, v in a.attrs.items() if k not in skip},
                         {k: v for k, v in b.attrs.items() if k not in skip}, f"{where}.attrs", skip=skip)
    elif isinstance(a, pd.Series):
        pd.testing.assert_series_equal(a, b, check_exact=True, obj=where)
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif dataclasses.is_dataclass(a):
        for item in dataclasses.fields(a):
            if item.name not in skip:
                assert_identical(getattr(a, item.name), getattr(b, item.name), f"{where}.{item.name}", skip=skip)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]", skip=skip)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]", skip=skip)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where
