"""Deterministic train/validation split by a stable hash of the normalized record.

Appending rows to a file and uploading it again never moves an old row to the other split.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

BUCKETS = 10_000


def record_digest(record: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(record, option=orjson.OPT_SORT_KEYS)).hexdigest()


def is_validation(digest: str, validation_fraction: float) -> bool:
    return int(digest[:8], 16) % BUCKETS < validation_fraction * BUCKETS


def validation_fraction_for(n_examples: int) -> float:
    """Hold out 10% when there are enough examples to learn from and to measure on (>= 20)."""
    return 0.1 if n_examples >= 20 else 0.0
