"""The API path once on PostgreSQL (the production registry), not only SQLite."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.integration.gateway.conftest import SMOLLM2, chat_jsonl, make_settings, start_gateway

pytestmark = pytest.mark.integration


def test_files_and_jobs_on_postgres(tmp_path: Path, postgres_database: str) -> None:
    gateway = start_gateway(make_settings(tmp_path / "home", database_url=postgres_database))
    try:
        acme, globex = gateway.client("acme"), gateway.client("globex")
        training = acme.files.create(file=("train.jsonl", chat_jsonl()), purpose="fine-tune")
        jobs = [acme.fine_tuning.jobs.create(model=SMOLLM2, training_file=training.id, suffix="pg")
                for _ in range(3)]
        page = acme.fine_tuning.jobs.list(limit=2)
        assert len(page.data) == 2 and page.has_more
        assert {job.id for job in acme.fine_tuning.jobs.list(limit=2)} == {job.id for job in jobs}
        assert acme.fine_tuning.jobs.cancel(jobs[0].id).status == "cancelled"
        assert len(acme.fine_tuning.jobs.list_events(jobs[0].id).data) == 3
        with pytest.raises(openai.NotFoundError):
            globex.fine_tuning.jobs.retrieve(jobs[0].id)
        with pytest.raises(openai.NotFoundError):
            globex.files.retrieve(training.id)
    finally:
        gateway.served.stop()
        gateway.runtime.db.dispose()
