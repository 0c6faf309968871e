"""The LLM judge against a real gateway: SmolLM2 (GGUF, llama.cpp in process) grades the answers of scripted models
through ``/v1/chat/completions`` with a JSON-schema grammar, and the grades reach every result file; a key the
gateway refuses fails only the judge."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from afina.core.artifacts.evaluation import JUDGE_MAX_SCORE, JUDGE_MIN_SCORE, EvaluationManifest
from afina.core.db import repository as repo
from afina.core.queue.jobs import run_stage
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from afina.evaluator.pipeline import evaluate_job, evaluation_prefix
from tests.integration.gateway.conftest import SMOLLM2, Gateway, make_settings, start_gateway
from tests.support.evaluation import TENANT, ScriptedModels, build_evaluated_job, conversation

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ANSWERS = {"Qual é a capital de Portugal?": "Lisboa.", "Quanto é dois mais dois?": "Quatro.",
           "Qual é a cor do céu num dia limpo?": "Azul."}
TEST = [conversation(question, answer) for question, answer in ANSWERS.items()]
SCRIPTS = {"base": {"answer": lambda _user: "I don't know."},
           "fine_tuned": {"answer": lambda user: ANSWERS.get(user, "?")},
           "gguf:q4_k_m": {"answer": lambda user: ANSWERS.get(user, "?")}}


@pytest.fixture(scope="module")
def judge_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = start_gateway(make_settings(tmp_path_factory.mktemp("judge-gateway-home")), tenants=("acme",))
    yield gateway
    gateway.served.stop()
    gateway.runtime.db.dispose()


def evaluate(tmp_path: Path, gateway: Gateway, api_key: str) -> tuple[Runtime, str, str]:
    """An automatic evaluation of a job with 3 Portuguese examples, judged by the gateway's SmolLM2."""
    runtime = Runtime(Settings(home=tmp_path / "home", log_json=False, evaluation_judge_model=SMOLLM2,
                               evaluation_judge_automatic=True, evaluation_judge_api_key=api_key,
                               evaluation_judge_base_url=f"{gateway.url}/v1", evaluation_judge_max_tokens=96,
                               evaluation_judge_retries=1, evaluation_train_examples=0))
    job = build_evaluated_job(runtime, tmp_path, test=TEST, train=TEST, variants=("q4_k_m",))
    assert run_stage(runtime, job.evaluation_job_id, "evaluate",
                     lambda context: evaluate_job(context, plan_models=ScriptedModels(SCRIPTS))) == "done"
    return runtime, job.evaluation_job_id, evaluation_prefix(TENANT, job.source.id)


def events(runtime: Runtime, job_id: str) -> list[str]:
    with runtime.db.session() as session:
        return [event.message for event in repo.list_events(session, job_id, None, 1000)[0]]


def test_every_answer_is_scored_in_range_or_counted_unscored_and_the_results_carry_it(
        tmp_path: Path, judge_gateway: Gateway) -> None:
    runtime, evaluation_id, prefix = evaluate(tmp_path, judge_gateway, judge_gateway.keys["acme"])
    with runtime.db.session() as session:
        assert repo.get_job(session, None, evaluation_id).status == "succeeded"
    manifest = EvaluationManifest.read(runtime.store, f"{prefix}/evaluation.json")
    assert manifest is not None and manifest.judge is not None and manifest.judge.model == SMOLLM2
    lines = [orjson.loads(line) for line in runtime.store.get_bytes(f"{prefix}/predictions.jsonl").splitlines()]
    rows = {row["model"]: row for row in
            csv.DictReader(io.StringIO(runtime.store.get_bytes(f"{prefix}/evaluation_summary.csv").decode()))}
    assert list(manifest.models) == ["base", "fine_tuned", "gguf:q4_k_m"] and len(lines) == 3
    graded = 0
    for key, summary in manifest.models.items():
        judge = summary.judge
        assert judge is not None and judge.error is None, judge  # the gateway answered every call
        assert judge.scored + judge.unscored == 3
        scores = [line["judge"][key]["score"] for line in lines]
        reasons = [line["judge"][key]["reason"] for line in lines]
        for score, reason in zip(scores, reasons, strict=True):
            assert (score is not None and JUDGE_MIN_SCORE <= score <= JUDGE_MAX_SCORE
                    or score is None and reason.startswith("not graded: ")), (score, reason)
        assert sum(score is None for score in scores) == judge.unscored
        scored = [score for score in scores if score is not None]
        assert judge.mean == (sum(scored) / len(scored) if scored else None)
        assert rows[key]["judge_unscored"] == str(judge.unscored)
        assert rows[key]["judge_score_mean"] == ("" if judge.mean is None else repr(judge.mean))
        graded += len(scored)
    assert graded >= 1  # a grammar-bound judge answers in the schema: something is scored
    assert "LLM judge" in runtime.store.get_bytes(f"{prefix}/evaluation.md").decode()
    assert any(message.startswith(f"LLM judge ({SMOLLM2}) on fine_tuned: mean score")
               for message in events(runtime, evaluation_id))


def test_a_key_the_gateway_refuses_fails_only_the_judge(tmp_path: Path, judge_gateway: Gateway) -> None:
    refused = "sk-afina-not-a-key-of-this-gateway"
    runtime, evaluation_id, prefix = evaluate(tmp_path, judge_gateway, refused)
    with runtime.db.session() as session:
        assert repo.get_job(session, None, evaluation_id).status == "succeeded"
    manifest = EvaluationManifest.read(runtime.store, f"{prefix}/evaluation.json")
    assert manifest is not None
    tuned: Any = manifest.models["fine_tuned"]
    assert tuned.text.exact_match == 1.0  # the other metrics stand
    assert tuned.judge.unscored == 3 and tuned.judge.mean is None
    assert "refused the judge's API key (401)" in tuned.judge.error
    messages = events(runtime, evaluation_id)
    assert any(message.startswith("The LLM judge failed for base") for message in messages)
    shown = "\n".join(messages) + runtime.store.get_bytes(f"{prefix}/evaluation.json").decode()
    assert refused not in shown and judge_gateway.url.split("//")[1] not in shown
