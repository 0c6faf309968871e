"""Migration 0004 stores a job's data once: a job written by an older afina (its resolved values under
``hyperparameters["resolved"]``, a copy of the request under ``method.supervised.hyperparameters``) comes out
with the request in ``hyperparameters``, the resolved values in ``training_config`` and its ``init_from`` kept;
the columns match the models, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from afina.core.db import Database, alembic_config, migrate
from afina.core.db.models import Base, Job
from afina.core.training.lifecycle import display_hyperparameters, resolution_input

pytestmark = pytest.mark.integration
OLD_JOBS = {
    "ftjob-old-1": ({"n_epochs": "auto", "batch_size": 4, "learning_rate_multiplier": "auto", "lora_r": 8,
                     "resolved": {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.0,
                                  "learning_rate": 2e-4, "lora_r": 8, "save_steps": 5}},
                    {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": "auto", "batch_size": 4,
                                                                              "lora_r": 8}}}),
    "ftjob-old-2": ({}, {"type": "supervised", "supervised": {
        "hyperparameters": {"n_epochs": 2}, "init_from": {"model": "ft:x", "job_id": "ftjob-parent"}}}),
}


def check(database: Database) -> None:
    config = alembic_config(database.url)
    with database.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0003")
    with database.engine.begin() as connection:
        connection.execute(sa.text("INSERT INTO tenants (id, created_at) VALUES ('acme', 0)"))
        jobs = sa.table("jobs", sa.column("id"), sa.column("tenant_id"), sa.column("model"),
                        sa.column("training_file"), sa.column("seed"), sa.column("hyperparameters", sa.JSON),
                        sa.column("method", sa.JSON), sa.column("status"), sa.column("stage"),
                        sa.column("result_files", sa.JSON), sa.column("cancel_requested"),
                        sa.column("created_at"), sa.column("attempts"))
        for job_id, (hyperparameters, method) in OLD_JOBS.items():
            connection.execute(jobs.insert().values(
                id=job_id, tenant_id="acme", model="smollm2-135m-instruct", training_file="file-1", seed=1,
                hyperparameters=hyperparameters, method=method, status="running", stage="train", result_files=[],
                cancel_requested=False, created_at=0, attempts=0))
    migrate(database)
    with database.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert [diff for diff in differences if "jobs" in repr(diff)] == []
    with database.session() as session:
        first, second = session.get(Job, "ftjob-old-1"), session.get(Job, "ftjob-old-2")
        assert first.hyperparameters == {"n_epochs": "auto", "batch_size": 4, "learning_rate_multiplier": "auto",
                                         "lora_r": 8}
        assert first.training_config["n_epochs"] == 3 and first.method == {"type": "supervised"}
        assert first.base_model is None  # resolved from ``model`` by its stages, as before
        assert display_hyperparameters(first) == {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.0}
        assert "learning_rate" not in resolution_input(first)  # derived: never an input
        assert second.hyperparameters == {"n_epochs": 2} and second.training_config is None
        assert second.method == {"type": "supervised",
                                 "supervised": {"init_from": {"model": "ft:x", "job_id": "ftjob-parent"}}}
    database.dispose()


def test_sqlite(tmp_path: Path) -> None:
    check(Database(f"sqlite:///{tmp_path / 'afina.db'}"))


def test_postgres(postgres_database: str) -> None:
    check(Database(postgres_database))
