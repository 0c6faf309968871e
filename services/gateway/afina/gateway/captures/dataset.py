"""Captured exchanges as training data: OpenAI chat JSONL, one example per exchange, and the original training
file they are appended to.

An example is the request's messages (the route's system prompt included) and one assistant
message: the correction where feedback gave one, else the answer. ``include_feedback="positive"``
leaves out exchanges thumbed down without a correction: a thumbed-down answer that was corrected
is a good example once its correction replaces it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, Protocol

import orjson

from afina.core.datasets.formats import SNIFF_BYTES, UTF8_BOM, detect_container
from afina.core.datasets.options import IngestOptions
from afina.core.errors import InvalidRequest

IncludeFeedback = Literal["all", "positive"]
# ingest options that change how records are read: a file using one is no plain chat JSONL to append to
RECORD_OPTIONS = ("columns", "transcript", "paired", "encryption")


class CapturedRow(Protocol):
    """What an example is made of (``afina.core.db.models.CapturedExchange`` has it)."""

    messages: list[dict[str, Any]]
    answer: str
    feedback: str | None
    correction: str | None


def training_example(row: CapturedRow, include_feedback: IncludeFeedback = "all") -> dict[str, Any] | None:
    """The exchange as ``{"messages": [..., {"role": "assistant", "content": ...}]}``; None when left out."""
    if include_feedback == "positive" and row.feedback == "down" and row.correction is None:
        return None
    messages = [{"role": message["role"], "content": message.get("content") or ""} for message in row.messages]
    answer = row.correction if row.correction is not None else row.answer
    return {"messages": [*messages, {"role": "assistant", "content": answer}]}


def chat_jsonl(rows: Iterable[CapturedRow], include_feedback: IncludeFeedback = "all") -> tuple[bytes, int]:
    """(the JSONL, how many examples it holds): one line per example, UTF-8, each ending with a newline."""
    lines = [orjson.dumps(example) + b"\n" for row in rows
             if (example := training_example(row, include_feedback)) is not None]
    return b"".join(lines), len(lines)


def check_appendable(data: bytes, filename: str, options: IngestOptions, file_id: str, param: str) -> None:
    """Refuse (400 naming ``param``) an original training file that chat JSONL lines cannot simply be appended
    to: one that is no JSONL (CSV, Parquet, an archive, compressed or encrypted) or whose records ingest reads
    through options (a column mapping, a transcript, renamed fields) or in another format than OpenAI chat."""
    head = data[:SNIFF_BYTES]
    spec = detect_container(head, filename, options.container)
    first = next((line for line in head.removeprefix(UTF8_BOM).splitlines() if line.strip()), b"")
    try:
        record = orjson.loads(first)
    except orjson.JSONDecodeError:
        record = None
    reason = None
    if spec is None or spec.name != "jsonl":
        reason = f"it is a {spec.name if spec else 'unrecognised'} file, not JSONL"
    elif options.format not in ("auto", "openai") or options.field_map \
            or any(getattr(options, name) is not None for name in RECORD_OPTIONS):
        reason = "its ingest options change how its records are read"
    elif not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        reason = "its records are not OpenAI chat examples ({\"messages\": [...]})"
    if reason is not None:
        raise InvalidRequest(f"the training file {file_id} cannot be combined with the captured exchanges: {reason}. "
                             f"Name a JSONL file of chat examples in capture.training_file", param=param)


def append_jsonl(original: bytes, captured: bytes) -> bytes:
    """The original file's lines, then the captured ones (a missing final newline added in between)."""
    if original and not original.endswith(b"\n"):
        original += b"\n"
    return original + captured


def count_lines(data: bytes) -> int:
    """Non-blank lines: the examples of a JSONL file, as far as can be told without parsing it."""
    return sum(1 for line in data.splitlines() if line.strip())
