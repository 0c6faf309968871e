"""Format detection and the chat-shaped converters: OpenAI, ShareGPT, Alpaca, prompt/completion, text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from afina.core.datasets.options import IngestOptions
from afina.core.errors import DatasetInvalid
from afina.ingest.formats import detect_format, to_examples
from afina.ingest.records import Example, RowIssue, SourceRow
from afina.ingest.sources import open_rows

DATA = Path(__file__).parents[2] / "data" / "ingest"


def convert(path: Path, **options: Any) -> list[Example | RowIssue]:
    ingest = IngestOptions(**options)
    return list(to_examples(open_rows(path, path.name, ingest), ingest))


def examples(items: list[Example | RowIssue]) -> list[Example]:
    return [item for item in items if isinstance(item, Example)]


def problems(items: list[Example | RowIssue]) -> list[tuple[int, str, str, str]]:
    return [(item.line, item.field, item.rule, item.action) for item in items if isinstance(item, RowIssue)]


def rows(*values: Any, source: str = "amostra.jsonl") -> list[SourceRow]:
    return [SourceRow(source, index + 1, value) for index, value in enumerate(values)]


@pytest.mark.parametrize(("value", "expected"), [
    ({"messages": []}, "openai"),
    ({"conversations": []}, "sharegpt"),
    ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
    ({"prompt": "a", "completion": "b"}, "prompt_completion"),
    ({"text": "Era uma vez..."}, "text"),
    ("Texto corrido sem falantes.", "text"),
    ("VOCÊ: oi\nAEON: olá", "transcript"),
])
def test_detect_format_from_keys_and_text(value: Any, expected: str) -> None:
    assert detect_format(rows(value)) == expected


def test_detect_format_follows_the_majority_of_the_sample() -> None:
    sample = rows({"text": "nota solta"}, *[{"messages": []}] * 3)
    assert detect_format(sample) == "openai"


def test_detect_format_failure_lists_the_keys_it_saw() -> None:
    with pytest.raises(DatasetInvalid) as caught:
        detect_format(rows({"title": "Tutu", "content": "Saia"}, {"title": "Caneca", "preco": 30}, source="trn.json"))
    message = caught.value.message
    assert message.startswith("trn.json: could not detect the dataset format")
    assert "['content', 'preco', 'title']" in message
    assert "format 'columns'" in message and "field_map" in message
    assert caught.value.rule == "unknown_format"


def test_openai_jsonl_with_a_user_split() -> None:
    items = convert(DATA / "chat_openai.jsonl")
    assert problems(items) == []
    found = examples(items)
    assert [example.line for example in found] == [1, 2, 3]
    assert found[0].messages[0] == {"role": "system", "content": "Você é um assistente de uma loja online brasileira."}
    assert [example.split for example in found] == [None, None, "test"]


def test_openai_messages_that_are_not_an_array_are_row_errors(tmp_path: Path) -> None:
    path = tmp_path / "errado.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(record) for record in [
        {"messages": [{"role": "user", "content": "Oi"}, {"role": "assistant", "content": "Olá"}]},
        {"messages": {"role": "user", "content": "um objeto onde devia haver uma lista"}},
        {"messages": ["texto solto"]},
        {"messages": '[{"role": "user", "content": "lista como texto"}]'},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Descreva "},
                                                    {"type": "text", "text": "a foto"}]},
                      {"role": "assistant", "content": "Uma praia."}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    ]))
    items = convert(path)
    assert problems(items) == [(2, "messages", "not_a_list", "error"), (3, "messages[0]", "not_an_object", "error"),
                               (6, "messages[0].content[0]", "unsupported_content", "error")]
    assert "got an object" in items[1].detail
    found = examples(items)
    assert found[1].messages == [{"role": "user", "content": "lista como texto"}]
    assert found[2].messages[0] == {"role": "user", "content": "Descreva a foto"}


def test_messages_column_in_csv_as_json_string(tmp_path: Path) -> None:
    path = tmp_path / "mensagens.csv"
    cell = orjson.dumps([{"role": "user", "content": "Quanto custa o frete?"},
                         {"role": "assistant", "content": "Grátis acima de R$ 99."}]).decode().replace('"', '""')
    path.write_text(f'id,messages\n1,"{cell}"\n2,"não é json"\n', encoding="utf-8")
    items = convert(path)
    assert examples(items)[0].messages[1] == {"role": "assistant", "content": "Grátis acima de R$ 99."}
    assert problems(items) == [(3, "messages", "invalid_json", "error")]


def test_parquet_messages_column_as_structs_or_json_text(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    conversation = [{"role": "user", "content": "Qual o CEP da Avenida Paulista, 1000?", "name": None},
                    {"role": "assistant", "content": "É 01310-100.", "name": "atendente"}]
    structs = tmp_path / "structs.parquet"
    pq.write_table(pa.table({"messages": [conversation], "divisao": ["validacao"]}), structs)
    [example] = convert(structs, split={"split_column": "divisao"})
    # a struct column gives every message every key, None where absent: those are dropped
    assert example.messages == [{"role": "user", "content": "Qual o CEP da Avenida Paulista, 1000?"},
                                {"role": "assistant", "content": "É 01310-100.", "name": "atendente"}]
    assert example.split == "validation"
    text = tmp_path / "texto.parquet"
    pq.write_table(pa.table({"messages": [orjson.dumps(conversation).decode()]}), text)
    assert [example.messages for example in examples(convert(text))] == [example.messages]


def test_sharegpt_roles_are_mapped_and_unknown_speakers_reported() -> None:
    items = convert(DATA / "sharegpt.json")
    found = examples(items)
    assert [message["role"] for message in found[0].messages] == ["system", "user", "assistant", "user", "assistant"]
    assert found[1].messages == [{"role": "user", "content": "Qual a fórmula da área do círculo?"},
                                 {"role": "assistant", "content": "A área é π vezes o raio ao quadrado (A = πr²)."}]
    assert problems(items) == [(3, "conversations[1].from", "unknown_speaker", "error")]
    assert "'robô'" in items[2].detail


def test_alpaca_instruction_and_input_become_the_user_turn() -> None:
    items = convert(DATA / "alpaca.json")
    found = examples(items)
    assert found[0].messages == [
        {"role": "user", "content": "Traduza para o inglês.\n\nO gato está dormindo no sofá."},
        {"role": "assistant", "content": "The cat is sleeping on the couch."},
    ]
    assert found[1].messages[0] == {"role": "user", "content": "Dê três dicas para economizar energia em casa."}
    assert problems(items) == [(4, "output", "missing_field", "error")]


def test_prompt_completion_with_string_or_message_prompts() -> None:
    items = convert(DATA / "prompt_completion.jsonl")
    found = examples(items)
    assert found[0].messages == [{"role": "user", "content": "Escreva um slogan para uma padaria artesanal."},
                                 {"role": "assistant", "content": "Pão quentinho, feito à mão, todo dia."}]
    assert [message["role"] for message in found[1].messages] == ["system", "user", "assistant"]
    assert problems(items) == [(3, "completion", "missing_field", "error")]


def test_field_map_renames_before_detection(tmp_path: Path) -> None:
    path = tmp_path / "faq.jsonl"
    path.write_text('{"pergunta": "Como redefinir a senha?", "resposta": "Clique em Esqueci minha senha."}\n',
                    encoding="utf-8")
    [example] = convert(path, field_map={"pergunta": "prompt", "resposta": "completion"})
    assert example.messages == [{"role": "user", "content": "Como redefinir a senha?"},
                                {"role": "assistant", "content": "Clique em Esqueci minha senha."}]


def test_system_prompt_is_injected_only_where_missing() -> None:
    found = examples(convert(DATA / "chat_openai.jsonl", system_prompt="Responda sempre em português do Brasil."))
    assert found[0].messages[0]["content"] == "Você é um assistente de uma loja online brasileira."
    assert found[1].messages[0] == {"role": "system", "content": "Responda sempre em português do Brasil."}
    assert sum(message["role"] == "system" for example in found for message in example.messages) == 3


def test_text_file_becomes_one_example_per_blank_line_separated_document() -> None:
    found = examples(convert(DATA / "artigo.txt"))
    assert [example.line for example in found] == [1, 4, 8]
    assert found[1].text == ("No século XIX, o café tornou-se o principal produto de exportação do país\n"
                             "e financiou a expansão das ferrovias paulistas.")
    assert all(example.messages is None for example in found)


def test_text_records_in_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "Receita de pão de queijo: polvilho, queijo e ovos."}\n{"text": null}\n',
                    encoding="utf-8")
    items = convert(path)
    assert examples(items)[0].text == "Receita de pão de queijo: polvilho, queijo e ovos."
    assert problems(items) == [(2, "text", "missing_field", "error")]


def test_a_text_file_under_a_record_format_is_a_row_error(tmp_path: Path) -> None:
    path = tmp_path / "leia-me.txt"
    path.write_text("Este arquivo explica os dados.", encoding="utf-8")
    assert problems(convert(path, format="openai")) == [(1, "file", "not_a_record", "error")]


def test_unreadable_rows_pass_through_as_issues_and_detection_skips_them(tmp_path: Path) -> None:
    path = tmp_path / "quebrado.jsonl"
    path.write_text('{"messages": [\n{"instruction": "Some 2+2", "output": "4"}\n', encoding="utf-8")
    items = convert(path)
    assert problems(items) == [(1, "line", "invalid_json", "error")]
    assert examples(items)[0].messages[1] == {"role": "assistant", "content": "4"}


def test_a_file_with_no_readable_row_yields_only_its_issues(tmp_path: Path) -> None:
    path = tmp_path / "tudo_quebrado.jsonl"
    path.write_text('{"a": \n[1, 2]\n', encoding="utf-8")
    assert problems(convert(path)) == [(1, "line", "invalid_json", "error"), (2, "line", "not_an_object", "error")]
