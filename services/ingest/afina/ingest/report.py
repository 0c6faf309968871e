"""The ingest report: every ``RowIssue`` of a run, one JSON object a line, plus the summary users see first.

Issues stream to a temp file as they happen (a 1M-row file with a problem in every row
must not hold a million issues in memory); the writer keeps only counts per rule and
action and the first few errors, which name the failure of a strict run and the
``status_details`` of a failed file. The report never holds a secret: issue details are
written by the stages, which never put key material in them.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import IO, Any

import orjson

from afina.ingest.records import RowIssue

FIRST_ERRORS_KEPT = 20
ERRORS_NAMED = 5  # in an error message: "file, line, field: detail [rule]" for the first five


class ReportWriter:
    """Append issues to ``path`` as JSONL; count them; remember the first errors."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: IO[bytes] = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.counts: Counter[tuple[str, str]] = Counter()
        self.first_errors: list[RowIssue] = []
        self.error_rows = 0
        self._last_error_row: tuple[str, int] | None = None

    def add(self, issue: RowIssue) -> None:
        self._handle.write(orjson.dumps(issue.as_dict()) + b"\n")
        self.counts[(issue.rule, issue.action)] += 1
        if issue.action == "error":
            row = (issue.source, issue.line)
            if row != self._last_error_row:
                self.error_rows += 1
                self._last_error_row = row
            if len(self.first_errors) < FIRST_ERRORS_KEPT:
                self.first_errors.append(issue)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def count(self, action: str) -> int:
        return sum(n for (_, act), n in self.counts.items() if act == action)

    def summary(self) -> dict[str, dict[str, int]]:
        """``{rule: {action: count}}``, rules sorted by name."""
        out: dict[str, dict[str, int]] = {}
        for (rule, action), count in sorted(self.counts.items()):
            out.setdefault(rule, {})[action] = count
        return out

    def first_errors_as_dicts(self) -> list[dict[str, Any]]:
        return [issue.as_dict() for issue in self.first_errors]

    def describe_errors(self) -> str:
        """The first errors as one sentence, for an exception message or ``status_details``."""
        named = "; ".join(issue.describe() for issue in self.first_errors[:ERRORS_NAMED])
        more = self.count("error") - min(len(self.first_errors), ERRORS_NAMED)
        return named + (f" (and {more} more error(s) in the report)" if more > 0 else "")

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()
