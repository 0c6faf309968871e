"""Running one stage of a job under a lease, on any worker.

A message may arrive twice (Redis redelivers after ``visibility_timeout``, the
recovery loop requeues jobs whose worker died). The lease in the database makes
that harmless: a message for a job whose lease is alive, or whose stage has
moved on, is dropped; one for a job whose lease expired resumes it.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from afina.core.db import repository as repo
from afina.core.db.models import Job
from afina.core.errors import AfinaError
from afina.core.logging import log_event
from afina.core.metrics import JOB_STAGE_SECONDS, JOBS_FINISHED, LEASES_RECOVERED, set_job_phase
from afina.core.queue.app import enqueue_stage
from afina.core.queue.drain import WorkerDraining, drain_requested
from afina.core.runtime import Runtime

log = logging.getLogger("afina.jobs")


class JobCancelled(Exception):
    """Raised by stage code at a safe point after the user asked to cancel."""


class LeaseLost(Exception):
    """This worker no longer owns the job (it stalled and another took over)."""


@dataclass
class JobContext:
    """What a stage needs: the job's identity, the runtime, and ways to report and stop."""

    runtime: Runtime
    job_id: str
    tenant_id: str
    stage: str
    owner: str
    lease_lost: threading.Event = field(default_factory=threading.Event)
    # the cancel flag is read from the database at most this often; a training loop asks every step
    cancel_poll_s: float = 0.5
    _cancel_checked_at: float = field(default=-1e9, init=False, repr=False)
    _cancel_seen: bool = field(default=False, init=False, repr=False)
    _writer: _EventWriter | None = field(default=None, init=False, repr=False)

    def snapshot(self) -> Job:
        """A fresh, detached copy of the job row."""
        with self.runtime.db.session() as session:
            return repo.get_job(session, None, self.job_id)

    def event(self, message: str, *, level: str = "info", event_type: str = "message",
              data: dict[str, Any] | None = None) -> None:
        """Record an event now (after any queued by ``event_nowait``, so events stay in order)."""
        self.flush_events()
        with self.runtime.db.session() as session:
            repo.add_event(session, self.job_id, message, level=level, event_type=event_type, data=data)

    def event_nowait(self, message: str, *, level: str = "info", event_type: str = "message",
                     data: dict[str, Any] | None = None) -> None:
        """Queue an event for a background writer: a training step never waits on the database.

        Events are written in the order they were queued, each with its sequence number taken when
        it is written, so a reader resuming after an event id never misses an earlier-queued one.
        """
        if self._writer is None:
            self._writer = _EventWriter(self)
            self._writer.start()
        self._writer.put((message, level, event_type, data))

    def flush_events(self) -> None:
        """Wait until every queued event is in the database."""
        if self._writer is not None:
            self._writer.flush()

    def close_events(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def update(self, **values: Any) -> None:
        """Set columns of the job row (only while holding the lease)."""
        with self.runtime.db.session() as session:
            job = repo.get_job(session, None, self.job_id)
            for name, value in values.items():
                setattr(job, name, value)

    def set_status(self, status: str, message: str | None = None) -> None:
        with self.runtime.db.session() as session:
            job = repo.get_job(session, None, self.job_id, for_update=True)
            if job.status != status:
                repo.set_status(session, job, status, message=message)

    def check_continue(self) -> None:
        """Raise ``LeaseLost``, ``JobCancelled`` or ``WorkerDraining`` if the stage must stop now."""
        if self.lease_lost.is_set():
            raise LeaseLost(self.job_id)
        if self.cancel_requested():
            raise JobCancelled(self.job_id)
        if drain_requested(self.runtime.settings):
            raise WorkerDraining(self.job_id)

    def cancel_requested(self) -> bool:
        """The job's cancel flag, read from the database at most every ``cancel_poll_s`` seconds."""
        if self._cancel_seen:
            return True
        now = time.monotonic()
        if now - self._cancel_checked_at < self.cancel_poll_s:
            return False
        self._cancel_checked_at = now
        with self.runtime.db.session() as session:
            self._cancel_seen = bool(repo.get_job(session, None, self.job_id).cancel_requested)
        return self._cancel_seen


class _EventWriter(threading.Thread):
    """Writes a context's queued events in order, batching what piled up into one transaction."""

    def __init__(self, context: JobContext) -> None:
        super().__init__(name=f"events-{context.job_id}", daemon=True)
        self.context = context
        self.pending: queue.Queue[tuple[str, str, str, dict[str, Any] | None] | None] = queue.Queue()

    def put(self, item: tuple[str, str, str, dict[str, Any] | None]) -> None:
        self.pending.put(item)

    def flush(self) -> None:
        self.pending.join()

    def close(self) -> None:
        self.pending.put(None)
        self.join(timeout=30)

    def run(self) -> None:
        while True:
            batch = [self.pending.get()]
            while True:
                try:
                    batch.append(self.pending.get_nowait())
                except queue.Empty:
                    break
            items = [item for item in batch if item is not None]
            try:
                if items:
                    with self.context.runtime.db.session() as session:
                        for message, level, event_type, data in items:
                            repo.add_event(session, self.context.job_id, message, level=level,
                                           event_type=event_type, data=data)
            except Exception:  # noqa: BLE001 - a lost progress event must never kill the training loop
                log.exception("event write failed", extra={"job_id": self.context.job_id})
            finally:
                for _ in batch:
                    self.pending.task_done()
            if len(items) != len(batch):
                return


def new_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class _Heartbeat(threading.Thread):
    def __init__(self, context: JobContext) -> None:
        super().__init__(name=f"lease-{context.job_id}", daemon=True)
        self.context = context
        self.stopped = threading.Event()

    def run(self) -> None:
        settings = self.context.runtime.settings
        while not self.stopped.wait(settings.heartbeat_s):
            try:
                with self.context.runtime.db.session() as session:
                    alive = repo.renew_lease(session, self.context.job_id, self.context.owner, settings.lease_s)
            except Exception:  # a database hiccup: try again at the next beat
                log.warning("lease renewal failed", exc_info=True)
                continue
            if not alive:
                self.context.lease_lost.set()
                return


def run_stage(runtime: Runtime, job_id: str, stage: str, work: Callable[[JobContext], str | None]) -> str:
    """Run ``work`` for ``job_id`` if this message should run; return what happened.

    ``work`` returns the next stage (which is enqueued) or None when the job is finished.
    """
    owner = new_owner()
    settings = runtime.settings
    with runtime.db.session() as session:
        job = repo.get_job(session, None, job_id)
        if job.status in repo.TERMINAL_STATUSES or job.stage != stage:
            log_event(log, "stage.skipped", job_id=job_id, stage=stage, status=job.status, job_stage=job.stage)
            return "skipped"
        if job.cancel_requested:
            repo.set_status(session, job, "cancelled", message="Job cancelled")
            return "cancelled"
        # read before acquiring: the lease UPDATE bumps ``attempts`` on the session's copy of the row too
        resumed = job.attempts > 0
        if not repo.acquire_lease(session, job_id, owner, settings.lease_s):
            log_event(log, "stage.duplicate_dropped", job_id=job_id, stage=stage)
            return "duplicate"
        tenant_id = job.tenant_id
    context = JobContext(runtime=runtime, job_id=job_id, tenant_id=tenant_id, stage=stage, owner=owner)
    if resumed:
        context.event(f"Resuming {stage} stage after an interrupted attempt")
    heartbeat = _Heartbeat(context)
    heartbeat.start()
    set_job_phase(stage)
    started = time.monotonic()
    outcome = "succeeded"
    try:
        try:
            next_stage = work(context)
        finally:
            context.close_events()  # queued progress events land before the stage's outcome is recorded
        if context.lease_lost.is_set():
            raise LeaseLost(job_id)
        with runtime.db.session() as session:
            job = repo.get_job(session, None, job_id, for_update=True)
            if next_stage is not None and job.status not in repo.TERMINAL_STATUSES:
                job.stage = next_stage
                job.attempts = 0  # attempts count per stage: the next stage starts fresh
            repo.release_lease(session, job_id, owner)
        if next_stage is not None:
            enqueue_stage(runtime.celery, next_stage, job_id)
        else:
            JOBS_FINISHED.labels(status="succeeded").inc()
        return "done"
    except WorkerDraining:
        # the stage checkpointed and stopped because this worker is shutting down: give the job back now
        outcome = "drained"
        with runtime.db.session() as session:
            repo.release_lease(session, job_id, owner)
        enqueue_stage(runtime.celery, stage, job_id)
        log_event(log, "stage.drained", job_id=job_id, stage=stage)
        return "drained"
    except LeaseLost:
        outcome = "lease_lost"
        log_event(log, "stage.lease_lost", logging.WARNING, job_id=job_id, stage=stage)
        return "lease_lost"
    except JobCancelled:
        outcome = "cancelled"
        _finish(runtime, job_id, owner, "cancelled", None, "Job cancelled")
        return "cancelled"
    except AfinaError as exc:
        outcome = "failed"
        error = {"code": exc.code, "message": exc.message, "param": exc.param}
        _finish(runtime, job_id, owner, "failed", error, f"Job failed: {exc.message}")
        return "failed"
    except Exception as exc:  # an unexpected fault: fail the job with a message a person can act on
        outcome = "failed"
        log_event(log, "stage.crashed", logging.ERROR, job_id=job_id, stage=stage, trace=traceback.format_exc())
        error = {"code": "internal_error", "message": f"{stage} stage failed: {type(exc).__name__}: {exc}",
                 "param": None}
        _finish(runtime, job_id, owner, "failed", error, f"Job failed: {error['message']}")
        return "failed"
    finally:
        heartbeat.stopped.set()
        set_job_phase("idle")
        JOB_STAGE_SECONDS.labels(stage=stage, outcome=outcome).observe(time.monotonic() - started)


def _finish(runtime: Runtime, job_id: str, owner: str, status: str, error: dict | None, message: str) -> None:
    with runtime.db.session() as session:
        job = repo.get_job(session, None, job_id, for_update=True)
        if job.status not in repo.TERMINAL_STATUSES:
            repo.set_status(session, job, status, error=error, message=message)
        repo.release_lease(session, job_id, owner)
    JOBS_FINISHED.labels(status=status).inc()


def recover_stale_jobs(runtime: Runtime) -> list[str]:
    """Requeue the current stage of every active job whose worker stopped heartbeating."""
    with runtime.db.session() as session:
        claimed = repo.claim_stale_jobs(session)
        for job in claimed:
            repo.add_event(session, job.id, f"Worker lost during {job.stage}; resuming from the last checkpoint",
                           level="warn")
        stages = [(job.id, job.stage) for job in claimed]
    for job_id, stage in stages:
        enqueue_stage(runtime.celery, stage, job_id)
        LEASES_RECOVERED.inc()
        log_event(log, "job.recovered", logging.WARNING, job_id=job_id, stage=stage)
    return [job_id for job_id, _ in stages]


def start_recovery_loop(runtime: Runtime) -> threading.Thread:
    """A daemon thread calling ``recover_stale_jobs`` every ``recovery_interval_s``."""

    def loop() -> None:
        while True:
            try:
                recover_stale_jobs(runtime)
            except Exception:
                log.warning("recovery sweep failed", exc_info=True)
            time.sleep(runtime.settings.recovery_interval_s)

    thread = threading.Thread(target=loop, name="afina-recovery", daemon=True)
    thread.start()
    return thread
