"""The transactional outbox: a queue message is a row written in the transaction that calls for it.

Committing a job's new state and then sending its Celery message is two steps: a crash or a
broker outage between them leaves a job that no message will ever start. So every writer adds
the message to the ``outbox`` table in the same transaction as the state change (``add_stage``,
``add_file_ingest``); after the commit it tries to send it at once (``deliver``), and the relay
that runs in every worker (``relay_pending``) sends whatever is still unsent — because the sender
died, or the broker was down — retrying with backoff until the broker takes it.

Delivery is at least once: a message sent and not yet marked sent when the process dies is sent
again. Stages make that harmless (a job's lease and stage drop the duplicate; file ingest is
content-addressed).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.orm import Session

from afina.core.db.clock import database_time, now_sql
from afina.core.db.models import Job, OutboxMessage
from afina.core.logging import log_event
from afina.core.metrics import OUTBOX_PENDING, OUTBOX_SENT
from afina.core.queue.app import OUTBOX_ID_HEADER, send_message
from afina.core.queue.names import QUEUE_INGEST, STAGE_TASKS, TASK_INGEST_FILE, train_queue
from afina.core.runtime import Runtime
from afina.core.transient import backoff_delays

log = logging.getLogger("afina.outbox")

SENDER_GRACE_S = 5.0  # a fresh message is its sender's to deliver; the relay takes it after this
CLAIM_S = 30.0  # how long one sender owns a message it is sending
KEEP_SENT_S = 24 * 3600.0  # sent rows are kept this long (for inspection), then removed
RELAY_BATCH = 100


def add_stage(session: Session, stage: str, job_id: str, *, delay_s: float = 0.0) -> OutboxMessage:
    """The message that moves ``job_id`` through ``stage``, written in the caller's transaction (a train stage
    goes to its GPU class's queue)."""
    task, queue = STAGE_TASKS[stage]
    if stage == "train":
        job = session.get(Job, job_id)
        if job is not None:
            queue = train_queue(job.gpu_class, job.num_gpus)
    return _add(session, task, queue, job_id, delay_s)


def add_file_ingest(session: Session, file_id: str) -> OutboxMessage:
    """The message that ingests an uploaded file, written in the caller's transaction."""
    return _add(session, TASK_INGEST_FILE, QUEUE_INGEST, file_id, 0.0)


def _add(session: Session, task: str, queue: str, subject_id: str, delay_s: float) -> OutboxMessage:
    moment = database_time(session)
    message = OutboxMessage(task=task, queue=queue, subject_id=subject_id, created_at=moment,
                            available_at=moment + delay_s, send_attempts=0)
    session.add(message)
    session.flush()  # the id, for ``deliver`` after the commit
    return message


def deliver(runtime: Runtime, messages: Iterable[OutboxMessage]) -> int:
    """Send committed messages now (best effort: what fails stays for the relay); how many went out."""
    sent = 0
    for message in messages:
        if message.available_at > message.created_at:
            continue  # a delayed message: the relay sends it when it is due
        try:
            sent += _claim_and_send(runtime, message.id)
        except Exception as exc:  # noqa: BLE001 - the row is committed; the relay retries
            log_event(log, "outbox.deliver_failed", logging.WARNING, message_id=message.id,
                      error=type(exc).__name__)
    return sent


def relay_pending(runtime: Runtime, limit: int = RELAY_BATCH) -> int:
    """Send due messages whose sender did not (crashed, broker down); how many went out."""
    with runtime.db.session() as session:
        moment = database_time(session)
        due = list(session.scalars(
            select(OutboxMessage.id)
            .where(OutboxMessage.sent_at.is_(None), OutboxMessage.available_at <= moment,
                   OutboxMessage.created_at <= moment - SENDER_GRACE_S,
                   or_(OutboxMessage.claimed_until.is_(None), OutboxMessage.claimed_until < moment))
            .order_by(OutboxMessage.id).limit(limit)))
    sent = 0
    for message_id in due:
        try:
            sent += _claim_and_send(runtime, message_id)
        except Exception as exc:  # noqa: BLE001 - one bad send must not stop the others
            log_event(log, "outbox.relay_failed", logging.WARNING, message_id=message_id, error=type(exc).__name__)
    if sent:
        log_event(log, "outbox.relayed", sent=sent)
    return sent


def prune_sent(runtime: Runtime) -> int:
    """Remove rows sent longer than ``KEEP_SENT_S`` ago; how many."""
    with runtime.db.session() as session:
        result = session.execute(delete(OutboxMessage).where(
            OutboxMessage.sent_at.is_not(None), OutboxMessage.sent_at < now_sql(session) - KEEP_SENT_S))
        return result.rowcount or 0


def pending_count(runtime: Runtime) -> int:
    """Messages not yet sent (also set as the ``afina_outbox_pending`` gauge)."""
    with runtime.db.session() as session:
        count = session.scalar(select(func.count()).select_from(OutboxMessage)
                               .where(OutboxMessage.sent_at.is_(None))) or 0
    OUTBOX_PENDING.set(count)
    return count


def _claim_and_send(runtime: Runtime, message_id: int) -> int:
    """Claim the message (one sender at a time), send it, mark it sent; 1 if sent, 0 if another sender has it.

    A failed send keeps the claim until a backoff delay has passed, so the relay retries an
    unreachable broker with growing pauses instead of hammering it.
    """
    with runtime.db.session() as session:
        moment = now_sql(session)
        claimed = session.execute(
            update(OutboxMessage)
            .where(OutboxMessage.id == message_id, OutboxMessage.sent_at.is_(None),
                   or_(OutboxMessage.claimed_until.is_(None), OutboxMessage.claimed_until < moment))
            .values(claimed_until=moment + CLAIM_S, send_attempts=OutboxMessage.send_attempts + 1)
            .execution_options(synchronize_session=False)).rowcount
        if claimed != 1:
            return 0
        message = session.get(OutboxMessage, message_id)
        task, queue, subject_id, attempts = message.task, message.queue, message.subject_id, message.send_attempts
    try:
        send_message(runtime.celery, task, queue, subject_id, headers={OUTBOX_ID_HEADER: message_id})
    except Exception:
        retry_in = backoff_delays(attempts, 1.0, cap_s=60.0)[-1] if attempts else 1.0
        with runtime.db.session() as session:
            session.execute(update(OutboxMessage).where(OutboxMessage.id == message_id)
                            .values(claimed_until=now_sql(session) + retry_in)
                            .execution_options(synchronize_session=False))
        raise
    with runtime.db.session() as session:
        session.execute(update(OutboxMessage).where(OutboxMessage.id == message_id)
                        .values(sent_at=now_sql(session), claimed_until=None)
                        .execution_options(synchronize_session=False))
    OUTBOX_SENT.inc()
    return 1
