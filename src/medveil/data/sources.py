"""Load a site's registered datasets into DataFrames, with errors that name the file and line.

An image dataset (kind "images": a folder of PNG or DICOM files and a labels CSV) loads as its
labels table, each entry of its file column checked (data/images.py); its pixels are read only
when an analysis asks for them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, model_validator


class DataError(ValueError):
    """A dataset cannot be read; the message names the dataset and where it broke."""


class DatasetConfig(BaseModel):
    """Where a dataset lives: a CSV or Parquet file, a table or query behind an SQLAlchemy URL, a
    PLINK fileset, or a folder of images (`path`) with its labels CSV (`labels`, default
    `<path>/labels.csv`) whose `file_column` names each row's image file inside the folder."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["csv", "parquet", "sql", "plink", "images"]
    path: Path | None = None
    url: str | None = None
    table: str | None = None
    query: str | None = None
    labels: Path | None = None
    file_column: str = "file"
    description: str = ""

    @model_validator(mode="after")
    def _where(self) -> "DatasetConfig":
        if self.kind in ("csv", "parquet", "plink", "images") and self.path is None:
            raise ValueError(f"a {self.kind} dataset needs a path")
        if self.kind == "sql" and (self.url is None or (self.table is None) == (self.query is None)):
            raise ValueError("an sql dataset needs a url and exactly one of table or query")
        if self.kind != "images" and self.labels is not None:
            raise ValueError("only an images dataset has a labels file")
        if not self.file_column:
            raise ValueError("file_column must name a column")
        return self

    @property
    def labels_path(self) -> Path:
        """An image dataset's labels CSV: `labels`, else labels.csv inside the folder."""
        assert self.path is not None
        return self.labels if self.labels is not None else self.path / "labels.csv"

    def resolved(self, base: Path) -> "DatasetConfig":
        """Relative `path` and `labels` taken against `base` (the site config's directory)."""
        def fix(path: Path | None) -> Path | None:
            return path if path is None or path.is_absolute() else base / path

        return self.model_copy(update={"path": fix(self.path), "labels": fix(self.labels)})

    def fingerprint(self) -> tuple:
        """Changes when the file changes (for images: the labels file or the folder's entries);
        SQL sources are re-read per task."""
        if self.kind == "images":
            assert self.path is not None
            return ("images", *_stat(self.path), *_stat(self.labels_path))
        if self.path is not None and self.path.exists():
            return _stat(self.path)
        return (self.kind, self.url, self.table, self.query)


def _stat(path: Path) -> tuple:
    try:
        stat = path.stat()
    except OSError:
        return (str(path), None, None)
    return (str(path), stat.st_mtime_ns, stat.st_size)


_CSV_LINE = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")


def load_dataset(name: str, config: DatasetConfig) -> pd.DataFrame:
    """Read one dataset; every failure becomes a DataError naming the dataset and the file."""
    if config.kind == "sql":
        return _load_sql(name, config)
    if config.kind == "plink":
        raise DataError(f"dataset {name!r} holds genotypes; analyses read it through its genotype parameter")
    if config.kind == "images":
        # Imported here: images.py builds on this module (DataError, DatasetConfig, read_csv).
        from medveil.data.images import load_labels

        return load_labels(name, config)
    path = config.path
    assert path is not None
    if not path.exists():
        raise DataError(f"dataset {name!r}: file {path} does not exist")
    if config.kind == "csv":
        return read_csv(name, path)
    try:
        return pd.read_parquet(path)
    except ImportError as exc:
        raise DataError(f"dataset {name!r}: reading Parquet needs pyarrow (pip install 'medveil[parquet]')") from exc
    except Exception as exc:
        raise DataError(f"dataset {name!r}: cannot read Parquet {path}: {exc}") from exc


def read_csv(name: str, path: Path, dtype: dict[str, type] | None = None) -> pd.DataFrame:
    """One CSV file as a frame (`dtype` per column, if given); a malformed file is a DataError
    naming the dataset, the file and the line."""
    if not path.is_file():
        raise DataError(f"dataset {name!r}: file {path} " + ("is not a file" if path.exists() else "does not exist"))
    try:
        frame = pd.read_csv(path, dtype=dtype)
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
