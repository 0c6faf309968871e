"""TXT: the whole file is one value; the converter decides how to cut it.

For ``format: text`` the text converter splits it into blank-line-separated documents;
for transcripts the parser reads it as one chat log. Read whole, so capped.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from afina.core.errors import DatasetInvalid
from afina.ingest.records import RowIssue, SourceRow
from afina.ingest.sources.encoding import TextEncoding
from afina.ingest.sources.limits import MAX_TEXT_BYTES, MiB


def read_text_file(path: Path, source: str, encoding: TextEncoding) -> Iterator[SourceRow]:
    """One ``SourceRow`` (line 1) holding the file's text, line endings normalized to LF."""
    text = read_text(path, source, encoding)
    for note in encoding.notes:
        yield SourceRow(source, 0, None, note)
    if "\r" in text:
        yield SourceRow(source, 0, None, RowIssue(source, 0, "file", "line_endings", "fixed",
                                                  "converted CRLF/CR line endings to LF"))
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    yield SourceRow(source, 1, text)


def read_text(path: Path, source: str, encoding: TextEncoding) -> str:
    """The decoded text of a file under the TXT cap; ``DatasetInvalid`` naming the file otherwise."""
    encoding.refuse_if_mixed(source)
    size = path.stat().st_size
    if size > MAX_TEXT_BYTES:
        raise DatasetInvalid(f"{source} is {size / MiB:.0f} MiB; text files are read whole and are limited to "
                             f"{MAX_TEXT_BYTES // MiB} MiB. Split it, or upload JSONL", rule="file_too_large",
                             param="file")
    try:
        with encoding.open_text(path, newline="") as handle:
            text = handle.read()
    except UnicodeDecodeError as exc:
        raise DatasetInvalid(f"{source}: not valid {encoding.label}: {exc.reason} at character {exc.start}",
                             rule="invalid_encoding", param="file") from None
    if not text.strip():
        raise DatasetInvalid(f"{source} is empty (only whitespace)", rule="empty_file", param="file")
    return text
