from __future__ import annotations

import pytest

from afina.core.errors import AuthenticationFailed
from afina.gateway.deps import bearer_token


def test_bearer_token() -> None:
    assert bearer_token("Bearer afk-123") == "afk-123"
    assert bearer_token("bearer  afk-123 ") == "afk-123"
    assert bearer_token(None) is None and bearer_token("") is None
    for header in ("Basic abc", "Bearer", "afk-123"):
        with pytest.raises(AuthenticationFailed):
            bearer_token(header)
