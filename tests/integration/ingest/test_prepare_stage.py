"""The job's ingest stage on a real store and registry, run through ``run_stage`` as a worker would."""

from __future__ import annotations

import orjson
import pytest

from afina.core.db import repository as repo
from afina.core.queue.jobs import run_stage
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from afina.ingest.prepare import prepare_dataset
from afina.ingest.process_file import process_uploaded_file
from tests.support.jobs import create_job, sample_examples, upload_file
from tests.support.models import shared_model_cache

pytestmark = pytest.mark.integration


@pytest.fixture
def runtime(afina_home, tmp_path_factory: pytest.TempPathFactory) -> Runtime:  # noqa: ANN001
    return Runtime(Settings(home=afina_home, log_json=False, model_cache_dir=shared_model_cache(tmp_path_factory)))


def jsonl(records: list) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in records)


def job_row(runtime: Runtime, job_id: str):  # noqa: ANN201
    with runtime.db.session() as session:
        return repo.get_job(session, None, job_id)


def file_row(runtime: Runtime, file_id: str):  # noqa: ANN201
    with runtime.db.session() as session:
        return repo.get_file(session, None, file_id)


def events(runtime: Runtime, job_id: str) -> list[str]:
    with runtime.db.session() as session:
        rows, _ = repo.list_events(session, job_id, None, 100)
    return [event.message for event in rows]


def test_an_unprocessed_file_is_ingested_by_the_job_and_committed(runtime: Runtime) -> None:
    examples = sample_examples()
    upload = upload_file(runtime, "acme", jsonl(examples + examples[:3]))  # 3 exact duplicates
    job = create_job(runtime, "acme", upload.id)
    assert run_stage(runtime, job.id, "ingest", prepare_dataset) == "done"
    row = job_row(runtime, job.id)
    assert row.status == "queued" and row.stage == "train" and row.lease_owner is None
    manifest = orjson.loads(runtime.store.get_bytes(f"{row.dataset_key}/manifest.json"))
    counts = manifest["counts"]
    assert counts["duplicates"] == 3
    assert counts["train"] + counts["validation"] == len(examples)
    assert counts["validation"] > 0
    train_lines = runtime.store.get_bytes(manifest["splits"]["train"]["key"]).splitlines()
    assert len(train_lines) == counts["train"]
    # the job's run processed the file too: its row says so
    uploaded = file_row(runtime, upload.id)
    assert uploaded.status == "processed" and uploaded.dataset_key == row.dataset_key
    # the train message for the next stage is on the (filesystem) broker
    queued = list((runtime.settings.broker_folder / "queue").iterdir())
    assert any(b"afina.trainer.train" in path.read_bytes() for path in queued)


def test_a_processed_file_is_reused_by_every_job(runtime: Runtime) -> None:
    upload = upload_file(runtime, "acme", jsonl(sample_examples(20)))
    assert process_uploaded_file(runtime, upload.id) == "processed"
    assert process_uploaded_file(runtime, upload.id) == "skipped"  # a redelivered message does nothing
    processed = file_row(runtime, upload.id)
    assert processed.ingest_state["counts"]["examples"] == 20
    first = create_job(runtime, "acme", upload.id)
    second = create_job(runtime, "acme", upload.id)
    run_stage(runtime, first.id, "ingest", prepare_dataset)
    run_stage(runtime, second.id, "ingest", prepare_dataset)
    assert job_row(runtime, first.id).dataset_key == job_row(runtime, second.id).dataset_key == \
        processed.dataset_key
    assert any("Reusing prepared dataset" in message for message in events(runtime, second.id))


@pytest.mark.parametrize(("mutate", "line", "rule"), [
    (lambda rows: rows.__setitem__(4, {"messages": [{"role": "user", "content": "oi"}]}), 5,
     "example_missing_assistant_message"),
    (lambda rows: rows.__setitem__(11, {"messages": [{"role": "bot", "content": "oi"},
                                                     {"role": "assistant", "content": "x"}]}), 12, "unrecognized_role"),
])
def test_strict_mode_fails_the_job_naming_file_line_and_rule(runtime: Runtime, mutate, line: int,  # noqa: ANN001
                                                             rule: str) -> None:
    rows = sample_examples(15)
    mutate(rows)
    upload = upload_file(runtime, "acme", jsonl(rows), filename="aeon.jsonl", ingest_options={"mode": "strict"})
    job = create_job(runtime, "acme", upload.id)
    assert run_stage(runtime, job.id, "ingest", prepare_dataset) == "failed"
    row = job_row(runtime, job.id)
    assert row.status == "failed" and row.finished_at
    assert row.error["code"] == rule
    assert f"line {line}" in row.error["message"] and "aeon.jsonl" in row.error["message"]
    assert row.error["param"] == "training_file"
    uploaded = file_row(runtime, upload.id)
    assert uploaded.status == "error" and f"line {line}" in uploaded.status_details
    # nothing committed for a failed dataset: the report only
    assert [info.key.rsplit("/", 1)[-1] for info in runtime.store.list("datasets/")] == ["report.jsonl",
                                                                                          "stats.json"]


def test_lenient_mode_drops_the_bad_row_and_trains_on_the_rest(runtime: Runtime) -> None:
    rows = sample_examples(15)
    rows[4] = {"messages": [{"role": "user", "content": "oi"}]}
    upload = upload_file(runtime, "acme", jsonl(rows), filename="aeon.jsonl")
    job = create_job(runtime, "acme", upload.id)
    assert run_stage(runtime, job.id, "ingest", prepare_dataset) == "done"
    manifest = orjson.loads(runtime.store.get_bytes(f"{job_row(runtime, job.id).dataset_key}/manifest.json"))
    assert manifest["counts"]["examples"] == 14
    assert manifest["summary"]["issues"]["example_missing_assistant_message"] == {"dropped": 1}


def test_a_failed_file_fails_its_job_without_ingesting_again(runtime: Runtime) -> None:
    upload = upload_file(runtime, "acme", jsonl(sample_examples(9)))
    assert process_uploaded_file(runtime, upload.id) == "error"
    failed = file_row(runtime, upload.id)
    assert "at least 10" in failed.status_details and failed.ingest_state["error"]["code"] == "too_few_examples"
    job = create_job(runtime, "acme", upload.id)
    assert run_stage(runtime, job.id, "ingest", prepare_dataset) == "failed"
    row = job_row(runtime, job.id)
    assert row.error["code"] == "too_few_examples" and "at least 10" in row.error["message"]
    assert not any("Ingesting" in message for message in events(runtime, job.id))


def test_a_validation_file_becomes_the_validation_split(runtime: Runtime) -> None:
    examples = sample_examples()
    training = upload_file(runtime, "acme", jsonl(examples[:60]))
    validation = upload_file(runtime, "acme", jsonl(examples[60:66]), filename="valid.jsonl")
    job = create_job(runtime, "acme", training.id)
    with runtime.db.session() as session:
        repo.get_job(session, None, job.id).validation_file = validation.id
    assert run_stage(runtime, job.id, "ingest", prepare_dataset) == "done"
    manifest = orjson.loads(runtime.store.get_bytes(f"{job_row(runtime, job.id).dataset_key}/manifest.json"))
    assert manifest["counts"]["train"] == 60 and manifest["counts"]["validation"] == 6
    from afina.trainer.data import load_prepared_dataset

    prepared = load_prepared_dataset(runtime.store, job_row(runtime, job.id).dataset_key)
    assert len(prepared.train) == 60 and len(prepared.validation) == 6


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
