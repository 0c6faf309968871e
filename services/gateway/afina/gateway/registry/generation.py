"""Reading the registry's generation counter (migration 0009) on the event loop, once per request, cheaply.

Every committed write to api_keys, models or routes moves the counter, whichever process wrote, so
a gateway may answer from its in-memory copy of those rows (``registry.cache``) exactly while the
counter reads what it read when it filled the copy. The read must therefore see every commit that
happened before the request arrived, and cost far less than the lookups it replaces:

* SQLite (the embedded default): a connection of its own, in autocommit, read inline on the event
  loop — a WAL read of one row is a few microseconds and never waits for a writer;
* PostgreSQL: an async connection of its own (psycopg), no worker thread. Concurrent requests share
  reads: a request uses the first read that *started* after it arrived (one in flight serves every
  request that came before it started), so many requests cost one round trip, none misses a commit.

``current()`` answers None when the counter cannot be read (the database away, a busy SQLite); the
cache then serves nothing from memory, so a failure can only cost speed, never a stale answer.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from typing import Any, Protocol

from afina.core.logging import log_event

log = logging.getLogger("afina.gateway.registry")
QUERY = "SELECT value FROM registry_generation WHERE id = 1"
CONNECT_TIMEOUT_S = 2


class GenerationReader(Protocol):
    async def current(self) -> int | None: ...

    async def close(self) -> None: ...


class Unreadable:
    """For a database no second connection can see (SQLite in memory): every lookup goes to the database."""

    async def current(self) -> int | None:
        return None

    async def close(self) -> None:
        return None


class SqliteGeneration:
    def __init__(self, path: str) -> None:
        self.path = path
        self._connection: sqlite3.Connection | None = None

    async def current(self) -> int | None:
        try:
            if self._connection is None:
                # autocommit (each read sees the newest commit), never written through, no busy wait: a lock
                # held by a writer answers at once (None) instead of stalling the event loop
                self._connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                                   timeout=0)
            row = self._connection.execute(QUERY).fetchone()
        except sqlite3.Error as exc:
            self._drop(exc)
            return None
        return int(row[0]) if row else None

    def _drop(self, exc: BaseException) -> None:
        log_event(log, "registry.generation_unreadable", logging.WARNING, error=type(exc).__name__)
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    async def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class PostgresGeneration:
    """One async connection; reads one at a time, each shared by every caller that arrived before it started."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._connection: Any = None  # psycopg.AsyncConnection
        self._lock = asyncio.Lock()
        self._started = 0  # reads begun so far
        self._finished_read = 0  # the number of the newest read that finished
        self._value: int | None = None

    async def current(self) -> int | None:
        arrived_after = self._started  # a read numbered above this one began after this call did
        async with self._lock:
            if self._finished_read > arrived_after:
                return self._value
            self._started += 1
            number = self._started
            # shielded: a caller that goes away mid-read leaves the connection between queries, not in one
            self._value = await asyncio.shield(self._read())
            self._finished_read = number
            return self._value

    async def _read(self) -> int | None:
        import psycopg

        try:
            if self._connection is None or self._connection.closed:
                self._connection = await psycopg.AsyncConnection.connect(self.url, autocommit=True,
                                                                         connect_timeout=CONNECT_TIMEOUT_S)
            cursor = await self._connection.execute(QUERY)
            row = await cursor.fetchone()
        except (psycopg.Error, OSError) as exc:
            log_event(log, "registry.generation_unreadable", logging.WARNING, error=type(exc).__name__)
            await self.close()
            return None
        return int(row[0]) if row else None

    async def close(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            try:
                await connection.close()
            except Exception:  # noqa: BLE001 - a connection already broken has nothing left to close
                pass


def open_generation_reader(database_url: str) -> GenerationReader:
    """The reader for this registry (the same URL the gateway's ``Database`` uses)."""
    if database_url.startswith("sqlite"):
        path = database_url.split("///", 1)[-1]
        return Unreadable() if not path or path == ":memory:" else SqliteGeneration(path)
    if database_url.startswith(("postgresql://", "postgresql+psycopg://", "postgres://")):
        return PostgresGeneration("postgresql://" + database_url.split("://", 1)[1])
    return Unreadable()
