"""API keys that can be named, listed, expired and revoked: in the registry (SQLite and PostgreSQL), through
``afina keys`` and at the gateway's door."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from afina.cli.main import main, parse_duration
from afina.core.db import Database, migrate
from afina.core.db import repository as repo
from afina.core.db.models import ApiKey
from afina.core.errors import AuthenticationFailed, Conflict, InvalidRequest, NotFound

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    url = f"sqlite:///{tmp_path / 'registry.db'}" if request.param == "sqlite" \
        else request.getfixturevalue("postgres_database")
    db = Database(url)
    migrate(db)
    yield db
    db.dispose()


def _refusal(database: Database, key: str | None) -> str:
    with database.session() as session, pytest.raises(AuthenticationFailed) as caught:
        repo.authenticate(session, key)
    return caught.value.message


def test_keys_are_listed_without_their_secret(database: Database) -> None:
    in_a_month = int(time.time()) + 30 * 86400
    with database.session() as session:
        ci_key = repo.create_api_key(session, "acme", name="ci", expires_at=in_a_month)
        plain_key = repo.create_api_key(session, "acme")
        other_key = repo.create_api_key(session, "globex", name="globex-prod")
    with database.session() as session:
        acme_keys = repo.list_api_keys(session, "acme")
        every_key = repo.list_api_keys(session, None)
    assert {key.prefix for key in acme_keys} == {ci_key[:10], plain_key[:10]}
    assert {key.tenant_id for key in every_key} == {"acme", "globex"} and len(every_key) == 3
    ci = next(key for key in acme_keys if key.prefix == ci_key[:10])
    assert (ci.name, ci.expires_at, ci.revoked_at, ci.state()) == ("ci", in_a_month, None, "active")
    assert ci.created_at <= time.time()
    shown = repr(every_key)
    for key in (ci_key, plain_key, other_key):
        assert key not in shown and repo.hash_api_key(key) not in shown


def test_a_revoked_key_is_refused_like_an_unknown_one(database: Database) -> None:
    with database.session() as session:
        key = repo.create_api_key(session, "acme", name="laptop")
        kept = repo.create_api_key(session, "acme")
    unknown = _refusal(database, "afk-" + "x" * 43)
    with database.session() as session:
        assert repo.authenticate(session, key) == "acme"
        revoked = repo.revoke_api_key(session, key[:10])
    assert revoked.state() == "revoked" and revoked.revoked_at is not None and revoked.name == "laptop"
    assert _refusal(database, key) == unknown
    with database.session() as session:
        assert repo.authenticate(session, kept) == "acme"  # the tenant's other keys go on working
        again = repo.revoke_api_key(session, key[:10])  # revoking twice changes nothing
        assert again.revoked_at == revoked.revoked_at
        assert [k.state() for k in repo.list_api_keys(session, "acme") if k.prefix == key[:10]] == ["revoked"]


def test_revoke_by_whole_key_scoped_by_tenant_and_unknown_prefixes(database: Database) -> None:
    with database.session() as session:
        key = repo.create_api_key(session, "acme")
    with database.session() as session:
        with pytest.raises(NotFound) as caught:
            repo.revoke_api_key(session, key[:10], "globex")  # another tenant's key is not found
        assert key[10:] not in caught.value.message
        with pytest.raises(NotFound) as caught:
            repo.revoke_api_key(session, key + "x")
        assert key not in caught.value.message  # a wrong plaintext is never echoed whole
        with pytest.raises(NotFound):
            repo.revoke_api_key(session, "afk-000000")
        assert repo.revoke_api_key(session, key, "acme").prefix == key[:10]
    assert _refusal(database, key) == "incorrect API key provided"


def test_an_expired_key_is_refused_like_an_unknown_one(database: Database) -> None:
    with database.session() as session:
        key = repo.create_api_key(session, "acme", expires_at=int(time.time()) + 3600)
        assert repo.authenticate(session, key) == "acme"
    with database.session() as session:  # an hour later
        session.get(ApiKey, repo.hash_api_key(key)).expires_at = int(time.time()) - 1
    assert _refusal(database, key) == _refusal(database, "afk-" + "y" * 43)
    with database.session() as session:
        assert repo.list_api_keys(session, "acme")[0].state() == "expired"
        with pytest.raises(InvalidRequest):
            repo.create_api_key(session, "acme", expires_at=int(time.time()) - 10)
        with pytest.raises(InvalidRequest):
            repo.create_api_key(session, "acme", name="n" * 129)


def test_keys_sharing_a_prefix_are_not_revoked_by_guess(database: Database) -> None:
    with database.session() as session:
        first, second = repo.create_api_key(session, "acme"), repo.create_api_key(session, "acme")
        assert first[:10] != second[:10]  # new keys get distinct prefixes
        session.get(ApiKey, repo.hash_api_key(second)).prefix = first[:10]  # as keys made before that could
    with database.session() as session:
        with pytest.raises(Conflict):
            repo.revoke_api_key(session, first[:10])
        repo.revoke_api_key(session, second)
    assert _refusal(database, second) == "incorrect API key provided"
    with database.session() as session:
        assert repo.authenticate(session, first) == "acme"


# the CLI --------------------------------------------------------------------

@pytest.fixture
def cli_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An afina home that no running stack owns; AFINA_* set here are undone after the test."""
    home = tmp_path / "home"
    for name in ("AFINA_DATABASE_URL", "AFINA_STORE_BACKEND", "AFINA_BROKER_URL", "AFINA_WORK_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AFINA_HOME", str(home))
    return home


def _afina(home: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["--home", str(home), *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_creates_lists_and_revokes_keys(cli_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _afina(cli_home, capsys, "keys", "create", "--tenant", "acme", "--name", "ci",
                          "--expires-in", "30d")
    assert code == 0
    ci_key = out.strip()
    assert ci_key.startswith("afk-") and "\n" not in ci_key
    code, out, _ = _afina(cli_home, capsys, "keys", "create", "--tenant", "globex")
    globex_key = out.strip()

    code, out, _ = _afina(cli_home, capsys, "keys", "list")
    assert code == 0 and ci_key[:10] in out and globex_key[:10] in out
    assert ci_key not in out and globex_key not in out
    ci_line = next(line for line in out.splitlines() if line.startswith(ci_key[:10]))
    assert "acme" in ci_line and " ci " in ci_line and " active " in ci_line
    assert ci_line.endswith("inference,fine-tune,admin  - req, - tok")  # every scope, the gateway's limits
    expected_expiry = time.strftime("%Y-%m-%d", time.localtime(time.time() + 30 * 86400))
    assert expected_expiry in ci_line
    code, out, _ = _afina(cli_home, capsys, "keys", "list", "--tenant", "globex")
    assert globex_key[:10] in out and ci_key[:10] not in out
    code, out, _ = _afina(cli_home, capsys, "keys", "create", "--tenant", "acme", "--scope", "inference",
                          "--scope", "admin", "--rpm", "60", "--tpm", "40000")
    app_key = out.strip()
    code, out, _ = _afina(cli_home, capsys, "keys", "list", "--tenant", "acme")
    app_line = next(line for line in out.splitlines() if line.startswith(app_key[:10]))
    assert app_line.split()[-5:] == ["inference,admin", "60", "req,", "40000", "tok"]
    code, _, err = _afina(cli_home, capsys, "keys", "create", "--tenant", "acme", "--rpm", "0")
    assert code == 2 and "requests_per_minute is at least 1" in err

    from afina.core.runtime import Runtime
    from afina.core.settings import Settings
    from afina.gateway.app import create_app

    gateway = TestClient(create_app(Runtime(Settings(home=cli_home, log_json=False))))
    headers = {"Authorization": f"Bearer {ci_key}"}
    assert gateway.get("/v1/models", headers=headers).status_code == 200

    code, out, _ = _afina(cli_home, capsys, "keys", "revoke", ci_key[:10])
    assert code == 0 and out.strip() == f"revoked {ci_key[:10]} (tenant acme, ci)"
    refused = gateway.get("/v1/models", headers=headers)
    unknown = gateway.get("/v1/models", headers={"Authorization": "Bearer afk-" + "z" * 43})
    assert refused.status_code == unknown.status_code == 401
    assert refused.json() == unknown.json()
    code, out, _ = _afina(cli_home, capsys, "keys", "list", "--tenant", "acme")
    assert next(line for line in out.splitlines() if line.startswith(ci_key[:10])).split()[7] == "revoked"

    code, _, err = _afina(cli_home, capsys, "keys", "revoke", "afk-nope00")
    assert code == 2 and err.strip() == "error: no such API key: afk-nope00"


def test_cli_refuses_a_bad_expiry(cli_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_duration("12h") == 43200 and parse_duration("2w") == 14 * 86400
    with pytest.raises(SystemExit) as caught:
        main(["--home", str(cli_home), "keys", "create", "--tenant", "acme", "--expires-in", "soon"])
    assert caught.value.code == 2
    assert "'soon' is not a duration" in capsys.readouterr().err
    code, out, _ = _afina(cli_home, capsys, "keys", "list")
    assert (code, out.strip()) == (0, "no API keys")
