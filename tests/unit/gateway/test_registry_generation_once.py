"""A request reads the registry's generation counter once: a read that started after the request arrived is
reused by its later lookups (and by requests that arrived before it), never by a request that arrived later."""

from __future__ import annotations

import asyncio
import time

from afina.gateway.registry.cache import REQUEST_STARTED, RegistryCache


class CountingReader:
    def __init__(self) -> None:
        self.value: int | None = 1
        self.reads = 0

    async def current(self) -> int | None:
        self.reads += 1
        return self.value

    async def close(self) -> None:
        return None


def _cache(reader: CountingReader) -> RegistryCache:
    def no_database() -> None:
        raise AssertionError("no database read expected")

    return RegistryCache(no_database, reader)  # type: ignore[arg-type]


def test_one_read_per_request_and_a_fresh_one_for_the_next() -> None:
    reader = CountingReader()
    cache = _cache(reader)

    async def request() -> tuple[int | None, int | None]:
        token = REQUEST_STARTED.set(time.perf_counter())
        try:
            return await cache._current(), await cache._current()
        finally:
            REQUEST_STARTED.reset(token)

    assert asyncio.run(request()) == (1, 1)
    assert reader.reads == 1
    reader.value = 2  # a commit between two requests: the next one must see it
    assert asyncio.run(request()) == (2, 2)
    assert reader.reads == 2


def test_outside_a_request_every_lookup_reads() -> None:
    reader = CountingReader()
    cache = _cache(reader)

    async def lookups() -> None:
        await cache._current()
        await cache._current()

    asyncio.run(lookups())
    assert reader.reads == 2


def test_an_unreadable_counter_is_never_reused() -> None:
    reader = CountingReader()
    reader.value = None
    cache = _cache(reader)

    async def request() -> None:
        token = REQUEST_STARTED.set(time.perf_counter())
        try:
            assert await cache._current() is None
            assert await cache._current() is None
        finally:
            REQUEST_STARTED.reset(token)

    asyncio.run(request())
    assert reader.reads == 2
