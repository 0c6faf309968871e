"""Starting a fine-tuning job from a route's captured exchanges.

The job continues the route's first target: for a fine-tune, ``model`` names it, so the job
trains the same base model from that fine-tune's adapter (``method.supervised.init_from``, set by
``fine_tuning.service.create_job``); for a catalog base model, it starts fresh. Its training file
is the original training data (the route's ``capture.training_file``, else that of the job that
made the first target) with the captured examples appended, uploaded as a user's upload is (the
same sniff, store, registry row and ingest message), so ingest checks it as it checks any file.
Appending works for a JSONL file of OpenAI chat examples; a training file the route names that is
anything else is refused, a default one is left out (the job's first event says so).

The exchanges are taken by a claim (``repository.claim_unused_captures``) before anything is
built: of two triggers at once, one starts the job and the other finds nothing to take. A failure
releases them; success marks them with the job's id. The route is left as it is: the new model is
registered when the job succeeds, and the alias moves only when an operator moves it.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from afina.core.datasets.formats import SNIFF_BYTES
from afina.core.datasets.options import IngestOptions
from afina.core.datasets.sniff import UploadSniffer
from afina.core.db import repository as repo
from afina.core.errors import Conflict, InvalidRequest, NotFound
from afina.core.logging import log_event
from afina.core.routing import RouteCapture, RouteSpec
from afina.core.runtime import Runtime
from afina.core.training import FineTuningRequest
from afina.gateway.captures import dataset
from afina.gateway.files import service as files
from afina.gateway.files.protocol import FileObject
from afina.gateway.files.upload import FLUSH_BYTES, SpooledUpload
from afina.gateway.fine_tuning import service as fine_tuning
from afina.gateway.fine_tuning.protocol import FineTuningJob

log = logging.getLogger("afina.gateway.capture")
ROUTE_METADATA_KEY = "afina_route"
CAPTURED_METADATA_KEY = "afina_captured"
MIN_EXAMPLES = IngestOptions().min_examples  # what ingest asks of a file by default


@dataclass(frozen=True)
class RetrainPlan:
    """What a retraining of one route trains: ``model`` as the job names it, on top of ``training_file`` (named
    in the route's capture settings, or by default the one the first target was trained on)."""

    route: str
    model: str
    training_file: str | None
    capture: RouteCapture
    training_file_named: bool = False


def route_spec(runtime: Runtime, tenant_id: str, name: str) -> RouteSpec:
    with runtime.db.session() as session:
        row = repo.get_route(session, tenant_id, name)
        if row is None:
            raise route_not_found(name)
        return RouteSpec.from_row(row.spec)


def route_not_found(name: str) -> NotFound:
    return NotFound(f"No route named '{name}'.", param="name", code="route_not_found")


def plan_retraining(runtime: Runtime, tenant_id: str, name: str, spec: RouteSpec) -> RetrainPlan:
    """The job a retraining of route ``name`` starts; a 400 when its first target is nothing afina trains."""
    capture = spec.capture or RouteCapture()
    target = spec.targets[0]
    if target.upstream is not None:
        raise InvalidRequest(f"the route {name}'s first target {target.label} is a model of an upstream; afina "
                             "retrains only a model it trains (a fine-tune or a catalog base model): put one first",
                             param="targets.0.model")
    training_file, named = capture.training_file, capture.training_file is not None
    if training_file is None:
        with runtime.db.session() as session:
            model = repo.get_model(session, tenant_id, target.model)
            if model is not None:
                try:
                    training_file = repo.get_job(session, tenant_id, model.job_id).training_file
                except NotFound:  # a model registered without a job of this registry: captured data only
                    training_file = None
    return RetrainPlan(route=name, model=target.model, training_file=training_file, capture=capture,
                       training_file_named=named)


def start_retraining(runtime: Runtime, tenant_id: str, name: str, *,
                     at_least: int | None = None) -> FineTuningJob | None:
    """Start a fine-tuning job on route ``name``'s unused captured exchanges.

    ``at_least``: a trigger's threshold (``retrain_after``): with fewer unused exchanges (another trigger took
    them) nothing starts and None is returned. Without it (an operator asking) any number will do, and none
    is a 409 saying there is nothing new to train on.
    """
    plan = plan_retraining(runtime, tenant_id, name, route_spec(runtime, tenant_id, name))
    claim = repo.new_capture_claim()
    with runtime.db.session() as session:
        claimed = repo.claim_unused_captures(session, tenant_id, name, claim,
                                             stale_after_s=runtime.settings.capture_stale_claim_s)
    if claimed < (at_least or 1):
        _settle(runtime, tenant_id, name, claim, None)
        if at_least is not None:
            return None
        raise Conflict(f"the route {name} has no captured exchange that a job has not used yet; nothing to "
                       "retrain on", param="name", code="nothing_to_retrain")
    uploaded: FileObject | None = None
    try:
        uploaded, examples, left_out = _upload_training_data(runtime, tenant_id, plan, claim)
        job = fine_tuning.create_job(runtime, tenant_id, FineTuningRequest(
            model=plan.model, training_file=uploaded.id, suffix=suffix_for(name),
            metadata={ROUTE_METADATA_KEY: name, CAPTURED_METADATA_KEY: str(examples)}))
    except BaseException:
        _settle(runtime, tenant_id, name, claim, None)
        if uploaded is not None:
            _forget_upload(runtime, tenant_id, uploaded.id)
        raise
    with runtime.db.session() as session:
        repo.settle_capture_claim(session, tenant_id, name, claim, job.id)
        repo.add_event(session, job.id, f"Retraining route {name} on {examples} captured example(s)"
                       + (f" after the training file {plan.training_file}" if left_out is None else
                          f" alone: {left_out}"))
    log_event(log, "capture.retraining_started", tenant=tenant_id, route=name, job_id=job.id, model=plan.model,
              exchanges=claimed, examples=examples, training_file=uploaded.id, original=plan.training_file)
    return job


def suffix_for(name: str) -> str:
    """A job suffix (``[A-Za-z0-9_-]{1,64}``) from a route name: ``support/v2`` -> ``support-v2``."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:64] or "route"


def _settle(runtime: Runtime, tenant_id: str, name: str, claim: str, job_id: str | None) -> None:
    with runtime.db.session() as session:
        repo.settle_capture_claim(session, tenant_id, name, claim, job_id)


def _upload_training_data(runtime: Runtime, tenant_id: str, plan: RetrainPlan,
                          claim: str) -> tuple[FileObject, int, str | None]:
    """The original training data with the claimed examples appended, stored as a fine-tune file; (the file, how
    many captured examples it holds, why the original was left out — None when it was not)."""
    with runtime.db.session() as session:
        rows = repo.captured_exchanges_for_dataset(session, tenant_id, plan.route, claim=claim)
        captured, examples = dataset.chat_jsonl(rows, plan.capture.include_feedback)
    original, options, left_out = b"", None, None
    if plan.training_file is None:
        left_out = "the first target has no training file of this registry"
    else:
        try:
            original, options = _original_training_data(runtime, tenant_id, plan.training_file)
        except InvalidRequest as exc:
            if plan.training_file_named:  # the operator named it: they hear why it cannot be used
                raise
            # the default (the first target's own) is no chat JSONL: the captured data alone, and the job says so
            left_out = exc.message
            log_event(log, "capture.original_left_out", logging.WARNING, tenant=tenant_id, route=plan.route,
                      training_file=plan.training_file, reason=exc.message)
    content = dataset.append_jsonl(original, captured)
    total = dataset.count_lines(content)
    needed = options.min_examples if options is not None else MIN_EXAMPLES
    if total < needed:
        raise InvalidRequest(f"the route {plan.route} has {examples} captured example(s) to train on"
                             f"{' with its training file' if original else ''}, {total} in all; ingest needs at "
                             f"least {needed} (include_feedback={plan.capture.include_feedback!r} leaves out "
                             "answers thumbed down without a correction)", param="name", code="too_few_examples")
    limit = runtime.settings.max_upload_bytes
    if len(content) > limit:
        raise InvalidRequest(f"the retraining data of route {plan.route} is {len(content)} bytes, over the upload "
                             f"limit of {limit} (AFINA_MAX_UPLOAD_BYTES)", param="name", code="file_too_large")
    filename = f"{suffix_for(plan.route)}-captured-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.jsonl"
    return store_bytes(runtime, tenant_id, filename, content, options), examples, left_out


def check_training_file(runtime: Runtime, tenant_id: str, file_id: str,
                        param: str = "capture.training_file") -> tuple[str, IngestOptions]:
    """(its object key, its ingest options) if ``file_id`` is a fine-tune file of the tenant that captured chat
    JSONL lines can be appended to (its first bytes tell); a 400 naming ``param`` otherwise. Another tenant's
    file answers like a missing one."""
    with runtime.db.session() as session:
        try:
            row = repo.get_file(session, tenant_id, file_id)
        except NotFound:
            raise InvalidRequest(f"{param}: the file {file_id} does not exist or you do not have access to it",
                                 param=param, code="invalid_file") from None
        filename, object_key, purpose = row.filename, row.object_key, row.purpose
        options = IngestOptions.model_validate(row.ingest_options or {})
    if purpose != "fine-tune":
        raise InvalidRequest(f"{param}: the file {file_id} has purpose {purpose!r}, not 'fine-tune'", param=param,
                             code="invalid_file")
    head = b"".join(runtime.store.iter_chunks(object_key, 0, SNIFF_BYTES))
    dataset.check_appendable(head, filename, options, file_id, param)
    return object_key, options


def _original_training_data(runtime: Runtime, tenant_id: str, file_id: str) -> tuple[bytes, IngestOptions]:
    """The original training file's bytes and ingest options, checked to take appended chat JSONL lines."""
    object_key, options = check_training_file(runtime, tenant_id, file_id)
    return runtime.store.get_bytes(object_key), options


def store_bytes(runtime: Runtime, tenant_id: str, filename: str, content: bytes,
                options: IngestOptions | None) -> FileObject:
    """Store ``content`` as a fine-tune file exactly as an upload of it would be: the upload's sniff, then
    ``files.service.store_upload`` (object, row, ingest message)."""
    sniffer = UploadSniffer(filename, options)
    for start in range(0, len(content), FLUSH_BYTES):
        sniffer.feed(content[start:start + FLUSH_BYTES])
    sniffer.finish()
    spool_dir = runtime.settings.resolved_work_dir / "uploads"  # the upload spool: a crashed gateway's is swept
    spool_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=spool_dir, prefix="upload-", suffix=".part")
    upload = SpooledUpload(path=Path(name), filename=filename, size=len(content), fields={"purpose": "fine-tune"})
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
        return files.store_upload(runtime, tenant_id, upload, options, sniffer.container)
    finally:
        upload.discard()


def _forget_upload(runtime: Runtime, tenant_id: str, file_id: str) -> None:
    """Remove the file a failed retraining stored (best effort: a leftover is only an unused file)."""
    try:
        files.delete_file(runtime, tenant_id, file_id)
    except Exception as exc:  # noqa: BLE001 - the retraining's own error is the one to report
        log_event(log, "capture.upload_cleanup_failed", logging.WARNING, file_id=file_id, error=type(exc).__name__)
