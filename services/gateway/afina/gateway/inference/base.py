"""The contract every inference backend honours.

A backend turns an OpenAI-style chat request for one GGUF file into an OpenAI-shaped
completion dict, or a stream of OpenAI-shaped chunk dicts. Backends own loading,
caching and stopping whatever runs the model; the chat service owns names, ids and
the wire format.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

# the OpenAI sampling parameters a backend receives (only those the caller set)
SAMPLING_OPTIONS = ("temperature", "top_p", "max_tokens", "stop", "seed", "presence_penalty", "frequency_penalty")


@dataclass(frozen=True)
class ChatRequest:
    """One chat call: which GGUF, which messages (role/content dicts), which sampling options."""

    model_path: Path
    messages: list[dict[str, Any]]
    options: dict[str, Any] = field(default_factory=dict)
    include_usage: bool = False  # a stream must end with exact usage even if it costs a backend more work


@runtime_checkable
class InferenceBackend(Protocol):
    async def chat(self, request: ChatRequest) -> dict[str, Any]:
        """An OpenAI ``chat.completion`` dict, with ``usage``."""

    def stream_chat(self, request: ChatRequest) -> AsyncIterator[dict[str, Any]]:
        """OpenAI ``chat.completion.chunk`` dicts; the last one has empty ``choices`` and the ``usage``
        (prompt_tokens may be 0 where it was not asked for and would cost extra to learn)."""

    async def close(self) -> None:
        """Release every loaded model; the backend stays usable (it reloads on the next call)."""


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def usage_chunk(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"object": "chat.completion.chunk", "choices": [], "usage": usage(prompt_tokens, completion_tokens)}
