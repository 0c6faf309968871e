"""Embeddings: every input's vector from the model, unit length, as floats or base64 float32 (what the
``openai`` client asks for by default, and decodes itself)."""

from __future__ import annotations

import base64
import struct

from afina.core.errors import InvalidRequest
from afina.core.keys import KeyGrant
from afina.gateway.embeddings.protocol import Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage
from afina.gateway.serving.dispatch import Answered, Dispatcher
from afina.gateway.serving.resolve import Plan


def encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


async def embed(dispatcher: Dispatcher, caller: KeyGrant, plan: Plan,
                request: EmbeddingRequest) -> tuple[EmbeddingList, Answered]:
    inputs = [request.input] if isinstance(request.input, str) else list(request.input)
    embeddings, answered = await dispatcher.embed(caller, plan, inputs)
    width = len(embeddings.vectors[0]) if embeddings.vectors else 0
    if request.dimensions is not None and request.dimensions != width:
        raise InvalidRequest(f"this model's embeddings have {width} dimensions; it cannot return "
                             f"{request.dimensions}", param="dimensions")
    data = [Embedding(index=index, embedding=encode(vector, request.encoding_format))
            for index, vector in enumerate(embeddings.vectors)]
    usage = EmbeddingUsage(prompt_tokens=embeddings.prompt_tokens, total_tokens=embeddings.prompt_tokens)
    return EmbeddingList(data=data, model=plan.requested, usage=usage), answered
