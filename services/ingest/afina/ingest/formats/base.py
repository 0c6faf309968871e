"""What every format converter shares: the error a record raises when it cannot convert."""

from __future__ import annotations

import datetime as dt
import decimal
import math
from typing import Any

import orjson

from afina.ingest.records import IssueAction


class ConversionError(Exception):
    """One record cannot become an example: where (``field``), which ``rule``, and why."""

    def __init__(self, field: str, rule: str, detail: str, action: IssueAction = "error") -> None:
        super().__init__(detail)
        self.field = field
        self.rule = rule
        self.detail = detail
        self.action = action


def as_text(value: Any) -> str | None:
    """A cell as text for a template or a message; None when it holds nothing.

    Numbers, dates and decimals print as people write them; lists and dicts as JSON;
    bytes as UTF-8 (Parquet binary columns).
    """
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | decimal.Decimal):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):  # pandas writes a missing cell of a numeric column as NaN
            return None
        if math.isinf(value):
            return str(value)
        return repr(value) if value != int(value) or abs(value) >= 1e16 else str(int(value))
    if isinstance(value, dt.date | dt.datetime | dt.time):
        return value.isoformat()
    return orjson.dumps(value, default=str).decode("utf-8")


def kind_of(value: Any) -> str:
    names = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
             type(None): "null", dict: "an object"}
    return names.get(type(value), type(value).__name__)
