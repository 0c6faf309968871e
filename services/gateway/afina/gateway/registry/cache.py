"""Key grants, and what a tenant's model names are (a fine-tune, a route), kept in memory while current.

Every request used to make three registry lookups, each a hop to a worker thread and a database
transaction: the key, the name, the model again. Now a request reads the registry's generation
counter (``registry.generation``: microseconds, on the event loop) and, while it reads the value the
memory was filled at, answers from memory. Any committed write to api_keys, models or routes, by any
process, moves the counter (database triggers), and the next request that reads it drops everything
kept: a revoked key is refused by the very next request, a moved alias answers from its new target,
in every gateway process alike. Writes are rare next to reads, so dropping everything on any write
costs little and leaves no per-entry invalidation to get wrong.

A request reads the counter once, not at each lookup: a read that started after the request reached the
gateway (``REQUEST_STARTED``, set by the gateway's middleware) saw every commit the request must see, so its
later lookups, and those of requests that arrived before that read, use it. Outside a request (no start
set) every lookup reads the counter.

Nothing read at one generation is kept under a later one: a row read from the database is stored
only if the counter still reads what it read before the row was fetched. When the counter cannot be
read, nothing is served from memory. Unknown keys are never kept (an unbounded set an attacker picks);
names, found or not, are, up to ``max_entries`` per kind (the oldest go first).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

from anyio import to_thread

from afina.core.db import Database
from afina.core.db import repository as repo
from afina.core.errors import AuthenticationFailed
from afina.core.keys import KeyGrant
from afina.core.routing import RouteSpec
from afina.gateway.registry.generation import GenerationReader

K = TypeVar("K")
V = TypeVar("V")
MAX_ENTRIES = 4096
# ``time.perf_counter()`` when the request being served reached the gateway's middleware (none: +inf)
REQUEST_STARTED: ContextVar[float] = ContextVar("afina_request_started", default=math.inf)


@dataclass(frozen=True)
class ModelEntry:
    """What serving one of a tenant's fine-tunes needs from its row."""

    name: str
    artifacts: dict[str, Any]
    ollama: dict[str, Any] | None
    quality_gate: dict[str, Any] | None = None  # afina.core.artifacts.evaluation.QualityGate (refuse_blocked)


@dataclass(frozen=True)
class NameEntry:
    """What a name is among a tenant's own: a fine-tune, a route (its spec, parsed once), or nothing."""

    model: ModelEntry | None = None
    route: RouteSpec | None = None


class RegistryCache:
    def __init__(self, database: Callable[[], Database], generation: GenerationReader, *,
                 max_entries: int = MAX_ENTRIES, clock: Callable[[], float] = time.time) -> None:
        self._database = database  # a callable: the runtime opens (and migrates) its database on first use
        self.generation = generation
        self.max_entries = max_entries
        self.clock = clock
        self._keys: dict[str, KeyGrant] = {}  # by the key's sha256, never the key
        self._names: dict[tuple[str, str], NameEntry] = {}
        self._filled_at: int | None = None
        self._read_started = -math.inf  # when the read that gave ``_filled_at`` started (-inf: none to reuse)
        self.lookups = 0  # database reads made (tests and the bench read it)

    async def grant(self, api_key: str | None) -> KeyGrant:
        """What ``api_key`` grants; ``AuthenticationFailed`` (the registry's words) for a missing, unknown,
        revoked or expired key."""
        if not api_key:
            raise AuthenticationFailed(repo.MISSING_KEY)
        digest = repo.hash_api_key(api_key)
        generation = await self._current()
        grant = self._keys.get(digest)
        if grant is None:
            grant = await to_thread.run_sync(self._load_grant, api_key)
            self._keep(self._keys, digest, grant, generation)
        if grant.expired(self.clock()):
            raise AuthenticationFailed(repo.INCORRECT_KEY)
        return grant

    async def name(self, tenant_id: str, name: str) -> NameEntry:
        """What ``name`` is among ``tenant_id``'s fine-tunes and routes (a fine-tune first, as before)."""
        generation = await self._current()
        entry = self._names.get((tenant_id, name))
        if entry is None:
            entry = await to_thread.run_sync(self._load_name, tenant_id, name)
            self._keep(self._names, (tenant_id, name), entry, generation)
        return entry

    async def close(self) -> None:
        self.clear()
        await self.generation.close()

    def clear(self) -> None:
        self._keys.clear()
        self._names.clear()

    async def _current(self) -> int | None:
        """The counter as of the request's start or later; what memory holds is dropped when it moved (or cannot
        be read)."""
        if self._read_started >= REQUEST_STARTED.get():
            return self._filled_at  # read after this request arrived: it saw every commit before it
        started = time.perf_counter()
        value = await self.generation.current()
        if value is None or value != self._filled_at:
            self.clear()
            self._filled_at = value
            self._read_started = -math.inf
        if value is not None and started > self._read_started:
            self._read_started = started
        return value

    def _keep(self, entries: dict[K, V], key: K, value: V, generation: int | None) -> None:
        if generation is None or generation != self._filled_at:
            return  # read while the registry changed: good for this request, not for the next
        if len(entries) >= self.max_entries:
            del entries[next(iter(entries))]
        entries[key] = value

    def _load_grant(self, api_key: str) -> KeyGrant:
        self.lookups += 1
        with self._database().session() as session:
            return repo.authenticate_key(session, api_key)

    def _load_name(self, tenant_id: str, name: str) -> NameEntry:
        self.lookups += 1
        with self._database().session() as session:
            row = repo.get_model(session, tenant_id, name)
            if row is not None:
                return NameEntry(model=ModelEntry(name=row.name, artifacts=row.artifacts, ollama=row.ollama,
                                                  quality_gate=row.quality_gate))
            route = repo.get_route(session, tenant_id, name)
            return NameEntry(route=RouteSpec.from_row(route.spec)) if route is not None else NameEntry()
