"""Paired folders (seed 001's "modo pastas"): inputs/ and outputs/ paired by base name, in ZIP or tar.gz."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest

from afina.core.datasets.options import IngestOptions, PairedOptions
from afina.ingest.formats import to_examples
from afina.ingest.records import Example, RowIssue
from afina.ingest.sources import open_rows

MEMBERS = {
    "acordaos/entradas/processo_001.txt": "Apelação cível. Cobrança indevida de tarifa bancária.",
    "acordaos/entradas/processo_002.txt": "Recurso contra multa de trânsito aplicada sem notificação.",
    "acordaos/entradas/processo_003.txt": "Ação de alimentos; pedido de revisão do valor.",
    "acordaos/saidas/processo_001.json": '{"decisao": "provido", "ementa": "Tarifa indevida deve ser restituída."}',
    "acordaos/saidas/processo_002.md": "Recurso provido: a multa é nula sem notificação prévia.",
    "acordaos/saidas/processo_004.txt": "Saída sem entrada correspondente.",
    "acordaos/LEIA-ME.txt": "Dados de exemplo.",
}
OPTIONS = PairedOptions(inputs_dir="entradas", outputs_dir="saidas",
                        prompt_template="Resuma o processo {name} no formato JSON:\n{input}")


def build(path: Path, kind: str) -> Path:
    if kind == "zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, text in MEMBERS.items():
                archive.writestr(name, text.encode("utf-8"))
    else:
        with tarfile.open(path, "w:gz") as archive:
            for name, text in reversed(MEMBERS.items()):  # outputs before inputs: pairing must not care
                data = text.encode("utf-8")
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return path


def convert(path: Path, **options: Any) -> list[Example | RowIssue]:
    ingest = IngestOptions(**options)
    return list(to_examples(open_rows(path, path.name, ingest), ingest))


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_inputs_and_outputs_pair_by_base_name(tmp_path: Path, kind: str) -> None:
    name = f"acordaos.{kind}"
    items = convert(build(tmp_path / name, kind), paired=OPTIONS, system_prompt="Você é um assistente jurídico.")
    found = sorted((item for item in items if isinstance(item, Example)), key=lambda example: example.source)
    assert [example.source for example in found] == [f"{name}:acordaos/entradas/processo_001.txt",
                                                     f"{name}:acordaos/entradas/processo_002.txt"]
    assert found[0].messages == [
        {"role": "system", "content": "Você é um assistente jurídico."},
        {"role": "user", "content": "Resuma o processo processo_001 no formato JSON:\n"
                                    "Apelação cível. Cobrança indevida de tarifa bancária."},
        {"role": "assistant", "content": '{"decisao": "provido", "ementa": "Tarifa indevida deve ser restituída."}'},
    ]
    reported = sorted((item.source, item.rule, item.action) for item in items if isinstance(item, RowIssue))
    assert reported == [
        (f"{name}:acordaos/LEIA-ME.txt", "paired_unexpected_file", "dropped"),
        (f"{name}:acordaos/entradas/processo_003.txt", "paired_missing_output", "dropped"),
        (f"{name}:acordaos/saidas/processo_004.txt", "paired_missing_input", "dropped"),
    ]


def test_default_folder_names_and_template(tmp_path: Path) -> None:
    path = tmp_path / "pares.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("inputs/a.txt", "Traduza: bom dia")
        archive.writestr("outputs/a.txt", "good morning")
        archive.writestr("inputs/sub/a.txt", "Traduza: boa noite")
        archive.writestr("outputs/sub/a.txt", "good night")
    found = [item for item in convert(path) if isinstance(item, Example)]
    assert [example.messages for example in found] == [
        [{"role": "user", "content": "Traduza: bom dia"}, {"role": "assistant", "content": "good morning"}],
        [{"role": "user", "content": "Traduza: boa noite"}, {"role": "assistant", "content": "good night"}],
    ]


def test_two_inputs_with_the_same_base_name_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "duplicado.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("inputs/caso.txt", "primeiro")
        archive.writestr("inputs/caso.md", "segundo")
        archive.writestr("outputs/caso.txt", "resposta")
    items = convert(path, format="paired")
    assert [item.messages[0]["content"] for item in items if isinstance(item, Example)] == ["primeiro"]
    [issue] = [item for item in items if isinstance(item, RowIssue)]
    assert (issue.source, issue.rule) == ("duplicado.zip:inputs/caso.md", "paired_duplicate_name")
