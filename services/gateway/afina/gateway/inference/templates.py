"""The chat template a GGUF carries, rendered as llama-cpp-python renders it: to tell a conversation the template
refuses (a system message to Gemma 2: the caller's 400 naming the message) from a fault of the backend."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from afina.core.catalog.gguf_metadata import gguf_metadata
from afina.core.catalog.template_refusal import first_refused_message, template_refusal
from afina.core.errors import InvalidRequest


def gguf_template_renderer(template: str) -> Callable[[list[dict[str, Any]]], object] | None:
    """A function rendering messages with a GGUF's chat template exactly as llama-cpp-python does (its
    sandbox, its ``raise_exception``); None where llama-cpp-python is not installed or the template does
    not compile. Special tokens render empty: whether a template refuses never depends on them."""
    try:
        from jinja2 import TemplateError
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    except ImportError:
        return None
    try:
        formatter = Jinja2ChatFormatter(template=template, eos_token="", bos_token="")
    except TemplateError:
        return None
    return lambda messages: formatter(messages=messages)


def refused_by_template(path: Path, messages: list[dict[str, Any]]) -> InvalidRequest | None:
    """Whether the GGUF's own chat template refuses ``messages``: asked after a llama.cpp server failed without
    saying why (it answers a template's refusal with a 500), so the caller's mistake is a 400, not a 503."""
    try:
        template = gguf_metadata(path).get("tokenizer.chat_template")
    except InvalidRequest:
        return None
    render = gguf_template_renderer(template) if isinstance(template, str) else None
    if render is None:
        return None
    try:
        render(messages)
    except Exception as refused:  # noqa: BLE001 - the template's own reason, whatever it raised
        return template_refusal(str(refused) or type(refused).__name__, first_refused_message(render, messages))
    return None
