"""The preflight's memory estimate, its advice, and the OOM retry's arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from afina.core.errors import TrainingFailed
from afina.trainer.preflight import (
    GIB,
    ModelShape,
    Resources,
    RunShape,
    check_fits,
    estimate_memory,
    halve_micro_batch,
    suggest_fit,
)

SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# the real Llama-3.2-1B shape (config.json of meta-llama/Llama-3.2-1B-Instruct)
LLAMA_1B = ModelShape(hidden_size=2048, intermediate_size=8192, num_layers=16, vocab_size=128256, num_heads=32,
                      num_kv_heads=8, head_dim=64, tied_embeddings=True)


def run(**overrides: object) -> RunShape:
    values = {"backend": "hf", "device": "cuda", "dtype": "bfloat16", "quantization": "none", "batch_size": 4,
              "gradient_accumulation_steps": 1, "tokens_per_row": 2048, "gradient_checkpointing": True,
              "lora_r": 16, "target_modules": SEVEN}
    values.update(overrides)
    return RunShape(**values)  # type: ignore[arg-type]


def test_parameter_count_matches_the_published_size() -> None:
    assert LLAMA_1B.parameters == pytest.approx(1.236e9, rel=0.01)
    # LoRA r=16 on the seven projections of 16 layers
    assert LLAMA_1B.lora_params(16, SEVEN) == 16 * 16 * (2 * (2048 + 2048) + 2 * (2048 + 512) + 3 * (2048 + 8192))


def test_shape_is_read_from_a_transformers_config(tmp_path: Path) -> None:
    config = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "vocab_size": 49152,
              "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    shape = ModelShape.from_config_file(tmp_path / "config.json")
    assert shape.head_dim == 64 and shape.parameters == pytest.approx(134.5e6, rel=0.01)  # SmolLM2-135M


def test_estimates_are_in_the_range_measured_on_the_h100() -> None:
    """Peaks measured on the H200 (bench/RESULTS.md), Llama-3.2-1B, batch 4 × 2048, bf16: afina's hf backend
    4.42 GiB, Unsloth 3.66 GiB; the estimate must stay above them (refusing a run that fits is the lesser harm)
    without being wildly off."""
    hf = estimate_memory(LLAMA_1B, run()).total / GIB
    unsloth = estimate_memory(LLAMA_1B, run(backend="unsloth")).total / GIB
    qlora = estimate_memory(LLAMA_1B, run(backend="unsloth", quantization="4bit")).total / GIB
    assert 4.42 < hf < 9
    assert 3.66 < unsloth < 5.5
    assert qlora < unsloth
    # and it grows with the micro-batch
    assert estimate_memory(LLAMA_1B, run(batch_size=8)).total > estimate_memory(LLAMA_1B, run()).total


def test_a_run_that_cannot_fit_is_refused_with_the_same_effective_batch() -> None:
    resources = Resources(gpu_free=10 * GIB, gpu_total=16 * GIB, ram_available=64 * GIB, disk_free=100 * GIB)
    with pytest.raises(TrainingFailed) as failure:
        check_fits(LLAMA_1B, run(batch_size=8, gradient_accumulation_steps=2), resources, disk_needed=GIB)
    assert failure.value.code == "insufficient_memory"
    message = failure.value.message
    assert "GiB of GPU memory" in message and "10.0 GiB free" in message
    assert "gradient_accumulation_steps" in message and "effective batch of 16" in message
    advice = suggest_fit(LLAMA_1B, run(batch_size=8, gradient_accumulation_steps=2), 10 * GIB)
    assert advice is not None
    batch = int(advice.split("batch_size ")[1].split()[0])
    accumulation = int(advice.split("gradient_accumulation_steps ")[1].split()[0])
    assert batch * accumulation == 16 and batch < 8


def test_a_fitting_run_passes_and_disk_is_checked() -> None:
    plenty = Resources(gpu_free=70 * GIB, gpu_total=80 * GIB, ram_available=64 * GIB, disk_free=100 * GIB)
    assert check_fits(LLAMA_1B, run(), plenty, disk_needed=GIB).total < 70 * GIB
    full_disk = Resources(gpu_free=70 * GIB, gpu_total=80 * GIB, ram_available=64 * GIB, disk_free=0.1 * GIB)
    with pytest.raises(TrainingFailed, match="AFINA_WORK_DIR") as failure:
        check_fits(LLAMA_1B, run(), full_disk, disk_needed=GIB)
    assert failure.value.code == "insufficient_disk"


def test_on_the_cpu_ram_is_what_counts() -> None:
    small = Resources(gpu_free=None, gpu_total=None, ram_available=2 * GIB, disk_free=100 * GIB)
    with pytest.raises(TrainingFailed, match="GiB of RAM"):
        check_fits(LLAMA_1B, run(device="cpu", dtype="float32"), small, disk_needed=GIB)


def test_when_nothing_fits_the_advice_says_so() -> None:
    tiny = Resources(gpu_free=0.5 * GIB, gpu_total=1 * GIB, ram_available=64 * GIB, disk_free=100 * GIB)
    with pytest.raises(TrainingFailed, match="no smaller setting fits"):
        check_fits(LLAMA_1B, run(), tiny, disk_needed=GIB)


def test_oom_retry_halves_the_micro_batch_and_keeps_the_effective_batch() -> None:
    assert halve_micro_batch(8, 1) == (4, 2)
    assert halve_micro_batch(2, 4) == (1, 8)
    assert halve_micro_batch(1, 4) is None


QWEN_7B = ModelShape(hidden_size=3584, intermediate_size=18944, num_layers=28, vocab_size=152064, num_heads=28,
                     num_kv_heads=4, head_dim=128, tied_embeddings=False)


@pytest.mark.parametrize(("shape", "overrides", "measured_gib"), [
    # peaks measured on an H100 with speed: auto (bench/RESULTS.md, 2026-12-07), sequence 2048
    (LLAMA_1B, {"backend": "unsloth", "batch_size": 16, "gradient_checkpointing": False}, 36.01),
    (LLAMA_1B, {"backend": "hf", "batch_size": 16, "gradient_checkpointing": False, "fused_loss": True}, 49.69),
    (QWEN_7B, {"backend": "unsloth", "batch_size": 4, "gradient_accumulation_steps": 2, "quantization": "4bit",
               "gradient_checkpointing": False}, 34.72),
    (QWEN_7B, {"backend": "hf", "batch_size": 4, "gradient_accumulation_steps": 2, "quantization": "4bit",
               "gradient_checkpointing": False, "fused_loss": True}, 66.56),
])
def test_the_plans_estimates_stay_above_the_peaks_measured_without_checkpointing(
        shape: ModelShape, overrides: dict[str, object], measured_gib: float) -> None:
    """The throughput plan picks the fastest setting that fits: an estimate below a real peak means an
    out-of-memory error (the back-off catches it, at the cost of a rebuild); one far above means a slower plan."""
    estimate = estimate_memory(shape, run(**overrides)).total / GIB
    assert measured_gib < estimate < measured_gib * 1.5


def test_a_warm_workers_cached_blocks_count_as_free(monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver counts memory this process's allocator keeps cached from an earlier job as used; the next
    job will get it, so the plan must see it (a second job in a worker planned with 27 of 78 GiB otherwise)."""
    import torch

    from afina.trainer.preflight import cuda_free_bytes

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (27 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: 40 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 4 * GIB)
    assert cuda_free_bytes() == (63 * GIB, 80 * GIB)
