"""The handles a process works with: settings, database, store and queue, built once from settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from celery import Celery

from afina.core.db import Database, migrate
from afina.core.settings import Settings
from afina.core.store import ArtifactStore, open_store


@dataclass
class Runtime:
    """Lazily opened connections of one process (a worker, the gateway, the CLI)."""

    settings: Settings
    include_tasks: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # secrets no pattern recognises (a lone S3 secret, an unusual password) are scrubbed by value
        from afina.core.logging import register_settings_secrets

        register_settings_secrets(self.settings)

    @cached_property
    def db(self) -> Database:
        database = Database(self.settings.resolved_database_url)
        migrate(database)
        return database

    @cached_property
    def store(self) -> ArtifactStore:
        return open_store(self.settings)

    @cached_property
    def celery(self) -> Celery:
        from afina.core.queue.app import create_celery_app

        app = create_celery_app(self.settings, include=self.include_tasks)
        app.afina_runtime = self  # task bodies reach this runtime through their app
        return app
