"""The evaluation stage on real weights: SmolLM2-135M through transformers, its fine-tune's GGUFs through
llama.cpp in process, all scored on the same token ids."""

from __future__ import annotations

from pathlib import Path

import pytest

from afina.core.artifacts.evaluation import EvaluationManifest
from afina.core.queue.jobs import run_stage
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from afina.evaluator.pipeline import evaluate_job, evaluation_prefix
from tests.support.evaluation import TENANT, build_evaluated_job, conversation

pytestmark = pytest.mark.slow

HELD_OUT = [conversation("Qual é a capital de Portugal?", "A capital de Portugal é Lisboa."),
            conversation("What is two plus two?", "Two plus two is four."),
            conversation("Diga oi em inglês.", "Hi!")]
TRAIN = [conversation("Say hello.", "Hello!"), conversation("Diga olá.", "Olá!")]


def test_base_fine_tuned_and_gguf_variants_are_scored_alike(tmp_path: Path, exporter_model_cache: Path,
                                                              lora_adapter_dir: Path, merged_f16_gguf: Path,
                                                              merged_q8_gguf: Path) -> None:
    runtime = Runtime(Settings(home=tmp_path / "home", model_cache_dir=exporter_model_cache, log_json=False,
                               evaluation_max_new_tokens=12, inference_n_ctx=512))
    job = build_evaluated_job(runtime, tmp_path, test=HELD_OUT, train=TRAIN, adapter=lora_adapter_dir,
                              gguf_files={"f16": merged_f16_gguf, "q8_0": merged_q8_gguf})
    assert run_stage(runtime, job.evaluation_job_id, "evaluate", evaluate_job) == "done"
    manifest = EvaluationManifest.read(runtime.store, f"{evaluation_prefix(TENANT, job.source.id)}/evaluation.json")
    assert manifest is not None and manifest.task == "text" and manifest.main_metric == "token_f1"
    models = manifest.models
    assert list(models) == ["base", "fine_tuned", "gguf:f16", "gguf:q8_0"]
    base, tuned, f16, q8 = (models[key] for key in models)
    for figures in models.values():
        assert figures.loss is not None and 0 < figures.loss < 20 and figures.scored_tokens > 10
    # the f16 GGUF is the fine-tuned model converted: on the same tokens its loss is the transformers one
    assert f16.loss == pytest.approx(tuned.loss, rel=0.02)
    assert q8.loss == pytest.approx(f16.loss, rel=0.05)
    assert base.loss != tuned.loss  # the adapter changed the weights
    assert manifest.loss_gap is not None and manifest.loss_gap.train_examples == 2
    assert manifest.quality_gate.checks  # every rule had its figures
