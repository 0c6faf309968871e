"""Text containers (JSONL, JSON array, CSV, TXT) and their encodings, read by ``open_rows``."""

from __future__ import annotations

import codecs
import random
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from afina.core.datasets.options import IngestOptions
from afina.core.errors import DatasetInvalid, InvalidRequest
from afina.ingest.records import SourceRow
from afina.ingest.sources import open_rows
from afina.ingest.sources.limits import MAX_LINE_BYTES

DATA = Path(__file__).parents[2] / "data" / "ingest"


def read(path: Path, name: str | None = None, **options: Any) -> list[SourceRow]:
    return list(open_rows(path, name or path.name, IngestOptions(**options)))


def values(rows: list[SourceRow]) -> list[Any]:
    return [row.value for row in rows if row.value is not None]


def issues(rows: list[SourceRow]) -> list[tuple[int, str, str]]:
    return [(row.line, row.issue.rule, row.issue.action) for row in rows if row.issue is not None]


def chat(user: str, assistant: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(record) + b"\n" for record in records))
    return path


# --- JSONL -------------------------------------------------------------------------------------------------------


def test_jsonl_rows_keep_their_physical_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text(orjson.dumps(chat("Oi", "Olá!")).decode() + "\n\n"
                    + orjson.dumps(chat("Tudo bem?", "Tudo ótimo.")).decode() + "\n", encoding="utf-8")
    rows = read(path)
    assert [(row.source, row.line) for row in rows] == [("chat.jsonl", 1), ("chat.jsonl", 3)]
    assert rows[1].value == chat("Tudo bem?", "Tudo ótimo.")


def test_truncated_json_lines_are_row_errors_and_the_rest_is_read(tmp_path: Path) -> None:
    good = orjson.dumps(chat("Qual a capital do Brasil?", "Brasília.")).decode()
    path = tmp_path / "truncated.jsonl"
    path.write_text(f"{good}\n{good[:40]}\n{good}\n{good[:-3]}", encoding="utf-8")  # the last line has no newline
    rows = read(path)
    assert issues(rows) == [(2, "invalid_json", "error"), (4, "invalid_json", "error")]
    assert [row.line for row in rows if row.value is not None] == [1, 3]
    assert "truncated" in rows[1].issue.detail
    assert rows[1].issue.source == "truncated.jsonl" and rows[1].issue.field == "line"


def test_bom_and_crlf_are_handled_and_the_bom_reported(tmp_path: Path) -> None:
    lines = [orjson.dumps(chat("Olá", "Oi, tudo bem?")).decode(), orjson.dumps(chat("Até logo", "Tchau!")).decode()]
    path = tmp_path / "windows.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + "\r\n".join(lines).encode("utf-8") + b"\r\n")
    rows = read(path)
    assert issues(rows) == [(0, "bom_removed", "fixed")]
    assert values(rows) == [chat("Olá", "Oi, tudo bem?"), chat("Até logo", "Tchau!")]
    assert [row.line for row in rows if row.value] == [1, 2]


def test_a_line_that_is_not_an_object_is_a_row_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mixed.jsonl", [chat("a", "b"), [chat("a", "b")], "texto solto", chat("c", "d")])
    rows = read(path)
    assert issues(rows) == [(2, "not_an_object", "error"), (3, "not_an_object", "error")]
    assert "got an array" in rows[1].issue.detail


def test_a_40_mb_single_line_is_a_row_error_without_stopping_the_file(tmp_path: Path) -> None:
    path = tmp_path / "huge_line.jsonl"
    big = {"messages": [{"role": "user", "content": "x" * (40 * 1024 * 1024)}]}
    with open(path, "wb") as handle:
        handle.write(orjson.dumps(chat("antes", "ok")) + b"\n")
        handle.write(orjson.dumps(big) + b"\n")
        handle.write(orjson.dumps(chat("depois", "ok")) + b"\n")
    assert path.stat().st_size > MAX_LINE_BYTES
    started = time.monotonic()
    rows = read(path)
    assert time.monotonic() - started < 5
    assert issues(rows) == [(2, "line_too_long", "error")]
    assert "40.0 MiB" in rows[1].issue.detail
    assert [row.line for row in rows if row.value] == [1, 3]


def test_a_corrupted_line_in_a_utf8_file_is_reported_on_its_own(tmp_path: Path) -> None:
    path = tmp_path / "corrupted.jsonl"
    path.write_bytes(orjson.dumps(chat("Olá", "Oi")) + b"\n" + b'{"text": "caf\xe9"}\n' + orjson.dumps(chat("a", "b")))
    rows = read(path)
    assert issues(rows) == [(2, "invalid_utf8", "error")]
    assert len(values(rows)) == 2


# --- encodings ---------------------------------------------------------------------------------------------------


def test_a_latin1_csv_is_decoded_and_the_encoding_reported(tmp_path: Path) -> None:
    path = tmp_path / "produtos_excel.csv"
    text = ("title;content\r\nCaneca Térmica;Mantém o café quente por até 6 horas.\r\n"
            "Pão de Queijo Congelado;Embalagem com 1 kg, pronto em 20 minutos no forno.\r\n")
    path.write_bytes(text.encode("cp1252"))
    rows = read(path)
    assert issues(rows) == [(0, "encoding_detected", "fixed")]
    assert "latin-1 decoding needed" in rows[0].issue.detail
    assert values(rows) == [
        {"title": "Caneca Térmica", "content": "Mantém o café quente por até 6 horas."},
        {"title": "Pão de Queijo Congelado", "content": "Embalagem com 1 kg, pronto em 20 minutos no forno."},
    ]


def test_a_short_latin1_jsonl_is_decoded(tmp_path: Path) -> None:
    path = tmp_path / "curto.jsonl"
    path.write_bytes('{"text": "ação"}\n'.encode("latin-1"))
    rows = read(path)
    assert issues(rows) == [(0, "encoding_detected", "fixed")]
    assert values(rows) == [{"text": "ação"}]


@pytest.mark.parametrize(("text", "codec", "named"), [
    ("Привет! Сегодня хорошая погода, не правда ли?", "cp1251", "cp1251"),
    ("今日はいい天気ですね。日本語のテキストです。", "shift_jis", "cp932"),
])
def test_a_non_latin_legacy_encoding_is_refused_naming_it(tmp_path: Path, text: str, codec: str, named: str) -> None:
    path = tmp_path / "outra_lingua.txt"
    path.write_bytes((text * 4).encode(codec))
    with pytest.raises(DatasetInvalid, match=f"outra_lingua.txt: not UTF-8: looks like {named}"):
        read(path)


def test_the_encoding_option_overrides_detection(tmp_path: Path) -> None:
    path = tmp_path / "notas.jsonl"
    path.write_bytes('{"text": "Atenção: promoção válida até sábado."}\n'.encode("latin-1"))
    assert values(read(path, encoding="latin-1")) == [{"text": "Atenção: promoção válida até sábado."}]
    with pytest.raises(InvalidRequest, match="unknown encoding 'klingon'"):
        read(path, encoding="klingon")


def test_utf16_with_a_bom_is_decoded(tmp_path: Path) -> None:
    path = tmp_path / "excel_unicode.csv"
    path.write_bytes("title\tcontent\r\nSabonete de Erva-Doce\tPerfume suave e hidratação.\r\n".encode("utf-16"))
    rows = read(path)
    assert issues(rows) == [(0, "bom_removed", "fixed")]
    assert "UTF-16" in rows[0].issue.detail
    assert values(rows) == [{"title": "Sabonete de Erva-Doce", "content": "Perfume suave e hidratação."}]


def test_utf16_without_a_bom_is_refused_naming_the_encoding(tmp_path: Path) -> None:
    path = tmp_path / "sem_bom.jsonl"
    path.write_bytes('{"text": "Olá, mundo"}\n'.encode("utf-16-le"))
    with pytest.raises(DatasetInvalid, match="sem_bom.jsonl: not UTF-8: looks like UTF-16"):
        read(path)


def test_a_file_mixing_encodings_is_refused_naming_the_line_for_csv(tmp_path: Path) -> None:
    path = tmp_path / "misto.csv"
    path.write_bytes("title,content\nCafé,Bom\n".encode() + b"P\xe3o,Quente\n")
    with pytest.raises(DatasetInvalid, match=r"^line 3: misto.csv: not valid UTF-8 at byte 25 ") as caught:
        read(path)
    assert caught.value.line == 3


# --- whole-file problems -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vazio.jsonl", "vazio.csv", "vazio.txt", "vazio.json", "vazio"])
def test_an_empty_file_is_refused_naming_it(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"")
    with pytest.raises(DatasetInvalid, match=f"{name} is empty"):
        read(path)


def test_a_file_of_only_a_bom_and_whitespace_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "quase_vazio.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + b"\r\n  \r\n")
    with pytest.raises(DatasetInvalid, match="quase_vazio.jsonl is empty"):
        read(path)


@pytest.mark.parametrize("name", ["dados.jsonl", "dados.csv", "dados.bin"])
def test_random_binary_is_refused_as_not_text(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(random.Random(3).randbytes(64 * 1024))
    with pytest.raises(DatasetInvalid, match=f"{name} is not a text file"):
        read(path)


# --- CSV ---------------------------------------------------------------------------------------------------------


def test_csv_with_quoted_newlines_reports_each_record_starting_line() -> None:
    rows = read(DATA / "produtos.csv")
    assert [row.line for row in rows] == [2, 3, 4, 7, 8, 9]
    kit = rows[2].value
    assert kit["title"] == 'Kit 3 Panos de Prato "Cozinha Feliz"'
    assert kit["content"] == "Panos 100% algodão, bordados à mão.\nMedem 45 x 70 cm.\nLavar à mão."
    assert rows[1].value == {"title": "Caneca Térmica Inox 500ml", "content": ""}


def test_csv_record_with_a_wrong_field_count_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "quebrado.csv"
    path.write_text('title,content\nA,"texto\ncom quebra"\nB,x,extra\nC,"aberto sem fechar\nD,y\n', encoding="utf-8")
    rows = read(path)
    assert issues(rows) == [(4, "csv_field_count", "error"), (5, "invalid_csv", "error")]
    assert "never closed" in rows[2].issue.detail
    assert rows[0].value == {"title": "A", "content": "texto\ncom quebra"}


@pytest.mark.parametrize(("name", "text", "options"), [
    ("ponto_virgula.csv", "title;content\nBolo;Receita de bolo, com fubá\n", {}),
    ("tabs.tsv", "title\tcontent\nBolo\tReceita de bolo, com fubá\n", {}),
    ("pipes.txt", "title|content\nBolo|Receita de bolo, com fubá\n", {"container": "csv", "csv_delimiter": "|"}),
])
def test_csv_delimiters(tmp_path: Path, name: str, text: str, options: dict[str, Any]) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    assert values(read(path, **options)) == [{"title": "Bolo", "content": "Receita de bolo, com fubá"}]


def test_csv_with_repeated_header_names_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "repetido.csv"
    path.write_text("title,title\na,b\n", encoding="utf-8")
    with pytest.raises(DatasetInvalid, match=r"repetido.csv: the CSV header repeats column name\(s\) \['title'\]"):
        read(path)


# --- JSON array --------------------------------------------------------------------------------------------------


def test_json_array_is_streamed_element_by_element() -> None:
    rows = read(DATA / "alpaca.json")
    assert [row.line for row in rows] == [1, 2, 3, 4]
    assert rows[0].value["instruction"] == "Traduza para o inglês."


def test_a_json_array_element_that_is_not_an_object_is_a_row_error(tmp_path: Path) -> None:
    path = tmp_path / "lista.json"
    path.write_bytes(orjson.dumps([chat("a", "b"), ["não", "é", "objeto"], chat("c", "d")]))
    rows = read(path)
    assert issues(rows) == [(2, "not_an_object", "error")]
    assert rows[1].issue.field == "[1]"


def test_a_truncated_json_array_keeps_the_elements_before_the_damage(tmp_path: Path) -> None:
    path = tmp_path / "cortado.json"
    path.write_bytes(orjson.dumps([chat("a", "b"), chat("c", "d"), chat("e", "f")])[:-30])
    rows = read(path)
    assert len(values(rows)) == 2
    assert issues(rows) == [(3, "invalid_json", "error")]


def test_an_object_where_an_array_was_expected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wrapper = tmp_path / "wrapper.json"
    wrapper.write_bytes(orjson.dumps({"data": [chat("a", "b"), chat("c", "d")]}, option=orjson.OPT_INDENT_2))
    rows = read(wrapper)
    assert issues(rows) == [(0, "json_wrapper_object", "warning")]
    assert values(rows) == [chat("a", "b"), chat("c", "d")]

    single = tmp_path / "um_exemplo.json"
    single.write_bytes(orjson.dumps(chat("Oi", "Olá"), option=orjson.OPT_INDENT_2))
    rows = read(single)
    assert issues(rows) == [(0, "json_single_object", "warning")]
    assert values(rows) == [chat("Oi", "Olá")]

    # too large to be one record: an object where an array of records was expected
    monkeypatch.setattr("afina.ingest.sources.json_array.MAX_LINE_BYTES", 10)
    config = tmp_path / "config.json"
    config.write_bytes(orjson.dumps({"modelo": "llama", "dados": {"treino": "x.jsonl"}}, option=orjson.OPT_INDENT_2))
    rows = read(config)
    assert values(rows) == []
    assert issues(rows) == [(1, "not_an_array", "error")]
    assert "an object where an array was expected" in rows[0].issue.detail
    assert "'modelo', 'dados'" in rows[0].issue.detail


def test_a_json_named_file_holding_json_lines_is_read_as_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "trn.json", [{"title": "Tutu", "content": "Saia rosa"},
                                               {"title": "Caneca", "content": "Inox"}])
    rows = read(path)
    assert [row.line for row in rows] == [1, 2]


# --- TXT ---------------------------------------------------------------------------------------------------------


def test_txt_is_one_row_with_line_endings_normalized(tmp_path: Path) -> None:
    path = tmp_path / "notas.txt"
    path.write_bytes(b"Primeira linha.\r\nSegunda linha.\r\n")
    rows = read(path)
    assert issues(rows) == [(0, "line_endings", "fixed")]
    assert values(rows) == ["Primeira linha.\nSegunda linha.\n"]
