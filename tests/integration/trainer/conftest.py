"""The trainer's recipe tests: real SmolLM2, real LoRA training, embedded runtime (SQLite + local store)."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from afina.core.db import repository as repo
from afina.core.queue.jobs import run_stage
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from tests.support.jobs import create_job, sample_examples, write_prepared_dataset
from tests.support.models import materialized_base_model, shared_model_cache

TENANT = "acme"
SEED = 20261121
# the 28 shortest sample conversations (CPU time is tokens): 24 to train on at batch 4, six optimizer steps
# an epoch, and 4 to validate on
_SHORTEST = sorted(sample_examples(), key=lambda example: len(str(example)))[:28]
TRAIN_EXAMPLES = _SHORTEST[:24]
VALIDATION_EXAMPLES = _SHORTEST[24:]
RUN_HYPERPARAMETERS = {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 2, "save_steps": 2}


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    materialized_base_model(tmp_path_factory)
    return shared_model_cache(tmp_path_factory)


def make_runtime(home: Path, model_cache: Path, **overrides: Any) -> Runtime:
    home.mkdir(parents=True, exist_ok=True)
    return Runtime(Settings(home=home, model_cache_dir=model_cache, log_json=False, **overrides))


def new_job(runtime: Runtime, hyperparameters: dict[str, Any], *, validation: bool = True) -> str:
    """A job whose ingest stage is done: a prepared dataset, status queued, stage train, a fixed seed."""
    job = create_job(runtime, TENANT, "file-test", hyperparameters=dict(hyperparameters), stage="train",
                     status="queued")
    write_prepared_dataset(runtime, TENANT, job.id, TRAIN_EXAMPLES, VALIDATION_EXAMPLES if validation else None)
    runtime_update(runtime, job.id, seed=SEED)
    return job.id


def runtime_update(runtime: Runtime, job_id: str, **values: Any) -> None:
    with runtime.db.session() as session:
        job = repo.get_job(session, None, job_id)
        for name, value in values.items():
            setattr(job, name, value)


def job_row(runtime: Runtime, job_id: str) -> Any:
    with runtime.db.session() as session:
        return repo.get_job(session, None, job_id)


def job_events(runtime: Runtime, job_id: str) -> list[Any]:
    """Every event, oldest first."""
    with runtime.db.session() as session:
        rows, _ = repo.list_events(session, job_id, None, 10_000)
        return list(reversed(rows))


def training_metrics(runtime: Runtime, job_id: str) -> dict[int, dict[str, Any]]:
    """The data of each training-step metrics event, by step."""
    return {event.data["step"]: event.data for event in job_events(runtime, job_id)
            if event.type == "metrics" and "train_loss" in (event.data or {})}


def checkpoint_rows(runtime: Runtime, job_id: str) -> list[Any]:
    with runtime.db.session() as session:
        rows, _ = repo.list_checkpoints(session, job_id, None, 1000)
        return rows


def cancel_after_step(runtime: Runtime, job_id: str, step: int, timeout_s: float = 240) -> threading.Thread:
    """A started thread that asks to cancel the job once its metrics reach ``step`` (as a user would, mid-run)."""

    def cancel() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if max(training_metrics(runtime, job_id), default=0) >= step:
                with runtime.db.session() as session:
                    repo.request_cancel(session, TENANT, job_id)
                return
            time.sleep(0.1)

    canceller = threading.Thread(target=cancel, daemon=True)
    canceller.start()
    return canceller


def finite(value: Any) -> bool:
    return isinstance(value, float) and math.isfinite(value)


@dataclass
class Run:
    runtime: Runtime
    job_id: str
    outcome: str
    seconds: float


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Run:
    """One uninterrupted run (6 steps, a checkpoint every 2): the end-to-end test checks it, the resume
    test compares against its losses."""
    runtime = make_runtime(tmp_path_factory.mktemp("reference") / "home", model_cache, checkpoint_keep_last=2)
    job_id = new_job(runtime, RUN_HYPERPARAMETERS)
    started = time.monotonic()
    outcome = run_stage(runtime, job_id, "train", _train_job())
    return Run(runtime=runtime, job_id=job_id, outcome=outcome, seconds=time.monotonic() - started)


def _train_job() -> Any:
    from afina.trainer.recipe import train_job

    return train_job
