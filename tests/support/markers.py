"""Which tests need a server, by where they live: the rule ``make test-fast`` relies on, checked so it cannot rot.

- ``tests/unit/``: no server and no real ML work. A test there that is marked ``slow`` or ``integration``, or
  asks for one of the root conftest's server fixtures, stops the collection with the list of offenders.
- ``tests/integration/``: every test gets ``integration`` (a server, a worker process, the gateway over HTTP, or
  a whole stage run on real weights).
- ``tests/e2e/``: every test gets ``e2e`` and ``integration`` (the multi-process stack).

And a test not marked ``integration`` cannot open a TCP connection at all (``tcp_blocked``), so a unit test
that reaches a server by a path the fixtures do not show fails on its first ``connect`` instead of passing on
a machine that happens to run PostgreSQL.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

TESTS_ROOT = Path(__file__).resolve().parents[1]
AREAS = ("unit", "integration", "e2e")
MARKERS_BY_AREA: dict[str, tuple[str, ...]] = {"unit": (), "integration": ("integration",),
                                               "e2e": ("e2e", "integration")}
NOT_IN_UNIT = ("slow", "integration", "e2e")
# the server fixtures of tests/conftest.py, the only ones tests/unit/ can see (the gateway, ingest-stack and
# services-stack fixtures live in conftests under tests/integration/ and tests/e2e/)
SERVER_FIXTURES = frozenset({"seaweedfs", "redis_url", "postgres_admin_url", "postgres_database"})


class TcpBlocked(RuntimeError):
    """A test that is not marked ``integration`` tried to reach a server."""


def area_of(item: pytest.Item) -> str | None:
    """``unit``, ``integration`` or ``e2e``: the folder right under tests/ that holds the item's file."""
    try:
        relative = Path(str(item.path)).resolve().relative_to(TESTS_ROOT)
    except ValueError:
        return None
    return relative.parts[0] if len(relative.parts) > 1 and relative.parts[0] in AREAS else None


def unit_rule_breaks(item: pytest.Item) -> list[str]:
    """Why ``item`` may not live under tests/unit/ (empty when it may)."""
    reasons = [f"marked {name}" for name in NOT_IN_UNIT if item.get_closest_marker(name) is not None]
    servers = sorted(SERVER_FIXTURES & set(getattr(item, "fixturenames", ())))
    if servers:
        reasons.append(f"uses the server fixture(s) {', '.join(servers)}")
    return reasons


def apply_area_markers(items: Iterable[pytest.Item]) -> None:
    """Mark every item by its area; raise ``pytest.UsageError`` naming each test that breaks the layout."""
    problems: list[str] = []
    for item in items:
        area = area_of(item)
        if area is None:
            problems.append(f"{item.nodeid}: lives outside tests/unit/, tests/integration/ and tests/e2e/")
            continue
        for name in MARKERS_BY_AREA[area]:
            item.add_marker(name)
        if area == "unit":
            problems.extend(f"{item.nodeid}: {reason}" for reason in unit_rule_breaks(item))
    if problems:
        raise pytest.UsageError(
            "tests/unit/ holds fast tests that need no server: move these under tests/integration/ (a server, or "
            "real ML work marked slow) or drop what makes them so:\n  " + "\n  ".join(problems))


@contextmanager
def tcp_blocked(nodeid: str) -> Iterator[None]:
    """Every ``connect`` of an IPv4/IPv6 socket raises ``TcpBlocked`` (Unix sockets and pipes still work)."""
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def refuse(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise TcpBlocked(f"{nodeid} is not marked integration, so it may not connect to {address!r}: "
                             "move it under tests/integration/")

    def connect(sock: socket.socket, address: Any) -> None:
        refuse(sock, address)
        real_connect(sock, address)

    def connect_ex(sock: socket.socket, address: Any) -> int:
        refuse(sock, address)
        return real_connect_ex(sock, address)

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    try:
        yield
    finally:
        socket.socket.connect, socket.socket.connect_ex = real_connect, real_connect_ex  # type: ignore[method-assign]
