"""The stop watcher: a cancellation or a drain saves and stops at a step, a lost lease stops without saving."""

from __future__ import annotations

from pathlib import Path

import pytest

from afina.core.db import repository as repo
from afina.core.errors import LeaseLost
from afina.core.queue.drain import WorkerDraining, clear_drain, request_drain
from afina.core.queue.jobs import JobCancelled, JobContext
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from afina.trainer.stopping import StopWatcher
from tests.support.jobs import context_for, create_job


@pytest.fixture
def context(tmp_path: Path) -> JobContext:
    runtime = Runtime(Settings(home=tmp_path / "home", log_json=False))
    job = create_job(runtime, "acme", "file-test", stage="train", status="running")
    context = context_for(runtime, job, "train")
    context.cancel_poll_s = 0.0
    return context


def messages(context: JobContext) -> list[str]:
    with context.runtime.db.session() as session:
        rows, _ = repo.list_events(session, context.job_id, None, 100)
        return [row.message for row in reversed(rows)]


def test_a_running_job_goes_on(context: JobContext) -> None:
    watcher = StopWatcher(context)
    assert not watcher.should_stop(1)
    watcher.ensure_owned()
    watcher.raise_if_stopped()
    assert watcher.reason is None


def test_a_cancellation_stops_at_the_step_once_and_then_raises(context: JobContext) -> None:
    watcher = StopWatcher(context)
    with context.runtime.db.session() as session:
        repo.request_cancel(session, "acme", context.job_id)
    assert watcher.should_stop(3) and watcher.cancelled and not watcher.draining
    assert watcher.should_stop(4)  # still stopping, without a second event
    assert messages(context).count("Cancellation requested: saving a checkpoint at step 3 and stopping") == 1
    with pytest.raises(JobCancelled):
        watcher.raise_if_stopped()


def test_a_draining_worker_stops_and_hands_the_job_back(context: JobContext) -> None:
    watcher = StopWatcher(context)
    request_drain(context.runtime.settings)
    try:
        assert watcher.should_stop(5) and watcher.draining
    finally:
        clear_drain(context.runtime.settings)
    assert any(m.startswith("Worker shutting down: saving a checkpoint at step 5") for m in messages(context))
    with pytest.raises(WorkerDraining):
        watcher.raise_if_stopped()


def test_a_lost_lease_stops_at_once_without_saving(context: JobContext) -> None:
    watcher = StopWatcher(context)
    context.lease_lost.set()
    with pytest.raises(LeaseLost):
        watcher.should_stop(2)
    with pytest.raises(LeaseLost):
        watcher.ensure_owned()
    assert watcher.reason is None
