"""What runs inside Spark tasks: the ``aurora`` Python data source and the staged writer.

Everything a task needs travels in a plain JSON *spec* (cluster, database user, SQL
pieces, partition predicates, the broker URL and capability) built on the driver; no
credential is in it. Each task connects with a token fetched from the driver's broker
at connect time, so tasks work however late or in however many waves they run.

Reads stream: PostgreSQL through ``COPY (SELECT ...) TO STDOUT`` parsed by Arrow's CSV
reader, MySQL through an unbuffered cursor; both yield Arrow record batches.
Writes stage: each task attempt loads its rows, tagged with its attempt id, into a private
stage table in one transaction; the driver publishes only the attempts Spark accepted (one
per partition), in one transaction, so a retried or speculative task never duplicates rows.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

from pyspark.sql.datasource import DataSource, DataSourceReader, InputPartition

from .broker import BrokerTokenSource
from .columns import Column, arrow_type
from .connections import open_connection
from .engines import dialect_for
from .policy import Cluster

__all__ = ["AuroraDataSource", "read_partition", "write_partition"]

COPY_BLOCK_BYTES = 4 << 20
MYSQL_BATCH_ROWS = 10_000


def _cluster(spec: dict[str, Any]) -> Cluster:
    return Cluster(**spec["cluster"])


def _connect(spec: dict[str, Any], *, read_only: bool) -> Any:
    cluster = _cluster(spec)
    return open_connection(
        dialect_for(cluster), cluster, spec["db_user"],
        BrokerTokenSource(spec["broker"], spec["capability"]),
        read_only=read_only, tags=spec.get("tags", {}),
    )


def _columns(spec: dict[str, Any]) -> list[Column]:
    return [Column(**c) for c in spec["columns"]]


def _select_sql(spec: dict[str, Any], predicate: str | None) -> str:
    cols = ", ".join(c.select for c in _columns(spec))
    conditions = [f"({spec['where']})"] if spec.get("where") else []
    if predicate:
        conditions.append(f"({predicate})")
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    return f"SELECT {cols} FROM {spec['relation']}{where}"


class _CopyStream(io.RawIOBase):
    """A file-like view of a psycopg ``COPY ... TO STDOUT`` for Arrow's CSV reader."""

    def __init__(self, copy: Any):
        self._chunks = iter(copy)
        self._buf = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        # Fill the caller's whole buffer: psycopg yields one row per chunk, and handing
        # Arrow one row per call was the read path's largest cost (bench/ANALYSIS.md).
        view = memoryview(b).cast("B")
        filled = 0
        while filled < len(view):
            if not self._buf:
                try:
                    self._buf = memoryview(bytes(next(self._chunks)))
                except StopIteration:
                    break
            n = min(len(view) - filled, len(self._buf))
            view[filled : filled + n] = self._buf[:n]
            self._buf = self._buf[n:]
            filled += n
        return filled


def _finish(batch: Any, columns: list[Column], schema: Any) -> Any:
    """Apply per-column conversions and label the batch with the Spark-facing schema."""
    import pyarrow as pa

    arrays = []
    for i, col in enumerate(columns):
        arr = batch.column(i)
        if col.convert == "hex_binary":
            arr = pa.array([None if v is None else bytes.fromhex(v) for v in arr.to_pylist()], pa.binary())
        elif col.convert == "utc":
            arr = arr.cast(pa.timestamp("us")).cast(pa.timestamp("us", tz="UTC"))
        arrays.append(arr)
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _arrow_schema(columns: list[Column]) -> Any:
    import pyarrow as pa

    return pa.schema([pa.field(c.name, arrow_type(c.spark_type)) for c in columns])


def read_partition(spec: dict[str, Any], index: int) -> Iterator[Any]:
    """Yield Arrow record batches of partition ``index`` of a read spec."""
    columns = _columns(spec)
    schema = _arrow_schema(columns)
    predicates = spec.get("predicates") or [None]
    sql = _select_sql(spec, predicates[index])
    conn = _connect(spec, read_only=True)
    try:
        if spec["cluster"]["engine"] == "postgresql":
            yield from _read_postgres(conn, sql, columns, schema)
        else:
            yield from _read_mysql(conn, sql, columns, schema, int(spec.get("fetch_size") or MYSQL_BATCH_ROWS))
    finally:
        conn.close()


def _read_postgres(conn: Any, sql: str, columns: list[Column], schema: Any) -> Iterator[Any]:
    import pyarrow as pa
    from pyarrow import csv

    parse_types = {}
    for c in columns:
        t = arrow_type(c.spark_type)
        if c.convert == "hex_binary":
            t = pa.string()
        elif c.convert == "utc":
            t = pa.timestamp("us")
        parse_types[c.name] = t
    names = [c.name for c in columns]
    with conn.cursor() as cur:
        cur.execute("SET TimeZone = 'UTC'")
        cur.execute("SET DateStyle = 'ISO, YMD'")
        cur.execute("SET extra_float_digits = 3")
        with cur.copy(f"COPY ({sql}) TO STDOUT WITH (FORMAT csv, NULL '\\N')") as copy:
            stream = io.BufferedReader(_CopyStream(copy), buffer_size=1 << 20)
            if not stream.peek(1):  # no rows: Arrow refuses an empty CSV stream
                return
            reader = csv.open_csv(
                stream,
                read_options=csv.ReadOptions(column_names=names, block_size=COPY_BLOCK_BYTES, use_threads=False),
                parse_options=csv.ParseOptions(newlines_in_values=True),
                convert_options=csv.ConvertOptions(
                    column_types=parse_types, null_values=["\\N"], strings_can_be_null=True,
                    quoted_strings_can_be_null=False, true_values=["t"], false_values=["f"],
                ),
            )
            for batch in reader:
                if batch.num_rows:
                    yield _finish(batch, columns, schema)
    conn.rollback()


def _read_mysql(conn: Any, sql: str, columns: list[Column], schema: Any, batch_rows: int) -> Iterator[Any]:
    import pyarrow as pa
    import pymysql.cursors

    with conn.cursor() as cur:
        cur.execute("SET time_zone = '+00:00'")
    types = [arrow_type(c.spark_type) if c.convert != "utc" else pa.timestamp("us") for c in columns]
    with conn.cursor(pymysql.cursors.SSCursor) as cur:
        cur.execute(sql)
        while True:
            rows = cur.fetchmany(batch_rows)
            if not rows:
                break
            cols = list(zip(*rows, strict=True))
            arrays = [pa.array(list(v), type=t) for v, t in zip(cols, types, strict=True)]
            batch = pa.RecordBatch.from_arrays(arrays, names=[c.name for c in columns])
            yield _finish(batch, columns, schema)
    conn.rollback()


class _Partition(InputPartition):
    def __init__(self, index: int):
        super().__init__(index)
        self.index = index


class AuroraReader(DataSourceReader):
    def __init__(self, spec: dict[str, Any]):
        self.spec = spec

    def partitions(self) -> list[InputPartition]:
        return [_Partition(i) for i in range(max(1, len(self.spec.get("predicates") or [])))]

    def read(self, partition: InputPartition) -> Iterator[Any]:
        yield from read_partition(self.spec, partition.index)  # type: ignore[attr-defined]


class AuroraDataSource(DataSource):
    """``spark.read.format("aurora")``: built by ``aurora_dbx.read_table``; see its docs."""

    @classmethod
    def name(cls) -> str:
        return "aurora"

    def schema(self) -> str:
        spec = json.loads(self.options["spec"])
        return ", ".join(Column(**c).ddl() for c in spec["columns"])

    def reader(self, schema: Any) -> DataSourceReader:
        return AuroraReader(json.loads(self.options["spec"]))


# -- writes ---------------------------------------------------------------------------


def _csv_ready(batch: Any) -> Any:
    """Arrow batch -> the same batch with values PostgreSQL's CSV COPY reads exactly."""
    import pyarrow as pa

    arrays, fields = [], []
    for field, arr in zip(batch.schema, batch.columns, strict=True):
        if pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type):
            arr = pa.array([None if v is None else "\\x" + v.hex() for v in arr.to_pylist()], pa.string())
        elif pa.types.is_timestamp(field.type) and field.type.tz is not None:
            # Arrow formats zone-aware timestamps ~20x slower; the UTC wall time is the same
            # instant for a session whose TimeZone is UTC (set before the COPY).
            arr = arr.cast(pa.timestamp(field.type.unit, tz="UTC")).cast(pa.timestamp(field.type.unit))
        arrays.append(arr)
        fields.append(pa.field(field.name, arr.type))
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))


def write_partition(spec: dict[str, Any], batches: Iterator[Any]) -> Iterator[Any]:
    """mapInArrow body: load this task attempt's rows into the stage in one transaction.

    Rows carry the task *attempt* id (unique across the application). A failed attempt
    rolls back; an attempt that committed but lost (a speculative copy, a task re-run after
    its result was lost) leaves rows the publish ignores, because the driver publishes only
    the attempts whose results Spark returned: one per partition.
    """
    import pyarrow as pa
    from pyspark import TaskContext

    tc = TaskContext.get()
    part = tc.partitionId() if tc is not None else 0
    attempt = tc.taskAttemptId() if tc is not None else 0
    conn = _connect(spec, read_only=False)
    try:
        if spec["cluster"]["engine"] == "postgresql":
            rows = _write_postgres(conn, spec, attempt, batches)
        else:
            rows = _write_mysql(conn, spec, attempt, batches)
    finally:
        conn.close()
    yield pa.RecordBatch.from_pydict({
        "part": pa.array([part], pa.int32()), "attempt": pa.array([attempt], pa.int64()),
        "rows": pa.array([rows], pa.int64()),
    })


def _write_postgres(conn: Any, spec: dict[str, Any], attempt: int, batches: Iterator[Any]) -> int:
    import pyarrow as pa
    from pyarrow import csv

    stage = spec["stage"]
    cols = ", ".join(spec["stage_columns"])
    rows = 0
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SET LOCAL TimeZone = 'UTC'")  # zone-less timestamps below are UTC wall times
        with cur.copy(f"COPY {stage} ({cols}, _adbx_attempt) FROM STDIN WITH (FORMAT csv)") as copy:
            for batch in batches:
                if batch.num_rows == 0:
                    continue
                batch = _csv_ready(batch)
                batch = batch.append_column("_adbx_attempt", pa.array([attempt] * batch.num_rows, pa.int64()))
                buf = io.BytesIO()
                csv.write_csv(batch, buf, csv.WriteOptions(include_header=False, quoting_style="needed"))
                copy.write(buf.getbuffer())
                rows += batch.num_rows
    return rows


def _write_mysql(conn: Any, spec: dict[str, Any], attempt: int, batches: Iterator[Any]) -> int:
    stage = spec["stage"]
    cols = ", ".join(spec["stage_columns"])
    rows = 0
    with conn.cursor() as cur:
        cur.execute("SET time_zone = '+00:00'")
        try:
            conn.begin()
            placeholders = ", ".join(["%s"] * (len(spec["stage_columns"]) + 1))
            sql = f"INSERT INTO {stage} ({cols}, _adbx_attempt) VALUES ({placeholders})"  # noqa: S608
            for batch in batches:
                if batch.num_rows == 0:
                    continue
                data = batch.to_pydict()
                values = list(zip(*data.values(), strict=True))
                # PyMySQL turns executemany INSERT ... VALUES into multi-row statements.
                for start in range(0, len(values), MYSQL_BATCH_ROWS):
                    chunk = [(*v, attempt) for v in values[start : start + MYSQL_BATCH_ROWS]]
                    cur.executemany(sql, chunk)
                rows += batch.num_rows
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
    return rows
