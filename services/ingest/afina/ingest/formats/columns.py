"""Any table to a conversation through templates (seed 004: "DESCRIBE ABOUT THE PRODUCT.\\nTitle: {title}").

``{column}`` is replaced by the row's value; ``{{`` and ``}}`` are literal braces; other
text is constant. A row whose template needs a missing or empty column is dropped and
reported naming that column: an empty target would teach the model to say nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from afina.core.datasets.options import ColumnMapping
from afina.ingest.formats.base import ConversionError, as_text

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]+)\}")


@dataclass(frozen=True)
class Template:
    role: str
    text: str
    columns: tuple[str, ...]

    @classmethod
    def parse(cls, role: str, text: str) -> Template:
        names = tuple(dict.fromkeys(match.group(1).strip() for match in _PLACEHOLDER.finditer(text)
                                    if match.group(1) is not None))
        return cls(role, text, names)

    def render(self, values: dict[str, str]) -> str:
        def substitute(match: re.Match[str]) -> str:
            token = match.group(0)
            if token == "{{":
                return "{"
            if token == "}}":
                return "}"
            return values[match.group(1).strip()]

        return _PLACEHOLDER.sub(substitute, self.text)


class ColumnConverter:
    """Compiled once per file from the user's ``ColumnMapping``."""

    def __init__(self, mapping: ColumnMapping) -> None:
        self.templates = [Template.parse(role, text) for role, text in
                          (("system", mapping.system), ("user", mapping.user), ("assistant", mapping.assistant))
                          if text]
        self.required = tuple(dict.fromkeys([*mapping.required_columns,
                                             *(name for template in self.templates for name in template.columns)]))

    def __call__(self, record: dict[str, Any]) -> list[dict[str, Any]]:
        values: dict[str, str] = {}
        for name in self.required:
            if name not in record:
                raise ConversionError(name, "missing_column", f"the row has no column {name!r}{self._used_by(name)}; "
                                                              f"row dropped", action="dropped")
            text = as_text(record[name])
            if text is None or not text.strip():
                raise ConversionError(name, "empty_column", f"column {name!r} is empty{self._used_by(name)}; "
                                                            f"row dropped", action="dropped")
            values[name] = text
        return [{"role": template.role, "content": template.render(values)} for template in self.templates]

    def _used_by(self, name: str) -> str:
        roles = [template.role for template in self.templates if name in template.columns]
        return f" (the {'/'.join(roles)} template needs it)" if roles else " (a required column)"
