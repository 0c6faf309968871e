"""A conversation the base model's chat template refuses (a system message to Gemma 2, two user turns in a row)
is the user's mistake: reported on its line, naming the message the template refused and why."""

from __future__ import annotations

import hashlib
from pathlib import Path

import orjson
import pytest

from afina.core.catalog import CHATML, GEMMA2, resolve_base_model
from afina.core.catalog.template_refusal import first_refused_message, template_refusal
from afina.core.datasets.options import IngestOptions
from afina.core.store.local import LocalStore
from afina.ingest.pipeline import IngestFailed, IngestSource, ingest_file
from afina.ingest.records import Example
from afina.ingest.tokens import IngestTokenizer, LengthChecker, TemplateRenderError, load_tokenizer, render_example
from tests.support.models import SMOLLM2, shared_model_cache

SYSTEM_FIRST = [{"role": "system", "content": "Seja breve."}, {"role": "user", "content": "oi"},
                {"role": "assistant", "content": "Olá!"}]
TWO_USERS = [{"role": "user", "content": "oi"}, {"role": "user", "content": "tudo bem?"},
             {"role": "assistant", "content": "Tudo!"}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> IngestTokenizer:
    # SmolLM2's tokenizer stands in for Gemma's (not on this machine): the template is what refuses
    return load_tokenizer(resolve_base_model(SMOLLM2), shared_model_cache(tmp_path_factory))


def test_the_refused_message_is_found_by_rendering_prefixes() -> None:
    def render(messages: list[dict[str, str]]) -> None:
        if any(message["role"] == "system" for message in messages):
            raise ValueError("System role not supported")

    assert first_refused_message(render, SYSTEM_FIRST) == 0
    assert first_refused_message(render, [*TWO_USERS, {"role": "system", "content": "x"}]) == 3
    assert first_refused_message(render, TWO_USERS) is None
    error = template_refusal("System role not supported", 0)
    assert (error.param, error.code, error.http_status) == ("messages[0]", "chat_template_error", 400)
    assert template_refusal("no", None).param == "messages"


@pytest.mark.parametrize(("messages", "where", "why"), [
    (SYSTEM_FIRST, "messages[0]", "System role not supported"),
    (TWO_USERS, "messages[1]", "Conversation roles must alternate"),
])
def test_gemma2_names_the_message_its_template_refuses(tokenizer: IngestTokenizer, messages: list[dict[str, str]],
                                                        where: str, why: str) -> None:
    example = Example("dados.jsonl", 7, messages=messages)
    with pytest.raises(TemplateRenderError, match=rf"gemma2 chat template cannot render {where.replace('[', '.')}"):
        render_example(example, GEMMA2, tokenizer.special_tokens)
    [result] = LengthChecker(tokenizer, GEMMA2, 2048).check_batch([example])
    [issue] = result.issues
    assert (issue.rule, issue.action, issue.line, issue.field) == ("template_error", "error", 7, "messages")
    assert where in issue.detail and why in issue.detail
    # the same conversation is fine for a family whose template accepts it
    assert LengthChecker(tokenizer, CHATML, 2048).check_batch([example])[0].keep


def test_a_file_gemma2_refuses_fails_its_ingest_with_the_reason(tokenizer: IngestTokenizer, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    rows = [[SYSTEM_FIRST[0], {"role": "user", "content": f"pergunta {i}"}, SYSTEM_FIRST[2]] for i in range(12)]
    content = b"".join(orjson.dumps({"messages": messages}) + b"\n" for messages in rows)
    key = "files/acme/file-1/dados.jsonl"
    info = store.put_bytes(key, content)
    source = IngestSource(tenant_id="acme", raw_key=key, filename="dados.jsonl",
                          sha256=info.sha256 or hashlib.sha256(content).hexdigest())
    with pytest.raises(IngestFailed) as caught:
        ingest_file(store, source, IngestOptions(base_model="gemma-2-2b-it"),
                    work_dir=tmp_path / "work", model_cache_dir=tmp_path / "unused", tokenizer=tokenizer)
    assert caught.value.http_status == 400
    report = [orjson.loads(line) for line in store.get_bytes(f"{caught.value.version_key}/report.jsonl").splitlines()]
    refused = [entry for entry in report if entry.get("rule") == "template_error"]
    assert len(refused) == 12
    assert all("messages[0]" in str(entry) and "System role not supported" in str(entry) for entry in refused)
