"""A packed batch trains exactly like separate ones, on real SmolLM2 weights (so ``slow``).

How rows are packed and collated is checked without a model in tests/unit/trainer/test_packing.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from afina.trainer.packing import IGNORE_INDEX, PaddingFreeCollator, pack_rows
from tests.support.models import materialized_base_model
from tests.support.packing import token_rows

pytestmark = pytest.mark.slow


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


def test_a_packed_batch_sees_each_example_alone(tmp_path_factory: pytest.TempPathFactory) -> None:
    """No example attends to another: the packed forward's loss equals the separate forwards' sum."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir: Path = materialized_base_model(tmp_path_factory)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    rows = token_rows([23, 41, 17, 30])
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
