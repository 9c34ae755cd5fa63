"""Load a site's registered datasets into DataFrames, with errors that name the file and line."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, model_validator


class DataError(ValueError):
    """A dataset cannot be read; the message names the dataset and where it broke."""


class DatasetConfig(BaseModel):
    """Where a dataset lives: a CSV or Parquet file, or a table or query behind an SQLAlchemy URL."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["csv", "parquet", "sql", "plink"]
    path: Path | None = None
    url: str | None = None
    table: str | None = None
    query: str | None = None
    description: str = ""

    @model_validator(mode="after")
    def _where(self) -> "DatasetConfig":
        if self.kind in ("csv", "parquet", "plink") and self.path is None:
            raise ValueError(f"a {self.kind} dataset needs a path")
        if self.kind == "sql" and (self.url is None or (self.table is None) == (self.query is None)):
            raise ValueError("an sql dataset needs a url and exactly one of table or query")
        return self

    def resolved(self, base: Path) -> "DatasetConfig":
        if self.path is None or self.path.is_absolute():
            return self
        return self.model_copy(update={"path": base / self.path})

    def fingerprint(self) -> tuple:
        """Changes when the file changes; SQL sources are re-read per task."""
        if self.path is not None and self.path.exists():
            stat = self.path.stat()
            return (str(self.path), stat.st_mtime_ns, stat.st_size)
        return (self.kind, self.url, self.table, self.query)


_CSV_LINE = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")


def load_dataset(name: str, config: DatasetConfig) -> pd.DataFrame:
    """Read one dataset; every failure becomes a DataError naming the dataset and the file."""
    if config.kind == "sql":
        return _load_sql(name, config)
    if config.kind == "plink":
        raise DataError(f"dataset {name!r} holds genotypes; analyses read it through its genotype parameter")
    path = config.path
    assert path is not None
    if not path.exists():
        raise DataError(f"dataset {name!r}: file {path} does not exist")
    if config.kind == "csv":
        try:
            frame = pd.read_csv(path)
        except pd.errors.ParserError as exc:
            match = _CSV_LINE.search(str(exc))
            if match:
                expected, line, saw = match.groups()
                raise DataError(
                    f"dataset {name!r}: malformed CSV {path}, line {line}: expected {expected} fields, saw {saw}"
                ) from exc
            raise DataError(f"dataset {name!r}: malformed CSV {path}: {exc}") from exc
        except (UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
            raise DataError(f"dataset {name!r}: cannot read CSV {path}: {exc}") from exc
        if not isinstance(frame.index, pd.RangeIndex):
            # pandas reads rows with one field more than the header as an implicit index column,
            # shifting every value one column left; that is a malformed file, not data.
            raise DataError(f"dataset {name!r}: malformed CSV {path}, line 2: more fields than the header")
        return frame
    try:
        return pd.read_parquet(path)
    except ImportError as exc:
        raise DataError(f"dataset {name!r}: reading Parquet needs pyarrow (pip install 'medveil[parquet]')") from exc
    except Exception as exc:
        raise DataError(f"dataset {name!r}: cannot read Parquet {path}: {exc}") from exc


def _load_sql(name: str, config: DatasetConfig) -> pd.DataFrame:
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import SQLAlchemyError

    engine = create_engine(config.url)  # type: ignore[arg-type]
    try:
        with engine.connect() as connection:
            if config.table is not None:
                return pd.read_sql_table(config.table, connection)
            return pd.read_sql_query(text(config.query), connection)  # type: ignore[arg-type]
    except (SQLAlchemyError, ValueError) as exc:
        raise DataError(f"dataset {name!r}: SQL source failed: {exc}") from exc
    finally:
        engine.dispose()
