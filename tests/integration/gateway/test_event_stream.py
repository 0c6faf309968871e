"""``GET /v1/fine_tuning/jobs/{id}/events?stream=true``: a real gateway (uvicorn) on SQLite and on PostgreSQL,
read by a real HTTP client as Server-Sent Events — replay, live follow, resume from Last-Event-ID,
keep-alive, the end of a finished job, and tenancy."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from afina.core.db import repository as repo
from tests.integration.gateway.conftest import SMOLLM2, Gateway, chat_jsonl, make_settings, start_gateway
from tests.support.servers import fresh_postgres_database

pytestmark = pytest.mark.integration

POLL_S, KEEPALIVE_S = 0.05, 0.3


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def sse_gateway(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway polling fast, so keep-alive and live delivery are seen in a fraction of a second."""
    overrides: dict[str, Any] = {"events_poll_s": POLL_S, "events_keepalive_s": KEEPALIVE_S}
    with ExitStack() as cleanup:
        if request.param == "postgres":
            overrides["database_url"] = cleanup.enter_context(
                fresh_postgres_database(request.getfixturevalue("postgres_admin_url"), "afina_sse"))
        gateway = start_gateway(make_settings(tmp_path_factory.mktemp(f"sse-{request.param}"), **overrides))
        yield gateway
        gateway.served.stop()
        gateway.runtime.db.dispose()


@dataclass
class SseEvent:
    id: str | None = None
    event: str | None = None
    data: list[str] = field(default_factory=list)
    retry: int | None = None

    @property
    def json(self) -> dict[str, Any]:
        return json.loads("\n".join(self.data))


@dataclass
class Stream:
    """What one SSE response carried, in order: events (with data), comments and the retry hint."""

    events: list[SseEvent] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    retry: int | None = None
    done: bool = False

    @property
    def job_events(self) -> list[dict[str, Any]]:
        return [event.json for event in self.events]

    @property
    def ids(self) -> list[str]:
        return [event.id for event in self.events]


def read_stream(response: httpx.Response, stop_after_comments: int | None = None) -> Stream:
    """Parse ``text/event-stream`` per the HTML spec's rules (fields, comments, blank-line dispatch)."""
    stream, current = Stream(), SseEvent()
    for line in response.iter_lines():
        if line == "":
            if current.data == ["[DONE]"]:
                stream.done = True
            elif current.data:
                stream.events.append(current)
            current = SseEvent()
            continue
        if line.startswith(":"):
            stream.comments.append(line[1:].strip())
            if stop_after_comments is not None and len(stream.comments) >= stop_after_comments:
                break
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            current.data.append(value)
        elif name == "id":
            current.id = value
        elif name == "event":
            current.event = value
        elif name == "retry":
            stream.retry = int(value)
    return stream


def headers(gateway: Gateway, tenant: str = "acme", last_event_id: str | None = None) -> dict[str, str]:
    values = {"Authorization": f"Bearer {gateway.keys[tenant]}", "Accept": "text/event-stream"}
    if last_event_id:
        values["Last-Event-ID"] = last_event_id
    return values


def new_job(gateway: Gateway) -> str:
    client = gateway.client("acme")
    training = client.files.create(file=("treino.jsonl", chat_jsonl()), purpose="fine-tune")
    return client.fine_tuning.jobs.create(model=SMOLLM2, training_file=training.id).id


def add_metrics(gateway: Gateway, job_id: str, steps: range) -> None:
    with gateway.runtime.db.session() as session:
        for step in steps:
            repo.add_event(session, job_id, f"Step {step}/10: training loss={2.5 - step / 10:.4f}",
                           event_type="metrics", data={"step": step, "total_steps": 10, "train_loss": 2.5 - step / 10})


def finish(gateway: Gateway, job_id: str, status: str = "succeeded") -> None:
    with gateway.runtime.db.session() as session:
        job = repo.get_job(session, None, job_id, for_update=True)
        repo.set_status(session, job, status, message=f"Job {status}: modelo pronto para conversar")


def events_url(gateway: Gateway, job_id: str) -> str:
    return f"{gateway.url}/v1/fine_tuning/jobs/{job_id}/events?stream=true"


def test_a_finished_job_replays_every_event_oldest_first_and_ends(sse_gateway: Gateway) -> None:
    job_id = new_job(sse_gateway)
    add_metrics(sse_gateway, job_id, range(1, 4))
    finish(sse_gateway, job_id)
    with httpx.stream("GET", events_url(sse_gateway, job_id), headers=headers(sse_gateway), timeout=10) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        stream = read_stream(response)
    assert stream.done and stream.retry == 3000
    listed = sse_gateway.client("acme").fine_tuning.jobs.list_events(job_id, limit=100).data
    # the same events the list endpoint gives (newest first there), oldest first here, with their ids
    assert stream.ids == [event.id for event in reversed(listed)]
    assert stream.job_events == [event.model_dump(mode="json") for event in reversed(listed)]
    messages = [event["message"] for event in stream.job_events]
    assert messages[0] == f"Created fine-tuning job: {job_id}"
    assert messages[-1] == "Job succeeded: modelo pronto para conversar"
    metrics = [event for event in stream.job_events if event["type"] == "metrics"]
    assert [event["data"]["step"] for event in metrics] == [1, 2, 3]
    assert all(event["object"] == "fine_tuning.job.event" for event in stream.job_events)


def test_a_running_job_is_followed_live_until_it_ends(sse_gateway: Gateway) -> None:
    job_id = new_job(sse_gateway)
    result: dict[str, Stream] = {}

    def listen() -> None:
        with httpx.stream("GET", events_url(sse_gateway, job_id), headers=headers(sse_gateway),
                          timeout=30) as response:
            result["stream"] = read_stream(response)

    listener = threading.Thread(target=listen)
    listener.start()
    time.sleep(0.4)  # the stream is open and has sent the history
    for step in range(1, 6):
        add_metrics(sse_gateway, job_id, range(step, step + 1))
        time.sleep(0.02)
    finish(sse_gateway, job_id, "failed")
    listener.join(30)
    assert not listener.is_alive(), "the stream did not end when the job failed"
    stream = result["stream"]
    seen = [event["message"] for event in stream.job_events]
    assert stream.done
    assert [e["data"]["step"] for e in stream.job_events if e["type"] == "metrics"] == [1, 2, 3, 4, 5]
    assert seen[-1] == "Job failed: modelo pronto para conversar"
    assert len(stream.ids) == len(set(stream.ids))  # nothing twice


def test_reconnecting_with_last_event_id_gets_only_later_events(sse_gateway: Gateway) -> None:
    job_id = new_job(sse_gateway)
    add_metrics(sse_gateway, job_id, range(1, 7))
    # first connection: read until the 4th metrics event, then drop the connection (job still running)
    with httpx.stream("GET", events_url(sse_gateway, job_id), headers=headers(sse_gateway), timeout=10) as response:
        received: list[SseEvent] = []
        current = SseEvent()
        for line in response.iter_lines():
            if line.startswith("id: "):
                current.id = line[4:]
            elif line.startswith("data: "):
                current.data.append(line[6:])
            elif line == "" and current.data:
                received.append(current)
                current = SseEvent()
                if sum(e.json["type"] == "metrics" for e in received) == 4:
                    break
    last_id = received[-1].id
    assert received[-1].json["data"]["step"] == 4
    add_metrics(sse_gateway, job_id, range(7, 9))
    finish(sse_gateway, job_id)
    with httpx.stream("GET", events_url(sse_gateway, job_id), headers=headers(sse_gateway, last_event_id=last_id),
                      timeout=10) as response:
        resumed = read_stream(response)
    assert resumed.done
    assert [e["data"]["step"] for e in resumed.job_events if e["type"] == "metrics"] == [5, 6, 7, 8]
    assert resumed.job_events[-1]["message"] == "Job succeeded: modelo pronto para conversar"
    assert not set(resumed.ids) & {event.id for event in received}
    # together, the two connections saw every event exactly once
    everything = [event.id for event in reversed(
        sse_gateway.client("acme").fine_tuning.jobs.list_events(job_id, limit=100).data)]
    assert [event.id for event in received] + resumed.ids == everything

    # resuming from the very last event of a finished job: nothing more, just the end
    with httpx.stream("GET", events_url(sse_gateway, job_id),
                      headers=headers(sse_gateway, last_event_id=everything[-1]), timeout=10) as response:
        tail = read_stream(response)
    assert tail.done and tail.events == []


def test_an_idle_stream_sends_keep_alive_comments(sse_gateway: Gateway) -> None:
    job_id = new_job(sse_gateway)
    started = time.monotonic()
    with httpx.stream("GET", events_url(sse_gateway, job_id), headers=headers(sse_gateway), timeout=10) as response:
        stream = read_stream(response, stop_after_comments=2)
    assert stream.comments == ["keep-alive", "keep-alive"]
    assert time.monotonic() - started >= 2 * KEEPALIVE_S * 0.9
    assert not stream.done and len(stream.events) == 2  # the job's two creation events, then silence
    # the gateway is fine after the client went away mid-stream
    assert httpx.get(f"{sse_gateway.url}/health", timeout=5).status_code == 200


def test_another_tenant_cannot_stream_a_job(sse_gateway: Gateway) -> None:
    job_id = new_job(sse_gateway)
    response = httpx.get(events_url(sse_gateway, job_id), headers=headers(sse_gateway, "globex"), timeout=10)
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["code"] == "not_found"
    # nor resume from one of its events into its own job's stream
    other_job = _job_for(sse_gateway, "globex")
    acme_event = sse_gateway.client("acme").fine_tuning.jobs.list_events(job_id, limit=1).data[0].id
    response = httpx.get(events_url(sse_gateway, other_job), timeout=10,
                         headers=headers(sse_gateway, "globex", last_event_id=acme_event))
    assert response.status_code == 400 and response.json()["error"]["param"] == "Last-Event-ID"
    response = httpx.get(events_url(sse_gateway, job_id), headers={"Accept": "text/event-stream"}, timeout=10)
    assert response.status_code == 401


def _job_for(gateway: Gateway, tenant: str) -> str:
    client = gateway.client(tenant)
    training = client.files.create(file=("dados.jsonl", chat_jsonl()), purpose="fine-tune")
    return client.fine_tuning.jobs.create(model=SMOLLM2, training_file=training.id).id


def test_a_long_history_is_sent_in_pages_without_gaps(sse_gateway: Gateway) -> None:
    job_id = new_job(sse_gateway)
    add_metrics(sse_gateway, job_id, range(1, 451))  # more than two pages, written within the late-commit window
    finish(sse_gateway, job_id)
    with httpx.stream("GET", events_url(sse_gateway, job_id), headers=headers(sse_gateway), timeout=30) as response:
        stream = read_stream(response)
    assert stream.done
    assert [e["data"]["step"] for e in stream.job_events if e["type"] == "metrics"] == list(range(1, 451))
    assert len(stream.ids) == len(set(stream.ids)) == 453


def test_an_event_committed_late_with_an_earlier_stamp_is_still_delivered_once(sse_gateway: Gateway) -> None:
    """Two writers: one stamps its event, the other stamps AND commits a later one first (the gateway's
    'Cancellation requested' racing a worker's step event). The stream must not skip the late one."""
    from afina.core import ids
    from afina.core.db.models import JobEvent

    job_id = new_job(sse_gateway)
    result: dict[str, Stream] = {}

    def listen() -> None:
        with httpx.stream("GET", events_url(sse_gateway, job_id), headers=headers(sse_gateway),
                          timeout=30) as response:
            result["stream"] = read_stream(response)

    stamped_early = time.time_ns()
    listener = threading.Thread(target=listen)
    listener.start()
    add_metrics(sse_gateway, job_id, range(1, 2))  # stamped after ``stamped_early``, committed first
    time.sleep(0.4)  # the stream has sent step 1: its cursor is past ``stamped_early``
    with sse_gateway.runtime.db.session() as session:
        session.add(JobEvent(id=ids.event_id(), job_id=job_id, seq=stamped_early, created_at=int(time.time()),
                             level="warn", type="message", message="Cancelamento solicitado"))
    time.sleep(0.4)
    finish(sse_gateway, job_id, "cancelled")
    listener.join(30)
    stream = result["stream"]
    messages = [event["message"] for event in stream.job_events]
    assert messages.count("Cancelamento solicitado") == 1, messages
    assert messages.index("Cancelamento solicitado") > messages.index("Step 1/10: training loss=2.4000")
    assert stream.done and len(stream.ids) == len(set(stream.ids))
