"""A day of the prediction log as Parquet: the archive's one format (pyarrow).

One file per UTC day, written in row groups of ``ROW_GROUP_ROWS`` as the rows stream out of
Postgres, so a day of any size needs the memory of one row group. Columns keep the table's names;
uuids are text, ``explanation`` is its JSON text, ``created_at`` a UTC microsecond timestamp (as
precise as Postgres's timestamptz). The file's metadata carries ``sira.schema_version``: a reader
refuses a version it does not know rather than guess.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
ROW_GROUP_ROWS = 100_000
COLUMNS = ("prediction_id", "event_id", "product", "model_id", "model_role", "score", "decision",
           "explanation", "latency_ms", "cached", "request_id", "created_at", "trace_id")
SCHEMA = pa.schema([
    ("prediction_id", pa.string()), ("event_id", pa.string()), ("product", pa.string()),
    ("model_id", pa.string()), ("model_role", pa.string()), ("score", pa.float64()),
    ("decision", pa.string()), ("explanation", pa.string()), ("latency_ms", pa.float64()),
    ("cached", pa.bool_()), ("request_id", pa.string()), ("created_at", pa.timestamp("us", tz="UTC")),
    ("trace_id", pa.string()),
], metadata={b"sira.schema_version": str(SCHEMA_VERSION).encode()})


class ArchiveFormatError(ValueError):
    """A file that is not a SIRA prediction archive of a known schema version."""


def write_day(path: str, batches: Iterable[list[tuple]]) -> int:
    """Write the rows (tuples in COLUMNS order, in batches) to a Parquet file; the number of rows."""
    rows = 0
    with pq.ParquetWriter(path, SCHEMA, compression="zstd") as writer:
        for batch in batches:
            if batch:
                writer.write_table(pa.Table.from_pylist([dict(zip(COLUMNS, row)) for row in batch], SCHEMA),
                                   row_group_size=ROW_GROUP_ROWS)
                rows += len(batch)
    return rows


def rows_in(path: str) -> int:
    """The row count a file's footer states, after checking it is an archive this code reads."""
    return _open(path).metadata.num_rows


def read_day(path: str) -> Iterator[list[tuple]]:
    """The rows of a file, a row group at a time, as tuples in COLUMNS order."""
    parquet = _open(path)
    for group in range(parquet.num_row_groups):
        table = parquet.read_row_group(group)
        yield list(zip(*(table.column(name).to_pylist() for name in COLUMNS)))


def _open(path: str) -> pq.ParquetFile:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ArchiveFormatError(f"{path}: not a Parquet file ({exc})") from None
    version = (parquet.schema_arrow.metadata or {}).get(b"sira.schema_version")
    if version != str(SCHEMA_VERSION).encode():
        raise ArchiveFormatError(f"{path}: archive schema version {version!r}; this SIRA reads {SCHEMA_VERSION}")
    if tuple(parquet.schema_arrow.names) != COLUMNS:
        raise ArchiveFormatError(f"{path}: columns {parquet.schema_arrow.names} are not the prediction log's")
    return parquet
