"""A chat rendered with a family's training template, and which tokens of it are the assistant's.

One implementation for the two stages that must agree token for token: ingest, which reports before any GPU
time what the trainer will train on, and the trainer, which trains on it. It renders like transformers'
``apply_chat_template`` and masks like its ``return_assistant_tokens_mask`` (tests hold both to transformers on
every family), without transformers' per-token Python loop: the character spans of each ``{% generation %}``
block come from the render itself, and each becomes a token run through the encoding's own ``char_to_token``.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

# the special tokens a chat template may reference, passed to it as transformers passes them
TEMPLATE_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def template_tokens(tokenizer: Any) -> dict[str, str]:
    """The special tokens ``render_chat`` passes to a template, from a transformers tokenizer."""
    return {key: value for key, value in tokenizer.special_tokens_map.items()
            if key in TEMPLATE_TOKEN_KEYS and isinstance(value, str)}


class _GenerationTracker:
    """Where each ``{% generation %}`` block lands in the rendered text (character offsets)."""

    def __init__(self) -> None:
        self.offset = 0  # characters rendered so far, updated by the render loop
        self.spans: list[tuple[int, int]] | None = None


@lru_cache(maxsize=8)
def _compile(template: str) -> tuple[Any, _GenerationTracker]:
    """The template compiled like transformers compiles chat templates, plus a generation tracker.

    transformers renders in a sandbox because Hub templates are untrusted; afina's come from its
    own catalog, and the plain environment renders the same text twice as fast.
    """
    import jinja2
    from jinja2.ext import Extension, loopcontrols

    tracker = _GenerationTracker()

    class GenerationExtension(Extension):
        tags = {"generation"}  # noqa: RUF012 - jinja's Extension API

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_track"), [], [], body).set_lineno(lineno)

        def _track(self, caller: Any) -> str:
            rendered = caller()
            if tracker.spans is not None:
                tracker.spans.append((tracker.offset, tracker.offset + len(rendered)))
            return rendered

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, autoescape=False,
                                     extensions=[GenerationExtension, loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return environment.from_string(template), tracker


def render_chat(template: str, messages: list[dict[str, Any]],
                special_tokens: dict[str, str] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """``(rendered text, [(start, end) character span of each generation block])``, as transformers renders it.

    Not reentrant across threads (the compiled template's tracker is shared): ingest workers
    render from one thread per process.
    """
    compiled, tracker = _compile(template)
    spans: list[tuple[int, int]] = []
    blocks: list[str] = []
    tracker.offset, tracker.spans = 0, spans
    try:
        for block in compiled.generate(messages=messages, tools=None, documents=None, add_generation_prompt=False,
                                       **(special_tokens or {})):
            blocks.append(block)
            tracker.offset += len(block)
    finally:
        tracker.spans = None
    return "".join(blocks), spans


def reply_token_runs(encoding: Any, char_spans: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """Token runs covered by ``char_spans`` (``render_chat``'s) in a ``tokenizers.Encoding``: transformers' assistant
    mask, as ``[start, end)`` runs.

    A span covers the tokens from the one holding its first character to the one holding its
    last; runs that touch merge (as ones in a mask would). transformers stops at the first span
    whose start has no token (cut by truncation); so does this.
    """
    runs: list[tuple[int, int]] = []
    for start_char, end_char in char_spans:
        start = encoding.char_to_token(start_char)
        if start is None:
            break
        end = encoding.char_to_token(end_char - 1)
        stop = end + 1 if end else length
        if stop <= start:
            continue
        if runs and start <= runs[-1][1]:
            runs[-1] = (runs[-1][0], max(runs[-1][1], stop))
        else:
            runs.append((start, stop))
    return runs
