"""Deterministic train/validation/test split by a stable hash of the normalized record.

A row's split depends on nothing but the row (after repairs): appending rows to a file and
uploading it again never moves an old row to another split, and the same row in two uploads
lands in the same split. A record's own split (a ``split`` column, a split file) wins over the
hash; Portuguese names (``treino``/``validacao``/``teste``) are accepted there as in the options.

The hash maps to a point in [0, 1) cut into validation, then test, then train: with no test
share, a row is in validation exactly when it was under the earlier two-way split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import orjson

from afina.core.datasets.options import SPLIT_ALIASES, SPLIT_NAMES, SplitOptions
from afina.ingest.records import Example

BUCKETS = 10_000


def record_digest(record: dict[str, Any]) -> str:
    """sha256 (hex) of the record's canonical JSON; also names records in reports and manifests."""
    return hashlib.sha256(orjson.dumps(record, option=orjson.OPT_SORT_KEYS)).hexdigest()


def bucket_of(digest: str) -> int:
    """The record's bucket in ``range(BUCKETS)``: the first 32 bits of its digest."""
    return int(digest[:8], 16) % BUCKETS


def canonical_split(name: str) -> str | None:
    """``"train"``/``"validation"``/``"test"`` for any accepted spelling (``"Treino "``, ``"validação"``)."""
    return SPLIT_ALIASES.get(name.strip().lower())


class Splitter:
    """Assign each example to a split, by its own ``split`` or by hash; check the minimum sizes."""

    def __init__(self, options: SplitOptions) -> None:
        self.options = options
        proportions = {name: options.proportions.get(name, 0.0) for name in SPLIT_NAMES}
        validation_end = round(proportions["validation"] * BUCKETS)
        test_end = validation_end + round(proportions["test"] * BUCKETS)
        # order of the cuts: validation [0, v), test [v, v+t), train [v+t, BUCKETS)
        self._cuts = ((validation_end, "validation"), (test_end, "test"))

    def assign(self, example: Example) -> str:
        """The example's split; raises ``ValueError`` for an unknown own split (validation reports it first)."""
        if example.split is not None:
            name = canonical_split(example.split)
            if name is None:
                raise ValueError(f"unknown split {example.split!r}")
            return name
        return self.assign_digest(record_digest(example.record()))

    def assign_digest(self, digest: str) -> str:
        """The hash split of a record whose ``record_digest`` is already known."""
        bucket = bucket_of(digest)
        for end, name in self._cuts:
            if bucket < end:
                return name
        return "train"

    def check_minimums(self, counts: Mapping[str, int]) -> list[str]:
        """One sentence per split smaller than its configured minimum (empty when all are met)."""
        problems = []
        for name, minimum in self.options.min_examples.items():
            have = counts.get(name, 0)
            if have < minimum:
                problems.append(f"the {name} split has {have} example(s); at least {minimum} are needed "
                                f"(add examples, change the split proportions or lower split.min_examples)")
        return problems
