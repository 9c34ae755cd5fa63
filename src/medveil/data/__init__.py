"""Dataset adapters: CSV, Parquet and SQL (through SQLAlchemy), with clear errors."""
