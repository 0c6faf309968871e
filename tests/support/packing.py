"""Token rows for the packing tests: random ids, the first part of each row masked as a prompt."""

from __future__ import annotations

import random

from afina.trainer.packing import IGNORE_INDEX


def token_row(length: int, first_label: int, seed: int) -> dict[str, list[int]]:
    rng = random.Random(seed)
    ids = [rng.randrange(10, 40000) for _ in range(length)]
    labels = [IGNORE_INDEX] * first_label + ids[first_label:]
    return {"input_ids": ids, "labels": labels}


def token_rows(lengths: list[int]) -> list[dict[str, list[int]]]:
    """One row per length (seeded by its position), the first half of each masked."""
    return [token_row(length, max(1, length // 2), seed) for seed, length in enumerate(lengths)]
