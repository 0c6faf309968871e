"""Parquet: read by record batches, so a large dataframe never sits in memory whole."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from afina.core.errors import DatasetInvalid
from afina.ingest.records import SourceRow

BATCH_ROWS = 1024
# pandas writes its index as a column; it is not data
_PANDAS_INDEX_PREFIX = "__index_level_"


def read_parquet(path: Path, source: str) -> Iterator[SourceRow]:
    """One ``SourceRow`` per row (1-based row number); list/struct columns become lists/dicts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    # what a damaged file raises: Arrow's errors, and ValueError (UnicodeDecodeError) from metadata or string
    # data that is not UTF-8
    damaged = (pa.ArrowException, OSError, ValueError)
    try:
        parquet = pq.ParquetFile(path)
    except damaged as exc:
        raise DatasetInvalid(f"{source} is not a readable Parquet file: {exc}", rule="invalid_parquet",
                             param="file") from None
    if parquet.metadata.num_rows == 0:
        raise DatasetInvalid(f"{source} is empty (a Parquet file with 0 rows)", rule="empty_file", param="file")
    columns = [name for name in parquet.schema_arrow.names if not name.startswith(_PANDAS_INDEX_PREFIX)]
    number = 0
    batches = parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns)
    while True:
        try:
            batch = next(batches)
            values = batch.to_pylist()
        except StopIteration:
            return
        except damaged as exc:
            raise DatasetInvalid(f"{source}: Parquet data after row {number} could not be read: {exc}",
                                 line=number + 1, rule="invalid_parquet", param="file") from None
        for value in values:
            number += 1
            yield SourceRow(source, number, value)
