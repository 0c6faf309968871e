"""Parquet uploads: read by batches, list/struct columns kept as lists of dicts."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from afina.core.datasets.options import IngestOptions
from afina.core.errors import DatasetInvalid
from afina.ingest.sources import open_rows
from afina.ingest.sources.parquet import BATCH_ROWS


def test_parquet_with_a_messages_column_gives_one_row_per_record(tmp_path: Path) -> None:
    conversations = [
        [{"role": "user", "content": "Qual o horário da farmácia?"},
         {"role": "assistant", "content": "Abrimos das 7h às 22h, todos os dias."}],
        [{"role": "system", "content": "Seja breve."}, {"role": "user", "content": "Tem dipirona?"},
         {"role": "assistant", "content": "Temos, em gotas e comprimidos."}],
    ]
    table = pa.table({"messages": conversations, "divisao": ["treino", "teste"],
                      "__index_level_0__": [10, 11]})  # pandas' index column is not data
    path = tmp_path / "farmacia.parquet"
    pq.write_table(table, path)
    rows = list(open_rows(path, "farmacia.parquet", IngestOptions()))
    assert [(row.source, row.line) for row in rows] == [("farmacia.parquet", 1), ("farmacia.parquet", 2)]
    assert rows[0].value == {"messages": conversations[0], "divisao": "treino"}
    assert rows[1].value["messages"][2] == {"role": "assistant", "content": "Temos, em gotas e comprimidos."}


def test_row_numbers_run_across_batches(tmp_path: Path) -> None:
    count = BATCH_ROWS * 2 + 7
    path = tmp_path / "grande.parquet"
    pq.write_table(pa.table({"text": [f"linha {index}" for index in range(count)]}), path, row_group_size=1000)
    rows = list(open_rows(path, path.name, IngestOptions()))
    assert [row.line for row in rows] == list(range(1, count + 1))
    assert rows[-1].value == {"text": f"linha {count - 1}"}


def test_parquet_detected_by_magic_bytes_whatever_its_name(tmp_path: Path) -> None:
    path = tmp_path / "exportado.dat"
    pq.write_table(pa.table({"text": ["olá"]}), path)
    assert [row.value for row in open_rows(path, path.name, IngestOptions())] == [{"text": "olá"}]


def test_a_damaged_or_empty_parquet_is_refused_naming_it(tmp_path: Path) -> None:
    damaged = tmp_path / "danificado.parquet"
    damaged.write_bytes(b"PAR1" + bytes(100) + b"PAR1")
    with pytest.raises(DatasetInvalid, match="danificado.parquet is not a readable Parquet file"):
        list(open_rows(damaged, damaged.name, IngestOptions()))
    empty = tmp_path / "vazio.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty)
    with pytest.raises(DatasetInvalid, match="vazio.parquet is empty"):
        list(open_rows(empty, empty.name, IngestOptions()))
