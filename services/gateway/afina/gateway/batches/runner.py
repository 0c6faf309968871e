"""The ``batch`` stage: a batch's input lines answered one by one through the gateway's own serving stack.

Read top to bottom, ``run_batch`` is the whole story:

1. the job's ``BatchSpec`` names the input file and the endpoint; its ``progress`` says how many lines a
   previous attempt finished (their answers are in the store's partial files), so a resumed batch starts there;
2. each line is checked (JSON, ``custom_id`` present and unique, ``method`` POST, ``url`` the batch's
   endpoint, a body the endpoint accepts) and answered by the same services as ``/v1/chat/completions`` and
   ``/v1/completions`` (same models, routes, backends, observers), as the key that created the batch;
   a line that fails goes to the error file, the rest go on;
3. after every line the answers are written to the store, then the progress to the job row (fenced by the
   lease): a killed worker loses at most the line it was answering;
4. cancellation and the completion window are checked between requests: a cancelled batch keeps what finished
   in its files; a batch past its window (``expires_at``) expires as OpenAI's do — what finished stays in the
   output file, each request not run goes to the error file as ``batch_expired``;
5. at the end the output and error files are registered (purpose ``batch_output``, expiring
   ``output_expires_after`` after their creation when the batch asked for it) and the batch completes,
   with the tokens of its answered requests summed (the Batch's ``usage``).

The serving stack lives on one event loop thread per worker process (``ServingLoop``), so a model stays loaded
from one batch to the next.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from pydantic import ValidationError
from sqlalchemy.orm import Session

from afina.core.batches import BATCH_OUTPUT_PURPOSE, BatchProgress, BatchSpec, batch_prefix
from afina.core.db import repository as repo
from afina.core.db.models import Job, now
from afina.core.errors import AfinaError
from afina.core.keys import KeyGrant
from afina.core.logging import log_event
from afina.core.queue.jobs import JobCancelled, JobContext
from afina.core.runtime import Runtime
from afina.gateway.chat import service as chat_service
from afina.gateway.chat.protocol import ChatCompletionRequest
from afina.gateway.completions import service as completions_service
from afina.gateway.completions.protocol import CompletionRequest
from afina.gateway.serving.dispatch import Dispatcher
from afina.gateway.serving.stack import ServingStack, build_serving

log = logging.getLogger("afina.batches")
T = TypeVar("T")


class LineRefused(Exception):
    """An input line the batch cannot run (before any model is asked): it goes to the error file."""

    def __init__(self, code: str, message: str, custom_id: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.custom_id = code, message, custom_id


class BatchExpired(Exception):
    """The batch's completion window ran out before its last request: it stops between requests."""


EXPIRED_ERROR = {"code": "batch_expired",
                 "message": "This request could not be executed before the completion window expired."}


@dataclass
class BatchLine:
    custom_id: str
    body: dict[str, Any]


def parse_line(raw: bytes, endpoint: str, seen: set[str]) -> BatchLine:
    """One input line checked as OpenAI documents it: ``{custom_id, method: "POST", url, body}``."""
    try:
        item = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise LineRefused("invalid_json", f"the line is not valid JSON: {exc}") from None
    if not isinstance(item, dict):
        raise LineRefused("invalid_request", "the line is not a JSON object")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise LineRefused("missing_custom_id", "the line has no custom_id (a non-empty string)")
    if custom_id in seen:
        raise LineRefused("duplicate_custom_id", f"custom_id {custom_id!r} is used by an earlier line; each "
                                                 f"line needs its own", custom_id)
    seen.add(custom_id)
    if item.get("method", "POST") != "POST":
        raise LineRefused("invalid_method", f"method {item.get('method')!r} is not supported; use POST", custom_id)
    if item.get("url") != endpoint:
        raise LineRefused("invalid_url", f"url {item.get('url')!r} does not match the batch's endpoint "
                                         f"{endpoint!r}", custom_id)
    body = item.get("body")
    if not isinstance(body, dict):
        raise LineRefused("invalid_body", "the line has no body object", custom_id)
    if body.get("stream"):
        raise LineRefused("invalid_body", "a batch request cannot stream; leave stream unset", custom_id)
    return BatchLine(custom_id=custom_id, body=body)


async def answer(dispatcher: Dispatcher, caller: KeyGrant, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    """The endpoint's JSON answer to ``body``, computed by the same service functions as its HTTP route."""
    if endpoint == "/v1/chat/completions":
        chat = ChatCompletionRequest.model_validate(body)
        plan = await dispatcher.plan(caller.tenant_id, chat.model, chat.user)
        completion, _answered = await chat_service.complete(dispatcher, caller, plan, chat)
        return completion.model_dump(mode="json")
    request = CompletionRequest.model_validate(body)
    plan = await dispatcher.plan(caller.tenant_id, request.model, request.user)
    text_completion, _answered = await completions_service.complete(dispatcher, caller, plan, request)
    return text_completion.model_dump(mode="json")


def _request_id() -> str:
    return f"req_{secrets.token_hex(16)}"


def output_line(custom_id: str, status_code: int, body: dict[str, Any]) -> dict[str, Any]:
    return {"id": f"batch_req_{secrets.token_hex(12)}", "custom_id": custom_id,
            "response": {"status_code": status_code, "request_id": _request_id(), "body": body}, "error": None}


def refused_line(refused: LineRefused) -> dict[str, Any]:
    return {"id": f"batch_req_{secrets.token_hex(12)}", "custom_id": refused.custom_id, "response": None,
            "error": {"code": refused.code, "message": refused.message}}


def _validation_body(exc: ValidationError) -> dict[str, Any]:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": str(exc)}
    param = ".".join(str(part) for part in first.get("loc", ())) or None
    return {"error": {"message": f"{param or 'body'}: {first.get('msg')}", "type": "invalid_request_error",
                      "param": param, "code": "invalid_request"}}


@dataclass
class Results:
    """The answers so far (``outputs`` go to the output file, ``errors`` to the error file) and the progress."""

    progress: BatchProgress
    outputs: list[bytes] = field(default_factory=list)
    errors: list[bytes] = field(default_factory=list)

    def add(self, line: dict[str, Any], ok: bool) -> None:
        (self.outputs if ok else self.errors).append(orjson.dumps(line) + b"\n")
        if ok:
            self.progress.completed += 1
            usage = (line["response"]["body"] or {}).get("usage") or {}
            self.progress.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.progress.completion_tokens += int(usage.get("completion_tokens") or 0)
        else:
            self.progress.failed += 1
        self.progress.lines_done += 1


def expired_line(raw: bytes) -> dict[str, Any]:
    """A request the window left unrun, for the error file (its ``custom_id`` when the line has one)."""
    try:
        item = orjson.loads(raw)
    except orjson.JSONDecodeError:
        item = None
    custom_id = item.get("custom_id") if isinstance(item, dict) else None
    return {"id": f"batch_req_{secrets.token_hex(12)}", "custom_id": custom_id if isinstance(custom_id, str) else None,
            "response": None, "error": dict(EXPIRED_ERROR)}


def _partial_keys(prefix: str) -> tuple[str, str]:
    return f"{prefix}/output.partial.jsonl", f"{prefix}/errors.partial.jsonl"


def _resume(context: JobContext, prefix: str, progress: BatchProgress) -> Results:
    """What an earlier attempt finished: the partial files cut to the recorded counts (a line written to the
    store whose progress never reached the database is answered again)."""
    results = Results(progress=progress)
    if progress.lines_done == 0:
        return results
    store = context.runtime.store
    output_key, errors_key = _partial_keys(prefix)
    for key, kept, target in ((output_key, progress.completed, results.outputs),
                              (errors_key, progress.failed, results.errors)):
        if kept:
            target.extend(line + b"\n" for line in store.get_bytes(key).splitlines()[:kept])
    context.event(f"Resuming the batch after line {progress.lines_done} of {progress.total}")
    return results


def _record(context: JobContext, progress: BatchProgress, *, finish: dict[str, Any] | None = None) -> None:
    """The progress (and with ``finish`` the batch's outcome) on the job row; a cancel's time stays as the
    gateway wrote it."""
    def change(session: Session, job: Job) -> None:
        spec = BatchSpec.of_job(job)
        progress.cancelling_at = spec.progress.cancelling_at
        spec.progress = progress.model_copy()
        job.method = spec.method()
        if finish is not None and job.status not in repo.TERMINAL_STATUSES:
            repo.set_status(session, job, **finish)

    context.write(change, "batch progress")


def _save_partials(context: JobContext, prefix: str, results: Results) -> None:
    store = context.runtime.store
    output_key, errors_key = _partial_keys(prefix)
    store.put_bytes(output_key, b"".join(results.outputs))
    store.put_bytes(errors_key, b"".join(results.errors))


def _publish(context: JobContext, spec: BatchSpec, prefix: str, results: Results) -> None:
    """The output and error files (each only when it has a line), registered as the tenant's files; with the
    batch's ``output_expires_after`` each expires that long after its creation (on the database's clock)."""
    store = context.runtime.store
    progress = results.progress
    progress.finalizing_at = progress.finalizing_at or now()
    _record(context, progress)
    for lines, name, attribute in ((results.outputs, "output", "output_file_id"),
                                   (results.errors, "errors", "error_file_id")):
        if not lines:
            continue
        key = f"{prefix}/{name}.jsonl"
        info = store.put_bytes(key, b"".join(lines))
        with context.runtime.db.session() as session:
            row = repo.add_result_file(session, context.tenant_id, object_key=key,
                                       filename=f"{context.job_id}_{name}.jsonl", size=info.size,
                                       sha256=info.sha256 or "")
            row.purpose, row.status = BATCH_OUTPUT_PURPOSE, "processed"
            if row in session.new:  # a re-run's publish keeps the file's first creation and expiry
                expiry = spec.output_expires_after
                repo.start_file_clock(session, row, expiry.seconds if expiry is not None else None)
            session.flush()
            setattr(progress, attribute, row.id)


class ServingLoop:
    """One event loop thread and one serving stack per worker process (and runtime): the model a batch loaded
    answers the next batch without loading again, as it does in the gateway's own process."""

    def __init__(self, runtime: Runtime) -> None:
        self.stack: ServingStack = build_serving(runtime)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="batch-serving", daemon=True)
        self.thread.start()

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` on the loop and wait for it (its exception, ``JobCancelled`` included, is raised here)."""
        return asyncio.run_coroutine_threadsafe(work, self.loop).result()


_loops: dict[int, tuple[Runtime, ServingLoop]] = {}
_loops_lock = threading.Lock()


def serving_loop(runtime: Runtime) -> ServingLoop:
    with _loops_lock:
        held = _loops.get(id(runtime))
        if held is None or held[0] is not runtime:
            held = _loops[id(runtime)] = (runtime, ServingLoop(runtime))
        return held[1]


def run_batch(context: JobContext) -> None:
    context.cancel_poll_s = 0.0  # a request costs far more than reading the flag: a cancel stops at the next line
    job = context.snapshot()
    spec = BatchSpec.of_job(job)
    runtime = context.runtime
    prefix = batch_prefix(context.tenant_id, context.job_id)
    with runtime.db.session() as session:
        # an expired input file is kept while its batch runs (afina.core.file_expiry)
        input_key = repo.get_file(session, context.tenant_id, spec.input_file_id, include_expired=True).object_key
    lines = [line for line in runtime.store.get_bytes(input_key).splitlines() if line.strip()]
    progress = spec.progress
    progress.total = len(lines)
    if progress.in_progress_at is None:
        progress.in_progress_at = now()
        context.set_status("running", f"Batch started: {len(lines)} request(s) to {spec.endpoint}")
    results = _resume(context, prefix, progress)
    _record(context, progress)
    caller = KeyGrant(tenant_id=context.tenant_id, prefix=spec.key_prefix or "batch", scopes=("inference",))
    expires_at = spec.expires_at(job.created_at)
    try:
        serving_loop(runtime).run(_answer_lines(context, spec, caller, lines, results, prefix, expires_at))
    except BatchExpired:
        _expire(context, spec, prefix, results, lines)
        return
    except JobCancelled:
        _publish(context, spec, prefix, results)
        _record(context, results.progress, finish={"status": "cancelled", "message": (
            f"Batch cancelled after {results.progress.lines_done} of {results.progress.total} request(s)")})
        raise
    _publish(context, spec, prefix, results)
    counts = results.progress
    _record(context, counts, finish={"status": "succeeded", "message": (
        f"Batch completed: {counts.completed} request(s) answered, {counts.failed} failed")})
    log_event(log, "batch.completed", batch=context.job_id, completed=counts.completed, failed=counts.failed)


def _expire(context: JobContext, spec: BatchSpec, prefix: str, results: Results, lines: list[bytes]) -> None:
    """The window ran out: every request not run goes to the error file as ``batch_expired``, what finished is
    published, and the batch stops (``expired``; its job row ``cancelled``, with ``expired_at`` set)."""
    progress = results.progress
    left = lines[progress.lines_done:]
    for raw in left:
        results.add(expired_line(raw), False)
    progress.expired_at = progress.expired_at or now()
    _save_partials(context, prefix, results)
    _publish(context, spec, prefix, results)
    _record(context, progress, finish={"status": "cancelled", "message": (
        f"Batch expired: its completion window ended after {progress.completed} request(s) answered; "
        f"{len(left)} not run went to the error file as batch_expired")})
    log_event(log, "batch.expired", batch=context.job_id, completed=progress.completed, expired=len(left))


async def _answer_lines(context: JobContext, spec: BatchSpec, caller: KeyGrant, lines: list[bytes],
                        results: Results, prefix: str, expires_at: int) -> None:
    dispatcher = serving_loop(context.runtime).stack.dispatcher
    seen: set[str] = set()
    for raw in lines[:results.progress.lines_done]:  # the custom_ids finished lines used, for the duplicate check
        try:
            parse_line(raw, spec.endpoint, seen)
        except LineRefused:
            pass
    for raw in lines[results.progress.lines_done:]:
        context.check_continue()  # cancel, lease lost, or a draining worker: stop between requests
        if now() >= expires_at:
            raise BatchExpired
        results.add(*await _answer_line(dispatcher, caller, spec.endpoint, raw, seen))
        _save_partials(context, prefix, results)
        _record(context, results.progress)


async def _answer_line(dispatcher: Dispatcher, caller: KeyGrant, endpoint: str, raw: bytes,
                       seen: set[str]) -> tuple[dict[str, Any], bool]:
    try:
        line = parse_line(raw, endpoint, seen)
    except LineRefused as refused:
        return refused_line(refused), False
    try:
        return output_line(line.custom_id, 200, await answer(dispatcher, caller, endpoint, line.body)), True
    except ValidationError as exc:
        return output_line(line.custom_id, 400, _validation_body(exc)), False
    except AfinaError as exc:
        return output_line(line.custom_id, exc.http_status, exc.to_openai()), False
