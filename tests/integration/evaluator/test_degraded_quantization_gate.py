"""The quality gate on real weights: the evaluation stage scores the fine-tune's f16 GGUF, a Q8_0 of it and a
deliberately degraded Q4_0 (weights damaged before rounding: conftest's ``damaged_q4_0_gguf``) on held-out data
through llama.cpp; the gate passes Q8_0, fails the damaged file, and with enforcement on the gateway refuses to
serve the model (409) and says why in ``/v1/models/{id}``.

The evaluation scores the GGUF variants only (its spec's ``models``, as an operator may choose): the rules under
test compare each variant with f16, and leaving the two transformers models out keeps the test near a minute."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from afina.core.artifacts.evaluation import EvaluationManifest, QualityGate
from afina.core.db import repository as repo
from afina.core.db.models import Model
from afina.core.evaluation_jobs import EVALUATION_KIND, EvaluationSpec
from afina.core.queue.jobs import run_stage
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from afina.evaluator.pipeline import evaluate_job, evaluation_prefix
from tests.support.evaluation import TENANT, build_evaluated_job, conversation
from tests.support.servers import serve_app

pytestmark = pytest.mark.slow

HELD_OUT = [conversation("Qual é a capital de Portugal?", "A capital de Portugal é Lisboa."),
            conversation("What is two plus two?", "Two plus two is four."),
            conversation("Name a color of the sky.", "The sky is blue.")]
TRAIN = [conversation("Say hello.", "Hello!"), conversation("Diga olá.", "Olá!")]
# the operator's defaults for the variants (within 0.05 of f16's main metric, perplexity at most 1.25x f16's),
# enforced
RULES = {"enforce": True, "variant_tolerance": 0.05, "max_perplexity_ratio": 1.25}
VARIANTS = ["gguf:f16", "gguf:q8_0", "gguf:q4_0"]


def score_only(runtime: Runtime, evaluation_job_id: str, models: list[str]) -> None:
    """Narrow the queued automatic evaluation to ``models`` (its gate is still the model's)."""
    with runtime.db.session() as session:
        row = repo.get_job(session, None, evaluation_job_id)
        spec = EvaluationSpec.of_job(row).model_copy(update={"models": models})
        row.method = {"type": EVALUATION_KIND, EVALUATION_KIND: spec.model_dump(mode="json")}


def test_the_gate_fails_a_degraded_quantization_and_the_gateway_refuses_to_serve_it(
        tmp_path: Path, exporter_model_cache: Path, lora_adapter_dir: Path, merged_f16_gguf: Path,
        merged_q8_gguf: Path, damaged_q4_0_gguf: Path) -> None:
    from afina.gateway.app import create_app

    runtime = Runtime(Settings(home=tmp_path / "home", model_cache_dir=exporter_model_cache, log_json=False,
                               evaluation_max_new_tokens=8, inference_n_ctx=512, quality_gate=RULES))
    job = build_evaluated_job(runtime, tmp_path, test=HELD_OUT, train=TRAIN, adapter=lora_adapter_dir,
                              gguf_files={"f16": merged_f16_gguf, "q8_0": merged_q8_gguf,
                                          "q4_0": damaged_q4_0_gguf})
    score_only(runtime, job.evaluation_job_id, VARIANTS)
    assert run_stage(runtime, job.evaluation_job_id, "evaluate", evaluate_job) == "done"
    manifest = EvaluationManifest.read(runtime.store, f"{evaluation_prefix(TENANT, job.source.id)}/evaluation.json")
    assert manifest is not None and list(manifest.models) == VARIANTS
    f16, q8, damaged = (manifest.models[key] for key in ("gguf:f16", "gguf:q8_0", "gguf:q4_0"))
    assert q8.perplexity == pytest.approx(f16.perplexity, rel=0.05)
    assert damaged.perplexity > 2 * f16.perplexity  # the damaged file really lost what the f16 one knows

    with runtime.db.session() as session:
        row = session.get(Model, job.model_name)
        assert row is not None
        gate = QualityGate.model_validate(row.quality_gate)
    assert not gate.passed and gate.enforced and gate.blocks_serving
    by_model: dict[str, list[bool]] = {}
    for check in gate.checks:
        by_model.setdefault(check.model, []).append(check.passed)
    assert by_model["gguf:q8_0"] == [True, True]  # a good quantization passes both rules
    failed = [(check.rule, check.model) for check in gate.checks if not check.passed]
    assert ("variant_perplexity_ratio", "gguf:q4_0") in failed and {model for _rule, model in failed} == {"gguf:q4_0"}

    with runtime.db.session() as session:
        key = repo.create_api_key(session, TENANT)
    served = serve_app(create_app(runtime))
    try:
        headers = {"Authorization": f"Bearer {key}"}
        chat = httpx.post(f"{served.url}/v1/chat/completions", headers=headers, timeout=60,
                          json={"model": job.model_name, "max_tokens": 2,
                                "messages": [{"role": "user", "content": "Hi"}]})
        assert chat.status_code == 409, chat.text
        error = chat.json()["error"]
        assert error["code"] == "model_blocked_by_quality_gate" and "q4_0" in error["message"].lower()
        card = httpx.get(f"{served.url}/v1/models/{job.model_name}", headers=headers, timeout=60).json()
        assert card["afina"]["blocked"] is True and card["afina"]["quality_gate"]["passed"] is False
    finally:
        served.stop()
        runtime.db.dispose()
