"""``/v1/models`` and ``/v1/chat/completions`` with real llama.cpp in process and the official client."""

from __future__ import annotations

import openai
import pytest

from afina.core.catalog import resolve_base_model
from tests.integration.gateway.conftest import SMOLLM2, Gateway

pytestmark = pytest.mark.slow  # llama.cpp inference
MESSAGES = [{"role": "user", "content": "Say hello."}]


def test_models_list_and_retrieve(acme, globex, fine_tune: str) -> None:  # noqa: ANN001
    owners = {model.id: model.owned_by for model in acme.models.list()}
    assert owners[SMOLLM2] == "afina"
    assert owners[fine_tune] == "acme"
    assert fine_tune not in {model.id for model in globex.models.list()}
    assert acme.models.retrieve(fine_tune).owned_by == "acme"
    assert acme.models.retrieve(SMOLLM2).object == "model"
    assert acme.models.retrieve("HuggingFaceTB/SmolLM2-135M-Instruct").id == SMOLLM2
    for client, name in ((acme, "no-such-model"), (globex, fine_tune)):
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve(name)


def test_chat_base_model(acme) -> None:  # noqa: ANN001
    completion = acme.chat.completions.create(model=SMOLLM2, messages=MESSAGES, max_tokens=8, temperature=0,
                                              seed=1)
    assert completion.object == "chat.completion" and completion.model == SMOLLM2
    assert completion.id.startswith("chatcmpl-")
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_stream_with_usage_matches_non_stream(acme) -> None:  # noqa: ANN001
    kwargs = {"model": SMOLLM2, "messages": MESSAGES, "max_completion_tokens": 12, "temperature": 0, "seed": 3}
    reference = acme.chat.completions.create(**kwargs)
    chunks = list(acme.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert {chunk.id for chunk in chunks} == {chunks[0].id}
    assert all(chunk.model == SMOLLM2 for chunk in chunks)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == reference.choices[0].message.content  # greedy: same tokens either way
    assert [chunk for chunk in chunks if chunk.choices][-1].choices[0].finish_reason in ("stop", "length")
    final = chunks[-1]
    assert final.choices == [] and final.usage is not None
    assert final.usage.model_dump() == reference.usage.model_dump()


def test_chat_stream_without_usage(acme) -> None:  # noqa: ANN001
    chunks = list(acme.chat.completions.create(model=SMOLLM2, messages=MESSAGES, max_tokens=4, stream=True))
    assert chunks and all(chunk.choices for chunk in chunks)
    assert all(chunk.usage is None for chunk in chunks)


def test_chat_fine_tune_from_the_store(gateway: Gateway, acme, fine_tune: str) -> None:  # noqa: ANN001
    completion = acme.chat.completions.create(model=fine_tune, messages=MESSAGES, max_tokens=6, temperature=0)
    assert completion.model == fine_tune and completion.choices[0].message.content
    # downloaded from the store once (other tests of the package's gateway cache models of their own)
    size = resolve_base_model(SMOLLM2).gguf_path().stat().st_size
    cached = [path for path in (gateway.runtime.settings.resolved_model_cache_dir / "gguf").glob("*.gguf")
              if path.stat().st_size == size]
    assert len(cached) == 1
    stream = acme.chat.completions.create(model=fine_tune, messages=MESSAGES, max_tokens=6, temperature=0,
                                          stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens > 0 and all(chunk.model == fine_tune for chunk in chunks)


def test_chat_errors(acme, globex, fine_tune: str) -> None:  # noqa: ANN001
    with pytest.raises(openai.NotFoundError) as caught:
        acme.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        globex.chat.completions.create(model=fine_tune, messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.BadRequestError) as caught:
        acme.chat.completions.create(model=SMOLLM2, messages=MESSAGES, n=9)
    assert caught.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as caught:
        acme.chat.completions.create(model=SMOLLM2, messages=MESSAGES, temperature=3)
    assert caught.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as caught:
        acme.chat.completions.create(model=SMOLLM2, messages=[])
    assert caught.value.body["param"] == "messages"


def test_prompt_longer_than_the_context_is_400(acme) -> None:  # noqa: ANN001
    long = [{"role": "user", "content": "word " * 3000}]
    with pytest.raises(openai.BadRequestError) as caught:
        acme.chat.completions.create(model=SMOLLM2, messages=long, max_tokens=4)
    assert caught.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        list(acme.chat.completions.create(model=SMOLLM2, messages=long, max_tokens=4, stream=True))


def test_a_stream_dropped_by_the_client_frees_the_model(acme) -> None:  # noqa: ANN001
    stream = acme.chat.completions.create(model=SMOLLM2, messages=MESSAGES, max_tokens=200, stream=True)
    next(iter(stream))
    stream.close()  # hang up mid-generation
    completion = acme.chat.completions.create(model=SMOLLM2, messages=MESSAGES, max_tokens=4, timeout=60)
    assert completion.choices[0].message.content is not None
