"""On-demand evaluations over HTTP: a 400 naming the problem before anything is queued (unknown metric, unknown
model, a file in another format or not ingested), and a queued evaluation job otherwise; run, its results are
its own — the job's result files and the model's gate stay as they were."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest
from fastapi.testclient import TestClient

from afina.core.artifacts.dataset import DATASET_MANIFEST, DatasetManifest, SplitFile
from afina.core.artifacts.evaluation import EvaluationManifest
from afina.core.db import repository as repo
from afina.core.db.models import File, Job, Model
from afina.core.evaluation_jobs import DEFAULT_JUDGE_RUBRIC, EvaluationSpec
from afina.core.queue.jobs import run_stage
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from afina.evaluator.pipeline import evaluate_job
from afina.gateway.app import create_app
from tests.support.evaluation import TENANT, EvaluatedJob, ScriptedModels, build_evaluated_job, conversation, label_of


@pytest.fixture
def stack(tmp_path: Path) -> tuple[TestClient, EvaluatedJob, dict[str, str]]:
    runtime = Runtime(Settings(home=tmp_path / "home", log_json=False))
    job = build_evaluated_job(runtime, tmp_path)
    with runtime.db.session() as session:
        key = repo.create_api_key(session, TENANT)
    return TestClient(create_app(runtime)), job, {"Authorization": f"Bearer {key}"}


def add_file(runtime: Runtime, records: list[dict], *, fmt: str = "openai-chat", status: str = "processed") -> str:
    file_id = f"file-eval-{time.monotonic_ns()}"
    prefix = f"datasets/{TENANT}/v-{file_id}"
    info = runtime.store.put_bytes(f"{prefix}/train.jsonl", b"".join(orjson.dumps(r) + b"\n" for r in records))
    DatasetManifest.build(format=fmt, created_at=1, counts={"train": len(records)},
                          splits={"train": SplitFile(key=info.key, sha256=info.sha256 or "", bytes=info.size,
                                                     examples=len(records))}
                          ).write(runtime.store, f"{prefix}/{DATASET_MANIFEST}")
    with runtime.db.session() as session:
        session.add(File(id=file_id, tenant_id=TENANT, filename="teste.jsonl", purpose="fine-tune", bytes=info.size,
                         sha256=info.sha256, object_key=info.key, status=status, dataset_key=prefix))
    return file_id


def evaluations_of(runtime: Runtime) -> list[Job]:
    with runtime.db.session() as session:
        return list(session.query(Job).filter(Job.kind == "evaluation").all())


@pytest.mark.parametrize(("body", "code", "words"), [
    ({"metrics": ["token_f1", "bleurt"]}, "unknown_metric", "unknown metric(s) ['bleurt']; afina computes: accuracy"),
    ({"models": ["base", "q2_k"]}, "unknown_model", "available: base, fine_tuned, gguf:f16, gguf:q4_k_m"),
    ({"file": "file-nope"}, "not_found", "no such file"),
])
def test_bad_requests_answer_400_or_404_and_queue_nothing(stack, body: dict, code: str, words: str) -> None:  # noqa: ANN001
    client, job, headers = stack
    answer = client.post(f"/v1/fine_tuning/jobs/{job.source.id}/evaluations", json=body, headers=headers)
    assert answer.status_code in (400, 404)
    error = answer.json()["error"]
    assert error["code"] == code and words in error["message"]
    assert len(evaluations_of(job.runtime)) == 1  # only the automatic one


def test_a_file_in_another_format_or_not_ingested_is_refused(stack) -> None:  # noqa: ANN001
    client, job, headers = stack
    text_file = add_file(job.runtime, [{"text": "só texto"}], fmt="text")
    answer = client.post(f"/v1/fine_tuning/jobs/{job.source.id}/evaluations", json={"file": text_file},
                         headers=headers)
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "format_mismatch"
    assert "holds 'text' examples but the model was trained on 'openai-chat'" in answer.json()["error"]["message"]
    pending = add_file(job.runtime, [conversation("a", "b")], status="processing")
    answer = client.post(f"/v1/models/{job.model_name}/evaluations", json={"file": pending}, headers=headers)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "file_not_ready"
    with job.runtime.db.session() as session:
        assert session.get(Model, job.model_name).quality_gate is None
        assert repo.get_job(session, None, job.source.id).status == "succeeded"


def test_an_evaluation_on_a_file_runs_apart_from_the_jobs_own(stack) -> None:  # noqa: ANN001
    client, job, headers = stack
    records = [conversation(f"avalie: loja {i} {'ótimo' if i % 2 else 'péssimo'}",
                            "positivo" if i % 2 else "negativo") for i in range(6)]
    file_id = add_file(job.runtime, records)
    answer = client.post(f"/v1/models/{job.model_name}/evaluations", headers=headers,
                         json={"file": file_id, "models": ["base", "Q4_K_M"], "metrics": ["accuracy", "chrf"]})
    assert answer.status_code == 200, answer.text
    created = answer.json()
    assert created["object"] == "fine_tuning.job.evaluation" and created["status"] == "queued"
    assert created["models"] == ["base", "gguf:q4_k_m"] and created["automatic"] is False
    listed = client.get(f"/v1/fine_tuning/jobs/{job.source.id}/evaluations", headers=headers).json()["data"]
    assert {item["id"] for item in listed} == {created["id"], job.evaluation_job_id}
    good = {"answer": label_of, "token_logprob": -0.5}
    models = ScriptedModels({"base": {"answer": lambda _u: "não sei", "token_logprob": -2.0},
                             "fine_tuned": good, "gguf:f16": good, "gguf:q4_k_m": good})
    runtime = job.runtime
    assert run_stage(runtime, created["id"], "evaluate",
                     lambda context: evaluate_job(context, plan_models=models)) == "done"
    assert models.loads == {"base": 1, "gguf:q4_k_m": 1}  # only the models asked for
    done = client.get(f"/v1/fine_tuning/jobs/{job.source.id}/evaluations/{created['id']}", headers=headers).json()
    assert done["status"] == "succeeded" and len(done["result_files"]) >= 6
    manifest = EvaluationManifest.read(runtime.store,
                                       f"jobs/{TENANT}/{job.source.id}/evaluations/{created['id']}/evaluation.json")
    assert manifest is not None and manifest.split == "file" and manifest.examples == 6
    assert manifest.main_metric == "accuracy" and manifest.metrics == ["accuracy", "chrf"]
    assert manifest.models["gguf:q4_k_m"].classification.accuracy == 1.0  # type: ignore[union-attr]
    with runtime.db.session() as session:
        assert session.get(Model, job.model_name).quality_gate is None  # the automatic evaluation's to set
        assert repo.get_job(session, None, job.source.id).result_files == []
    events = client.get(f"/v1/fine_tuning/jobs/{created['id']}/events", headers=headers).json()["data"]
    assert any("6 example(s) of the file" in event["message"] for event in events)


def judge_stack(tmp_path: Path, **settings: object) -> tuple[TestClient, EvaluatedJob, dict[str, str]]:
    runtime = Runtime(Settings(home=tmp_path / "home", log_json=False, **settings))  # type: ignore[arg-type]
    job = build_evaluated_job(runtime, tmp_path)
    with runtime.db.session() as session:
        key = repo.create_api_key(session, TENANT)
    return TestClient(create_app(runtime)), job, {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(("settings", "judge", "param", "code", "words"), [
    ({"evaluation_judge_model": "judge-x"}, {"model": "gpt-9-judge"}, "judge.model", "unknown_judge_model",
     "judge.model names 'gpt-9-judge', which is not a judge this gateway serves; use 'judge-x'"),
    ({}, True, "judge", "judge_not_configured", "no LLM judge is set up on this gateway"),
    ({"evaluation_judge_model": "judge-x"}, {"rubric": ""}, "judge.rubric", None, "Invalid 'judge.rubric'"),
    ({"evaluation_judge_model": "judge-x"}, "yes", "judge", None, "valid dictionary"),
])
def test_a_judge_the_gateway_cannot_use_is_a_400_naming_the_field(tmp_path: Path, settings: dict, judge: object,
                                                                  param: str, code: str | None, words: str) -> None:
    client, job, headers = judge_stack(tmp_path, **settings)
    answer = client.post(f"/v1/fine_tuning/jobs/{job.source.id}/evaluations", json={"judge": judge},
                         headers=headers)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and words in error["message"]
    if code is not None:
        assert error["code"] == code
    assert len(evaluations_of(job.runtime)) == 1  # only the automatic one


def test_a_judge_request_is_resolved_once_and_stored_on_the_evaluation(tmp_path: Path) -> None:
    client, job, headers = judge_stack(tmp_path, evaluation_judge_model="judge-x")
    url = f"/v1/fine_tuning/jobs/{job.source.id}/evaluations"
    default = client.post(url, json={"judge": True}, headers=headers)
    assert default.status_code == 200, default.text
    assert default.json()["judge"] == {"model": "judge-x", "rubric": DEFAULT_JUDGE_RUBRIC}
    catalog = client.post(url, json={"judge": {"model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                               "rubric": "Só a resposta certa vale 5."}}, headers=headers).json()
    assert catalog["judge"] == {"model": "smollm2-135m-instruct", "rubric": "Só a resposta certa vale 5."}
    assert client.post(url, json={"judge": False}, headers=headers).json()["judge"] is None
    with job.runtime.db.session() as session:
        stored = EvaluationSpec.of_job(repo.get_job(session, TENANT, catalog["id"]))
    assert stored.judge is not None and stored.judge.model == "smollm2-135m-instruct"
