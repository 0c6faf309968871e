"""``encryption.key_env`` names only a variable the operator allowed for the tenant; a variable that is not
allowed, and one that is allowed but unset, get the same answer — nothing tells what the worker's
environment holds (``AFINA_S3_SECRET_KEY``, ``PATH``)."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet

from afina.core.datasets.key_env import KEY_ENV_REFUSED_CODE, check_key_env_allowed
from afina.core.datasets.options import EncryptionOptions, IngestOptions
from afina.core.errors import InvalidRequest
from afina.core.settings import Settings
from afina.ingest.crypto import check_key_env, load_fernet

SETTINGS = Settings(encryption_key_envs={"acme": ["ACME_FERNET_KEY", "ACME_UNSET_KEY"], "*": ["SHARED_FERNET_KEY"]})


def options(key_env: str) -> IngestOptions:
    return IngestOptions(encryption=EncryptionOptions(key_env=key_env, fields=["prompt"]))


def answer(key_env: str, tenant: str = "acme") -> tuple[str, str | None, str | None]:
    with pytest.raises(InvalidRequest) as caught:
        check_key_env(options(key_env), SETTINGS.key_envs_for(tenant))
    error = caught.value
    return error.message.replace(repr(key_env), "<name>"), error.param, error.code


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACME_FERNET_KEY", Fernet.generate_key().decode())
    monkeypatch.setenv("SHARED_FERNET_KEY", Fernet.generate_key().decode())
    monkeypatch.setenv("AFINA_S3_SECRET_KEY", "s3-secret-value")
    monkeypatch.setenv("GLOBEX_FERNET_KEY", Fernet.generate_key().decode())
    monkeypatch.delenv("ACME_UNSET_KEY", raising=False)
    monkeypatch.delenv("NO_SUCH_VARIABLE_ANYWHERE", raising=False)


def test_the_tenants_set_and_the_shared_set_are_allowed() -> None:
    assert SETTINGS.key_envs_for("acme") == {"ACME_FERNET_KEY", "ACME_UNSET_KEY", "SHARED_FERNET_KEY"}
    assert SETTINGS.key_envs_for("globex") == {"SHARED_FERNET_KEY"}
    check_key_env(options("ACME_FERNET_KEY"), SETTINGS.key_envs_for("acme"))
    check_key_env(options("SHARED_FERNET_KEY"), SETTINGS.key_envs_for("globex"))
    check_key_env(IngestOptions(), frozenset())  # nothing encrypted: nothing to check
    assert load_fernet("ACME_FERNET_KEY") is not None


def test_not_allowed_and_allowed_but_unset_get_one_answer() -> None:
    answers = {name: answer(name) for name in ("AFINA_S3_SECRET_KEY", "PATH", "GLOBEX_FERNET_KEY",
                                               "NO_SUCH_VARIABLE_ANYWHERE", "ACME_UNSET_KEY")}
    answers["another tenant's key"] = answer("ACME_FERNET_KEY", tenant="globex")
    assert len(set(answers.values())) == 1, answers
    message, param, code = next(iter(answers.values()))
    assert (param, code) == ("encryption.key_env", KEY_ENV_REFUSED_CODE)
    assert "s3-secret-value" not in message and "not one of the key variables" in message


def test_load_fernet_answers_an_unset_variable_like_a_refused_one() -> None:
    with pytest.raises(InvalidRequest) as caught:
        load_fernet("ACME_UNSET_KEY")
    assert caught.value.message.replace("'ACME_UNSET_KEY'", "<name>") == answer("PATH")[0]


def test_the_gateway_check_names_the_upload_field() -> None:
    check_key_env_allowed(options("ACME_FERNET_KEY"), SETTINGS.key_envs_for("acme"))
    with pytest.raises(InvalidRequest) as caught:
        check_key_env_allowed(options("PATH"), SETTINGS.key_envs_for("acme"),
                              param="ingest_options.encryption.key_env")
    assert caught.value.param == "ingest_options.encryption.key_env"
    assert caught.value.message.startswith("ingest_options.encryption.key_env 'PATH' is not one of")
