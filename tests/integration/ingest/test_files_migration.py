"""Migration 0002 gives ``files`` the ingest columns, exactly as the models declare them, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from afina.core.db import Database, migrate
from afina.core.db.models import Base, File, Tenant

pytestmark = pytest.mark.integration
INGEST_COLUMNS = {"ingest_options", "status_details", "dataset_key", "ingest_state"}


def check(database: Database) -> None:
    migrate(database)
    columns = {column["name"]: column for column in inspect(database.engine).get_columns("files")}
    assert INGEST_COLUMNS <= set(columns) and all(columns[name]["nullable"] for name in INGEST_COLUMNS)
    with database.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert [diff for diff in differences if "files" in repr(diff)] == []
    with database.session() as session:  # the JSON columns round-trip
        session.add(Tenant(id="acme"))
        session.flush()
        session.add(File(id="file-x", tenant_id="acme", filename="a.jsonl", purpose="fine-tune", bytes=1, sha256="0",
                         object_key="k", status="uploaded", ingest_options={"mode": "strict"},
                         ingest_state={"state": "queued", "progress": {"rows": 0}}))
    with database.session() as session:
        row = session.get(File, "file-x")
        assert row.ingest_options == {"mode": "strict"} and row.ingest_state["progress"] == {"rows": 0}
    migrate(database)  # repeatable
    database.dispose()


def test_sqlite(tmp_path: Path) -> None:
    check(Database(f"sqlite:///{tmp_path / 'afina.db'}"))


def test_postgres(postgres_database: str) -> None:
    check(Database(postgres_database))
