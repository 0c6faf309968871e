"""Migration 0012 gives ``files`` an indexed ``expires_at`` exactly as the model declares it, keeps the files an
older afina wrote (never expiring), and goes down to 0011 and up again, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from afina.core.db import Database, alembic_config, migrate
from afina.core.db.models import Base, File

pytestmark = pytest.mark.integration


def _move(database: Database, revision: str, *, down: bool = False) -> None:
    config = alembic_config(database.url)
    with database.engine.begin() as connection:
        config.attributes["connection"] = connection
        (command.downgrade if down else command.upgrade)(config, revision)


def _files_columns(database: Database) -> set[str]:
    return {column["name"] for column in sa.inspect(database.engine).get_columns("files")}


def check(database: Database) -> None:
    _move(database, "0011")
    with database.engine.begin() as connection:
        connection.execute(sa.text("INSERT INTO tenants (id, created_at) VALUES ('acme', 0)"))
        connection.execute(sa.text(
            "INSERT INTO files (id, tenant_id, filename, purpose, bytes, sha256, object_key, status, created_at) "
            "VALUES ('file-old', 'acme', 'a.jsonl', 'batch', 1, '0', 'files/acme/file-old/a.jsonl', 'processed', 5)"))
    assert "expires_at" not in _files_columns(database)

    migrate(database)
    assert "expires_at" in _files_columns(database)
    indexes = {index["name"]: index for index in sa.inspect(database.engine).get_indexes("files")}
    assert indexes["ix_files_expires_at"]["column_names"] == ["expires_at"]
    with database.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert [diff for diff in differences if "files" in repr(diff)] == []
    with database.session() as session:
        old = session.get(File, "file-old")
        assert old is not None and old.expires_at is None  # a file from before expiry never expires
        old.expires_at = 2_000_000_000

    _move(database, "0011", down=True)
    assert "expires_at" not in _files_columns(database)
    assert "ix_files_expires_at" not in {index["name"] for index in sa.inspect(database.engine).get_indexes("files")}
    with database.engine.connect() as connection:
        assert connection.execute(sa.text("SELECT id FROM files")).scalars().all() == ["file-old"]

    migrate(database)  # up again, and repeatable
    migrate(database)
    with database.session() as session:
        assert session.get(File, "file-old").expires_at is None
    database.dispose()


def test_sqlite(tmp_path: Path) -> None:
    check(Database(f"sqlite:///{tmp_path / 'afina.db'}"))


def test_postgres(postgres_database: str) -> None:
    check(Database(postgres_database))
