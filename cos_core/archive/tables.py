"""Reading a run's parquet tables (samples.parquet and derived/*.parquet) within limits and with checked columns.

The limits are checked from the file size and the parquet footer before any data is decoded (a 500 KB file can
declare 60 M rows), then decoding runs in batches that stop at a memory budget. Columns are checked against
`schema.COLUMN_KINDS` (type, nulls, range), so a page never meets a string where it plots numbers. Every problem is
an `ArchiveError` naming the file and the column. Imports pandas/pyarrow, `schema` and `files` only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Mapping

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .files import read_bytes
from .schema import ArchiveError

MAX_TABLE_BYTES = 256 * 2**20      # on disk
MAX_TABLE_ROWS = 2_000_000         # from the footer, before decoding
MAX_TABLE_COLUMNS = 4_096
MAX_DECODED_BYTES = 512 * 2**20    # arrow memory while decoding, counted batch by batch
BATCH_ROWS = 16_384


def read_parquet(run_dir: Path, path: Path, what: str, kinds: Mapping[str, str] | None = None,
                 required: tuple[str, ...] = (), digest: str | None = None) -> pd.DataFrame:
    """The table in `path` (a regular file inside `run_dir`) as a DataFrame, after checking its size, its footer and
    the columns named in `kinds` ({column or 'prefix*': kind}); `digest` ('sha256:…'): the bytes must hash to it."""
    data = read_bytes(run_dir, path, what, MAX_TABLE_BYTES)
    if digest is not None and f"sha256:{hashlib.sha256(data).hexdigest()}" != digest:
        raise DigestMismatch(f"{path} does not match the checksum its derived manifest records")
    try:
        file = pq.ParquetFile(pa.BufferReader(data))
        meta = file.metadata
        schema = file.schema_arrow
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise ArchiveError(f"{path} cannot be read as parquet: {err}") from None
    if meta.num_rows > MAX_TABLE_ROWS:
        raise ArchiveError(f"{path} declares {meta.num_rows} rows, over the {MAX_TABLE_ROWS}-row limit (refused "
                           "before decoding)")
    if meta.num_columns > MAX_TABLE_COLUMNS:
        raise ArchiveError(f"{path} has {meta.num_columns} columns, over the {MAX_TABLE_COLUMNS}-column limit")
    # row-group totals: pyarrow 26 aborts the process (an uncaught C++ exception) on some damaged column-chunk
    # metadata when it is read from Python (docs/reliability.md, case 84); decoding then fails cleanly instead
    declared = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
    if declared > MAX_DECODED_BYTES:
        raise ArchiveError(f"{path} declares {declared} bytes of decoded data, over the {MAX_DECODED_BYTES}-byte "
                           "limit (refused before decoding)")
    missing = [c for c in required if c not in schema.names]
    if missing:
        raise ArchiveError(f"{path} lacks column(s) {missing}; expected {list(required)} (see docs/dashboard.md); it "
                           f"has {schema.names}")
    checks = _kinds_of(schema.names, kinds or {})
    empty = meta.num_rows == 0
    for name, kind in checks.items():
        if not (empty and pa.types.is_null(schema.field(name).type)):  # no rows: a column of no values is any kind
            _check_type(path, name, schema.field(name).type, kind)
    table = _decode(path, file)
    for name, kind in checks.items():
        try:
            _check_values(path, name, table.column(name), kind)
        except (UnicodeDecodeError, pa.ArrowException) as err:  # bytes that are not UTF-8 in a text column
            raise ArchiveError(f"{path}: column {name!r} cannot be read: {err}") from None
    try:
        return table.to_pandas()
    except Exception as err:  # noqa: BLE001 - pandas/pyarrow conversion problems of a hostile schema
        raise ArchiveError(f"{path} cannot be converted to a table: {err}") from None


class DigestMismatch(ArchiveError):
    """A derived table's bytes differ from its manifest entry (a publish swapped the set while it was read)."""


def _decode(path: Path, file: pq.ParquetFile) -> pa.Table:
    batches, used = [], 0
    try:
        for batch in file.iter_batches(batch_size=BATCH_ROWS, use_threads=False):
            used += batch.nbytes
            if used > MAX_DECODED_BYTES:
                raise ArchiveError(f"{path} decodes to more than {MAX_DECODED_BYTES} bytes; refused")
            batches.append(batch)
        return pa.Table.from_batches(batches, schema=file.schema_arrow)
    except ArchiveError:
        raise
    except Exception as err:  # noqa: BLE001 - pyarrow decoding errors of a damaged file
        raise ArchiveError(f"{path} cannot be read as parquet: {err}") from None


def _kinds_of(names: list[str], kinds: Mapping[str, str]) -> dict[str, str]:
    """{column present in the table: kind}, patterns 'score_*' applied to every column they match."""
    out = {}
    for name in names:
        if name in kinds:
            out[name] = kinds[name]
        else:
            out.update({name: kind for pattern, kind in kinds.items()
                        if pattern.endswith("*") and name.startswith(pattern[:-1])})
    return out


def _is_text(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_null(t)


_TYPES = {"int": pa.types.is_integer, "index": pa.types.is_integer, "number": _is_number, "bool": _is_number,
          "text": _is_text, "json": _is_text}
_SAYS = {"int": "integers", "index": "integers >= 0", "number": "numbers", "bool": "booleans (or 0/1)",
         "text": "text", "json": "JSON text"}


def _check_type(path: Path, name: str, t: pa.DataType, kind: str) -> None:
    assert kind in _TYPES, f"unknown column kind {kind!r}"
    if not _TYPES[kind](t):
        raise ArchiveError(f"{path}: column {name!r} must hold {_SAYS[kind]}, found {t}")


def _check_values(path: Path, name: str, column: pa.ChunkedArray, kind: str) -> None:
    if kind in ("int", "index") and column.null_count:
        raise ArchiveError(f"{path}: column {name!r} must hold {_SAYS[kind]}, found {column.null_count} missing")
    if kind == "index" and len(column) and pc.min(column).as_py() < 0:
        raise ArchiveError(f"{path}: column {name!r} must hold {_SAYS[kind]}, found {pc.min(column)}")
    if kind == "json":
        for i, value in enumerate(column.to_pylist()):
            if value is None or value == "":
                continue
            try:
                json.loads(value)
            except (ValueError, RecursionError):
                raise ArchiveError(f"{path}: column {name!r} row {i} is not valid JSON ({value[:40]!r})") from None
