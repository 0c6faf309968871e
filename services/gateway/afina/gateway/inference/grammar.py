"""Structured output for llama.cpp: a GBNF grammar from Ollama's ``format`` or OpenAI's ``response_format``.

llama.cpp samples only tokens the grammar allows, so a JSON answer always parses and a schema's
required fields are always there. A grammar is compiled once per schema (the same few schemas
come back on every call of an app).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import orjson

from afina.core.errors import InvalidRequest
from afina.gateway.inference.base import OutputFormat

GRAMMAR_CACHE = 64


def grammar_for(output_format: OutputFormat | None) -> Any:
    """A ``llama_cpp.LlamaGrammar`` for the format, None for free text; a schema llama.cpp cannot turn
    into a grammar is the caller's 400."""
    if output_format is None:
        return None
    schema = orjson.dumps(output_format.schema, option=orjson.OPT_SORT_KEYS).decode() \
        if output_format.kind == "json_schema" and output_format.schema else None
    try:
        return _compiled(schema)
    except InvalidRequest as exc:
        raise InvalidRequest(exc.message, param=output_format.param) from None


@lru_cache(maxsize=GRAMMAR_CACHE)
def _compiled(schema: str | None) -> Any:
    from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

    if schema is None:
        return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
    try:
        return LlamaGrammar.from_json_schema(schema, verbose=False)
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise InvalidRequest(f"the JSON schema cannot be used to constrain the output: {exc}") from None
