"""Uploads with ingest options, and the ingest endpoints before a worker has run (no worker in this package)."""

from __future__ import annotations

import io
import json
import zipfile

import httpx
import pytest
from sqlalchemy import select

from afina.core.db.models import File
from tests.integration.gateway.conftest import Gateway, chat_jsonl


def post_file(gateway: Gateway, name: str, content: bytes, options: object | None = None, tenant: str = "acme",
              options_first: bool = True) -> httpx.Response:
    """A raw multipart upload, with ``ingest_options`` before (or after) the file part."""
    boundary = "afinaboundary"
    parts = [("purpose", None, b"fine-tune")]
    option_part = [("ingest_options", None, (options if isinstance(options, str) else json.dumps(options)).encode())] \
        if options is not None else []
    file_part = [("file", name, content)]
    parts += option_part + file_part if options_first else file_part + option_part
    body = b""
    for field, filename, data in parts:
        disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return httpx.post(f"{gateway.url}/v1/files", content=body, timeout=60,
                      headers={"Authorization": f"Bearer {gateway.keys[tenant]}",
                               "Content-Type": f"multipart/form-data; boundary={boundary}"})


def rows(gateway: Gateway, tenant: str) -> list[File]:
    with gateway.runtime.db.session() as session:
        return list(session.scalars(select(File).where(File.tenant_id == tenant)))


def stored(gateway: Gateway, tenant: str) -> list[str]:
    return [info.key for info in gateway.runtime.store.list(f"files/{tenant}/")]


def test_options_are_stored_with_the_file_as_the_user_wrote_them(gateway: Gateway) -> None:
    options = {"format": "openai", "system_prompt": "Você é o Aeon, assistente da casa.", "mode": "strict",
               "split": {"proportions": {"treino": 0.8, "validacao": 0.1, "teste": 0.1}}}
    response = post_file(gateway, "aeon.jsonl", chat_jsonl(12), options)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "uploaded" and body["status_details"] is None
    row = next(row for row in rows(gateway, "acme") if row.id == body["id"])
    assert row.ingest_options["system_prompt"] == "Você é o Aeon, assistente da casa."
    assert row.ingest_options["mode"] == "strict"
    assert row.ingest_options["split"]["proportions"] == {"train": 0.8, "validation": 0.1, "test": 0.1}
    assert "max_seq_len" not in row.ingest_options  # defaults stay defaults


@pytest.mark.parametrize(("options", "param", "words"), [
    ({"split": {"proportions": {"treino": 0.8, "validacao": 0.1}}}, "ingest_options.split.proportions", "sum to 1"),
    ({"formato": "openai"}, "ingest_options.formato", "Extra inputs"),
    ({"format": "columns"}, "ingest_options", "columns"),
    ({"max_seq_len": 4}, "ingest_options.max_seq_len", "greater than or equal"),
    ({"base_model": "gpt-9"}, "ingest_options.base_model", "not a base model"),
    ("{not json", "ingest_options", "not valid JSON"),
])
@pytest.mark.parametrize("options_first", [True, False])
def test_a_bad_option_is_400_naming_it_and_nothing_is_stored(gateway: Gateway, options: object, param: str,
                                                             words: str, options_first: bool) -> None:
    before_rows, before_objects = len(rows(gateway, "globex")), stored(gateway, "globex")
    response = post_file(gateway, "train.jsonl", chat_jsonl(12), options, tenant="globex",
                         options_first=options_first)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"]
    assert len(rows(gateway, "globex")) == before_rows and stored(gateway, "globex") == before_objects
    assert list((gateway.runtime.settings.resolved_work_dir / "uploads").glob("*")) == []


def test_an_explicit_container_lets_an_unnamed_text_file_in(gateway: Gateway) -> None:
    transcript = "VOCÊ: aeon, liga a luz da sala\nAEON: Pronto, luz da sala ligada.\n".encode()
    assert post_file(gateway, "conversa", transcript).status_code == 400
    response = post_file(gateway, "conversa", transcript, {"container": "txt", "format": "transcript"})
    assert response.status_code == 200, response.text


def zip_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize(("members", "code"), [
    ({"inputs/a.txt": b"pergunta", "../outputs/a.txt": b"resposta"}, "unsafe_archive_member"),
    ({"inputs/a.txt": b"0" * (3 * 1024 * 1024 * 1024 // 1000)}, None),  # ~3 MB: fine
])
def test_archives_are_checked_before_they_are_stored(gateway: Gateway, members: dict[str, bytes],
                                                     code: str | None) -> None:
    before = stored(gateway, "globex")
    response = post_file(gateway, "pastas.zip", zip_of(members), tenant="globex")
    if code is None:
        assert response.status_code == 200, response.text
        return
    assert response.status_code == 400 and response.json()["error"]["code"] == code
    assert "../outputs/a.txt" in response.json()["error"]["message"]
    assert stored(gateway, "globex") == before


def test_ingest_endpoints_before_the_worker_ran(gateway: Gateway) -> None:
    created = post_file(gateway, "train.jsonl", chat_jsonl(12)).json()
    headers = {"Authorization": f"Bearer {gateway.keys['acme']}"}
    status = httpx.get(f"{gateway.url}/v1/files/{created['id']}/ingest", headers=headers)
    assert status.status_code == 200
    body = status.json()
    assert body["object"] == "file.ingest" and body["status"] == "uploaded" and body["counts"] is None
    assert body["artifacts"]["report"] == f"/v1/files/{created['id']}/ingest/report"
    for path in ("ingest/report", "ingest/stats", "ingest/preview", "ingest/token_lengths.png"):
        response = httpx.get(f"{gateway.url}/v1/files/{created['id']}/{path}", headers=headers)
        assert response.status_code == 404 and response.json()["error"]["code"] == "ingest_not_ready"
    # another tenant sees nothing
    other = httpx.get(f"{gateway.url}/v1/files/{created['id']}/ingest",
                      headers={"Authorization": f"Bearer {gateway.keys['globex']}"})
    assert other.status_code == 404


def test_a_job_on_a_file_that_failed_ingest_is_refused_with_the_reason(gateway: Gateway) -> None:
    created = post_file(gateway, "train.jsonl", chat_jsonl(12)).json()
    with gateway.runtime.db.session() as session:  # as the ingest worker leaves a file it refused
        row = session.get(File, created["id"])
        row.status, row.status_details = "error", "train.jsonl, line 3, field messages: no assistant [x]"
    client = gateway.client("acme")
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(model="smollm2-135m-instruct", training_file=created["id"])
    assert caught.value.body["param"] == "training_file"
    assert "line 3, field messages" in caught.value.body["message"]
    assert client.files.retrieve(created["id"]).status_details.startswith("train.jsonl, line 3")
