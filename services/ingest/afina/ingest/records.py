"""The values that flow through the ingest pipeline, stage to stage.

    container reader  ->  SourceRow       (where it came from + the raw value)
    format converter  ->  Example         (canonical: messages, or text)
    repairs/validate  ->  Example + RowIssue(s)
    split/tokenize    ->  written split files, report lines, stats

Every stage is a generator over these, so a 1M-row file streams with bounded memory.
Each ``RowIssue`` names the file (or archive member), the 1-based line/row, the field,
the rule, and what was done about it; the report the user downloads is these, one per line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

IssueAction = Literal["fixed", "dropped", "error", "warning"]


@dataclass(frozen=True, slots=True)
class RowIssue:
    """One thing found in one row: repaired (``fixed``), removed (``dropped``), fatal (``error``) or noted."""

    source: str  # file name, or "archive.zip:folder/member.txt"
    # 1-based physical line (JSONL/TXT; CSV: where the record starts, the header is line 1), row (Parquet),
    # or element (JSON array); 0 = the whole file
    line: int
    field: str  # "messages[2].content", "title", "line", "file"
    rule: str  # stable machine name: "invalid_json", "mojibake", "example_missing_assistant_message", ...
    action: IssueAction
    detail: str  # human sentence: what was wrong and what was done, never a secret

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.source, "line": self.line, "field": self.field, "rule": self.rule,
                "action": self.action, "detail": self.detail}

    def describe(self) -> str:
        where = f"{self.source}, line {self.line}" if self.line else self.source
        return f"{where}, field {self.field}: {self.detail} [{self.rule}]"


@dataclass(slots=True)
class SourceRow:
    """One record as a container reader produced it, before any format conversion.

    ``value`` is a dict for structured containers (JSONL/JSON/CSV/Parquet rows), a str for
    text (a TXT file's whole text, or a paired archive's member), or None when the row could
    not be parsed (then ``issue`` says why, and the pipeline reports and skips it).
    """

    source: str
    line: int
    value: dict[str, Any] | str | None
    issue: RowIssue | None = None


@dataclass(slots=True)
class Example:
    """A training example in afina's canonical form: chat ``messages`` or plain ``text``.

    ``split`` is the user's own split for this record when the data says so (a ``split`` column,
    a split file); None lets the hash split decide.
    """

    source: str
    line: int
    messages: list[dict[str, Any]] | None = None
    text: str | None = None
    split: str | None = None
    issues: list[RowIssue] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """What is written to a split file (and hashed for the split and deduplication)."""
        if self.messages is not None:
            return {"messages": self.messages}
        return {"text": self.text}
