"""Plain text for continued pretraining: ``{"text": ...}`` records, or TXT files.

A TXT file becomes one example per blank-line-separated document, each pointing at
the line it starts on. One example per file was the other choice; it makes any
file longer than a few pages one example over ``max_seq_len``, dropped whole.
Put a whole document on one block (no blank lines) to keep it as one example.
"""

from __future__ import annotations

from collections.abc import Iterator

from afina.ingest.records import Example


def documents(text: str, source: str, first_line: int = 1) -> Iterator[Example]:
    block: list[str] = []
    start = first_line
    for offset, line in enumerate(text.split("\n")):
        if line.strip():
            if not block:
                start = first_line + offset
            block.append(line)
        elif block:
            yield Example(source, start, text="\n".join(block))
            block = []
    if block:
        yield Example(source, start, text="\n".join(block))
