"""``/v1/batches`` end to end: the official ``openai`` client uploads a ``purpose=batch`` file, creates a batch,
polls it while a worker answers it through the gateway's serving stack (the in-process SmolLM2 model), and
reads the output and error files; bad lines go to the error file, a killed worker resumes without running
finished lines again, a cancel stops between requests, and another tenant sees none of it."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
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


def test_an_inference_key_runs_a_batch_with_its_files_but_not_training_data(gateway: Gateway, acme: Any,
                                                                           upload: Any) -> None:
    """OpenAI counts a batch's input, output and error files as batch usage: the inference scope uploads and
    reads them; training data (upload, read, ingest views) stays with the fine-tune scope."""
    from afina.core.db import repository as repo

    with gateway.runtime.db.session() as session:
        inference_key = repo.create_api_key(session, "acme", scopes=["inference"])
        fine_tune_key = repo.create_api_key(session, "acme", scopes=["fine-tune"])
    inference = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=inference_key, max_retries=0, timeout=120)
    fine_tune = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=fine_tune_key, max_retries=0, timeout=120)

    content = chat_line("ok", "Say hi.") + b"\n" + b"{broken\n"
    input_file = inference.files.create(file=("requests.jsonl", content), purpose="batch")
    assert input_file.purpose == "batch" and inference.files.retrieve(input_file.id).id == input_file.id
    batch = inference.batches.create(input_file_id=input_file.id, endpoint=CHAT, completion_window="24h")
    assert run_worker(gateway, batch.id) == "done"
    done = inference.batches.retrieve(batch.id)
    assert done.status == "completed" and done.output_file_id and done.error_file_id
    assert [line["custom_id"] for line in lines_of(inference, done.output_file_id)] == ["ok"]
    assert [line["error"]["code"] for line in lines_of(inference, done.error_file_id)] == ["invalid_json"]
    listed = {item.id: item.purpose for item in inference.files.list().data}
    assert {input_file.id, done.output_file_id, done.error_file_id} <= set(listed)
    assert set(listed.values()) <= {"batch", "batch_output"}  # acme's training files are not shown to it

    training = upload()  # acme's all-scopes key: a fine-tune file
    with pytest.raises(openai.PermissionDeniedError) as refused:
        inference.files.create(file=("train.jsonl", b'{"messages": []}\n'), purpose="fine-tune")
    assert "'fine-tune' scope" in refused.value.message and "purpose 'fine-tune'" in refused.value.message
    for read in (inference.files.retrieve, inference.files.content, inference.files.delete):
        with pytest.raises(openai.PermissionDeniedError):
            read(training.id)
    ingest = httpx.get(f"{gateway.url}/v1/files/{input_file.id}/ingest",
                       headers={"Authorization": f"Bearer {inference_key}"})
    assert ingest.status_code == 403, ingest.text
    assert acme.files.retrieve(training.id).id == training.id  # refused above, so not deleted

    # a fine-tune key keeps its uploads (training data, and batch files as before) but cannot run a batch
    assert fine_tune.files.create(file=("t.jsonl", b'{"messages": []}\n'), purpose="fine-tune").purpose == "fine-tune"
    kept = fine_tune.files.create(file=("r.jsonl", chat_line("a", "Hi.") + b"\n"), purpose="batch")
    with pytest.raises(openai.PermissionDeniedError):
        fine_tune.batches.create(input_file_id=kept.id, endpoint=CHAT, completion_window="24h")
    # another tenant's inference key still sees none of acme's batch files
    with gateway.runtime.db.session() as session:
        globex_key = repo.create_api_key(session, "globex", scopes=["inference"])
    globex = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=globex_key, max_retries=0, timeout=120)
    with pytest.raises(openai.NotFoundError):
        globex.files.content(done.output_file_id)


def test_usage_sums_the_answered_requests_tokens_and_output_expires_after_is_accepted(gateway: Gateway,
                                                                                    acme: Any) -> None:
    content = b"\n".join([chat_line("a", "Say hi."), chat_line("b", "Count: 1, 2,"), b"{broken"]) + b"\n"
    input_file = acme.files.create(file=("r.jsonl", content), purpose="batch")
    batch = acme.batches.create(input_file_id=input_file.id, endpoint=CHAT, completion_window="24h",
                                output_expires_after={"anchor": "created_at", "seconds": 7200})
    assert batch.expires_at == batch.created_at + 24 * 3600
    assert batch.usage is not None and batch.usage.total_tokens == 0
    assert run_worker(gateway, batch.id) == "done"
    done = acme.batches.retrieve(batch.id)
    bodies = [line["response"]["body"] for line in lines_of(acme, done.output_file_id)]
    prompt = sum(body["usage"]["prompt_tokens"] for body in bodies)
    completion = sum(body["usage"]["completion_tokens"] for body in bodies)
    assert len(bodies) == 2 and prompt > 0 and completion > 0
    usage = done.usage
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (prompt, completion, prompt + completion)
    assert usage.input_tokens_details.cached_tokens == 0 and usage.output_tokens_details.reasoning_tokens == 0
    for bad in ({"anchor": "created_at", "seconds": 60}, {"anchor": "last_active_at", "seconds": 7200}):
        with pytest.raises(openai.BadRequestError) as caught:
            acme.batches.create(input_file_id=input_file.id, endpoint=CHAT, completion_window="24h",
                                output_expires_after=bad)  # type: ignore[arg-type]
        assert "output_expires_after" in str(caught.value.body)


def test_a_batch_past_its_window_expires_and_keeps_its_partial_output(gateway: Gateway, acme: Any,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """As OpenAI's: the window runs out between requests; what finished stays in the output file, every request
    not run is in the error file as ``batch_expired``, and the batch is ``expired`` with ``expired_at``."""
    from afina.core.db.models import now
    from afina.gateway.batches import runner

    content = b"\n".join(chat_line(f"line-{index}", f"Say {index}.") for index in range(3)) + b"\n"
    input_file = acme.files.create(file=("r.jsonl", content), purpose="batch")
    batch = acme.batches.create(input_file_id=input_file.id, endpoint=CHAT, completion_window="24h")
    real = runner._answer_line

    async def the_day_passes_during_the_first(dispatcher: Any, caller: Any, endpoint: str, raw: bytes,
                                              seen: set[str]) -> Any:
        answered = await real(dispatcher, caller, endpoint, raw, seen)
        monkeypatch.setattr(runner, "now", lambda: now() + 24 * 3600 + 60)  # the worker's clock, a day later
        return answered

    monkeypatch.setattr(runner, "_answer_line", the_day_passes_during_the_first)
    assert run_worker(gateway, batch.id) == "done"
    done = acme.batches.retrieve(batch.id)
    assert done.status == "expired" and done.expired_at and done.expired_at >= done.expires_at
    assert done.cancelled_at is None and done.completed_at is None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (3, 1, 2)
    assert [line["custom_id"] for line in lines_of(acme, done.output_file_id)] == ["line-0"]
    assert done.usage.output_tokens > 0  # the answered request's tokens count
    errors = lines_of(acme, done.error_file_id)
    assert [(line["custom_id"], line["error"]["code"], line["response"]) for line in errors] == [
        ("line-1", "batch_expired", None), ("line-2", "batch_expired", None)]
    with pytest.raises(openai.ConflictError):
        acme.batches.cancel(batch.id)
    messages = [event.message for event in acme.fine_tuning.jobs.list_events(batch.id, limit=50).data]
    assert any(message.startswith("Batch expired") for message in messages)
