"""A fine-tune upload is ingested by the worker; its status, report, stats and preview come back through the API,
jobs reuse the processed version, and the CLI pushes with options and prints the report."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from afina.cli.main import main as cli
from tests.integration.ingest.conftest import IngestStack

pytestmark = pytest.mark.integration

PEDIDOS = ("Qual o status do pedido {i}?", "O pedido {i} pode ser entregue no sábado?",
           "Quero trocar o endereço do pedido {i}.", "O pedido {i} veio com defeito, e agora?")


def conversations(n: int, bad_line: int | None = None) -> bytes:
    rows = []
    for i in range(n):
        messages = [{"role": "user", "content": PEDIDOS[i % len(PEDIDOS)].format(i=7000 + i)},
                    {"role": "assistant", "content": f"Verifiquei o pedido {7000 + i}: está em separação e sai "
                                                     f"amanhã. Posso ajudar em mais alguma coisa?"}]
        if i % 5 == 0:
            messages += [{"role": "user", "content": "Obrigado!"},
                         {"role": "assistant", "content": f"Por nada! Qualquer coisa, é só chamar. ({i})"}]
        rows.append({"messages": messages})
    if bad_line is not None:
        rows[bad_line - 1] = {"messages": [{"role": "user", "content": "cadê a resposta?"}]}
    return b"".join(json.dumps(row, ensure_ascii=False).encode() + b"\n" for row in rows)


def get(stack: IngestStack, path: str, **params: Any) -> httpx.Response:
    return httpx.get(f"{stack.url}{path}", headers=stack.headers(), params=params, timeout=30)


def test_upload_is_ingested_and_everything_is_downloadable(ingest_stack: IngestStack) -> None:
    options = {"system_prompt": "Você é o assistente de pedidos da Loja Afina.",
               "split": {"proportions": {"treino": 0.8, "validacao": 0.1, "teste": 0.1}}}
    created = ingest_stack.upload("pedidos.jsonl", conversations(80, bad_line=17), options)
    assert created.status_code == 200 and created.json()["status"] == "uploaded"
    status = ingest_stack.wait(created.json()["id"])
    assert status["status"] == "processed" and status["status_details"] is None
    assert status["counts"]["rows"] == 80 and status["counts"]["examples"] == 79
    assert sum(status["splits"].values()) == 79 and status["splits"]["test"] > 0
    assert status["issues"]["example_missing_assistant_message"] == {"dropped": 1}
    assert status["progress"]["stage"] == "done" and status["progress"]["rows"] == 80
    assert status["options"]["system_prompt"].startswith("Você é")
    assert status["dataset_version"].startswith("datasets/acme/v-")
    stats = status["stats"]
    assert stats["tokens"]["count"] == 79 and stats["languages"]["counts"]["pt"] > 0
    assert stats["roles"]["system_prompt_share"] == 1.0
    # the OpenAI file object says processed too
    assert get(ingest_stack, f"/v1/files/{status['file_id']}").json()["status"] == "processed"

    report = ingest_stack.report(status["file_id"])
    assert {"file": "pedidos.jsonl", "line": 17, "field": "messages", "rule": "example_missing_assistant_message",
            "action": "dropped"}.items() <= report[0].items()
    download = get(ingest_stack, f"/v1/files/{status['file_id']}/ingest/report")
    assert download.headers["content-type"].startswith("application/x-ndjson")
    assert "pedidos.jsonl.report.jsonl" in download.headers["content-disposition"]
    assert get(ingest_stack, f"/v1/files/{status['file_id']}/ingest/stats").json()["examples"] == 79
    preview = get(ingest_stack, f"/v1/files/{status['file_id']}/ingest/preview").text
    assert "<|im_start|>system\nVocê é o assistente de pedidos da Loja Afina.<|im_end|>" in preview
    assert "«Verifiquei o pedido" in preview  # the trained reply is marked
    page = get(ingest_stack, f"/v1/files/{status['file_id']}/ingest/preview", format="html")
    assert page.headers["content-type"].startswith("text/html") and "<mark" in page.text
    png = get(ingest_stack, f"/v1/files/{status['file_id']}/ingest/token_lengths.png")
    assert png.headers["content-type"] == "image/png" and png.content.startswith(b"\x89PNG")
    # another tenant can read none of it
    other = httpx.get(f"{ingest_stack.url}/v1/files/{status['file_id']}/ingest/report",
                      headers=ingest_stack.headers("globex"), timeout=30)
    assert other.status_code == 404


def test_a_job_reuses_the_processed_version(ingest_stack: IngestStack) -> None:
    file_id = ingest_stack.upload("reuso.jsonl", conversations(30)).json()["id"]
    status = ingest_stack.wait(file_id)
    client = ingest_stack.gateway.client("acme")
    job = client.fine_tuning.jobs.create(model="smollm2-135m-instruct", training_file=file_id)
    deadline = time.monotonic() + 120
    while client.fine_tuning.jobs.retrieve(job.id).status == "validating_files" and time.monotonic() < deadline:
        time.sleep(0.3)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "queued"  # no trainer here: it waits for one
    messages = [event.message for event in client.fine_tuning.jobs.list_events(job.id, limit=50).data]
    assert any("Reusing prepared dataset" in message for message in messages), messages
    with ingest_stack.gateway.runtime.db.session() as session:
        from afina.core.db import repository as repo

        assert repo.get_job(session, None, job.id).dataset_key == status["dataset_version"]


def test_cli_push_with_options_waits_and_prints_the_report(ingest_stack: IngestStack, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("AFINA_BASE_URL", f"{ingest_stack.url}/v1")
    monkeypatch.setenv("AFINA_API_KEY", ingest_stack.gateway.keys["acme"])
    data = tmp_path / "aeon.jsonl"
    data.write_bytes(conversations(40, bad_line=3))
    options = tmp_path / "options.yaml"
    options.write_text("deduplicate: exact\nmax_seq_len: 1024\n")
    code = cli(["push", str(data), "--options", str(options), "--system-prompt", "Você é o Aeon.",
                "--split", "treino=0.8,validacao=0.1,teste=0.1", "--wait"])
    out = capsys.readouterr().out
    assert code == 0, out
    uploaded = json.loads(out[:out.index("\n}\n") + 2])
    assert "file " + uploaded["id"] + ": processed" in out
    assert "example_missing_assistant_message: 1 dropped" in out
    assert f"/v1/files/{uploaded['id']}/ingest/report" in out
    stored = ingest_stack.ingest(uploaded["id"])["options"]
    assert stored["system_prompt"] == "Você é o Aeon." and stored["deduplicate"] == "exact"
    assert stored["split"]["proportions"] == {"train": 0.8, "validation": 0.1, "test": 0.1}

    target = tmp_path / "report.jsonl"
    assert cli(["report", uploaded["id"], "--download", str(target)]) == 0
    assert json.loads(target.read_text().splitlines()[0])["line"] == 3

    strict = cli(["push", str(data), "--strict", "--wait"])
    out = capsys.readouterr().out
    assert strict == 1 and ": error" in out and "line 3" in out


def test_cli_refuses_bad_options_before_uploading(ingest_stack: IngestStack, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("AFINA_BASE_URL", f"{ingest_stack.url}/v1")
    monkeypatch.setenv("AFINA_API_KEY", ingest_stack.gateway.keys["globex"])
    data = tmp_path / "aeon.jsonl"
    data.write_bytes(conversations(12))
    assert cli(["push", str(data), "--split", "treino=0.8,validacao=0.1"]) == 2
    assert "sum to 1" in capsys.readouterr().err
    assert cli(["push", str(data), "--format", "csv"]) == 2
    assert "invalid ingest option format" in capsys.readouterr().err
    listing = httpx.get(f"{ingest_stack.url}/v1/files", headers=ingest_stack.headers("globex"), timeout=30).json()
    assert all(item["filename"] != "aeon.jsonl" for item in listing["data"])
