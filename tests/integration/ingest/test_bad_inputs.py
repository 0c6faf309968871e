"""The bad-input corpus through the real API and a real ingest worker.

Every input gets either a 4xx at upload, whose message names the file and what is wrong (and then
nothing is stored), or an upload that ingest processes with a per-row error naming file, line,
field and rule in the downloadable report (or, for a file-level problem, the file ends ``error``
with ``status_details`` saying why). Never a 500, and the server keeps serving after each.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import func, select

from afina.core.db.models import File
from tests.integration.ingest.conftest import IngestStack

pytestmark = pytest.mark.integration

PERGUNTAS = ("qual o prazo de entrega para Recife?", "posso trocar o tamanho da camiseta?",
             "vocês aceitam pix?", "o notebook tem garantia de quantos meses?", "como rastreio meu pedido?",
             "a loja abre no domingo?", "tem desconto para estudante?", "o frete é grátis?",
             "a caneca vai na lava-louças?", "como falo com um atendente humano?", "vocês vendem no atacado?",
             "o celular vem com carregador?")


def chat(i: int, **override: Any) -> dict[str, Any]:
    record = {"messages": [{"role": "user", "content": f"{PERGUNTAS[i % len(PERGUNTAS)]} (pedido {1000 + i})"},
                           {"role": "assistant", "content": f"Claro! Sobre o pedido {1000 + i}: já está tudo certo."}]}
    record.update(override)
    return record


def lines(records: list[Any], newline: bytes = b"\n") -> bytes:
    return b"".join((record if isinstance(record, bytes) else orjson.dumps(record)) + newline for record in records)


def good_rows(n: int = 12) -> list[Any]:
    return [chat(i) for i in range(n)]


def with_row(line: int, row: Any, n: int = 14) -> bytes:
    rows = good_rows(n)
    rows[line - 1] = row
    return lines(rows)


def zip_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def zip_bomb(expanded_bytes: int) -> bytes:
    """A real ZIP of ~2 MB whose one member inflates to ``expanded_bytes`` of zeros.

    One 8 MiB block of zeros is deflated once with a full flush (so it is self-contained) and that
    block is repeated; zipfile still computes the CRC and sizes over every byte it is given.
    """
    chunk = bytes(8 * 1024 * 1024)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)

    class RepeatedBlock:
        def compress(self, data: bytes) -> bytes:
            assert data == chunk
            return block

        def flush(self) -> bytes:
            return zlib.compressobj(9, zlib.DEFLATED, -15).flush()  # the final, empty block

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive, \
            archive.open("inputs/pedido.txt", "w", force_zip64=True) as member:
        member._compressor = RepeatedBlock()  # noqa: SLF001 - deflating 2 GiB for real takes 25 s
        for _ in range(expanded_bytes // len(chunk)):
            member.write(chunk)
    data = buffer.getvalue()
    with zipfile.ZipFile(io.BytesIO(data)) as archive, archive.open("inputs/pedido.txt") as member:
        assert member.read(len(chunk) * 2) == chunk * 2  # it really inflates
    return data


def tar_gz_bomb(expanded_bytes: int) -> bytes:
    """A tar.gz whose one member expands far beyond any sane ratio (the gateway does not open tar files)."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9) as gz, tarfile.open(fileobj=gz, mode="w|") as tar:
        info = tarfile.TarInfo("inputs/pedido.txt")
        info.size = expanded_bytes

        class Zeros:
            remaining = expanded_bytes

            def read(self, size: int = -1) -> bytes:
                n = self.remaining if size < 0 else min(size, self.remaining)
                self.remaining -= n
                return bytes(n)

        tar.addfile(info, Zeros())
    return buffer.getvalue()


def row_count(stack: IngestStack, tenant: str) -> int:
    with stack.gateway.runtime.db.session() as session:
        return session.scalar(select(func.count()).select_from(File).where(File.tenant_id == tenant)) or 0


def stored_objects(stack: IngestStack, tenant: str) -> list[str]:
    return [info.key for info in stack.gateway.runtime.store.list(f"files/{tenant}/")]


# -- refused at upload: 4xx, nothing stored ----------------------------------------------------------

REFUSED: dict[str, tuple[str, Callable[[], bytes], str, str]] = {
    # id: (filename, content, error code, words the message must contain)
    "random binary": ("dump.bin", lambda: bytes(range(256)) * 512, "unsupported_file_type", "not text"),
    "random binary named jsonl": ("train.jsonl", lambda: bytes((i * 7919) % 256 for i in range(100_000)),
                                  "unsupported_file_type", "not text"),
    "empty file": ("vazio.jsonl", lambda: b"", "empty_file", "empty"),
    "only blank lines": ("branco.jsonl", lambda: b"\r\n\n  \n", "empty_file", "empty"),
    "zip with a ../ member": ("pastas.zip", lambda: zip_of({"inputs/a.txt": b"pergunta",
                                                             "../../outputs/a.txt": b"resposta"}),
                              "unsafe_archive_member", "'../../outputs/a.txt'"),
    "zip bomb (gigabytes)": ("pastas.zip", lambda: zip_bomb(2 * 1024**3), "archive_too_large",
                             "decompression bomb"),
    "first line truncated": ("cortado.jsonl", lambda: b'{"messages": [{"role": "user", "content": "oi',
                             "invalid_file_format", "line 1 is not valid JSON"),
    "array of numbers": ("numeros.json", lambda: b"[1, 2, 3]", "invalid_file_format", "array of numbers"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_at_upload_with_the_reason_and_nothing_stored(ingest_stack: IngestStack, case: str) -> None:
    filename, content, code, words = REFUSED[case]
    rows_before, objects_before = row_count(ingest_stack, "globex"), stored_objects(ingest_stack, "globex")
    response = ingest_stack.upload(filename, content(), tenant="globex")
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert error["code"] == code and words in error["message"] and filename in error["message"], error
    assert error["param"] == "file"
    assert row_count(ingest_stack, "globex") == rows_before
    assert stored_objects(ingest_stack, "globex") == objects_before
    assert list((ingest_stack.gateway.runtime.settings.resolved_work_dir / "uploads").glob("*")) == []
    ingest_stack.still_serving()


# -- accepted, then a per-row error in the report -------------------------------------------------------

def _truncated_last_line() -> bytes:
    return lines(good_rows(12)) + b'{"messages": [{"role": "user", "content": "cortad'


ROW_ERRORS: dict[str, tuple[Callable[[], bytes], int, str, str]] = {
    # id: (content, line, field, rule); every file has enough good rows to be processed (lenient mode)
    "truncated JSON line": (_truncated_last_line, 13, "line", "invalid_json"),
    "wrong role": (lambda: with_row(5, {"messages": [{"role": "bot", "content": "oi"},
                                                     {"role": "assistant", "content": "olá"}]}),
                   5, "messages[0].role", "unrecognized_role"),
    "missing assistant": (lambda: with_row(7, {"messages": [{"role": "user", "content": "alô?"}]}), 7, "messages",
                          "example_missing_assistant_message"),
    "empty content": (lambda: with_row(3, {"messages": [{"role": "user", "content": "oi"},
                                                        {"role": "assistant", "content": ""}]}),
                      3, "messages[1].content", "missing_content"),
    "object where an array was expected": (lambda: with_row(9, {"messages": {"role": "user", "content": "oi"}}), 9,
                                           "messages", None),
    "40 MB single line": (lambda: with_row(2, orjson.dumps(chat(1, padding="x" * (40 * 1024 * 1024)))), 2,
                          "line", "line_too_long"),
}


@pytest.mark.parametrize("case", list(ROW_ERRORS))
def test_a_bad_row_is_reported_where_and_what_and_the_rest_is_kept(ingest_stack: IngestStack, case: str) -> None:
    content, line, field, rule = ROW_ERRORS[case]
    response = ingest_stack.upload("pedidos.jsonl", content())
    assert response.status_code == 200, response.text
    status = ingest_stack.wait(response.json()["id"])
    assert status["status"] == "processed", status
    assert status["counts"]["examples"] == status["counts"]["rows"] - 1
    report = [entry for entry in ingest_stack.report(status["file_id"]) if entry["action"] in ("error", "dropped")]
    assert {(entry["file"], entry["line"]) for entry in report} == {("pedidos.jsonl", line)}, report  # one row
    entry = report[0]  # the first thing wrong with it
    assert entry["field"] == field, entry
    assert all(item["action"] == "dropped" and item["detail"] for item in report)
    if rule is not None:
        assert entry["rule"] == rule, entry
    assert status["issues"][entry["rule"]] == {"dropped": 1}
    if len(content()) >= 32 * 1024 * 1024:  # a large file: the Celery worker spread it over worker processes
        logged = [line for line in ingest_stack.worker_log.read_text().splitlines()
                  if "file.ingested" in line and status["file_id"] in line]
        assert logged and "processes=2" in logged[-1], logged
    ingest_stack.still_serving()


def test_strict_mode_fails_the_file_naming_the_row(ingest_stack: IngestStack) -> None:
    content = with_row(5, {"messages": [{"role": "bot", "content": "oi"}, {"role": "assistant", "content": "olá"}]})
    response = ingest_stack.upload("pedidos.jsonl", content, {"mode": "strict"})
    status = ingest_stack.wait(response.json()["id"])
    assert status["status"] == "error"
    assert "pedidos.jsonl, line 5, field messages[0].role" in status["status_details"]
    assert "[unrecognized_role]" in status["status_details"]
    assert status["first_errors"][0]["line"] == 5
    report = ingest_stack.report(status["file_id"])
    assert report[0]["rule"] == "unrecognized_role" and {entry["action"] for entry in report} == {"error"}
    assert httpx_status(ingest_stack, f"/v1/files/{status['file_id']}/ingest/preview") == 404  # nothing committed


def httpx_status(stack: IngestStack, path: str) -> int:
    import httpx

    return httpx.get(f"{stack.url}{path}", headers=stack.headers(), timeout=30).status_code


# -- accepted and repaired or decoded: reported as fixed ---------------------------------------------------

def test_bom_and_crlf_are_repaired(ingest_stack: IngestStack) -> None:
    content = b"\xef\xbb\xbf" + lines(good_rows(12), newline=b"\r\n")
    status = ingest_stack.wait(ingest_stack.upload("windows.jsonl", content).json()["id"])
    assert status["status"] == "processed" and status["counts"]["examples"] == 12
    fixed = {(entry["rule"], entry["line"]) for entry in ingest_stack.report(status["file_id"])
             if entry["action"] == "fixed"}
    assert ("bom_removed", 0) in fixed


def test_a_latin1_file_is_detected_decoded_and_reported(ingest_stack: IngestStack) -> None:
    rows = [json.dumps(record, ensure_ascii=False) for record in good_rows(12)]
    rows[0] = json.dumps(chat(0, messages=[{"role": "user", "content": "Qual é a previsão de entrega? Ação rápida!"},
                                           {"role": "assistant", "content": "Amanhã, até às 18h. Obrigado!"}]),
                         ensure_ascii=False)
    content = ("\n".join(rows) + "\n").encode("latin-1")
    status = ingest_stack.wait(ingest_stack.upload("latin1.jsonl", content).json()["id"])
    assert status["status"] == "processed" and status["counts"]["examples"] == 12
    notes = [entry for entry in ingest_stack.report(status["file_id"]) if entry["rule"] == "encoding_detected"]
    assert notes and notes[0]["line"] == 0 and "latin-1" in notes[0]["detail"]
    preview = httpx_text(ingest_stack, f"/v1/files/{status['file_id']}/ingest/preview")
    # only row 0 has these words, and only a latin-1 decode gives them back: read as UTF-8 the accented bytes
    # are invalid (U+FFFD), and text decoded with the wrong codec a second time is mojibake ("AÃ§Ã£o")
    assert "Qual é a previsão de entrega? Ação rápida!" in preview
    assert "Amanhã, até às 18h. Obrigado!" in preview
    assert "\ufffd" not in preview and "Ã" not in preview


def httpx_text(stack: IngestStack, path: str) -> str:
    import httpx

    response = httpx.get(f"{stack.url}{path}", headers=stack.headers(), timeout=30)
    assert response.status_code == 200, response.text
    return response.text


def test_csv_with_quoted_newlines_keeps_them_inside_the_cell(ingest_stack: IngestStack) -> None:
    rows = ["pergunta,resposta"]
    for i in range(12):
        rows.append(f'"Linha um da pergunta {i}\nlinha dois","Resposta {i}:\n- item a\n- item b"')
    content = ("\n".join(rows) + "\n").encode()
    options = {"format": "columns", "columns": {"user": "{pergunta}", "assistant": "{resposta}"}}
    status = ingest_stack.wait(ingest_stack.upload("produtos.csv", content, options).json()["id"])
    assert status["status"] == "processed", status
    assert status["counts"]["rows"] == 12 and status["counts"]["examples"] == 12
    preview = httpx_text(ingest_stack, f"/v1/files/{status['file_id']}/ingest/preview")
    assert "Linha um da pergunta 0\nlinha dois" in preview


# -- accepted by the gateway, refused by the worker: the file ends in error, saying why --------------------

def test_a_tar_gz_bomb_fails_the_file_naming_the_member(ingest_stack: IngestStack) -> None:
    response = ingest_stack.upload("pastas.tar.gz", tar_gz_bomb(256 * 1024**2), {"format": "paired"})
    assert response.status_code == 200, response.text
    status = ingest_stack.wait(response.json()["id"])
    assert status["status"] == "error"
    assert "pastas.tar.gz" in status["status_details"] and "inputs/pedido.txt" in status["status_details"]
    report = ingest_stack.report(status["file_id"])
    assert report[0]["field"] == "file" and report[0]["rule"] in ("archive_bomb", "archive_too_large")
    # nothing of the archive was kept on the worker's disk
    work = Path(ingest_stack.gateway.runtime.settings.resolved_work_dir) / "ingest"
    assert not work.exists() or list(work.iterdir()) == []
    ingest_stack.still_serving()
