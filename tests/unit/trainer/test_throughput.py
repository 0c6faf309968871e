"""The throughput plan (``speed: auto``), its logic checked with the GPU's free memory given."""

from __future__ import annotations

import pytest

from afina.core.errors import TrainingFailed
from afina.trainer.preflight import GIB, ModelShape, RunShape, estimate_memory
from afina.trainer.throughput import Candidate, Fixed, candidates, plan_throughput, speed_score

SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA_1B = ModelShape(hidden_size=2048, intermediate_size=8192, num_layers=16, vocab_size=128256, num_heads=32,
                      num_kv_heads=8, head_dim=64, tied_embeddings=True)
# config.json of Qwen/Qwen2.5-7B-Instruct
QWEN_7B = ModelShape(hidden_size=3584, intermediate_size=18944, num_layers=28, vocab_size=152064, num_heads=28,
                     num_kv_heads=4, head_dim=128, tied_embeddings=False)


def run(**overrides: object) -> RunShape:
    values = {"backend": "unsloth", "device": "cuda", "dtype": "bfloat16", "quantization": "none", "batch_size": 16,
              "gradient_accumulation_steps": 1, "tokens_per_row": 2048, "gradient_checkpointing": True,
              "lora_r": 16, "target_modules": SEVEN}
    values.update(overrides)
    return RunShape(**values)  # type: ignore[arg-type]


def fits_and_is_fastest(plan_budget: float, shape: ModelShape, base: RunShape, fixed: Fixed = Fixed()) -> Candidate:
    """The plan's choice, checked against every candidate: it fits, and no fitting candidate scores higher."""
    plan = plan_throughput(shape, base, budget=plan_budget, fixed=fixed)
    chosen = plan.chosen
    assert plan.estimate.total <= plan_budget
    assert chosen.micro_batch * chosen.accumulation == base.batch_size * base.gradient_accumulation_steps
    best = speed_score(chosen, base.tokens_per_row, shape.num_layers)
    for other in candidates(base.batch_size * base.gradient_accumulation_steps, base.backend, shape.num_layers,
                            fixed, fixed_micro_batch=None if fixed.accumulation is None else chosen.micro_batch):
        if estimate_memory(shape, other.run_shape(base)).total <= plan_budget:
            assert speed_score(other, base.tokens_per_row, shape.num_layers) <= best + 1e-12
    return chosen


def test_a_large_gpu_trains_the_whole_effective_batch_at_once_without_checkpointing() -> None:
    """An H200's 139 GiB: micro-batch 16, no checkpointing — the fastest setting measured (80.0k vs 55.0k)."""
    chosen = fits_and_is_fastest(139 * GIB, LLAMA_1B, run())
    assert (chosen.micro_batch, chosen.accumulation, chosen.checkpointing) == (16, 1, "none")


def test_less_memory_splits_the_batch_before_it_turns_checkpointing_on() -> None:
    """On a 24 GiB card the same job keeps checkpointing off and splits 16 into smaller micro-batches."""
    chosen = fits_and_is_fastest(24 * GIB, LLAMA_1B, run())
    assert chosen.checkpointing == "none" and chosen.micro_batch < 16
    assert chosen.micro_batch * chosen.accumulation == 16


def test_little_memory_falls_back_to_unsloths_offloaded_checkpointing() -> None:
    chosen = fits_and_is_fastest(5 * GIB, LLAMA_1B, run())
    assert chosen.checkpointing == "offloaded"


def test_the_hf_backend_checkpoints_only_as_many_layers_as_it_must() -> None:
    """Between 'everything fits' and 'only full checkpointing fits', the hf backend checkpoints some layers."""
    base = run(backend="hf", batch_size=4)
    none = estimate_memory(LLAMA_1B, Candidate(4, 1, "none", 0).run_shape(base)).total
    full = estimate_memory(LLAMA_1B, Candidate(4, 1, "full", 16).run_shape(base)).total
    one = estimate_memory(LLAMA_1B, Candidate(1, 4, "none", 0).run_shape(base)).total
    budget = max(full, one) + (none - max(full, one)) / 2
    chosen = fits_and_is_fastest(budget, LLAMA_1B, base)
    assert chosen.checkpointing in ("selective", "none")
    if chosen.checkpointing == "selective":
        assert 0 < chosen.checkpoint_layers < 16


def test_selective_checkpointing_costs_between_none_and_full() -> None:
    base = run(backend="hf", batch_size=4)
    totals = [estimate_memory(LLAMA_1B, Candidate(4, 1, "selective", k).run_shape(base)).total for k in (1, 8, 15)]
    none = estimate_memory(LLAMA_1B, Candidate(4, 1, "none", 0).run_shape(base)).total
    full = estimate_memory(LLAMA_1B, Candidate(4, 1, "full", 16).run_shape(base)).total
    assert none > totals[0] > totals[1] > totals[2]
    # checkpointing all but the last layer holds no more than full checkpointing (whose recompute buffer is the
    # size of the last layer's kept activations) and recomputes less
    assert totals[2] <= full


def test_an_explicit_accumulation_keeps_the_split_and_says_what_it_costs() -> None:
    base = run(batch_size=4, gradient_accumulation_steps=4)
    plan = plan_throughput(LLAMA_1B, base, budget=139 * GIB, fixed=Fixed(accumulation=4))
    assert (plan.chosen.micro_batch, plan.chosen.accumulation) == (4, 4)
    assert plan.chosen.checkpointing == "none"  # the part not fixed is still planned
    assert len(plan.notes) == 1 and "gradient_accumulation_steps set explicitly: kept" in plan.notes[0]
    assert "micro-batch 16 × 1" in plan.notes[0]


def test_an_explicit_checkpointing_is_kept_and_reported() -> None:
    plan = plan_throughput(LLAMA_1B, run(), budget=139 * GIB, fixed=Fixed(checkpointing="offloaded"))
    assert plan.chosen.checkpointing == "offloaded"
    assert plan.notes and "gradient_checkpointing set explicitly: kept" in plan.notes[0]
    # an explicit setting that is what the plan would choose anyway says nothing
    assert plan_throughput(LLAMA_1B, run(), budget=139 * GIB, fixed=Fixed(checkpointing="none")).notes == ()


def test_a_plan_that_cannot_fit_is_refused_with_the_smallest_change_that_would() -> None:
    """A 7B model in 16-bit on a 16 GiB GPU class: no split or checkpointing fits; QLoRA would."""
    with pytest.raises(TrainingFailed) as failure:
        plan_throughput(QWEN_7B, run(batch_size=8, tokens_per_row=1024), budget=16 * GIB, fixed=Fixed())
    assert failure.value.code == "insufficient_memory"
    assert "16.0 GiB free" in failure.value.message
    assert "set quantization 4bit" in failure.value.message


def test_qlora_7b_fits_a_small_gpu() -> None:
    chosen = fits_and_is_fastest(24 * GIB, QWEN_7B, run(quantization="4bit", batch_size=8, tokens_per_row=2048))
    assert chosen.micro_batch * chosen.accumulation == 8


def test_the_out_of_memory_back_off_needs_clearly_less_memory() -> None:
    plan = plan_throughput(LLAMA_1B, run(), budget=139 * GIB, fixed=Fixed())
    fallback = plan.fallback()
    assert fallback is not None
    assert fallback.estimate.total <= 0.8 * plan.estimate.total
    assert fallback.chosen.micro_batch * fallback.chosen.accumulation == 16
    assert "backed off from micro-batch 16" in fallback.notes[0]
    # the smallest setting has nothing left to back off to
    tight = plan_throughput(LLAMA_1B, run(batch_size=1), budget=plan_budget_for_smallest(), fixed=Fixed())
    assert tight.fallback() is None


def plan_budget_for_smallest() -> float:
    return estimate_memory(LLAMA_1B, Candidate(1, 1, "offloaded", 16).run_shape(run(batch_size=1))).total * 1.01


def test_short_rows_make_larger_micro_batches_pay_more() -> None:
    """The speed score saturates with tokens per micro-batch: doubling 128-token rows gains far more than
    doubling 2048-token rows."""
    small = speed_score(Candidate(8, 1, "none", 0), 128, 16) / speed_score(Candidate(4, 2, "none", 0), 128, 16)
    large = speed_score(Candidate(8, 1, "none", 0), 2048, 16) / speed_score(Candidate(4, 2, "none", 0), 2048, 16)
    assert small > large > 1.0
