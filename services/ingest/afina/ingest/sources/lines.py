"""Physical lines of a file, one at a time, with a per-line cap.

A 40 MB line is skipped without being held in memory: ``readline(limit)`` returns at
most the cap, and the rest of that line is read in pieces and thrown away.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, AnyStr, Generic

from afina.ingest.sources.limits import MAX_LINE_BYTES

_SKIP_CHUNK = 1024 * 1024


@dataclass(slots=True)
class Line(Generic[AnyStr]):
    number: int  # 1-based physical line
    text: AnyStr  # without the line ending; empty when ``oversize``
    oversize: int = 0  # the line's length when it was over the cap (then ``text`` is empty)


def iter_lines(handle: IO[AnyStr], limit: int = MAX_LINE_BYTES) -> Iterator[Line[AnyStr]]:
    """Every line of ``handle`` split on LF only (CRLF's CR is dropped), capped at ``limit``."""
    newline = "\n" if isinstance(handle.read(0), str) else b"\n"
    number = 0
    while True:
        text = handle.readline(limit + 1)
        if not text:
            return
        number += 1
        if len(text) > limit and not text.endswith(newline):  # type: ignore[arg-type]
            length = len(text)
            while True:
                rest = handle.readline(_SKIP_CHUNK)
                length += len(rest)
                if not rest or rest.endswith(newline):  # type: ignore[arg-type]
                    break
            yield Line(number, text[:0], oversize=length)
            continue
        yield Line(number, text.rstrip(b"\r\n" if newline == b"\n" else "\r\n"))  # type: ignore[arg-type]
