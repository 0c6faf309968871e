"""The rule ``make test-fast`` relies on (tests/support/markers.py) holds for the tests of this folder."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.support.markers import TcpBlocked, unit_rule_breaks


@dataclass
class FakeItem:
    markers: tuple[str, ...] = ()
    fixturenames: list[str] = field(default_factory=list)

    def get_closest_marker(self, name: str) -> Any:
        return name if name in self.markers else None


def test_a_unit_test_cannot_open_a_tcp_connection() -> None:
    with pytest.raises(TcpBlocked, match="test_suite_layout.py.*may not connect to .*5432"):
        socket.create_connection(("127.0.0.1", 5432), timeout=1)


def test_unix_sockets_and_pipes_still_work() -> None:
    left, right = socket.socketpair()
    with left, right:
        left.sendall(b"ok")
        assert right.recv(2) == b"ok"


def test_this_folder_is_not_marked_integration(request: pytest.FixtureRequest) -> None:
    assert [name for name in ("slow", "integration", "e2e") if request.node.get_closest_marker(name)] == []


@pytest.mark.parametrize(("item", "reasons"), [
    (FakeItem(), []),
    (FakeItem(fixturenames=["tmp_path", "tokenizer"]), []),
    (FakeItem(markers=("slow",)), ["marked slow"]),
    (FakeItem(markers=("integration",), fixturenames=["postgres_admin_url", "postgres_database"]),
     ["marked integration", "uses the server fixture(s) postgres_admin_url, postgres_database"]),
    (FakeItem(fixturenames=["redis_url"]), ["uses the server fixture(s) redis_url"]),
])
def test_what_keeps_a_test_out_of_unit(item: FakeItem, reasons: list[str]) -> None:
    assert unit_rule_breaks(item) == reasons  # type: ignore[arg-type]
