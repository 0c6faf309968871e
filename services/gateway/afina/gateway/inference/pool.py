"""The models a local backend holds: loaded llama.cpp contexts (in process) or running llama.cpp servers.

Both local backends keep the same book: one entry per ``Slot`` (a GGUF, a context length, generation
or embeddings), opened once even when first calls arrive together, at most ``capacity`` of them (the
least recently used goes first, before a new one opens), each kept ``keep_alive`` seconds after its
last call (``0``: let go at once; negative: until evicted). An entry evicted while calls use it is
closed when the last of them ends. What an entry holds, and how it opens and closes, is the backend's.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import anyio

from afina.core.errors import InferenceUnavailable
from afina.gateway.inference.base import LoadedModel, ServedModel

H = TypeVar("H")


@dataclass(frozen=True)
class Slot:
    """What one loaded thing is for: a file, a context length, generation (with every position's logits or
    not) or embeddings."""

    path: Path
    n_ctx: int
    embedding: bool = False
    logits_all: bool = False  # the logits of every position kept (token log probabilities; costly, so apart)

    @classmethod
    def of(cls, model: ServedModel, num_ctx: int | None, default_n_ctx: int, *, embedding: bool = False,
           logits_all: bool = False) -> Slot:
        if model.path is None:
            raise InferenceUnavailable(f"model {model.name} has no local model file to serve")
        return cls(model.path, num_ctx or default_n_ctx, embedding, logits_all)


@dataclass
class Entry(Generic[H]):
    handle: H
    model: ServedModel  # the model it was opened for (``loaded`` lists it)
    users: int = 0
    evicted: bool = False  # closed as soon as its last call ends
    expires_at: float | None = None


class LoadedPool(Generic[H]):
    """``open(slot, model)`` makes a handle, ``close(handle)`` lets it go; ``usable(entry)``, when given, is
    asked before an idle entry is reused (a server that died is opened again)."""

    def __init__(self, *, capacity: int, keep_alive_s: float, open: Callable[[Slot, ServedModel], Awaitable[H]],
                 close: Callable[[H], Awaitable[None]],
                 usable: Callable[[Entry[H]], Awaitable[bool]] | None = None) -> None:
        self.capacity = max(1, capacity)
        self.keep_alive_s = keep_alive_s
        self._open, self._close, self._usable = open, close, usable
        self._entries: OrderedDict[Slot, Entry[H]] = OrderedDict()
        self._open_locks: dict[Slot, asyncio.Lock] = {}

    async def acquire(self, slot: Slot, model: ServedModel) -> tuple[Entry[H], int]:
        """The entry for ``slot``, opened if needed, and the nanoseconds this call spent opening it."""
        await self._evict_expired()
        open_ns = 0
        async with self._open_locks.setdefault(slot, asyncio.Lock()):
            entry = self._entries.get(slot)
            if entry is not None and self._usable is not None and not await self._usable(entry):
                await self.evict(slot)
                entry = None
            if entry is None:
                await self._evict_beyond(self.capacity - 1)  # room first: two models never both load past it
                started = time.perf_counter_ns()
                entry = Entry(handle=await self._open(slot, model), model=model)
                open_ns = time.perf_counter_ns() - started
                self._entries[slot] = entry
            self._entries.move_to_end(slot)
            entry.users += 1
            return entry, open_ns

    async def release(self, slot: Slot, entry: Entry[H], keep_alive_s: float | None) -> None:
        """One call is done with ``entry``; it stays ``keep_alive_s`` (None: the pool's default)."""
        with anyio.CancelScope(shield=True):  # a cancelled caller still gives its entry back
            entry.users -= 1
            keep = self.keep_alive_s if keep_alive_s is None else keep_alive_s
            entry.expires_at = None if keep < 0 else time.time() + keep
            if entry.users > 0:
                return
            if entry.evicted:
                await self._close(entry.handle)
            elif keep == 0:
                await self.evict(slot)

    async def evict(self, slot: Slot) -> None:
        """Close the slot's entry now, or when its last call ends."""
        entry = self._entries.pop(slot, None)
        if entry is None:
            return
        entry.evicted = True
        if entry.users == 0:
            await self._close(entry.handle)

    async def evict_model(self, model: ServedModel) -> None:
        for slot in [slot for slot, entry in self._entries.items() if entry.model.cache_key == model.cache_key]:
            await self.evict(slot)

    async def _evict_beyond(self, keep: int) -> None:
        while len(self._entries) > keep:
            await self.evict(next(iter(self._entries)))

    async def _evict_expired(self) -> None:
        moment = time.time()
        for slot, entry in list(self._entries.items()):
            if entry.users == 0 and entry.expires_at is not None and entry.expires_at <= moment:
                await self.evict(slot)

    async def loaded(self) -> list[LoadedModel]:
        """What is held now (the expired let go first), as ``/api/ps`` lists it."""
        await self._evict_expired()
        return [LoadedModel(model=entry.model, size=_file_size(slot.path), expires_at=entry.expires_at)
                for slot, entry in self._entries.items()]

    async def close(self) -> None:
        await self._evict_beyond(0)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
