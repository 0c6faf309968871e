"""Packing: bins hold every example once within max_seq_len, and the collator makes one row a backend can train.

That a packed batch trains exactly like separate ones needs real weights: tests/integration/trainer/
test_packing_attention.py.
"""

from __future__ import annotations

import random

import pytest

from afina.core.errors import TrainingFailed
from afina.trainer.packing import IGNORE_INDEX, PaddingFreeCollator, pack_rows
from tests.support.packing import token_rows


def test_bins_hold_every_example_once_within_capacity() -> None:
    rng = random.Random(7)
    lengths = [rng.choice([12, 30, 64, 100, 200, 250]) for _ in range(300)]
    rows = token_rows(lengths)
    packed, summary = pack_rows(rows, 256)
    assert all(len(row["input_ids"]) <= 256 for row in packed)
    assert summary.examples == 300 and summary.rows == len(packed) and summary.tokens == sum(lengths)
    # every example appears exactly once, intact, with positions restarting at 0
    seen = []
    for row in packed:
        start = 0
        assert len(row["position_ids"]) == len(row["input_ids"]) == len(row["labels"]) == sum(row["seq_lengths"])
        for length in row["seq_lengths"]:
            seen.append(tuple(row["input_ids"][start:start + length]))
            assert row["position_ids"][start:start + length] == list(range(length))
            start += length
    assert sorted(seen) == sorted(tuple(row["input_ids"]) for row in rows)
    # best-fit decreasing comes within 10% of the fewest rows the tokens could fit in
    fewest = -(-sum(lengths) // 256)
    assert summary.fill > 0.9 and summary.rows <= fewest * 1.1


def test_packing_is_deterministic() -> None:
    rows = token_rows([5, 9, 3, 7, 7, 2, 11, 4] * 10)
    assert pack_rows(rows, 16)[0] == pack_rows(rows, 16)[0]


def test_an_example_longer_than_the_row_is_refused() -> None:
    with pytest.raises(TrainingFailed, match="more than max_seq_len=8"):
        pack_rows(token_rows([9]), 8)


def test_collator_makes_one_row_with_boundary_labels_masked() -> None:
    rows = token_rows([6, 4, 5])
    packed, _ = pack_rows(rows, 10)
    batch = PaddingFreeCollator()(packed)
    total = sum(len(row["input_ids"]) for row in rows)
    assert batch["input_ids"].shape == (1, total) and batch["position_ids"].shape == (1, total)
    assert "attention_mask" not in batch
    positions = batch["position_ids"][0].tolist()
    starts = [index for index, position in enumerate(positions) if position == 0]
    assert len(starts) == 3
    labels = batch["labels"][0].tolist()
    assert all(labels[start] == IGNORE_INDEX for start in starts)


def test_collator_refuses_a_batch_with_nothing_to_train_on() -> None:
    row = {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX] * 3}
    with pytest.raises(TrainingFailed, match="no trainable token"):
        PaddingFreeCollator()([row, dict(row)])


def test_collator_can_pass_packed_lengths_for_unsloth() -> None:
    packed, _ = pack_rows(token_rows([3, 4]), 8)
    batch = PaddingFreeCollator(with_seq_lengths=True)(packed)
    assert sorted(batch["packed_seq_lengths"].tolist()) == [3, 4]
