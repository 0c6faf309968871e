"""Ollama's native API shapes (``docs/api.md``, ``api/types.go``), as the official ``ollama`` client sends and reads
them. Unknown fields are ignored, as Ollama's JSON decoding does; a field of the wrong type is a 400."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from afina.gateway.params import NulFreeStr

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
MAX_DURATION_S = 2**63 / 1e9
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_seconds(value: str | float | None) -> float | None:
    """Ollama's ``keep_alive``: a number of seconds or a Go duration ("5m", "1h30m", "0"); negative keeps
    the model loaded until evicted. None: the gateway's default."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        return _bounded(float(value), value)
    text = value.strip()
    sign = -1.0 if text.startswith("-") else 1.0
    text = text.lstrip("+-")
    if _NUMBER.fullmatch(text):
        return _bounded(sign * float(text), value)  # a bare number is seconds
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise ValueError(f"time: invalid duration {value!r}")
    return _bounded(sign * sum(float(number) * _UNIT_S[unit] for number, unit in parts), value)


def _bounded(seconds: float, value: object) -> float:
    """Go's durations are int64 nanoseconds (about 292 years); NaN and infinity are no duration at all."""
    if not math.isfinite(seconds) or abs(seconds) > MAX_DURATION_S:
        raise ValueError(f"time: invalid duration {value!r}")
    return seconds


class Options(BaseModel):
    """The Modelfile parameters a request may set (``api.Options``); those afina does not use are accepted and
    ignored, as Ollama ignores options its runner does not know."""

    model_config = ConfigDict(extra="ignore")

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    num_predict: int | None = None
    stop: list[str] | None = None
    seed: int | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    num_ctx: Annotated[int, Field(ge=1)] | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[Any] | None = None


KeepAlive = str | float | None
Format = Literal["", "json"] | dict[str, Any] | None


class _Generation(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: NulFreeStr
    format: Format = None
    options: Options | None = None
    stream: bool = True
    keep_alive: KeepAlive = None
    think: bool | str | None = None

    @field_validator("keep_alive")
    @classmethod
    def _duration(cls, value: KeepAlive) -> KeepAlive:
        keep_alive_seconds(value)
        return value


class ChatRequest(_Generation):
    messages: list[Message] = Field(default_factory=list)
    tools: list[Any] | None = None


class GenerateRequest(_Generation):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    raw: bool = False
    images: list[str] | None = None
    context: list[int] | None = None


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: NulFreeStr
    input: str | Annotated[list[str], Field(max_length=256)]
    truncate: bool = True
    options: Options | None = None
    keep_alive: KeepAlive = None
    dimensions: int | None = None


class EmbeddingsRequest(BaseModel):
    """The legacy ``/api/embeddings``: one prompt, one vector (the same vector ``/api/embed`` gives)."""

    model_config = ConfigDict(extra="ignore")

    model: NulFreeStr
    prompt: str = ""
    options: Options | None = None
    keep_alive: KeepAlive = None


class ModelRequest(BaseModel):
    """``/api/show`` and ``/api/delete``: ``model``, or the older ``name``."""

    model_config = ConfigDict(extra="ignore")

    model: NulFreeStr | None = None
    name: NulFreeStr | None = None
    verbose: bool = False

    @property
    def target(self) -> str:
        return self.model or self.name or ""


class Details(BaseModel):
    parent_model: str = ""
    format: str = "gguf"
    family: str = ""
    families: list[str] | None = None
    parameter_size: str = ""
    quantization_level: str = ""


class ListedModel(BaseModel):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: Details


class RunningModel(BaseModel):
    name: str
    model: str
    size: int
    digest: str
    details: Details
    expires_at: str
    size_vram: int = 0
