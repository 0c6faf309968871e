"""The ingest stage: validate, normalize, deduplicate, split, and commit with a manifest.

The manifest is written last: a dataset prefix without ``manifest.json`` is an
unfinished attempt, and a retried stage starts it over; one with a manifest is
reused as it is (the stage is idempotent).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from afina.core.datasets.layout import dataset_prefix
from afina.core.db import repository as repo
from afina.core.errors import DatasetInvalid, ObjectMissing
from afina.core.queue.jobs import JobContext
from afina.core.store import ArtifactStore
from afina.ingest.split import is_validation, record_digest, validation_fraction_for
from afina.ingest.validate import MIN_EXAMPLES, RowProblem, check_example, normalize_example, parse_line

log = logging.getLogger("afina.ingest")
MAX_REPORTED_PROBLEMS = 20


def iter_object_lines(store: ArtifactStore, key: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line bytes) for every non-blank line of a stored object."""
    pending = b""
    number = 0
    for chunk in store.iter_chunks(key):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            number += 1
            if line.strip():
                yield number, line.rstrip(b"\r")
    if pending.strip():
        yield number + 1, pending.rstrip(b"\r")


def load_examples(store: ArtifactStore, key: str, filename: str) -> list[dict[str, Any]]:
    """Every example of a file, normalized; ``DatasetInvalid`` naming the first bad line otherwise."""
    problems: list[RowProblem] = []
    examples: list[dict[str, Any]] = []
    for line_number, raw in iter_object_lines(store, key):
        value, problem = parse_line(raw, line_number)
        found = [problem] if problem else check_example(value, line_number)
        if found:
            problems.extend(found)
            if len(problems) >= MAX_REPORTED_PROBLEMS:
                break
            continue
        examples.append(normalize_example(value))
    if problems:
        first = problems[0]
        more = f" ({len(problems) - 1} more problem(s): " + "; ".join(p.describe() for p in problems[1:5]) + ")" \
            if len(problems) > 1 else ""
        raise DatasetInvalid(f"{filename}: {first.message} [field {first.field}]{more}", line=first.line,
                             rule=first.rule, param="training_file")
    return examples


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "wb") as handle:
        for record in records:
            handle.write(orjson.dumps(record) + b"\n")


def prepare_dataset(context: JobContext) -> str:
    """Run the ingest stage for a job; returns the next stage (``train``)."""
    runtime = context.runtime
    store = runtime.store
    with runtime.db.session() as session:
        job = repo.get_job(session, None, context.job_id)
        training = repo.get_file(session, job.tenant_id, job.training_file)
        validation = repo.get_file(session, job.tenant_id, job.validation_file) if job.validation_file else None
    prefix = dataset_prefix(context.tenant_id, training.id, validation.id if validation else None)
    manifest_key = f"{prefix}/manifest.json"
    try:
        manifest = orjson.loads(store.get_bytes(manifest_key))
        context.event(f"Reusing prepared dataset ({manifest['counts']['train']} training examples)")
    except ObjectMissing:
        manifest = _build_dataset(context, store, prefix, training, validation)
    context.update(dataset_key=prefix)
    context.set_status("queued", message="Files validated; job queued for training")
    return "train"


def _build_dataset(context: JobContext, store: ArtifactStore, prefix: str, training, validation) -> dict[str, Any]:  # noqa: ANN001
    context.event(f"Validating training file: {training.id}")
    examples = load_examples(store, training.object_key, training.filename)
    if len(examples) < MIN_EXAMPLES:
        raise DatasetInvalid(f"{training.filename} has {len(examples)} valid example(s); at least {MIN_EXAMPLES} "
                             f"are required", rule="too_few_examples", param="training_file")
    seen: set[str] = set()
    train_records: list[dict[str, Any]] = []
    validation_records: list[dict[str, Any]] = []
    duplicates = 0
    fraction = 0.0 if validation else validation_fraction_for(len(examples))
    for record in examples:
        digest = record_digest(record)
        if digest in seen:
            duplicates += 1
            continue
        seen.add(digest)
        (validation_records if is_validation(digest, fraction) else train_records).append(record)
    if validation is not None:
        context.event(f"Validating validation file: {validation.id}")
        validation_records = load_examples(store, validation.object_key, validation.filename)
    if not train_records:
        raise DatasetInvalid("no training examples remain after the split", rule="empty_split",
                             param="training_file")
    manifest: dict[str, Any] = {
        "format": "openai-chat",
        "training_file": training.id,
        "validation_file": validation.id if validation else None,
        "counts": {"input": len(examples), "duplicates_removed": duplicates, "train": len(train_records),
                   "validation": len(validation_records)},
        "splits": {},
    }
    with tempfile.TemporaryDirectory(prefix="afina-ingest-") as tmp:
        for split_name, records in (("train", train_records), ("validation", validation_records)):
            if not records:
                continue
            path = Path(tmp) / f"{split_name}.jsonl"
            _write_jsonl(path, records)
            info = store.put_file(f"{prefix}/{split_name}.jsonl", path)
            manifest["splits"][split_name] = {"key": info.key, "sha256": info.sha256, "bytes": info.size,
                                              "examples": len(records)}
    store.put_bytes(f"{prefix}/manifest.json", orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    context.event(f"Dataset ready: {len(train_records)} training and {len(validation_records)} validation "
                  f"examples ({duplicates} duplicate(s) removed)")
    return manifest
