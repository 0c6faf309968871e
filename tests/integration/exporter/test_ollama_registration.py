"""Ollama registration against the contract Ollama (``tests.support.ollama_server``): a real GGUF registered with
the official ``ollama`` client and answered through it; the contract server's own strictness (raw HTTP: what real
Ollama refuses, it refuses); and the faults: Ollama down, a create refused, a stall, an upload cut off."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import httpx
import numpy as np
import ollama
import pytest

from afina.core.catalog import CHATML, resolve_base_model
from afina.exporter.ollama import (
    OllamaError,
    delete_model_from_ollama,
    file_sha256,
    register_model_in_ollama,
)
from tests.support.ollama_server import ContractOllama, contract_ollama  # noqa: F401 - the fixture

SYSTEM = "Você atende clientes da Livraria Sebo Azul, em português."
QUESTION = [{"role": "user", "content": "Vocês compram livros usados?"}]
NUM_CTX = 1024


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    return resolve_base_model("smollm2-135m-instruct").gguf_path()


@pytest.fixture(scope="module")
def smollm2_digest(smollm2_gguf: Path) -> str:
    return file_sha256(smollm2_gguf)


def _register(server: ContractOllama, gguf: Path, name: str, **overrides: object):  # noqa: ANN202
    arguments: dict = {"url": server.url, "name": name, "gguf_path": gguf, "family": CHATML, "system": SYSTEM,
                       "num_ctx": NUM_CTX, "timeout_s": 60, "variant": "q4_1"}
    arguments.update(overrides)
    return register_model_in_ollama(**arguments)


def _tag_names(server: ContractOllama) -> list[str]:
    return [model.model for model in ollama.Client(host=server.url).list().models]


# --- a real model, registered and answered through Ollama -----------------------------------------------------

@pytest.mark.slow
def test_a_registered_gguf_answers_through_the_official_client(contract_ollama: ContractOllama,  # noqa: F811
                                                               smollm2_gguf: Path, smollm2_digest: str) -> None:
    from llama_cpp import Llama

    progress: list[str] = []
    record = _register(contract_ollama, smollm2_gguf, "acme-livraria", on_progress=progress.append)
    assert record.status == "registered", record.error
    assert (record.name, record.digest, record.variant, record.error) == ("acme-livraria", smollm2_digest, "q4_1",
                                                                         None)
    assert progress[-1].startswith("acme-livraria answered the smoke chat")
    create_body = contract_ollama.state.create_requests[-1]
    assert "modelfile" not in create_body and create_body["files"] == {"model.gguf": smollm2_digest}
    assert create_body["parameters"] == {"stop": list(CHATML.stop), "num_ctx": NUM_CTX, "temperature": 0.7}

    client = ollama.Client(host=contract_ollama.url)
    assert "acme-livraria:latest" in _tag_names(contract_ollama)
    shown = client.show("acme-livraria")
    assert shown.template == CHATML.ollama_template and shown.details.quantization_level == "Q4_1"
    answer = client.chat(model="acme-livraria", messages=QUESTION, options={"temperature": 0, "num_predict": 24})
    assert answer.message.content.strip() and answer.done and answer.eval_count > 0
    streamed = "".join(chunk.message.content for chunk in client.chat(
        model="acme-livraria", messages=QUESTION, stream=True, options={"temperature": 0, "num_predict": 24}))
    assert streamed == answer.message.content

    # the chat Ollama built is the one the model was trained on: llama.cpp with the GGUF's own (Jinja) chat
    # template, the same system prompt, greedy, says the same
    llm = Llama(model_path=str(smollm2_gguf), n_ctx=NUM_CTX, n_threads=2, verbose=False)
    try:
        direct = llm.create_chat_completion(messages=[{"role": "system", "content": SYSTEM}, *QUESTION],
                                            max_tokens=24, temperature=0, stop=list(CHATML.stop))
    finally:
        llm.close()
    assert answer.message.content == direct["choices"][0]["message"]["content"]


@pytest.mark.slow
def test_the_registration_is_idempotent_and_uploads_a_blob_once(contract_ollama: ContractOllama,  # noqa: F811
                                                                smollm2_gguf: Path, smollm2_digest: str) -> None:
    for name in ("acme-a", "acme-a", "acme-b"):
        record = _register(contract_ollama, smollm2_gguf, name, gguf_sha256=smollm2_digest.removeprefix("sha256:"))
        assert record.status == "registered", record.error
    assert contract_ollama.state.blob_uploads == [smollm2_digest]
    assert sorted(_tag_names(contract_ollama)) == ["acme-a:latest", "acme-b:latest"]


def _write_lora_gguf(base: Path, out: Path, *, seed: int, rank: int = 8, scale: float = 0.2) -> Path:
    """A LoRA-only GGUF (llama.cpp's adapter format) on q_proj/v_proj of ``base``, random but seeded."""
    import gguf

    shapes = {tensor.name: [int(size) for size in tensor.shape] for tensor in gguf.GGUFReader(str(base)).tensors
              if tensor.name.endswith(("attn_q.weight", "attn_v.weight"))}
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(out), arch="llama")
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))
    for name, (n_in, n_out) in shapes.items():  # GGUF shapes are ggml's: (inputs, outputs)
        writer.add_tensor(f"{name}.lora_a", (rng.standard_normal((rank, n_in)) * n_in ** -0.5).astype(np.float32))
        writer.add_tensor(f"{name}.lora_b", (rng.standard_normal((n_out, rank)) * scale).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.mark.slow
def test_fine_tunes_share_one_base_blob_through_adapter(contract_ollama: ContractOllama,  # noqa: F811
                                                        smollm2_gguf: Path, smollm2_digest: str,
                                                        tmp_path: Path) -> None:
    adapters = [_write_lora_gguf(smollm2_gguf, tmp_path / f"lora-{seed}.gguf", seed=seed) for seed in (1, 2)]
    for index, adapter in enumerate(adapters):
        record = _register(contract_ollama, smollm2_gguf, f"acme-lora-{index}", adapter_gguf=adapter)
        assert record.status == "registered", record.error
    assert contract_ollama.state.blob_uploads == [smollm2_digest, *(file_sha256(path) for path in adapters)]
    base = _register(contract_ollama, smollm2_gguf, "acme-base")
    assert base.status == "registered" and len(contract_ollama.state.blob_uploads) == 3

    client = ollama.Client(host=contract_ollama.url)
    assert "\nADAPTER " in client.show("acme-lora-0").modelfile
    answers = {name: client.chat(model=name, messages=QUESTION, options={"temperature": 0, "num_predict": 16},
                                 keep_alive=0).message.content for name in ("acme-base", "acme-lora-0", "acme-lora-1")}
    assert len(set(answers.values())) == 3, answers  # each adapter changes what the shared base says


# --- the contract server refuses what Ollama refuses (raw HTTP) -------------------------------------------------

def _tiny_gguf(path: Path) -> bytes:
    """A valid GGUF of one small tensor: enough for Ollama to parse, nothing to run."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tensor("token_embd.weight", np.arange(64, dtype=np.float32).reshape(8, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def test_the_contract_server_is_as_strict_as_ollama(contract_ollama: ContractOllama, tmp_path: Path) -> None:  # noqa: F811
    payload = _tiny_gguf(tmp_path / "tiny.gguf")
    digest = "sha256:" + hashlib.sha256(payload).hexdigest()
    with httpx.Client(base_url=contract_ollama.url, timeout=30) as http:
        assert http.get("/").text == "Ollama is running"
        assert http.head(f"/api/blobs/{digest}").status_code == 404
        assert http.head("/api/blobs/sha256:nothex").status_code == 400

        wrong = http.post(f"/api/blobs/sha256:{'0' * 64}", content=payload)
        assert wrong.status_code == 400
        assert wrong.json() == {"error": f'digest mismatch, expected "sha256:{"0" * 64}", got "{digest}"'}
        assert http.head(f"/api/blobs/sha256:{'0' * 64}").status_code == 404
        assert http.post(f"/api/blobs/{digest}", content=payload).status_code == 201
        assert http.head(f"/api/blobs/{digest}").status_code == 200

        legacy = http.post("/api/create", json={"model": "acme-x", "modelfile": f"FROM @{digest}\n"})
        assert (legacy.status_code, legacy.json()) == (400, {"error": "neither 'from' or 'files' was specified"})
        bad_name = http.post("/api/create", json={"model": "acme x", "files": {"model.gguf": digest}})
        assert (bad_name.status_code, bad_name.json()) == (400, {"error": "invalid model name"})
        outside = http.post("/api/create", json={"model": "acme-x", "files": {"../model.gguf": digest}})
        assert (outside.status_code, outside.json()) == (400, {"error": "file path must be relative"})

        unknown = "sha256:" + "1" * 64
        streamed = http.post("/api/create", json={"model": "acme-x", "files": {"model.gguf": unknown}})
        lines = [json.loads(line) for line in streamed.text.splitlines()]
        assert streamed.status_code == 200 and lines[0] == {"status": "parsing GGUF"}
        assert lines[-1]["error"].endswith(f"{unknown.replace(':', '-')}: no such file or directory")
        whole = http.post("/api/create", json={"model": "acme-x", "files": {"model.gguf": unknown}, "stream": False})
        assert whole.status_code == 500 and "no such file or directory" in whole.json()["error"]
        adapter = http.post("/api/create", json={"model": "acme-x", "files": {"model.gguf": digest},
                                                 "adapters": {"adapter.gguf": unknown}, "stream": False})
        assert adapter.status_code == 500 and "no such file or directory" in adapter.json()["error"]

        text_digest = "sha256:" + hashlib.sha256(b"not a model").hexdigest()
        assert http.post(f"/api/blobs/{text_digest}", content=b"not a model").status_code == 201
        not_gguf = http.post("/api/create", json={"model": "acme-x", "files": {"model.gguf": text_digest}})
        assert not_gguf.text.splitlines()[-1] == '{"error": "supplied file was not in GGUF format"}'

        broken = http.post("/api/create", json={"model": "acme-x", "files": {"model.gguf": digest},
                                                "template": "{{ if .System }}x", "stream": False})
        assert broken.status_code == 400 and broken.json()["error"].startswith("template error: ")

        assert http.post("/api/show", json={"model": "acme-x"}).json() == {"error": "model 'acme-x' not found"}
        made = http.post("/api/create", json={"model": "acme-x", "files": {"model.gguf": digest}, "stream": False})
        assert (made.status_code, made.json()) == (200, {"status": "success"})
        assert [model["name"] for model in http.get("/api/tags").json()["models"]] == ["acme-x:latest"]
        assert http.request("DELETE", "/api/delete", json={"model": "ACME-X:latest"}).status_code == 200
        assert http.head(f"/api/blobs/{digest}").status_code == 404  # no model uses it any more
        gone = http.request("DELETE", "/api/delete", json={"model": "acme-x"})
        assert (gone.status_code, gone.json()) == (404, {"error": "model 'acme-x' not found"})
        assert http.get("/api/tags").json() == {"models": []}
    with pytest.raises(ollama.ResponseError, match="neither 'from' or 'files'") as refused:
        ollama.Client(host=contract_ollama.url).create(model="acme-x", template="{{ .Prompt }}")
    assert refused.value.status_code == 400


def test_an_upload_cut_off_midway_leaves_no_blob(contract_ollama: ContractOllama) -> None:  # noqa: F811
    payload = b"GGUF" + b"\0" * 200_000
    digest = "sha256:" + hashlib.sha256(payload).hexdigest()
    with socket.create_connection(("127.0.0.1", contract_ollama.port)) as raw:  # an exporter SIGKILLed mid-upload
        raw.sendall(f"POST /api/blobs/{digest} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(payload)}\r\n\r\n"
                    .encode() + payload[:50_000])
    with httpx.Client(base_url=contract_ollama.url, timeout=30) as http:
        assert http.head(f"/api/blobs/{digest}").status_code == 404
        assert http.post(f"/api/blobs/{digest}", content=payload).status_code == 201
    assert contract_ollama.state.blob_uploads == [digest]
    assert [path.name for path in contract_ollama.state.blob_dir.iterdir()] == [digest.replace(":", "-")]


# --- faults: the record says failed and why; nothing is left half-made; a retry registers -----------------------

@pytest.mark.slow
def test_ollama_down_is_a_failed_registration_and_a_retry_registers(contract_ollama: ContractOllama,  # noqa: F811
                                                                    smollm2_gguf: Path) -> None:
    contract_ollama.go_down()
    record = _register(contract_ollama, smollm2_gguf, "acme-x")
    assert record.status == "failed"
    assert record.error == "Ollama (AFINA_OLLAMA_URL) is not reachable (connection refused) while uploading the GGUF"
    contract_ollama.come_back()
    retried = _register(contract_ollama, smollm2_gguf, "acme-x")
    assert retried.status == "registered", retried.error
    assert _tag_names(contract_ollama) == ["acme-x:latest"]


@pytest.mark.parametrize("http_status", [None, 400], ids=["in-the-stream", "before-any-output"])
def test_a_refused_create_is_failed_with_ollamas_text(contract_ollama: ContractOllama, smollm2_gguf: Path,  # noqa: F811
                                                      http_status: int | None) -> None:
    contract_ollama.fail_create("write /root/.ollama/models/blobs/sha256-1f2e-partial: no space left on device",
                                http_status=http_status)
    record = _register(contract_ollama, smollm2_gguf, "acme-x")
    assert record.status == "failed"
    status = "" if http_status is None else f" ({http_status})"
    assert record.error == (f"Ollama (AFINA_OLLAMA_URL) refused creating acme-x{status}: "
                            "write …/sha256-1f2e-partial: no space left on device")
    assert contract_ollama.url not in record.error and _tag_names(contract_ollama) == []


@pytest.mark.slow
def test_a_model_that_fails_its_smoke_chat_is_not_left_in_ollama(contract_ollama: ContractOllama,  # noqa: F811
                                                                 smollm2_gguf: Path) -> None:
    record = _register(contract_ollama, smollm2_gguf, "acme-x", num_ctx=16)  # the chat prompt alone is longer
    assert record.status == "failed"
    assert record.error == ("Ollama (AFINA_OLLAMA_URL) refused the smoke chat with acme-x (400): "
                            "the input length exceeds the context length")
    assert _tag_names(contract_ollama) == []


def test_what_on_progress_raises_propagates_and_leaves_no_model(contract_ollama: ContractOllama,  # noqa: F811
                                                                smollm2_gguf: Path) -> None:
    class JobCancelled(Exception):
        pass

    def cancel_once_created(line: str) -> None:
        if line == "acme-x created in Ollama":
            raise JobCancelled("cancelled by the user")

    with pytest.raises(JobCancelled):
        _register(contract_ollama, smollm2_gguf, "acme-x", on_progress=cancel_once_created)
    assert contract_ollama.state.create_requests and _tag_names(contract_ollama) == []


def test_a_stalled_create_times_out(contract_ollama: ContractOllama, smollm2_gguf: Path) -> None:  # noqa: F811
    contract_ollama.stall_create(3)
    record = _register(contract_ollama, smollm2_gguf, "acme-x", timeout_s=1)
    assert record.status == "failed"
    assert record.error == "Ollama (AFINA_OLLAMA_URL) did not answer within 1s while creating acme-x"


def test_an_invalid_name_is_failed_before_anything_is_sent(contract_ollama: ContractOllama,  # noqa: F811
                                                           smollm2_gguf: Path) -> None:
    record = _register(contract_ollama, smollm2_gguf, "Acme X")
    assert (record.status, record.error) == ("failed", "'Acme X' is not a valid Ollama model name")
    assert contract_ollama.state.blob_uploads == [] and contract_ollama.state.create_requests == []


@pytest.mark.slow
def test_delete_removes_the_model_and_tolerates_one_already_gone(contract_ollama: ContractOllama,  # noqa: F811
                                                                 smollm2_gguf: Path, smollm2_digest: str) -> None:
    assert _register(contract_ollama, smollm2_gguf, "acme-x").status == "registered"
    delete_model_from_ollama(contract_ollama.url, "acme-x", 30)
    assert _tag_names(contract_ollama) == []
    assert not contract_ollama.state.has_blob(smollm2_digest)  # Ollama drops the blobs no model uses
    delete_model_from_ollama(contract_ollama.url, "acme-x", 30)  # already gone: fine
    contract_ollama.go_down()
    with pytest.raises(OllamaError, match=r"^Ollama \(AFINA_OLLAMA_URL\) is not reachable"):
        delete_model_from_ollama(contract_ollama.url, "acme-x", 5)
