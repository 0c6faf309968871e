"""What the gateway shows without a key: the API docs only where the operator wants them, and its start-up
sweep of the spools a crashed gateway left behind."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from afina.core.runtime import Runtime
from afina.core.settings import Settings
from afina.gateway.app import create_app

DOC_PATHS = ("/docs", "/redoc", "/openapi.json")


def _client(home: Path, **settings: Any) -> TestClient:
    return TestClient(create_app(Runtime(Settings(home=home, log_json=False, database_url=None, broker_url=None,
                                                  store_backend="local", work_dir=None, **settings))))


@pytest.mark.parametrize(("settings", "served"), [
    ({"environment": "local"}, True),
    ({"environment": "production"}, False),
    ({"environment": "production", "expose_docs": True}, True),
    ({"environment": "local", "expose_docs": False}, False),
], ids=["local", "production", "production-exposed", "local-hidden"])
def test_docs_are_served_only_when_enabled(tmp_path: Path, settings: dict[str, Any], served: bool) -> None:
    client = _client(tmp_path, **settings)
    for path in DOC_PATHS:
        response = client.get(path)
        assert response.status_code == (200 if served else 404), path
    if served:
        assert client.get("/openapi.json").json()["info"]["title"] == "afina gateway"
        assert "swagger" in client.get("/docs").text.lower()
    else:
        assert client.get("/docs").json()["error"]["code"] == "not_found"  # like any unknown path
    assert client.get("/health").json() == {"status": "ok"}  # liveness stays open either way


def test_docs_setting_reads_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AFINA_ENVIRONMENT", "production")
    monkeypatch.setenv("AFINA_EXPOSE_DOCS", "true")
    assert Settings(home=tmp_path).docs_enabled
    monkeypatch.delenv("AFINA_EXPOSE_DOCS")
    assert not Settings(home=tmp_path).docs_enabled


def test_gateway_start_removes_stale_upload_spools(tmp_path: Path) -> None:
    spool = tmp_path / "work" / "uploads"
    spool.mkdir(parents=True)
    stale, fresh = spool / "upload-crashed.part", spool / "upload-running.part"
    for path in (stale, fresh):
        path.write_bytes(b"partial upload")
    long_ago = time.time() - 7 * 3600
    os.utime(stale, (long_ago, long_ago))
    with _client(tmp_path, stale_temp_after_s=6 * 3600) as client:  # entering runs the app's start-up
        assert client.get("/health").status_code == 200
    assert not stale.exists() and fresh.exists()
