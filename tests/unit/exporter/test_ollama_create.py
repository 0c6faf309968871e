"""What the registration sends to Ollama's ``create`` and how it reads ``show`` back: the family's Go template and
every stop token always, never a Modelfile; Ollama's Go-quoted parameter text parsed exactly; reasons a tenant may
read (no URL, no file paths, no secrets)."""

from __future__ import annotations

import pytest

from afina.core.catalog import CHATML, FAMILIES, ChatFamily
from afina.exporter.ollama import landed_problems, ollama_create_request, parse_show_parameters, public_reason
from tests.support.ollama_server import go_quote, go_value, modelfile_quote

DIGEST = "sha256:" + "ab" * 32
ADAPTER = "sha256:" + "cd" * 32


@pytest.mark.parametrize("family", list(FAMILIES.values()), ids=lambda family: family.name)
def test_the_create_body_carries_the_template_and_every_stop(family: ChatFamily) -> None:
    request = ollama_create_request(name="acme-x", family=family, system=None, num_ctx=4096, temperature=0.7,
                                    model_digest=DIGEST)
    assert request == {"model": "acme-x", "files": {"model.gguf": DIGEST}, "template": family.ollama_template,
                       "parameters": {"stop": list(family.stop), "num_ctx": 4096, "temperature": 0.7}}
    assert family.eos_token in request["parameters"]["stop"]


def test_system_and_adapter_are_sent_when_given() -> None:
    request = ollama_create_request(name="acme-x", family=CHATML, system="Fale português.", num_ctx=2048,
                                    temperature=0.2, model_digest=DIGEST, adapter_digest=ADAPTER)
    assert request["system"] == "Fale português."
    assert request["adapters"] == {"adapter.gguf": ADAPTER}
    assert "modelfile" not in request and "from" not in request


@pytest.mark.parametrize("value", ["<|im_end|>", 'a "quoted"\tstop\n', "<｜end▁of▁sentence｜>", "\x01bell\x7f",
                                   "emoji 🦙"])
def test_show_parameters_parse_what_ollama_prints(value: str) -> None:
    # Ollama prints each value with Go's %#v, names padded to 30 (server/routes.go GetModelInfo)
    text = "\n".join([f"{'stop':<30} {go_value(value)}", f"{'stop':<30} {go_value('<|im_start|>')}",
                      f"{'num_ctx':<30} {go_value(2048)}", f"{'temperature':<30} {go_value(0.7)}"])
    assert parse_show_parameters(text) == {"stop": [value, "<|im_start|>"], "num_ctx": ["2048"],
                                           "temperature": ["0.7"]}
    assert go_quote(value).startswith('"')


def _show_of(request: dict, *, template: str | None = None, stops: list[str] | None = None, num_ctx: object = None,
             system: str | None = None) -> dict:
    parameters = request["parameters"]
    lines = [f"{'stop':<30} {go_value(stop)}" for stop in (parameters["stop"] if stops is None else stops)]
    lines += [f"{'num_ctx':<30} {go_value(parameters['num_ctx'] if num_ctx is None else num_ctx)}",
              f"{'temperature':<30} {go_value(parameters['temperature'])}"]
    system = request.get("system") if system is None else system
    modelfile = "FROM /blobs/x\n" + (f"SYSTEM {modelfile_quote(system)}\n" if system else "")
    return {"template": request["template"] if template is None else template, "parameters": "\n".join(lines),
            "modelfile": modelfile}


def test_what_landed_is_checked_field_by_field() -> None:
    request = ollama_create_request(name="acme-x", family=CHATML, system="Você atende clientes.\nSeja breve.",
                                    num_ctx=2048, temperature=0.7, model_digest=DIGEST)
    assert landed_problems(request, **_show_of(request)) == []
    assert landed_problems(request, **_show_of(request, template="{{ .Prompt }}")) == [
        "its template is not the family's"]
    assert landed_problems(request, **_show_of(request, stops=["<|im_end|>"])) == [
        "stop tokens ['<|im_start|>'] are missing"]
    assert landed_problems(request, **_show_of(request, num_ctx=4096)) == ["num_ctx is ['4096'] instead of 2048"]
    assert landed_problems(request, **_show_of(request, system="Outro.")) == [
        "its system prompt is not the one sent"]


def test_reasons_leave_out_the_url_paths_and_secrets() -> None:
    url = "http://ollama.internal:11434"
    text = ("open /root/.ollama/models/blobs/sha256-abc: no such file or directory at http://ollama.internal:11434/"
            "api/create (ollama.internal:11434) token hf_abcdefghijklmnopqrstuvwxyz012345")
    reason = public_reason(text, url)
    assert "ollama.internal" not in reason and "/root" not in reason and "hf_abcdefghijkl" not in reason
    assert reason.startswith("open …/sha256-abc: no such file or directory at AFINA_OLLAMA_URL")
