"""Ollama's request shapes as its clients send them: ``keep_alive`` in both of its spellings (seconds or a Go
duration), unknown fields ignored as Ollama's JSON decoding does, and a wrong type refused (a 400)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from afina.gateway.ollama.protocol import (
    ChatRequest,
    EmbeddingsRequest,
    EmbedRequest,
    GenerateRequest,
    ModelRequest,
    keep_alive_seconds,
)


@pytest.mark.parametrize("value, seconds", [
    ("5m", 300.0), ("1h30m", 5400.0), ("1h", 3600.0), ("90s", 90.0), ("1.5h", 5400.0), ("500ms", 0.5),
    ("2m30s", 150.0), ("0", 0.0), ("0s", 0.0), (0, 0.0), (0.0, 0.0), (300, 300.0), (2.5, 2.5),
    (-1, -1.0), ("-1", -1.0), ("-1m", -60.0), ("10", 10.0), (" 5m ", 300.0),
    (None, None), ("", None),
])
def test_keep_alive_seconds(value: str | float | None, seconds: float | None) -> None:
    assert keep_alive_seconds(value) == seconds


@pytest.mark.parametrize("value", [
    "5x", "m", "5 m", "5m3", "1h-30m", "forever", " ",
    "nan", "inf",  # Go's time.ParseDuration refuses both; a NaN keep-alive neither expires nor unloads
])
def test_an_invalid_keep_alive_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        keep_alive_seconds(value)


def test_a_negative_keep_alive_means_until_evicted() -> None:
    assert keep_alive_seconds("-5m") < 0 and keep_alive_seconds(-0.5) < 0


@pytest.mark.parametrize("model, body, unknown", [
    (ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "hi"}], "shift": False}, "shift"),
    (GenerateRequest, {"model": "m", "prompt": "hi", "truncate": True}, "truncate"),
    (EmbedRequest, {"model": "m", "input": "hi", "unknown": {"nested": 1}}, "unknown"),
    (EmbeddingsRequest, {"model": "m", "prompt": "hi", "new_field": None}, "new_field"),
    (ModelRequest, {"name": "m", "insecure": True}, "insecure"),
])
def test_unknown_fields_are_ignored(model: type, body: dict[str, Any], unknown: str) -> None:
    assert unknown not in model.model_validate(body).model_dump()


def test_unknown_message_fields_and_options_are_ignored() -> None:
    chat = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi", "thinking": "x"}],
                                       "options": {"num_gpu": 1, "mirostat": 2, "temperature": 0.1}})
    assert "thinking" not in chat.messages[0].model_dump()
    assert chat.options is not None and chat.options.temperature == 0.1
    assert "num_gpu" not in chat.options.model_dump()


def test_the_request_fields_afina_reads() -> None:
    chat = ChatRequest.model_validate({
        "model": "m", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "format": {"type": "object"}, "options": {"temperature": 0.3, "num_predict": 12, "stop": ["\n"],
                                                  "num_ctx": 4096, "seed": 1},
        "stream": False, "keep_alive": "10m"})
    assert [message.role for message in chat.messages] == ["system", "user"]
    assert chat.options is not None and chat.options.num_predict == 12 and chat.options.num_ctx == 4096
    assert (chat.format, chat.stream, chat.keep_alive) == ({"type": "object"}, False, "10m")
    generate = GenerateRequest.model_validate({"model": "m", "prompt": "hi", "format": "json", "keep_alive": 0})
    assert generate.stream is True and generate.format == "json" and keep_alive_seconds(generate.keep_alive) == 0
    assert EmbedRequest.model_validate({"model": "m", "input": ["a", "b"]}).truncate is True
    assert ModelRequest.model_validate({"name": "old"}).target == "old"
    assert ModelRequest.model_validate({"model": "new", "name": "old"}).target == "new"


@pytest.mark.parametrize("model, body, field", [
    (ChatRequest, {"model": "m", "messages": "hi"}, "messages"),
    (ChatRequest, {"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    (ChatRequest, {"model": "m", "messages": [{"role": "user", "content": ["hi"]}]}, "content"),
    (ChatRequest, {"model": "m", "stream": [True]}, "stream"),
    (ChatRequest, {"model": 7}, "model"),
    (ChatRequest, {"messages": []}, "model"),
    (ChatRequest, {"model": "m", "keep_alive": "5x"}, "keep_alive"),
    (ChatRequest, {"model": "m", "keep_alive": [5]}, "keep_alive"),
    (ChatRequest, {"model": "m", "format": "yaml"}, "format"),
    (GenerateRequest, {"model": "m", "options": {"temperature": "hot"}}, "temperature"),
    (GenerateRequest, {"model": "m", "options": {"num_ctx": 0}}, "num_ctx"),
    (GenerateRequest, {"model": "m", "options": {"stop": "\n"}}, "stop"),
    (GenerateRequest, {"model": "m", "context": ["a"]}, "context"),
    (EmbedRequest, {"model": "m", "input": 3}, "input"),
    (EmbedRequest, {"model": "m", "input": ["x"] * 257}, "input"),
    (EmbeddingsRequest, {"model": "m", "prompt": {"text": "hi"}}, "prompt"),
    (ModelRequest, {"model": "m\x00"}, "model"),
])
def test_a_wrong_type_is_refused(model: type, body: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    assert field in str(caught.value)
