"""A preview of what the model will be trained on, like axolotl's preprocess debug output.

Each example is shown exactly as the trainer will see it — rendered with the base model's
training template, special tokens included — with the tokens that carry a loss marked:
``«…»`` in text, ``<mark>`` in HTML. A ``✂`` marks where ``max_seq_len`` cuts the example.
The masks come from ``afina.ingest.tokens``, the same rule the trainer applies.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from afina.core.catalog import ChatFamily
from afina.ingest.records import Example
from afina.ingest.tokens import EncodedChat, IngestTokenizer, TemplateRenderError, encode_examples, render_example

TRAINED_OPEN, TRAINED_CLOSE, CUT = "«", "»", "✂"


def render_preview(examples: Sequence[Example], tokenizer: IngestTokenizer, family: ChatFamily, n: int = 5,
                   max_seq_len: int | None = None) -> str:
    """Plain-text preview of the first ``n`` examples: trained spans in «», token counts in each header."""
    blocks = []
    for number, (example, encoded) in enumerate(_encode(examples, tokenizer, family, n), start=1):
        if isinstance(encoded, str):
            blocks.append(f"── example {number} · {example.source} line {example.line} ──\n({encoded})")
            continue
        pieces = [(escape_markers(text), trained) for text, trained in _segments(encoded, max_seq_len)]
        body = "".join(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained is True else
                       CUT + text if trained is None else text for text, trained in pieces)
        blocks.append(f"── example {number} · {_header(example, encoded, max_seq_len)} ──\n{body}")
    return "\n\n".join(blocks) + ("\n" if blocks else "")


def render_preview_html(examples: Sequence[Example], tokenizer: IngestTokenizer, family: ChatFamily, n: int = 5,
                        max_seq_len: int | None = None) -> str:
    """The same preview as an HTML fragment: trained spans in ``<mark>``, text past max_seq_len struck out."""
    sections = []
    for number, (example, encoded) in enumerate(_encode(examples, tokenizer, family, n), start=1):
        if isinstance(encoded, str):
            sections.append(f'<section class="example"><h3>Example {number} · '
                            f'{html.escape(f"{example.source} line {example.line}")}</h3>'
                            f'<p class="error">{html.escape(encoded)}</p></section>')
            continue
        body = "".join(f'<mark class="trained">{html.escape(text)}</mark>' if trained is True else
                       f'<s class="truncated">{html.escape(text)}</s>' if trained is None else html.escape(text)
                       for text, trained in _segments(encoded, max_seq_len))
        sections.append(f'<section class="example"><h3>Example {number} · '
                        f'{html.escape(_header(example, encoded, max_seq_len))}</h3><pre>{body}</pre></section>')
    style = ("<style>mark.trained{background:#c8f7c5}s.truncated{color:#999}"
             "pre{white-space:pre-wrap}</style>")
    return style + "".join(sections)


def escape_markers(text: str) -> str:
    """Double the marker characters a text already contains, so «» in the preview only mean "trained"."""
    return text.replace(TRAINED_OPEN, TRAINED_OPEN * 2).replace(TRAINED_CLOSE, TRAINED_CLOSE * 2)


def _encode(examples: Sequence[Example], tokenizer: IngestTokenizer, family: ChatFamily,
            n: int) -> list[tuple[Example, EncodedChat | str]]:
    """The first ``n`` examples encoded, or the reason the template could not render one."""
    rendered: list[tuple[Example, tuple[str, list[tuple[int, int]]] | str]] = []
    for example in examples[:n]:
        try:
            rendered.append((example, render_example(example, family, tokenizer.special_tokens)))
        except TemplateRenderError as exc:
            rendered.append((example, str(exc)))
    ok = [(example, text) for example, text in rendered if not isinstance(text, str)]
    encoded = iter(encode_examples(tokenizer, family, [e for e, _ in ok], [r for _, r in ok])) if ok else iter(())
    return [(example, item if isinstance(item, str) else next(encoded)) for example, item in rendered]


def _header(example: Example, encoded: EncodedChat, max_seq_len: int | None) -> str:
    trained = sum(min(end, max_seq_len or end) - start for start, end in encoded.trained_runs
                  if max_seq_len is None or start < max_seq_len)
    cut = f", cut at max_seq_len {max_seq_len}" if max_seq_len and len(encoded.ids) > max_seq_len else ""
    return f"{example.source} line {example.line} · {len(encoded.ids)} tokens, {trained} trained{cut}"


def _segments(encoded: EncodedChat, max_seq_len: int | None) -> list[tuple[str, bool | None]]:
    """The rendered text cut into ``(text, trained)`` pieces; ``trained`` is None past max_seq_len."""
    text, offsets = encoded.text, encoded.offsets  # one conversion: the property builds a new list
    limit = len(encoded.ids) if max_seq_len is None else min(max_seq_len, len(encoded.ids))
    boundaries: list[tuple[int, bool | None]] = []  # (character where a piece starts, its kind)
    for start, end in encoded.trained_runs:
        if start >= limit:
            continue
        boundaries.append((offsets[start][0], True))
        boundaries.append((offsets[min(end, limit) - 1][1], False))
    if limit < len(encoded.ids):
        boundaries.append((offsets[limit][0], None))
    pieces: list[tuple[str, bool | None]] = []
    position, kind = 0, False
    for where, next_kind in sorted(boundaries, key=lambda b: b[0]):
        if where > position:
            pieces.append((text[position:where], kind))
        position, kind = max(position, where), next_kind
    if position < len(text):
        pieces.append((text[position:], kind))
    return pieces
