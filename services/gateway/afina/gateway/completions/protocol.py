"""Text completions as OpenAI's legacy ``/v1/completions`` speaks them (``openai.types.completion``): the prompt
is continued as is, with no chat template — what evaluation harnesses and raw-prompt apps send."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from afina.gateway.chat.protocol import StreamOptions, Usage
from afina.gateway.params import NulFreeStr

MAX_CHOICES = 8  # prompts x n: every choice is one generation, run in turn
MAX_LOGPROBS = 5  # OpenAI's own bound on the alternatives listed per token


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: NulFreeStr
    # text, several texts, or token ids of the model's vocabulary (one prompt or several), as OpenAI takes them
    prompt: (str | Annotated[list[str], Field(min_length=1, max_length=MAX_CHOICES)]
             | Annotated[list[int], Field(min_length=1)]
             | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1, max_length=MAX_CHOICES)])
    max_tokens: Annotated[int, Field(ge=0)] | None = 16  # OpenAI's default
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repeat_penalty: Annotated[float, Field(ge=0)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False  # the prompt returned in front of the answer (with its tokens' logprobs when asked)
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None  # the likeliest alternatives per token
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _bounded_choices(self) -> CompletionRequest:
        prompts = 1 if isinstance(self.prompt, str) or isinstance(self.prompt[0], int) else len(self.prompt)
        if prompts * self.n > MAX_CHOICES:
            raise ValueError(f"prompts x n is {prompts * self.n}; afina generates at most {MAX_CHOICES} choices "
                             "per request")
        return self


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy per-token log probabilities (``openai.types.completion_choice.Logprobs``)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None
