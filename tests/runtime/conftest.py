"""Fixtures for the runtime tests: a PostgreSQL URL when a server is up (`.ci/run` starts one)."""

from __future__ import annotations

import os

import pytest

DEFAULT_POSTGRES_URL = "postgresql+psycopg://medveil:medveil@127.0.0.1:5432/medveil_test"


@pytest.fixture()
def postgres_url() -> str:
    """The test server's URL with every table of its test database dropped (tables of older
    schemas too); skips when no server answers."""
    sqlalchemy = pytest.importorskip("sqlalchemy")
    pytest.importorskip("psycopg")
    url = os.environ.get("MEDVEIL_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect():
            pass
    except Exception as exc:
        pytest.skip(f"no PostgreSQL server at {url.split('@')[-1]} ({type(exc).__name__}); .ci/run starts one")
    tables = sqlalchemy.MetaData()
    tables.reflect(engine)
    tables.drop_all(engine)
    engine.dispose()
    return url
