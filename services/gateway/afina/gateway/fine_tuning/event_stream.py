"""A job's events as Server-Sent Events: ``GET /v1/fine_tuning/jobs/{id}/events?stream=true``.

Each event goes out as ``id: <ftevent-…>`` and ``data: <the event object as JSON>``, oldest
first; a client that reconnects with ``Last-Event-ID`` gets only the events after that one.
The stream ends with ``data: [DONE]`` once the job is terminal and every event is sent; while
nothing happens a comment line keeps proxies from closing the connection.

Events are ordered by ``seq`` (the time each was written, in ns). Writers commit a moment
after they stamp, so a poll re-reads a short window behind its cursor and skips the ids it
already sent: an event that commits late is still delivered, exactly once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
import orjson
from sqlalchemy import select

from afina.core.db import repository as repo
from afina.core.db.models import JobEvent
from afina.core.errors import InvalidRequest
from afina.core.runtime import Runtime
from afina.gateway.fine_tuning.service import event_object

PAGE_SIZE = 200
LATE_COMMIT_WINDOW_NS = 5_000_000_000
RETRY_MS = 3000  # how long a disconnected EventSource waits before reconnecting
DONE = "data: [DONE]\n\n"
KEEPALIVE = ": keep-alive\n\n"


@dataclass(frozen=True)
class StreamStart:
    """Where a stream begins: after the event with ``seq`` (``None`` for the job's first event)."""

    job_id: str
    after_seq: int | None


def open_stream(runtime: Runtime, tenant_id: str, job_id: str, last_event_id: str | None, *,
                after: str | None = None) -> StreamStart:
    """Check the job is the tenant's (404 otherwise) and resolve ``Last-Event-ID``, before any byte is sent.

    ``after`` pages the newest-first list; a stream runs oldest first, so it is refused rather than
    silently ignored (a client that sent it would get events it meant to skip).
    """
    with runtime.db.session() as session:
        repo.get_job(session, tenant_id, job_id)
        if after:
            raise InvalidRequest("'after' pages the event list; a stream (stream=true) resumes after the event "
                                 "named in the Last-Event-ID header instead", param="after")
        if not last_event_id:
            return StreamStart(job_id, None)
        anchor = session.get(JobEvent, last_event_id.strip())
        if anchor is None or anchor.job_id != job_id:
            raise InvalidRequest(f"Last-Event-ID {last_event_id!r} is not an event of job {job_id}",
                                 param="Last-Event-ID")
        return StreamStart(job_id, anchor.seq)


def _poll(runtime: Runtime, job_id: str, cursor: int | None,
          window_floor: int | None) -> tuple[list[JobEvent], list[JobEvent], bool]:
    """Events at or before ``cursor`` but after ``window_floor`` (the late-commit window, to be filtered
    by id), up to ``PAGE_SIZE`` events after ``cursor`` (oldest first), and whether the job was terminal
    BEFORE they were read: every event of a terminal job is then in these lists or an earlier poll's."""
    with runtime.db.session() as session:
        terminal = repo.get_job(session, None, job_id).status in repo.TERMINAL_STATUSES
        ordered = (JobEvent.seq, JobEvent.id)
        recent: list[JobEvent] = []
        if cursor is not None and window_floor is not None and window_floor < cursor:
            recent = list(session.scalars(select(JobEvent).where(
                JobEvent.job_id == job_id, JobEvent.seq > window_floor, JobEvent.seq <= cursor).order_by(*ordered)))
        query = select(JobEvent).where(JobEvent.job_id == job_id)
        if cursor is not None:
            query = query.where(JobEvent.seq > cursor)
        newer = list(session.scalars(query.order_by(*ordered).limit(PAGE_SIZE)))
        session.expunge_all()
        return recent, newer, terminal


def format_event(event: JobEvent) -> str:
    body = orjson.dumps(event_object(event).model_dump(mode="json")).decode()
    return f"id: {event.id}\ndata: {body}\n\n"


async def event_stream(runtime: Runtime, start: StreamStart, *, poll_s: float,
                       keepalive_s: float) -> AsyncIterator[str]:
    """The SSE text of ``start.job_id``'s events, following the job until it is terminal."""
    cursor = start.after_seq  # the newest seq sent (or the client already had)
    sent: dict[str, int] = {}  # id -> seq of the events this stream sent inside the late-commit window
    yield f"retry: {RETRY_MS}\n\n"
    last_write = time.monotonic()
    while True:
        window_floor = None
        if cursor is not None:
            window_floor = cursor - LATE_COMMIT_WINDOW_NS
            if start.after_seq is not None:  # never re-read what the client had before it reconnected
                window_floor = max(window_floor, start.after_seq)
        recent, newer, terminal = await anyio.to_thread.run_sync(_poll, runtime, start.job_id, cursor, window_floor)
        fresh = [row for row in recent if row.id not in sent] + newer
        for row in fresh:
            sent[row.id] = row.seq
            cursor = row.seq if cursor is None else max(cursor, row.seq)
            yield format_event(row)
        if fresh:
            last_write = time.monotonic()
            horizon = cursor - LATE_COMMIT_WINDOW_NS
            sent = {event_id: seq for event_id, seq in sent.items() if seq > horizon}
        if len(newer) == PAGE_SIZE:
            continue  # more history to send at once
        if terminal:
            yield DONE
            return
        if time.monotonic() - last_write >= keepalive_s:
            yield KEEPALIVE
            last_write = time.monotonic()
        await asyncio.sleep(poll_s)
