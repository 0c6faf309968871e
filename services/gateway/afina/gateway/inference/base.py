"""The contract every inference backend honours, in the gateway's own terms.

Two public surfaces (OpenAI's ``/v1`` and Ollama's ``/api``) and four backends (llama.cpp in
process, a llama.cpp server per model, Ollama's native API, any OpenAI-compatible upstream)
meet here: a surface turns its request into a ``GenerationRequest`` for a ``ServedModel``; a
backend answers a ``Generation`` (or streams ``TextDelta`` pieces ending with one) and the
surface writes it back in its own wire format. No backend knows either surface's shapes, and
no surface knows how a backend reaches its model.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from afina.core.errors import InvalidRequest

LOCAL_BACKEND = "local"  # the GGUF files afina serves itself: llama.cpp in process or a llama.cpp server
OLLAMA_BACKEND = "ollama"


@dataclass(frozen=True)
class ServedModel:
    """One model a backend can run, resolved from a public name by the registry.

    ``name`` is what the caller sees in answers; ``backend`` picks the backend (``local``,
    ``ollama``, or an upstream's name from ``settings.upstreams``); ``path`` is the GGUF of a
    local model; ``upstream_model`` is the model's name where a remote backend knows it.
    """

    name: str
    backend: str = LOCAL_BACKEND
    path: Path | None = None
    upstream_model: str | None = None
    context_length: int | None = None  # what the model was trained for (the GGUF's), when known
    size: int | None = None  # bytes of the served file, when known
    digest: str | None = None  # its sha256, when known

    @property
    def cache_key(self) -> str:
        """What identifies the loaded thing in a backend (a file, or the upstream's model)."""
        return str(self.path) if self.path is not None else f"{self.backend}:{self.upstream_model}"


@dataclass(frozen=True)
class Sampling:
    """Sampling options, by their OpenAI names where OpenAI has one; None means the backend's default."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    max_tokens: int | None = None  # Ollama's num_predict
    stop: tuple[str, ...] = ()
    seed: int | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    def set_fields(self) -> dict[str, Any]:
        """Only what the caller set (``stop`` when non-empty)."""
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return {name: (list(value) if name == "stop" else value) for name, value in values.items()
                if value is not None and value != ()}


@dataclass(frozen=True)
class OutputFormat:
    """Constrained output: any JSON object, or JSON matching ``schema`` (llama.cpp turns it into a grammar)."""

    kind: Literal["json", "json_schema"]
    schema: dict[str, Any] | None = None
    param: str = "response_format"  # how the caller named it, for an error about it


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: a chat (``messages``) or a raw prompt the model continues as is (``prompt``: text, or
    token ids of the model's own vocabulary, as evaluation harnesses send them so that their token counts
    match the model's).

    ``logprobs`` asks for each answered token's log probability and that many of the likeliest alternatives
    (0: the token's own only); ``echo`` puts the prompt in front of the answer, its tokens scored too, which
    with ``max_tokens`` 0 scores a text without generating (what evaluation harnesses call log-likelihood).
    Both are for raw prompts; a backend that cannot report them refuses (``refuse_token_level``).
    """

    model: ServedModel
    messages: list[dict[str, Any]] | None = None
    prompt: str | list[int] | None = None
    sampling: Sampling = field(default_factory=Sampling)
    output_format: OutputFormat | None = None
    num_ctx: int | None = None  # a context length other than the backend's default (Ollama's num_ctx)
    keep_alive_s: float | None = None  # how long the model stays loaded after this call (None: the default)
    logprobs: int | None = None
    echo: bool = False

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a GenerationRequest has messages or a prompt, not both")
        if self.messages is not None and (self.logprobs is not None or self.echo):
            raise ValueError("logprobs and echo are for raw prompts")

    @property
    def scored(self) -> bool:
        """Whether the answer must carry token log probabilities or the echoed prompt."""
        return self.logprobs is not None or self.echo

    @property
    def token_level(self) -> str | None:
        """The parameter asking for what works on the model's tokens (their log probabilities, the echoed
        prompt, a prompt given as token ids), or None."""
        if self.logprobs is not None:
            return "logprobs"
        if self.echo:
            return "echo"
        return "prompt" if isinstance(self.prompt, list) else None


@dataclass(frozen=True)
class TokenLogprobs:
    """Token log probabilities as OpenAI's legacy completions give them: per token its text, its log probability
    (None for the first token of a text, which nothing precedes), the likeliest alternatives at that position
    (text to log probability, the token itself included) and where the token starts in the answer's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]

    def __add__(self, other: TokenLogprobs) -> TokenLogprobs:
        return TokenLogprobs(tokens=self.tokens + other.tokens,
                             token_logprobs=self.token_logprobs + other.token_logprobs,
                             top_logprobs=self.top_logprobs + other.top_logprobs,
                             text_offset=self.text_offset + other.text_offset)

    @classmethod
    def from_openai(cls, value: Any) -> TokenLogprobs | None:
        """A choice's ``logprobs`` as an OpenAI-compatible server sent it (None when it sent none)."""
        if not isinstance(value, dict) or not isinstance(value.get("tokens"), list):
            return None
        tokens = [str(token) for token in value["tokens"]]
        count = len(tokens)
        return cls(tokens=tokens, token_logprobs=list(value.get("token_logprobs") or [None] * count),
                   top_logprobs=list(value.get("top_logprobs") or [None] * count),
                   text_offset=list(value.get("text_offset") or [0] * count))


def refuse_token_level(request: GenerationRequest) -> None:
    """For a backend that cannot work at the level of the model's tokens (``GenerationRequest.token_level``):
    a 400 naming the parameter, never an answer silently without what was asked."""
    param = request.token_level
    if param is not None:
        what = "token ids as a prompt" if param == "prompt" else f"'{param}'"
        raise InvalidRequest(f"{what} is not available for this model: the server it runs on does not work with "
                             "its tokens. Models afina runs itself (llama.cpp in process) and "
                             "OpenAI-compatible upstreams do.", param=param)


@dataclass(frozen=True)
class TextDelta:
    """A piece of a streamed answer."""

    text: str


@dataclass
class Generation:
    """A finished answer with what it cost; a stream's last item (its ``text`` is then the whole answer)."""

    text: str
    finish_reason: Literal["stop", "length"] = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    load_ns: int = 0  # loading the model for this call (0 when it was loaded)
    prompt_eval_ns: int = 0
    eval_ns: int = 0
    logprobs: TokenLogprobs | None = None  # when the request asked (``GenerationRequest.logprobs``)


@dataclass
class Embeddings:
    vectors: list[list[float]]
    prompt_tokens: int = 0
    load_ns: int = 0


@dataclass(frozen=True)
class LoadedModel:
    """A model a backend holds in memory now (Ollama's ``/api/ps``)."""

    model: ServedModel
    size: int
    expires_at: float | None  # epoch seconds; None: until evicted


@runtime_checkable
class InferenceBackend(Protocol):
    async def generate(self, request: GenerationRequest) -> Generation:
        """The whole answer."""

    def stream(self, request: GenerationRequest) -> AsyncIterator[TextDelta | Generation]:
        """``TextDelta`` pieces, then one ``Generation`` with the totals. Closing the iterator early (the
        caller went away) stops the generation at its source."""

    async def embed(self, model: ServedModel, inputs: list[str], *, truncate: bool = True,
                    keep_alive_s: float | None = None) -> Embeddings:
        """One vector per input; ``truncate=False`` refuses an input longer than the context."""

    async def loaded(self) -> list[LoadedModel]:
        """What is loaded now (empty for a backend that does not say)."""

    async def unload(self, model: ServedModel) -> None:
        """Let the model go now (Ollama's ``keep_alive: 0``); nothing if it is not loaded."""

    async def close(self) -> None:
        """Release every loaded model and connection; the backend stays usable (it reloads on the next call)."""


def input_too_long(index: int, tokens: int, n_ctx: int) -> InvalidRequest:
    """An embedding input past the context, with truncation refused (Ollama's ``truncate: false``)."""
    return InvalidRequest(f"input {index} has {tokens} tokens, more than the context length {n_ctx}; shorten it "
                          "or allow truncation", param="input", code="context_length_exceeded")


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header, given as seconds or as an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class UpstreamError(Exception):
    """A remote backend failed in a way a fallback may cover (down, timed out, 5xx, 429): the router tries
    the next target, and answers ``InferenceUnavailable``/504 when none is left. Not an ``AfinaError``: the
    message is for the operator's log (it may hold the upstream's own words)."""

    def __init__(self, message: str, *, status: int = 502, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
