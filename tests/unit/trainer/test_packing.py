"""Packing: bins hold every example once within max_seq_len, and a packed batch trains exactly like separate ones."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from afina.core.errors import TrainingFailed
from afina.trainer.packing import IGNORE_INDEX, PaddingFreeCollator, pack_rows
from tests.support.models import materialized_base_model


def _row(length: int, first_label: int, seed: int) -> dict[str, list[int]]:
    rng = random.Random(seed)
    ids = [rng.randrange(10, 40000) for _ in range(length)]
    labels = [IGNORE_INDEX] * first_label + ids[first_label:]
    return {"input_ids": ids, "labels": labels}


def _rows(lengths: list[int]) -> list[dict[str, list[int]]]:
    return [_row(length, max(1, length // 2), seed) for seed, length in enumerate(lengths)]


def test_bins_hold_every_example_once_within_capacity() -> None:
    rng = random.Random(7)
    lengths = [rng.choice([12, 30, 64, 100, 200, 250]) for _ in range(300)]
    rows = _rows(lengths)
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
    rows = _rows([5, 9, 3, 7, 7, 2, 11, 4] * 10)
    assert pack_rows(rows, 16)[0] == pack_rows(rows, 16)[0]


def test_an_example_longer_than_the_row_is_refused() -> None:
    with pytest.raises(TrainingFailed, match="more than max_seq_len=8"):
        pack_rows(_rows([9]), 8)


def test_collator_makes_one_row_with_boundary_labels_masked() -> None:
    rows = _rows([6, 4, 5])
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
    packed, _ = pack_rows(_rows([3, 4]), 8)
    batch = PaddingFreeCollator(with_seq_lengths=True)(packed)
    assert sorted(batch["packed_seq_lengths"].tolist()) == [3, 4]


def _loss_sum(model: Any, batch: dict[str, Any]) -> tuple[float, int]:
    """Summed token loss and the number of trained tokens of one forward pass."""
    import torch

    with torch.no_grad():
        # use_cache=False as in training (the backends set it): with a cache, transformers ignores packed positions
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        logits = model(**inputs, use_cache=False).logits.float()
    labels = batch["labels"]
    shifted_logits, shifted_labels = logits[:, :-1], labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(shifted_logits.reshape(-1, shifted_logits.shape[-1]),
                                             shifted_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return float(loss), int((shifted_labels != IGNORE_INDEX).sum())


@pytest.mark.slow
def test_a_packed_batch_sees_each_example_alone(tmp_path_factory: pytest.TempPathFactory) -> None:
    """No example attends to another: the packed forward's loss equals the separate forwards' sum."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir: Path = materialized_base_model(tmp_path_factory)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    rows = _rows([23, 41, 17, 30])
    separate_loss, separate_tokens = 0.0, 0
    for row in rows:
        loss, tokens = _loss_sum(model, {"input_ids": torch.tensor([row["input_ids"]]),
                                         "labels": torch.tensor([row["labels"]])})
        separate_loss += loss
        separate_tokens += tokens
    packed, summary = pack_rows(rows, 128)
    assert summary.rows == 1
    packed_loss, packed_tokens = _loss_sum(model, PaddingFreeCollator()(packed))
    assert packed_tokens == separate_tokens
    assert packed_loss == pytest.approx(separate_loss, rel=1e-4)
    # and the check can fail: without positions restarting, examples would see each other
    leaked = PaddingFreeCollator()(packed)
    leaked["position_ids"] = torch.arange(leaked["input_ids"].shape[1]).unsqueeze(0)
    leaked_loss, _ = _loss_sum(model, leaked)
    assert leaked_loss != pytest.approx(separate_loss, rel=1e-3)
