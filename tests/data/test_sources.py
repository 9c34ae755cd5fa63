"""Dataset loaders: CSV, Parquet and SQL read back the frame; failures name the file and line."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError
from sqlalchemy import create_engine

from medveil.data.sources import DataError, DatasetConfig, load_dataset


@pytest.fixture
def frame() -> pd.DataFrame:
    rng = np.random.default_rng(3)
    return pd.DataFrame({
        "id": np.arange(40),
        "age": rng.integers(20, 90, 40),
        "bmi": np.round(rng.normal(26.0, 4.0, 40), 3),
        "sex": rng.choice(["f", "m"], 40),
    })


def test_csv_load(tmp_path, frame):
    path = tmp_path / "site.csv"
    frame.to_csv(path, index=False)
    loaded = load_dataset("cohort", DatasetConfig(kind="csv", path=path))
    pd.testing.assert_frame_equal(loaded, frame)


def test_relative_csv_path_resolves_against_the_config_directory(tmp_path, frame):
    (tmp_path / "data").mkdir()
    frame.to_csv(tmp_path / "data" / "site.csv", index=False)
    config = DatasetConfig(kind="csv", path="data/site.csv").resolved(tmp_path)
    assert config.path == tmp_path / "data" / "site.csv"
    pd.testing.assert_frame_equal(load_dataset("cohort", config), frame)


def _malformed(tmp_path, frame, bad_line: int):
    """Write `frame` as CSV, then give physical line `bad_line` (1 = header) one extra field."""
    lines = frame.to_csv(index=False).splitlines()
    lines[bad_line - 1] += ",extra"
    path = tmp_path / "broken.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("bad_line", [3, 17, 41])
def test_malformed_csv_names_file_and_line(tmp_path, frame, bad_line):
    path = _malformed(tmp_path, frame, bad_line)
    with pytest.raises(DataError) as info:
        load_dataset("cohort", DatasetConfig(kind="csv", path=path))
    message = str(info.value)
    assert str(path) in message
    assert f"line {bad_line}" in message
    assert "'cohort'" in message


def test_extra_field_in_first_data_row_is_an_error_not_a_shifted_frame(tmp_path, frame):
    """pandas reads a first data row with one field more than the header as an implicit index
    column, shifting every value one column to the left instead of failing: the node would then
    compute statistics of the wrong variables."""
    path = _malformed(tmp_path, frame, 2)
    with pytest.raises(DataError) as info:
        loaded = load_dataset("cohort", DatasetConfig(kind="csv", path=path))
        # Reached only when no error was raised: show what the node would have analysed.
        pytest.fail(f"no DataError; 'age' was read as {loaded['age'].head(3).tolist()}, "
                    f"the file holds {frame['age'].head(3).tolist()}")
    assert str(path) in str(info.value)
    assert "line 2" in str(info.value)


def test_missing_file(tmp_path):
    path = tmp_path / "absent.csv"
    with pytest.raises(DataError, match="does not exist") as info:
        load_dataset("cohort", DatasetConfig(kind="csv", path=path))
    assert str(path) in str(info.value)


def test_empty_csv(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(DataError) as info:
        load_dataset("cohort", DatasetConfig(kind="csv", path=path))
    assert str(path) in str(info.value)


def test_parquet_load(tmp_path, frame):
    pytest.importorskip("pyarrow")
    path = tmp_path / "site.parquet"
    frame.to_parquet(path, index=False)
    loaded = load_dataset("cohort", DatasetConfig(kind="parquet", path=path))
    pd.testing.assert_frame_equal(loaded, frame)


def test_corrupt_parquet_names_the_file(tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "site.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(DataError) as info:
        load_dataset("cohort", DatasetConfig(kind="parquet", path=path))
    assert str(path) in str(info.value)


@pytest.fixture
def sqlite_url(tmp_path, frame) -> str:
    url = f"sqlite:///{tmp_path / 'site.db'}"
    engine = create_engine(url)
    try:
        frame.to_sql("patients", engine, index=False)
    finally:
        engine.dispose()
    return url


def test_sql_table(sqlite_url, frame):
    loaded = load_dataset("cohort", DatasetConfig(kind="sql", url=sqlite_url, table="patients"))
    pd.testing.assert_frame_equal(loaded, frame)


def test_sql_query(sqlite_url, frame):
    query = "SELECT age, sex FROM patients WHERE age >= 50 ORDER BY id"
    config = DatasetConfig(kind="sql", url=sqlite_url, query=query)
    loaded = load_dataset("cohort", config)
    expected = frame.loc[frame["age"] >= 50, ["age", "sex"]].reset_index(drop=True)
    assert len(expected) > 0
    pd.testing.assert_frame_equal(loaded, expected)


@pytest.mark.parametrize("where", [{"table": "no_such_table"}, {"query": "SELECT nope FROM patients"}])
def test_sql_failure_is_a_data_error(sqlite_url, where):
    with pytest.raises(DataError, match="'cohort': SQL source failed"):
        load_dataset("cohort", DatasetConfig(kind="sql", url=sqlite_url, **where))


@pytest.mark.parametrize(
    "raw",
    [{"kind": "csv"}, {"kind": "parquet"}, {"kind": "sql", "table": "t"}, {"kind": "sql", "url": "sqlite://"},
     {"kind": "sql", "url": "sqlite://", "table": "t", "query": "SELECT 1"}, {"kind": "excel", "path": "a.xlsx"},
     {"kind": "csv", "path": "a.csv", "colour": "blue"}],
)
def test_incomplete_dataset_config_is_refused(raw):
    with pytest.raises(ValidationError):
        DatasetConfig(**raw)


def test_fingerprint_changes_with_the_file(tmp_path, frame):
    path = tmp_path / "site.csv"
    frame.to_csv(path, index=False)
    config = DatasetConfig(kind="csv", path=path)
    before = config.fingerprint()
    frame.head(10).to_csv(path, index=False)
    assert config.fingerprint() != before
