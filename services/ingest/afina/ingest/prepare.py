"""The job's ingest stage: find (or make) the dataset versions of its files, and point the job at them.

A file is normally ingested as soon as it is uploaded (``process_file``); the version is
content-addressed by the raw bytes, the options and the job's base model, so this stage
usually finds a committed manifest and reuses it. If the file has not been processed yet
(its worker is busy, or the upload's message was lost), the stage runs the same pipeline
itself and gets the same version. The stage is idempotent: a retried stage finds what the
first attempt committed.

With a ``validation_file`` the training file keeps every example for training, the
validation file becomes the validation split, and a small job-level manifest names the
split objects of both versions.
"""

from __future__ import annotations

import time

from afina.core.artifacts.dataset import DATASET_MANIFEST, SPLIT_NAMES, DatasetManifest, DatasetVersions
from afina.core.catalog import check_model_access
from afina.core.datasets.layout import dataset_prefix
from afina.core.datasets.options import IngestOptions
from afina.core.db import repository as repo
from afina.core.db.models import File, Job
from afina.core.errors import DatasetInvalid, InvalidRequest
from afina.core.queue.jobs import JobContext
from afina.core.runtime import Runtime
from afina.core.training import lifecycle
from afina.ingest.crypto import check_key_env
from afina.ingest.pipeline import IngestFailed, IngestProgress, IngestResult, read_manifest, version_key
from afina.ingest.process_file import options_of, record_failure, record_result, run_ingest, source_of


def job_options(row: File, model: str, role: str) -> IngestOptions:
    """The file's own options for this job: its base model, and the split its role needs."""
    options = options_of(row)
    values = options.model_dump(mode="json")
    if options.base_model is None:
        values["base_model"] = model
    if role == "validation_file":  # all of it is validation: it goes through "train" of its own version
        values.update(split={"proportions": {"train": 1.0}, "min_examples": {}, "split_column": None},
                      min_examples=1)
    elif role == "training_file_with_validation":  # a separate validation file: nothing held out here
        values["split"] = {**values["split"], "proportions": {"train": 1.0}, "min_examples": {"train": 1}}
    return IngestOptions.model_validate(values)


def check_file_options(runtime: Runtime, row: File, options: IngestOptions, param: str) -> None:
    """What the tenant's options name, checked again on the worker before any work: the base model (the
    tenant's own or the operator's, paths only under ``allowed_model_dirs``) and ``encryption.key_env`` (in
    the tenant's set and set here). A refusal names the file parameter and the option."""
    settings = runtime.settings
    try:
        if options.base_model is not None:
            check_model_access(options.base_model, row.tenant_id, settings.allowed_model_dirs, param="base_model")
        check_key_env(options, settings.key_envs_for(row.tenant_id))
    except InvalidRequest as exc:
        raise DatasetInvalid(f"{row.filename}: {exc.message}", rule=exc.code, param=param) from None


def job_base_model(runtime: Runtime, job: Job) -> str:
    """The job's base model resolved as the trainer will (its ``chat_family``, a store model read through the
    store), checked against the operator's ``allowed_model_dirs`` again; its id names it in the options."""
    return lifecycle.job_base_model(job, store=runtime.store, allowed_model_dirs=runtime.settings.allowed_model_dirs).id


def ensure_version(context: JobContext, row: File, options: IngestOptions, param: str) -> IngestResult:
    """The committed version of ``row`` under ``options``: reused if it exists, made otherwise."""
    runtime = context.runtime
    check_file_options(runtime, row, options, param)
    source = source_of(row)
    key = version_key(source, options, runtime.store)
    manifest = read_manifest(runtime.store, key)
    if manifest is not None:
        context.event(f"Reusing prepared dataset {key.rsplit('/', 1)[-1]} of {row.filename} "
                      f"({manifest.examples('train')} training examples)")
        return IngestResult(version_key=key, manifest=manifest, reused=True)
    state = row.ingest_state or {}
    if row.status == "error" and state.get("version") == key:  # the same input already failed the same way
        error = state.get("error") or {}
        raise DatasetInvalid(row.status_details or error.get("message") or "the file failed ingest",
                             rule=error.get("code"), param=param)
    context.event(f"Ingesting {row.filename} ({row.id})")

    def on_progress(event: IngestProgress) -> None:
        if event.stage == "reading":
            context.check_continue()
            context.event(f"Ingest of {row.filename}: {event.rows} rows read, {event.examples} examples kept, "
                          f"{event.issues} issue(s)", data={"ingest": event.as_dict()})

    own_version = version_key(source, options_of(row), runtime.store) == key
    try:
        result = run_ingest(runtime, source, options, on_progress)
    except IngestFailed as exc:
        if own_version and row.status == "uploaded":
            record_failure(runtime, row.id, exc, exc.version_key)
        raise DatasetInvalid(exc.reason, line=exc.line, rule=exc.rule, param=param) from None
    if own_version and row.status == "uploaded":
        record_result(runtime, row.id, result)
    manifest = result.manifest
    context.event(f"Dataset {result.version_key.rsplit('/', 1)[-1]} ready: {manifest.examples('train')} training, "
                  f"{manifest.examples('validation')} validation, {manifest.examples('test')} test examples "
                  f"({result.summary.get('issue_total', 0)} issue(s) in the report)")
    return result


def prepare_dataset(context: JobContext) -> str:
    """Run the ingest stage for a job; returns the next stage (``train``)."""
    runtime = context.runtime
    with runtime.db.session() as session:
        job = repo.get_job(session, None, context.job_id)
        # a file that expired after the job was created is kept while the job runs (afina.core.file_expiry)
        training = repo.get_file(session, job.tenant_id, job.training_file, include_expired=True)
        validation = (repo.get_file(session, job.tenant_id, job.validation_file, include_expired=True)
                      if job.validation_file else None)
    model = job_base_model(runtime, job)
    if validation is None:
        result = ensure_version(context, training, job_options(training, model, "training_file"), "training_file")
        dataset_key = result.version_key
    else:
        context.event(f"Validating training file: {training.id}")
        trained = ensure_version(context, training, job_options(training, model, "training_file_with_validation"),
                                 "training_file")
        context.event(f"Validating validation file: {validation.id}")
        held_out = ensure_version(context, validation, job_options(validation, model, "validation_file"),
                                  "validation_file")
        dataset_key = _combine(context, trained, held_out)
    context.record_dataset(dataset_key)
    context.set_status("queued", message="Files validated; job queued for training")
    return "train"


def _combine(context: JobContext, trained: IngestResult, held_out: IngestResult) -> str:
    """A job-level manifest: train (and test) from the training version, validation from the other file."""
    store = context.runtime.store
    prefix = dataset_prefix(context.tenant_id, trained.version_key, held_out.version_key)
    if read_manifest(store, prefix) is not None:
        return prefix
    splits = {name: entry for name, entry in trained.manifest.splits.items() if name != "validation"}
    validation = held_out.manifest.splits.get("train")
    if validation is not None:
        splits["validation"] = validation
    manifest = DatasetManifest.build(
        format=trained.manifest.format,
        versions=DatasetVersions(training=trained.version_key, validation=held_out.version_key),
        counts={name: splits[name].examples if name in splits else 0 for name in SPLIT_NAMES},
        splits=splits, created_at=int(time.time()))
    manifest.write(store, f"{prefix}/{DATASET_MANIFEST}")  # last: the commit
    return prefix
