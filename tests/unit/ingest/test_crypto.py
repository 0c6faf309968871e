"""Fernet-encrypted data (seed 001): fields and whole files, the key never shown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cryptography.fernet import Fernet

from afina.core.datasets.options import ColumnMapping, EncryptionOptions, IngestOptions
from afina.core.errors import DatasetInvalid, InvalidRequest
from afina.ingest.crypto import DecryptionFailed, decrypt_field, load_fernet
from afina.ingest.formats import to_examples
from afina.ingest.records import Example, RowIssue
from afina.ingest.sources import open_rows

KEY_ENV = "AFINA_TEST_CHAVE_CRIPT"


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> bytes:
    value = Fernet.generate_key()
    monkeypatch.setenv(KEY_ENV, value.decode())
    return value


def everything_said(items: list[Any]) -> str:
    """All text an ingest run could show a user: issues, examples' notes."""
    parts = []
    for item in items:
        issues = [item] if isinstance(item, RowIssue) else item.issues
        parts.extend(issue.describe() for issue in issues)
    return "\n".join(parts)


def test_load_fernet_names_the_variable_never_its_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(InvalidRequest, match=f"{KEY_ENV}' is not one of the key variables") as caught:
        load_fernet(KEY_ENV)  # unset: the same answer as a variable the tenant may not name
    assert caught.value.param == "encryption.key_env"
    monkeypatch.setenv(KEY_ENV, "minha-senha-super-secreta")
    with pytest.raises(InvalidRequest, match=f"the encryption key in {KEY_ENV} is not a valid Fernet key") as caught:
        load_fernet(KEY_ENV)
    assert "minha-senha-super-secreta" not in str(caught.value)


def test_decrypt_field_round_trip_and_failures(key: bytes) -> None:
    fernet = load_fernet(KEY_ENV)
    token = Fernet(key).encrypt("Paciente relata dor lombar há três semanas.".encode())
    assert decrypt_field(token.decode(), fernet) == "Paciente relata dor lombar há três semanas."
    assert decrypt_field(token, fernet) == "Paciente relata dor lombar há três semanas."
    other = Fernet(Fernet.generate_key()).encrypt(b"segredo")
    for bad in (other.decode(), "texto em claro, sem criptografia", token.decode()[:-8]):
        with pytest.raises(DecryptionFailed) as caught:
            decrypt_field(bad, fernet)
        assert "segredo" not in str(caught.value) and key.decode() not in str(caught.value)


def test_rotated_keys_decrypt_with_any_of_them(monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = Fernet.generate_key(), Fernet.generate_key()
    monkeypatch.setenv(KEY_ENV, f"{new.decode()},{old.decode()}")
    assert decrypt_field(Fernet(old).encrypt(b"antigo"), load_fernet(KEY_ENV)) == "antigo"


def test_parquet_with_encrypted_fields_like_seed_001(tmp_path: Path, key: bytes) -> None:
    fernet = Fernet(key)
    wrong = Fernet(Fernet.generate_key())
    records = [
        ("Paciente com febre de 39 graus há dois dias.", "Investigar dengue; hidratação e repouso.", "treino", fernet),
        ("Dor de cabeça intensa ao acordar.", "Avaliar pressão arterial e padrão de sono.", "validacao", fernet),
        ("Tosse seca persistente por um mês.", "Solicitar raio-X de tórax.", "teste", wrong),
        ("Alergia a dipirona relatada.", "Registrar no prontuário e evitar o medicamento.", "treino", fernet),
    ]
    table = pa.table({
        "texto": [cipher.encrypt(text.encode()).decode() for text, _, _, cipher in records],
        "resposta": [cipher.encrypt(answer.encode()) for _, answer, _, cipher in records],  # a binary column
        "divisao": [split for _, _, split, _ in records],
    })
    path = tmp_path / "prontuarios.parquet"
    pq.write_table(table, path)
    options = IngestOptions(
        columns=ColumnMapping(user="Analise o caso clínico:\n{texto}", assistant="{resposta}"),
        encryption=EncryptionOptions(key_env=KEY_ENV, fields=["texto", "resposta"]),
        split={"split_column": "divisao", "proportions": {"treino": 0.8, "validacao": 0.1, "teste": 0.1}},
    )
    items = list(to_examples(open_rows(path, path.name, options), options))
    examples = [item for item in items if isinstance(item, Example)]
    assert [example.line for example in examples] == [1, 2, 4]
    assert examples[0].messages == [
        {"role": "user", "content": "Analise o caso clínico:\nPaciente com febre de 39 graus há dois dias."},
        {"role": "assistant", "content": "Investigar dengue; hidratação e repouso."},
    ]
    assert [example.split for example in examples] == ["train", "validation", "train"]
    failures = [item for item in items if isinstance(item, RowIssue)]
    assert [(issue.line, issue.field, issue.rule, issue.action) for issue in failures] == [
        (3, "texto", "decryption_failed", "error")]
    assert KEY_ENV in failures[0].detail
    said = everything_said(items)
    assert key.decode() not in said and "Tosse seca" not in said and "raio-X" not in said


def test_encrypted_message_contents_in_a_messages_column(tmp_path: Path, key: bytes) -> None:
    fernet = Fernet(key)
    conversation = [{"role": "user", "content": fernet.encrypt(b"Qual meu saldo?").decode()},
                    {"role": "assistant", "content": fernet.encrypt("Seu saldo é R$ 1.250,00.".encode()).decode()}]
    path = tmp_path / "banco.parquet"
    pq.write_table(pa.table({"messages": [conversation]}), path)
    options = IngestOptions(encryption=EncryptionOptions(key_env=KEY_ENV, fields=["messages.content"]))
    [example] = list(to_examples(open_rows(path, path.name, options), options))
    assert example.messages == [{"role": "user", "content": "Qual meu saldo?"},
                                {"role": "assistant", "content": "Seu saldo é R$ 1.250,00."}]


def test_a_whole_encrypted_file_is_decrypted_before_reading(tmp_path: Path, key: bytes) -> None:
    plain = b"".join(orjson.dumps({"messages": [{"role": "user", "content": f"Pergunta {index}"},
                                                {"role": "assistant", "content": f"Resposta {index}"}]}) + b"\n"
                     for index in range(3))
    path = tmp_path / "sigiloso.jsonl.enc"
    path.write_bytes(Fernet(key).encrypt(plain))
    options = IngestOptions(encryption=EncryptionOptions(key_env=KEY_ENV, whole_file=True))
    rows = list(open_rows(path, path.name, options))
    assert [(row.source, row.line) for row in rows] == [("sigiloso.jsonl.enc", 1), ("sigiloso.jsonl.enc", 2),
                                                        ("sigiloso.jsonl.enc", 3)]
    assert rows[2].value["messages"][1]["content"] == "Resposta 2"


def test_a_whole_file_with_the_wrong_key_is_refused_without_the_key(tmp_path: Path, key: bytes) -> None:
    path = tmp_path / "sigiloso.jsonl.enc"
    path.write_bytes(Fernet(Fernet.generate_key()).encrypt(b'{"text": "confidencial"}\n'))
    options = IngestOptions(encryption=EncryptionOptions(key_env=KEY_ENV, whole_file=True))
    with pytest.raises(DatasetInvalid, match=f"sigiloso.jsonl.enc could not be decrypted with the key in {KEY_ENV}") \
            as caught:
        list(open_rows(path, path.name, options))
    assert key.decode() not in str(caught.value) and "confidencial" not in str(caught.value)


def test_field_decryption_without_the_variable_fails_before_any_row(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    path = tmp_path / "dados.jsonl"
    path.write_text('{"prompt": "x", "completion": "y"}\n', encoding="utf-8")
    options = IngestOptions(encryption=EncryptionOptions(key_env=KEY_ENV, fields=["prompt"]))
    with pytest.raises(InvalidRequest, match=f"{KEY_ENV}' is not one of the key variables"):
        list(to_examples(open_rows(path, path.name, options), options))
