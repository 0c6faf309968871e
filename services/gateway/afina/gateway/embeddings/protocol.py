"""Embeddings as OpenAI's ``/v1/embeddings`` speaks them (``openai.types.create_embedding_response``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from afina.gateway.params import NulFreeStr

MAX_INPUTS = 256
# characters of one input: far past any embedding model's context, and a request one past it stays under the
# JSON body limit (so it is refused as invalid, not as too large)
MAX_INPUT_CHARS = 100_000
InputText = Annotated[str, Field(max_length=MAX_INPUT_CHARS)]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: NulFreeStr
    # token arrays (list[int]) are OpenAI's too; afina embeds text
    input: InputText | Annotated[list[InputText], Field(min_length=1, max_length=MAX_INPUTS)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # base64 of little-endian float32 with encoding_format=base64


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
