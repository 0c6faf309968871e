"""The ingest stage on a real store and registry, run through ``run_stage`` as a worker would."""

from __future__ import annotations

import orjson
import pytest

from afina.core.db import repository as repo
from afina.core.queue.jobs import run_stage
from afina.core.runtime import Runtime
from afina.ingest.prepare import prepare_dataset
from tests.support.jobs import create_job, sample_examples, upload_file

pytestmark = pytest.mark.integration


@pytest.fixture
def runtime(embedded_settings) -> Runtime:  # noqa: ANN001
    return Runtime(embedded_settings)


def jsonl(records: list) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in records)


def job_row(runtime: Runtime, job_id: str):  # noqa: ANN201
    with runtime.db.session() as session:
        return repo.get_job(session, None, job_id)


def test_valid_file_is_split_and_committed_with_a_manifest(runtime: Runtime) -> None:
    examples = sample_examples()
    upload = upload_file(runtime, "acme", jsonl(examples + examples[:3]))  # 3 exact duplicates
    job = create_job(runtime, "acme", upload.id)
    assert run_stage(runtime, job.id, "ingest", prepare_dataset) == "done"
    row = job_row(runtime, job.id)
    assert row.status == "queued" and row.stage == "train" and row.lease_owner is None
    manifest = orjson.loads(runtime.store.get_bytes(f"{row.dataset_key}/manifest.json"))
    counts = manifest["counts"]
    assert counts["duplicates_removed"] == 3
    assert counts["train"] + counts["validation"] == len(examples)
    assert counts["validation"] > 0
    train_lines = runtime.store.get_bytes(manifest["splits"]["train"]["key"]).splitlines()
    assert len(train_lines) == counts["train"]
    # the train message for the next stage is on the (filesystem) broker
    queued = list((runtime.settings.broker_folder / "queue").iterdir())
    assert any(b"afina.trainer.train" in path.read_bytes() for path in queued)


def test_second_run_reuses_the_committed_dataset(runtime: Runtime) -> None:
    upload = upload_file(runtime, "acme", jsonl(sample_examples(20)))
    first = create_job(runtime, "acme", upload.id)
    second = create_job(runtime, "acme", upload.id)
    run_stage(runtime, first.id, "ingest", prepare_dataset)
    run_stage(runtime, second.id, "ingest", prepare_dataset)
    assert job_row(runtime, first.id).dataset_key == job_row(runtime, second.id).dataset_key
    with runtime.db.session() as session:
        events, _ = repo.list_events(session, second.id, None, 20)
    assert any("Reusing prepared dataset" in e.message for e in events)


@pytest.mark.parametrize(("mutate", "line", "rule"), [
    (lambda rows: rows.__setitem__(4, {"messages": [{"role": "user", "content": "oi"}]}), 5,
     "example_missing_assistant_message"),
    (lambda rows: rows.__setitem__(11, {"messages": [{"role": "bot", "content": "oi"},
                                                     {"role": "assistant", "content": "x"}]}), 12, "unrecognized_role"),
])
def test_invalid_row_fails_the_job_naming_line_and_rule(runtime: Runtime, mutate, line: int, rule: str) -> None:  # noqa: ANN001
    rows = sample_examples(15)
    mutate(rows)
    upload = upload_file(runtime, "acme", jsonl(rows), filename="aeon.jsonl")
    job = create_job(runtime, "acme", upload.id)
    assert run_stage(runtime, job.id, "ingest", prepare_dataset) == "failed"
    row = job_row(runtime, job.id)
    assert row.status == "failed" and row.finished_at
    assert row.error["code"] == rule
    assert f"line {line}" in row.error["message"] and "aeon.jsonl" in row.error["message"]
    assert row.error["param"] == "training_file"
    # nothing committed for a failed dataset
    assert runtime.store.list("datasets/") == []


def test_truncated_json_line_is_named(runtime: Runtime) -> None:
    content = jsonl(sample_examples(12)) + b'{"messages": [{"role": "user", "content": "cut'
    upload = upload_file(runtime, "acme", content)
    job = create_job(runtime, "acme", upload.id)
    run_stage(runtime, job.id, "ingest", prepare_dataset)
    row = job_row(runtime, job.id)
    assert row.error["code"] == "invalid_json" and "line 13" in row.error["message"]


def test_too_few_examples_fails(runtime: Runtime) -> None:
    upload = upload_file(runtime, "acme", jsonl(sample_examples(9)))
    job = create_job(runtime, "acme", upload.id)
    run_stage(runtime, job.id, "ingest", prepare_dataset)
    row = job_row(runtime, job.id)
    assert row.error["code"] == "too_few_examples" and "at least 10" in row.error["message"]


def test_a_message_for_a_leased_job_is_dropped(runtime: Runtime) -> None:
    upload = upload_file(runtime, "acme", jsonl(sample_examples(12)))
    job = create_job(runtime, "acme", upload.id)
    with runtime.db.session() as session:
        repo.acquire_lease(session, job.id, "another-worker", ttl_s=60)
    assert run_stage(runtime, job.id, "ingest", prepare_dataset) == "duplicate"
    assert job_row(runtime, job.id).status == "validating_files"


def test_a_message_for_a_finished_or_moved_on_job_is_skipped(runtime: Runtime) -> None:
    upload = upload_file(runtime, "acme", jsonl(sample_examples(12)))
    job = create_job(runtime, "acme", upload.id, stage="train", status="running")
    assert run_stage(runtime, job.id, "ingest", prepare_dataset) == "skipped"
