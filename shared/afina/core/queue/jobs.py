"""Running one stage of a job under a lease, on any worker.

A message may arrive twice (Redis redelivers after ``visibility_timeout``, the
recovery loop requeues jobs whose worker died, the outbox sends at least once). The
lease in the database makes that harmless: a message for a job whose lease is alive,
or whose stage has moved on, is dropped; one for a job whose lease expired resumes it.

Every state change that calls for a message (the handoff to the next stage, a drained
or paused stage given back, a recovered job) writes that message to the outbox in the
same transaction (``afina.core.queue.outbox``), so no crash and no broker outage can
leave an active job that no message will start. Every write a stage makes to its job
is fenced by the lease owner, so a worker that stalled and lost its lease changes nothing.
"""

from __future__ import annotations

import errno
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
from typing import Any, TypeVar

from celery.exceptions import Reject, SoftTimeLimitExceeded
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from afina.core.db import repository as repo
from afina.core.db.clock import database_time
from afina.core.db.models import Job, OutboxMessage
from afina.core.errors import AfinaError, LeaseLost
from afina.core.file_expiry import sweep_expired_files
from afina.core.gpu_classes import NeedsLargerGpu
from afina.core.logging import log_event, new_error_id, redact
from afina.core.metrics import JOB_STAGE_SECONDS, JOBS_FINISHED, LEASES_RECOVERED, STAGES_REQUEUED, set_job_phase
from afina.core.queue import outbox
from afina.core.queue.drain import WorkerDraining, drain_requested
from afina.core.runtime import Runtime
from afina.core.transient import is_transient, retry_transient

log = logging.getLogger("afina.jobs")
T = TypeVar("T")

__all__ = ["JobCancelled", "JobContext", "LeaseLost", "new_owner", "owner_gpus", "recover_stale_jobs", "run_stage",
           "start_maintenance_loop"]


class JobCancelled(Exception):
    """Raised by stage code at a safe point after the user asked to cancel."""


def _retrying(runtime: Runtime, what: str, call: Callable[[], T]) -> T:
    settings = runtime.settings
    return retry_transient(call, what=what, retries=settings.transient_retries, backoff_s=settings.transient_backoff_s)


@dataclass
class JobContext:
    """What a stage needs: the job's identity, the runtime, and ways to report and stop.

    Its writes to the job are fenced (``LeaseLost`` once another worker owns the job) and
    retried through passing database faults.
    """

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
        def read() -> Job:
            with self.runtime.db.session() as session:
                return repo.get_job(session, None, self.job_id)

        return _retrying(self.runtime, "job read", read)

    def write(self, change: Callable[[Session, Job], T], what: str = "job write") -> T:
        """Run ``change(session, job)`` on the locked job row if this worker still owns it (retried)."""
        def attempt() -> T:
            with self.runtime.db.session() as session:
                try:
                    job = repo.get_owned_job(session, self.job_id, self.owner)
                except LeaseLost:
                    self.lease_lost.set()
                    raise
                return change(session, job)

        return _retrying(self.runtime, what, attempt)

    def event(self, message: str, *, level: str = "info", event_type: str = "message",
              data: dict[str, Any] | None = None) -> None:
        """Record an event now (after any queued by ``event_nowait``, so events stay in order)."""
        self.flush_events()
        self.write(lambda session, _job: repo.add_event(session, self.job_id, message, level=level,
                                                        event_type=event_type, data=data), "event write")

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

    # named writes: each stage owns the columns it fills, and nothing else writes them

    def record_dataset(self, dataset_key: str) -> None:
        """Ingest: the committed dataset (its ``DatasetManifest`` prefix) the job trains on."""
        self._set(dataset_key=dataset_key)

    def record_training_config(self, training_config: dict[str, Any]) -> None:
        """Train: the resolved ``TrainingConfig`` (``lifecycle.stored_training_config``), stored once."""
        self._set(training_config=training_config)

    def record_estimated_finish(self, when: int) -> None:
        """Train: when the run should end (epoch seconds), as OpenAI's ``estimated_finish``."""
        self._set(estimated_finish=when)

    def record_trained_tokens(self, tokens: int) -> None:
        """Train: the tokens the finished run trained on."""
        self._set(trained_tokens=tokens)

    def record_result_files(self, file_ids: list[str]) -> None:
        """Train: the report files, downloadable as the job's ``result_files``."""
        self._set(result_files=file_ids)

    def _set(self, **values: Any) -> None:
        def change(_session: Session, job: Job) -> None:
            for name, value in values.items():
                setattr(job, name, value)

        self.write(change)

    def set_status(self, status: str, message: str | None = None) -> None:
        def change(session: Session, job: Job) -> None:
            if job.status != status:
                repo.set_status(session, job, status, message=message)

        self.write(change, "status write")

    def check_continue(self) -> None:
        """Raise ``LeaseLost``, ``JobCancelled`` or ``WorkerDraining`` if the stage must stop now."""
        if self.lease_lost.is_set():
            raise LeaseLost(self.job_id)
        if self.cancel_requested():
            raise JobCancelled(self.job_id)
        if drain_requested(self.runtime.settings):
            raise WorkerDraining(self.job_id)

    def cancel_requested(self) -> bool:
        """The job's cancel flag, read from the database at most every ``cancel_poll_s`` seconds.

        A database blip is retried with backoff; one that outlasts the retries propagates, and
        ``run_stage`` gives the job back to the queue instead of failing it.
        """
        if self._cancel_seen:
            return True
        now = time.monotonic()
        if now - self._cancel_checked_at < self.cancel_poll_s:
            return False
        self._cancel_checked_at = now

        def read() -> bool:
            with self.runtime.db.session() as session:
                return bool(session.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)))

        self._cancel_seen = _retrying(self.runtime, "cancel check", read)
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

    def _add(self, session: Session, items: list[tuple[str, str, str, dict[str, Any] | None]]) -> None:
        for message, level, event_type, data in items:
            repo.add_event(session, self.context.job_id, message, level=level, event_type=event_type, data=data)

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
                if items and not self.context.lease_lost.is_set():
                    self.context.write(lambda session, _job, items=items: self._add(session, items), "event write")
            except LeaseLost:
                pass  # another worker owns the job now: its events are that worker's to write
            except Exception:  # noqa: BLE001 - a lost progress event must never kill the training loop
                log.exception("event write failed", extra={"fields": {"job_id": self.context.job_id}})
            finally:
                for _ in batch:
                    self.pending.task_done()
            if len(items) != len(batch):
                return


GPU_MARK = "@gpu="


def new_owner() -> str:
    """A lease owner: host, pid and a nonce, and the CUDA devices a pinned trainer runs on (``afina status``
    shows which job runs on which GPU from it)."""
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    return f"{owner}{GPU_MARK}{gpus}" if gpus else owner


def owner_gpus(owner: str | None) -> str | None:
    """The CUDA devices recorded in a lease owner by ``new_owner`` (None: not a pinned worker)."""
    if not owner or GPU_MARK not in owner:
        return None
    return owner.split(GPU_MARK, 1)[1] or None


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

    ``work`` returns the next stage (whose message goes out through the outbox) or None when
    the job is finished. Outcomes: ``done``, ``skipped`` / ``duplicate`` (nothing to do),
    ``cancelled``, ``failed``, ``lease_lost``, ``drained`` and ``paused`` (given back to the queue).
    """
    owner = new_owner()
    try:
        claim = _retrying(runtime, "stage claim", lambda: _claim(runtime, job_id, stage, owner))
    except Exception as exc:
        if not is_transient(exc):
            raise
        # the database is away: put the message back on the broker (acks_late) instead of acking it unread
        log_event(log, "stage.claim_unavailable", logging.WARNING, job_id=job_id, stage=stage,
                  error=type(exc).__name__)
        time.sleep(runtime.settings.transient_backoff_s)
        raise Reject(f"database unavailable for {job_id}", requeue=True) from None
    if isinstance(claim, str):
        return claim
    tenant_id, resumed = claim
    context = JobContext(runtime=runtime, job_id=job_id, tenant_id=tenant_id, stage=stage, owner=owner)
    heartbeat = _Heartbeat(context)
    heartbeat.start()
    set_job_phase(stage)
    started = time.monotonic()
    outcome = "failed"

    def resume_then_work(context: JobContext) -> str | None:
        # inside the guarded run: a database fault while saying so pauses the job like any other (uncounted)
        if resumed:
            context.event(f"Resuming {stage} stage after an interrupted attempt")
        return work(context)

    try:
        outcome = _run_claimed(context, resume_then_work)
        return outcome
    finally:
        heartbeat.stopped.set()
        set_job_phase("idle")
        label = "succeeded" if outcome == "done" else outcome
        JOB_STAGE_SECONDS.labels(stage=stage, outcome=label).observe(time.monotonic() - started)


def _claim(runtime: Runtime, job_id: str, stage: str, owner: str) -> str | tuple[str, bool]:
    """Take the job's lease for ``stage``: ``(tenant, resumed)``, or the outcome when this message has nothing
    to run (the job moved on, is cancelled, another worker holds it, or it used up its attempts)."""
    settings = runtime.settings
    with runtime.db.session() as session:
        job = repo.get_job(session, None, job_id)
        if job.status in repo.TERMINAL_STATUSES or job.stage != stage:
            log_event(log, "stage.skipped", job_id=job_id, stage=stage, status=job.status, job_stage=job.stage)
            return "skipped"
        if job.cancel_requested:
            repo.set_status(session, job, "cancelled", message="Job cancelled")
            return "cancelled"
        if not repo.acquire_lease(session, job_id, owner, settings.lease_s):
            log_event(log, "stage.duplicate_dropped", job_id=job_id, stage=stage)
            return "duplicate"
        # read back, not job.attempts + 1: a claim retried after its commit went through was not counted twice
        attempt = session.scalar(select(Job.attempts).where(Job.id == job_id))
        if attempt > settings.max_stage_attempts:
            error = {"code": "stage_attempts_exhausted", "param": None,
                     "message": f"The {stage} stage was started {attempt - 1} times and its worker stopped each time "
                                f"before finishing (killed, out of memory, or restarted); giving up after "
                                f"{settings.max_stage_attempts} attempts (AFINA_MAX_STAGE_ATTEMPTS)."}
            repo.set_status(session, job, "failed", error=error, message=f"Job failed: {error['message']}")
            repo.release_lease(session, job_id, owner)
            log_event(log, "stage.attempts_exhausted", logging.ERROR, job_id=job_id, stage=stage, attempts=attempt - 1)
            JOBS_FINISHED.labels(status="failed").inc()
            return "failed"
        return job.tenant_id, attempt > 1


def _run_claimed(context: JobContext, work: Callable[[JobContext], str | None]) -> str:
    """Run the stage's work under the lease and record how it ended (every record fenced by the owner)."""
    runtime, job_id, stage = context.runtime, context.job_id, context.stage
    try:
        try:
            next_stage = work(context)
        finally:
            context.close_events()  # queued progress events land before the stage's outcome is recorded
        if context.lease_lost.is_set():
            raise LeaseLost(job_id)
        _hand_off(context, next_stage)
        if next_stage is None:
            JOBS_FINISHED.labels(status="succeeded").inc()
        return "done"
    except WorkerDraining:
        # the stage checkpointed and stopped because this worker is shutting down: give the job back now
        _give_back(context, delay_s=0.0, reason="drain", message=None)
        log_event(log, "stage.drained", job_id=job_id, stage=stage)
        return "drained"
    except LeaseLost:
        log_event(log, "stage.lease_lost", logging.WARNING, job_id=job_id, stage=stage)
        return "lease_lost"
    except NeedsLargerGpu as exc:
        # the job does not fit this GPU and a larger class would hold it: its stage moves to that class's queue
        _give_back(context, delay_s=0.0, reason="gpu_class", message=exc.message, gpu_class=exc.gpu_class)
        log_event(log, "stage.rerouted", job_id=job_id, stage=stage, gpu_class=exc.gpu_class)
        return "rerouted"
    except JobCancelled:
        return _finish(context, "cancelled", None, "Job cancelled")
    except SoftTimeLimitExceeded:
        soft, _hard = runtime.settings.stage_time_limits(stage)
        error = {"code": "stage_time_limit", "param": None,
                 "message": f"The {stage} stage ran longer than its time limit of {soft} s and was stopped "
                            f"(AFINA_STAGE_TIME_LIMITS_S / AFINA_TASK_SOFT_TIME_LIMIT_S)."}
        return _finish(context, "failed", error, f"Job failed: {error['message']}")
    except AfinaError as exc:
        if is_transient(exc):
            return _pause(context, exc)
        error = {"code": exc.code, "message": redact(exc.message), "param": exc.param}
        return _finish(context, "failed", error, f"Job failed: {error['message']}")
    except Exception as exc:
        if is_transient(exc):
            return _pause(context, exc)
        if _disk_full(exc):
            error = {"code": "disk_full", "param": None,
                     "message": f"The {stage} stage ran out of disk space on its worker (the work folder is full). "
                                f"Nothing was published; the operator must free space or give the worker a larger "
                                f"volume (AFINA_WORK_DIR), then the job can be run again."}
            log_event(log, "stage.disk_full", logging.ERROR, job_id=job_id, stage=stage, error=str(exc))
            return _finish(context, "failed", error, f"Job failed: {error['message']}")
        # an unexpected fault: the user gets an error id to quote, the operator's log gets the trace (scrubbed)
        error_id = new_error_id()
        log_event(log, "stage.crashed", logging.ERROR, job_id=job_id, stage=stage, error_id=error_id,
                  error=type(exc).__name__, trace=traceback.format_exc())
        error = {"code": "internal_error", "param": None, "error_id": error_id,
                 "message": f"The {stage} stage failed unexpectedly (error id {error_id}). This is a fault of the "
                            f"service, not of your data or settings; the operator's logs have the details."}
        return _finish(context, "failed", error, f"Job failed: {error['message']}")


def _disk_full(exc: BaseException) -> bool:
    """An ENOSPC/EDQUOT anywhere in the exception's chain (libraries often wrap the OSError)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _hand_off(context: JobContext, next_stage: str | None) -> None:
    """Record the finished stage: the job moves to ``next_stage`` and its message is written, in one transaction."""
    messages: list[OutboxMessage] = []

    def change(session: Session, job: Job) -> None:
        if next_stage is not None and job.status not in repo.TERMINAL_STATUSES:
            job.stage = next_stage
            job.attempts = 0  # attempts count per stage: the next stage starts fresh
            messages.append(outbox.add_stage(session, next_stage, job.id))
        repo.release_lease(session, job.id, context.owner)

    context.write(change, "stage handoff")
    outbox.deliver(context.runtime, messages)


def _give_back(context: JobContext, *, delay_s: float, reason: str, message: str | None,
               gpu_class: str | None = None) -> None:
    """Release the lease without counting the attempt and queue the same stage again (after ``delay_s``; on
    ``gpu_class``'s queue when given)."""
    messages: list[OutboxMessage] = []

    def change(session: Session, job: Job) -> None:
        if gpu_class is not None:
            job.gpu_class = gpu_class  # before the message: add_stage routes by it
        if message:
            repo.add_event(session, job.id, message, level="warn")
        repo.release_lease(session, job.id, context.owner, uncount_attempt=True)
        messages.append(outbox.add_stage(session, context.stage, job.id, delay_s=delay_s))

    context.write(change, "stage give-back")
    outbox.deliver(context.runtime, messages)
    STAGES_REQUEUED.labels(reason=reason).inc()


def _pause(context: JobContext, exc: BaseException) -> str:
    """A dependency stayed away past the in-stage retries: hand the job back to run again later, not fail it.

    If even that cannot be written (the database is the one away), the lease expires and the
    recovery sweep requeues the job.
    """
    settings = context.runtime.settings
    delay = settings.transient_requeue_delay_s
    log_event(log, "stage.paused", logging.WARNING, job_id=context.job_id, stage=context.stage,
              error=type(exc).__name__, retry_in_s=delay)
    # the heartbeat still holds the lease, so keep trying for a while: a give-back that never lands lets the
    # lease expire, and the recovery sweep's requeue would count this pause as a crashed attempt
    give_up_at = time.monotonic() + 2 * settings.lease_s
    while True:
        try:
            _give_back(context, delay_s=delay, reason="transient",
                       message=f"The {context.stage} stage paused: a service it depends on did not answer; "
                               f"it resumes from its last checkpoint in {delay:.0f} s")
            return "paused"
        except LeaseLost:
            return "lease_lost"
        except Exception as fault:  # noqa: BLE001 - the lease will expire and the recovery sweep requeues the job
            if not is_transient(fault) or time.monotonic() >= give_up_at or context.lease_lost.is_set():
                log.warning("could not give the job back; the recovery sweep will", exc_info=True)
                return "paused"
            time.sleep(settings.transient_backoff_s)


def _finish(context: JobContext, status: str, error: dict | None, message: str) -> str:
    def change(session: Session, job: Job) -> None:
        if job.status not in repo.TERMINAL_STATUSES:
            repo.set_status(session, job, status, error=error, message=message)
        repo.release_lease(session, job.id, context.owner)

    try:
        context.write(change, "stage outcome")
    except LeaseLost:
        return "lease_lost"
    JOBS_FINISHED.labels(status=status).inc()
    return status


def recover_stale_jobs(runtime: Runtime) -> list[str]:
    """Requeue the current stage of every active job whose worker stopped heartbeating, and of every active
    job that nothing holds and no message will start (an orphan: its message was lost)."""
    messages: list[OutboxMessage] = []
    with runtime.db.session() as session:
        claimed = repo.claim_stale_jobs(session)
        for job in claimed:
            repo.add_event(session, job.id, f"Worker lost during {job.stage}; resuming from the last checkpoint",
                           level="warn")
            messages.append(outbox.add_stage(session, job.stage, job.id))
        orphans = _orphaned_jobs(session, runtime.settings.orphan_requeue_s)
        for job in orphans:
            messages.append(outbox.add_stage(session, job.stage, job.id))
        recovered = [(job.id, job.stage, "lease_expired") for job in claimed]
        recovered += [(job.id, job.stage, "orphaned") for job in orphans]
    outbox.deliver(runtime, messages)
    for job_id, stage, reason in recovered:
        LEASES_RECOVERED.inc()
        log_event(log, "job.recovered", logging.WARNING, job_id=job_id, stage=stage, reason=reason)
    return [job_id for job_id, _, _ in recovered]


def _orphaned_jobs(session: Session, older_than_s: float) -> list[Job]:
    """Active, unleased jobs with no unsent message and none sent in the last ``older_than_s`` seconds."""
    moment = database_time(session)
    newest = (select(OutboxMessage.subject_id, func.max(func.coalesce(OutboxMessage.sent_at, moment)).label("at"))
              .group_by(OutboxMessage.subject_id).subquery())
    rows = session.execute(
        select(Job, newest.c.at).outerjoin(newest, newest.c.subject_id == Job.id)
        .where(Job.status.in_(repo.ACTIVE_STATUSES), Job.lease_owner.is_(None), Job.cancel_requested.is_(False),
               Job.created_at < moment - older_than_s)).all()
    return [job for job, last_sent in rows if last_sent is None or last_sent < moment - older_than_s]


def start_maintenance_loop(runtime: Runtime, extra: Callable[[], object] | None = None) -> threading.Thread:
    """A daemon thread in every worker's main process: sends what the outbox holds (every
    ``outbox_relay_interval_s``), requeues stranded jobs (every ``recovery_interval_s``), deletes expired files
    (every ``file_expiry_sweep_interval_s``; several workers at once delete each file once), prunes the outbox,
    and runs ``extra`` (e.g. the stale scratch sweep) hourly."""
    settings = runtime.settings
    duties: list[tuple[str, float, Callable[[], object]]] = [
        ("outbox relay", settings.outbox_relay_interval_s, lambda: outbox.relay_pending(runtime)),
        ("recovery sweep", settings.recovery_interval_s, lambda: recover_stale_jobs(runtime)),
        ("file expiry sweep", settings.file_expiry_sweep_interval_s, lambda: sweep_expired_files(runtime)),
        ("outbox prune", 3600.0, lambda: (outbox.prune_sent(runtime), outbox.pending_count(runtime))),
    ]
    if extra is not None:
        duties.append(("maintenance", 3600.0, extra))

    def loop() -> None:
        due = dict.fromkeys((name for name, _, _ in duties), 0.0)
        while True:
            now = time.monotonic()
            for name, every_s, duty in duties:
                if now < due[name]:
                    continue
                due[name] = now + every_s
                try:
                    duty()
                except Exception:  # noqa: BLE001 - a sweep that failed runs again at its next turn
                    log.warning(f"{name} failed", exc_info=True)
            time.sleep(min(every_s for _, every_s, _ in duties) / 2)

    thread = threading.Thread(target=loop, name="afina-maintenance", daemon=True)
    thread.start()
    return thread
