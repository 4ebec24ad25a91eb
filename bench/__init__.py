"""Benchmarks of aurora_dbx against raw Spark JDBC and PostgreSQL COPY (see bench/README.md)."""
