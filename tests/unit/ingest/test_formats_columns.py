"""Column mapping with templates (seed 004: product title -> description, rows without content dropped)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from afina.core.datasets.options import ColumnMapping, IngestOptions
from afina.ingest.formats import to_examples
from afina.ingest.formats.base import ConversionError
from afina.ingest.formats.columns import ColumnConverter
from afina.ingest.records import Example, RowIssue
from afina.ingest.sources import open_rows

DATA = Path(__file__).parents[2] / "data" / "ingest"
SEED_004 = ColumnMapping(user="DESCRIBE ABOUT THE PRODUCT.\nTitle: {title}", assistant="{content}")


def convert(path: Path, **options: Any) -> list[Example | RowIssue]:
    ingest = IngestOptions(**options)
    return list(to_examples(open_rows(path, path.name, ingest), ingest))


def test_products_csv_like_seed_004_drops_rows_without_content() -> None:
    items = convert(DATA / "produtos.csv", columns=SEED_004)
    found = [item for item in items if isinstance(item, Example)]
    assert [example.line for example in found] == [2, 4, 7, 9]
    assert found[0].messages == [
        {"role": "user", "content": "DESCRIBE ABOUT THE PRODUCT.\nTitle: Girls Ballet Tutu Neon Pink"},
        {"role": "assistant", "content": "Uma linda saia tutu rosa neon para ballet, leve e confortável."},
    ]
    dropped = [item for item in items if isinstance(item, RowIssue)]
    assert [(issue.line, issue.field, issue.rule, issue.action) for issue in dropped] == [
        (3, "content", "empty_column", "dropped"), (8, "content", "empty_column", "dropped")]
    assert "column 'content' is empty (the assistant template needs it)" in dropped[0].detail
    assert dropped[0].source == "produtos.csv"


def test_seed_004_jsonl_named_json_with_a_system_template(tmp_path: Path) -> None:
    path = tmp_path / "trn.json"
    path.write_text('{"title": "Garrafa Térmica 1L", "content": "Mantém bebidas quentes por 12 horas."}\n'
                    '{"title": "Mochila Escolar", "content": null}\n'
                    '{"uid": "B0001", "content": "Sem título."}\n', encoding="utf-8")
    mapping = ColumnMapping(system="Você escreve descrições de produtos.", user="Produto: {title}",
                            assistant="{content}")
    items = convert(path, columns=mapping)
    assert items[0].messages == [{"role": "system", "content": "Você escreve descrições de produtos."},
                                 {"role": "user", "content": "Produto: Garrafa Térmica 1L"},
                                 {"role": "assistant", "content": "Mantém bebidas quentes por 12 horas."}]
    assert [(item.line, item.field, item.rule) for item in items[1:]] == [
        (2, "content", "empty_column"), (3, "title", "missing_column")]
    assert "the row has no column 'title' (the user template needs it)" in items[2].detail


def test_templates_constants_escapes_and_required_columns() -> None:
    converter = ColumnConverter(ColumnMapping(user="Preço de {{item}}: {nome}, R$ {preco}", assistant="{resposta}",
                                              required_columns=["categoria"]))
    row = {"nome": "Café", "preco": 18.9, "resposta": "Custa R$ 18,90.", "categoria": "mercearia"}
    assert converter(row) == [{"role": "user", "content": "Preço de {item}: Café, R$ 18.9"},
                              {"role": "assistant", "content": "Custa R$ 18,90."}]
    with pytest.raises(ConversionError) as caught:
        converter({**row, "categoria": "  "})
    assert (caught.value.field, caught.value.rule, caught.value.action) == ("categoria", "empty_column", "dropped")
    assert "(a required column)" in caught.value.detail


def test_numbers_and_missing_numeric_cells() -> None:
    converter = ColumnConverter(ColumnMapping(user="Quantas unidades de {produto}?", assistant="{estoque}"))
    assert converter({"produto": "lápis", "estoque": 120})[1]["content"] == "120"
    assert converter({"produto": "lápis", "estoque": 120.0})[1]["content"] == "120"
    with pytest.raises(ConversionError, match="column 'estoque' is empty"):
        converter({"produto": "caneta", "estoque": float("nan")})  # pandas' missing number
