"""``afina eval MODEL --compare base,q4_k_m``: asks the gateway, follows the evaluation job, prints the table."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from afina.cli import models as cli_models
from afina.cli.datasets import CliError
from afina.cli.evaluation import comparison_table, run_evaluation
from afina.core.db import repository as repo
from afina.core.db.models import Job
from afina.core.queue.jobs import run_stage
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from afina.evaluator.pipeline import evaluate_job
from afina.gateway.app import create_app
from tests.support.evaluation import TENANT, ScriptedModels, build_evaluated_job, label_of, wrong_label_of


def serve_evaluations(runtime: Runtime, models: ScriptedModels, stop: threading.Event) -> None:
    """A worker: runs every queued on-demand evaluation with the scripted models."""
    while not stop.is_set():
        with runtime.db.session() as session:
            queued = [job.id for job in session.query(Job).filter(Job.kind == "evaluation", Job.status == "queued")
                      if job.method["evaluation"].get("on_demand")]
        for job_id in queued:
            run_stage(runtime, job_id, "evaluate", lambda context: evaluate_job(context, plan_models=models))
        time.sleep(0.1)


@pytest.fixture
def gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    runtime = Runtime(Settings(home=tmp_path / "home", log_json=False))
    job = build_evaluated_job(runtime, tmp_path)
    with runtime.db.session() as session:
        key = repo.create_api_key(session, TENANT)
    app = create_app(runtime)
    monkeypatch.setattr(cli_models, "_client", lambda _url, api_key: TestClient(
        app, headers={"Authorization": f"Bearer {api_key}"}))
    good = {"answer": label_of, "token_logprob": -0.5}
    models = ScriptedModels({"base": {"answer": lambda _u: "não sei", "token_logprob": -2.0}, "fine_tuned": good,
                             "gguf:f16": good, "gguf:q4_k_m": {"answer": wrong_label_of, "token_logprob": -0.9}})
    stop = threading.Event()
    worker = threading.Thread(target=serve_evaluations, args=(runtime, models, stop), daemon=True)
    worker.start()
    yield job, key, models
    stop.set()
    worker.join(timeout=30)


def test_eval_compares_the_named_models_and_prints_the_table(gateway) -> None:  # noqa: ANN001
    job, key, models = gateway
    out = io.StringIO()
    evaluation = run_evaluation("http://testserver/v1", key, job.model_name, data=None, compare=["base", "q4_k_m"],
                                metrics=["accuracy", "token_f1"], labels=None, out=out, poll_s=0.05)
    assert list(evaluation["models"]) == ["base", "fine_tuned", "gguf:q4_k_m"]
    assert models.loads == {"base": 1, "fine_tuned": 1, "gguf:q4_k_m": 1}
    assert "queued" in out.getvalue() and "Evaluated" in out.getvalue()
    table = comparison_table(evaluation).splitlines()
    assert table[0] == "8 held-out examples (test split), task classification, main metric accuracy"
    assert table[1].split() == ["model", "tokF1", "acc"]
    rows = {line.split()[0]: line.split()[1:] for line in table[3:6]}
    assert rows == {"base": ["0", "0"], "fine_tuned": ["1", "1"], "gguf:q4_k_m": ["0", "0"]}


def test_eval_of_an_unknown_variant_is_an_error_naming_the_available_ones(gateway) -> None:  # noqa: ANN001
    job, key, _models = gateway
    with pytest.raises(CliError) as caught:
        run_evaluation("http://testserver/v1", key, job.model_name, data=None, compare=["q2_k"], metrics=None,
                       labels=None, out=io.StringIO())
    assert caught.value.message.startswith("400: models names 'q2_k'")
    assert caught.value.message.endswith("available: base, fine_tuned, gguf:f16, gguf:q4_k_m")


def test_eval_with_the_judge_and_no_judge_configured_is_an_error_naming_it(gateway) -> None:  # noqa: ANN001
    job, key, _models = gateway
    with pytest.raises(CliError) as caught:
        run_evaluation("http://testserver/v1", key, job.model_name, data=None, compare=None, metrics=None,
                       labels=None, judge=True, out=io.StringIO())
    assert caught.value.message.startswith("400: ") and "judge" in caught.value.message
