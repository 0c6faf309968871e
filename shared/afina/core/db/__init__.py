"""The registry database: models, sessions, migrations and the queries services share."""

from __future__ import annotations

from pathlib import Path

from afina.core.db.generation import install_generation_triggers
from afina.core.db.session import Database

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

__all__ = ["Database", "alembic_config", "migrate"]


def alembic_config(database_url: str):  # noqa: ANN201 - alembic.config.Config
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def migrate(database: Database) -> None:
    """Bring the schema to the newest revision (safe to run from every process at start)."""
    from alembic import command

    config = alembic_config(database.url)
    with database.engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # one migrator at a time when several services start together
            from sqlalchemy import text

            connection.execute(text("SELECT pg_advisory_xact_lock(7311)"))
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
        # again on every start: a migration that rebuilt one of the tables (SQLite) dropped its triggers
        install_generation_triggers(connection)
