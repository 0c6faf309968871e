"""``/v1/batches`` end to end: the official ``openai`` client uploads a ``purpose=batch`` file, creates a batch,
polls it while a worker answers it through the gateway's serving stack (the in-process SmolLM2 model), and
reads the output and error files; bad lines go to the error file, a killed worker resumes without running
finished lines again, a cancel stops between requests, and another tenant sees none of it."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import openai
import pytest

from tests.integration.gateway.conftest import SMOLLM2, Gateway

CHAT = "/v1/chat/completions"


def chat_line(custom_id: str | None, content: str, *, model: str = SMOLLM2, url: str = CHAT) -> bytes:
    line: dict[str, Any] = {"method": "POST", "url": url,
                            "body": {"model": model, "max_tokens": 2, "temperature": 0,
                                     "messages": [{"role": "user", "content": content}]}}
    if custom_id is not None:
        line["custom_id"] = custom_id
    return json.dumps(line).encode()


def run_worker(gateway: Gateway, batch_id: str) -> str:
    """One delivery of the batch's message, as the ``batcher`` worker's task runs it."""
    from afina.core.queue.jobs import run_stage
    from afina.gateway.batches.runner import run_batch

    return run_stage(gateway.runtime, batch_id, "batch", run_batch)


def poll(client: Any, batch_id: str, statuses: set[str], timeout_s: float = 180) -> Any:
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        seen.append(batch.status)
        if batch.status in statuses:
            return batch, seen
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} never reached {statuses}; saw {seen[-5:]}")


def lines_of(client: Any, file_id: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def test_openai_client_drives_a_batch_end_to_end(gateway: Gateway, acme: Any, globex: Any) -> None:
    good = [chat_line("good-1", "Say hi."), chat_line("good-2", "Count: 1, 2,")]
    bad = [b"{not json", chat_line(None, "No id."), chat_line("good-1", "Same id again."),
           chat_line("wrong-url", "Hi.", url="/v1/completions"),
           chat_line("foreign-model", "Hi.", model="ft:smollm2-135m-instruct:globex:secret:ftjob-" + "cd" * 12)]
    content = b"\n".join([good[0], *bad[:2], good[1], *bad[2:]]) + b"\n"
    input_file = acme.files.create(file=("requests.jsonl", content), purpose="batch")
    assert input_file.purpose == "batch" and input_file.status == "processed"

    batch = acme.batches.create(input_file_id=input_file.id, endpoint=CHAT, completion_window="24h",
                                metadata={"run": "e2e"})
    assert batch.id.startswith("batch_") and batch.object == "batch" and batch.status == "validating"
    assert batch.metadata == {"run": "e2e"} and batch.expires_at == batch.created_at + 24 * 3600

    worker = threading.Thread(target=run_worker, args=(gateway, batch.id))
    worker.start()
    done, seen = poll(acme, batch.id, {"completed", "failed"})
    worker.join(timeout=60)
    assert done.status == "completed", done.errors
    assert done.request_counts.total == 7 and done.request_counts.completed == 2 and done.request_counts.failed == 5
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    assert "in_progress" in seen or "finalizing" in seen or seen[0] == "completed"

    outputs = lines_of(acme, done.output_file_id)
    assert [line["custom_id"] for line in outputs] == ["good-1", "good-2"]
    for line in outputs:
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200 and line["response"]["request_id"]
        body = line["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == SMOLLM2
        assert body["usage"]["completion_tokens"] <= 2
    errors = {(line["custom_id"], (line["error"] or {}).get("code"), (line["response"] or {}).get("status_code"))
              for line in lines_of(acme, done.error_file_id)}
    assert errors == {(None, "invalid_json", None), (None, "missing_custom_id", None),
                      ("good-1", "duplicate_custom_id", None), ("wrong-url", "invalid_url", None),
                      ("foreign-model", None, 404)}
    assert acme.files.retrieve(done.output_file_id).purpose == "batch_output"

    # a batch is tracked like every job: its events say what happened
    messages = [event.message for event in acme.fine_tuning.jobs.list_events(batch.id, limit=50).data]
    assert any(message.startswith("Batch completed: 2 request(s) answered, 5 failed") for message in messages)
    with pytest.raises(openai.NotFoundError):
        globex.fine_tuning.jobs.list_events(batch.id)

    listed = acme.batches.list(limit=100)
    assert batch.id in [item.id for item in listed.data]
    # tenant isolation: globex sees neither the batch nor its files, and cannot batch acme's file
    with pytest.raises(openai.NotFoundError):
        globex.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        globex.batches.cancel(batch.id)
    with pytest.raises(openai.NotFoundError):
        globex.files.content(done.output_file_id)
    with pytest.raises(openai.NotFoundError):
        globex.batches.create(input_file_id=input_file.id, endpoint=CHAT, completion_window="24h")
    assert batch.id not in [item.id for item in globex.batches.list().data]


def test_a_fine_tune_file_or_a_bad_endpoint_is_refused(acme: Any, upload: Any) -> None:
    training = upload()
    with pytest.raises(openai.BadRequestError, match="purpose 'batch'"):
        acme.batches.create(input_file_id=training.id, endpoint=CHAT, completion_window="24h")
    requests = acme.files.create(file=("r.jsonl", chat_line("a", "Hi.") + b"\n"), purpose="batch")
    with pytest.raises(openai.BadRequestError):
        acme.batches.create(input_file_id=requests.id, endpoint="/v1/embeddings",  # type: ignore[arg-type]
                            completion_window="24h")


def test_a_killed_worker_resumes_without_rerunning_finished_lines(gateway: Gateway, acme: Any,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy import update

    from afina.core.db.models import Job
    from afina.gateway.batches import runner

    content = b"\n".join(chat_line(f"line-{index}", f"Say {index}.") for index in range(3)) + b"\n"
    input_file = acme.files.create(file=("r.jsonl", content), purpose="batch")
    batch = acme.batches.create(input_file_id=input_file.id, endpoint=CHAT, completion_window="24h")
    answered: list[bytes] = []
    real = runner._answer_line

    class Killed(BaseException):
        """The worker process dying mid-request (not an error the stage could record)."""

    async def dies_on_the_second(dispatcher: Any, caller: Any, endpoint: str, raw: bytes, seen: set[str]) -> Any:
        if len(answered) == 1:
            raise Killed
        answered.append(raw)
        return await real(dispatcher, caller, endpoint, raw, seen)

    monkeypatch.setattr(runner, "_answer_line", dies_on_the_second)
    with pytest.raises(Killed):
        run_worker(gateway, batch.id)
    midway = acme.batches.retrieve(batch.id)
    assert midway.status == "in_progress" and midway.request_counts.completed == 1

    with gateway.runtime.db.session() as session:  # the lease of the dead worker runs out
        session.execute(update(Job).where(Job.id == batch.id).values(lease_expires_at=0))

    async def counts(dispatcher: Any, caller: Any, endpoint: str, raw: bytes, seen: set[str]) -> Any:
        answered.append(raw)
        return await real(dispatcher, caller, endpoint, raw, seen)

    monkeypatch.setattr(runner, "_answer_line", counts)
    assert run_worker(gateway, batch.id) == "done"
    assert [json.loads(raw)["custom_id"] for raw in answered] == ["line-0", "line-1", "line-2"]
    done = acme.batches.retrieve(batch.id)
    assert done.status == "completed" and done.request_counts.completed == 3
    assert [line["custom_id"] for line in lines_of(acme, done.output_file_id)] == ["line-0", "line-1", "line-2"]
    assert done.error_file_id is None


def test_cancel_stops_between_requests_and_keeps_what_finished(gateway: Gateway, acme: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from afina.gateway.batches import runner

    content = b"\n".join(chat_line(f"line-{index}", f"Say {index}.") for index in range(4)) + b"\n"
    input_file = acme.files.create(file=("r.jsonl", content), purpose="batch")
    batch = acme.batches.create(input_file_id=input_file.id, endpoint=CHAT, completion_window="24h")
    real = runner._answer_line
    cancelled: list[Any] = []

    async def cancels_during_the_first(dispatcher: Any, caller: Any, endpoint: str, raw: bytes,
                                       seen: set[str]) -> Any:
        if not cancelled:
            cancelled.append(await __import__("asyncio").to_thread(acme.batches.cancel, batch.id))
        return await real(dispatcher, caller, endpoint, raw, seen)

    monkeypatch.setattr(runner, "_answer_line", cancels_during_the_first)
    assert run_worker(gateway, batch.id) == "cancelled"
    assert cancelled[0].status == "cancelling" and cancelled[0].cancelling_at
    done = acme.batches.retrieve(batch.id)
    assert done.status == "cancelled" and done.cancelled_at and done.request_counts.completed == 1
    assert [line["custom_id"] for line in lines_of(acme, done.output_file_id)] == ["line-0"]
    with pytest.raises(openai.ConflictError):
        acme.batches.cancel(batch.id)

    queued = acme.batches.create(input_file_id=input_file.id, endpoint=CHAT, completion_window="24h")
    assert acme.batches.cancel(queued.id).status == "cancelled"  # no worker holds it: cancelled at once
    assert run_worker(gateway, queued.id) == "skipped"


def test_a_completions_batch_answers_raw_prompts(gateway: Gateway, acme: Any) -> None:
    line = {"custom_id": "p-1", "method": "POST", "url": "/v1/completions",
            "body": {"model": SMOLLM2, "prompt": "1, 2, 3,", "max_tokens": 2, "temperature": 0}}
    input_file = acme.files.create(file=("p.jsonl", json.dumps(line).encode() + b"\n"), purpose="batch")
    batch = acme.batches.create(input_file_id=input_file.id, endpoint="/v1/completions", completion_window="24h")
    assert run_worker(gateway, batch.id) == "done"
    done = acme.batches.retrieve(batch.id)
    assert done.status == "completed" and done.request_counts.total == done.request_counts.completed == 1
    [output] = lines_of(acme, done.output_file_id)
    assert output["custom_id"] == "p-1" and output["response"]["body"]["object"] == "text_completion"
    assert output["response"]["body"]["choices"][0]["text"]
