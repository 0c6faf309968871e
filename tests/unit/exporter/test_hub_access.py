"""The Hub token checks that run before any upload, on ``whoami-v2`` payloads shaped like the Hub's."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from huggingface_hub import constants
from pydantic import SecretStr

from afina.core.artifacts import HubTarget
from afina.exporter.hub import PublishRefused, check_write_access, publish_to_hub, split_repo

ENDPOINT = "https://hub.example"
SETTINGS = "https://hub.example/settings/tokens"


def whoami(role: str = "write", *, orgs: dict[str, str] | None = None, scoped: dict[str, list[str]] | None = None,
           kind: str = "user", name: str = "ana") -> dict[str, Any]:
    """A whoami-v2 answer: the user, their organizations with ``roleInOrg``, the token's role and scopes."""
    access_token: dict[str, Any] = {"displayName": "afina-publish", "role": role, "createdAt": "2026-01-01T00:00:00Z"}
    if role == "fineGrained":
        access_token["fineGrained"] = {
            "canReadGatedRepos": False, "global": ["discussion.write"],
            "scoped": [{"entity": {"_id": "0" * 24, "type": "org" if entity in (orgs or {}) else "user",
                                   "name": entity}, "permissions": permissions}
                       for entity, permissions in (scoped or {}).items()]}
    return {"type": kind, "id": "1" * 24, "name": name, "fullname": "Ana", "canPay": False, "isPro": False,
            "orgs": [{"type": "org", "name": org, "roleInOrg": org_role} for org, org_role in (orgs or {}).items()],
            "auth": {"type": "access_token", "accessToken": access_token}}


def test_a_write_token_publishes_in_the_users_own_namespace_by_default() -> None:
    identity = check_write_access(whoami("write"), None, endpoint=ENDPOINT)
    assert (identity.user, identity.namespace, identity.token_role) == ("ana", "ana", "write")


@pytest.mark.parametrize("org_role", ["admin", "write", "contributor"])
def test_a_write_token_publishes_in_an_organization_where_the_user_may_create(org_role: str) -> None:
    identity = check_write_access(whoami("write", orgs={"aeon-labs": org_role}), "aeon-labs", endpoint=ENDPOINT)
    assert identity.namespace == "aeon-labs"


def test_a_read_token_is_refused_saying_it_can_only_read() -> None:
    with pytest.raises(PublishRefused) as refused:
        check_write_access(whoami("read"), None, endpoint=ENDPOINT)
    assert refused.value.code == "hub_token_read_only"
    assert refused.value.message.startswith(f"this token can only read; create a write token at {SETTINGS}")
    assert "ana" in refused.value.message


def test_a_namespace_the_user_is_not_in_is_refused_naming_user_and_namespace() -> None:
    with pytest.raises(PublishRefused) as refused:
        check_write_access(whoami("write", orgs={"aeon-labs": "write"}), "acme", endpoint=ENDPOINT)
    assert refused.value.code == "hub_namespace_forbidden"
    assert refused.value.http_status == 403
    assert "user ana cannot write to the namespace 'acme'" in refused.value.message
    assert "aeon-labs" in refused.value.message  # the organizations the user does belong to


def test_a_read_only_membership_of_the_organization_is_refused() -> None:
    with pytest.raises(PublishRefused) as refused:
        check_write_access(whoami("write", orgs={"aeon-labs": "read"}), "aeon-labs", endpoint=ENDPOINT)
    assert refused.value.code == "hub_org_role"
    assert "ana's role in the organization 'aeon-labs' is 'read'" in refused.value.message


def test_a_fine_grained_token_without_repo_write_on_the_namespace_is_refused() -> None:
    payload = whoami("fineGrained", orgs={"aeon-labs": "write"},
                     scoped={"ana": ["repo.content.read", "repo.write"], "aeon-labs": ["repo.content.read"]})
    assert check_write_access(payload, "ana", endpoint=ENDPOINT).namespace == "ana"
    with pytest.raises(PublishRefused) as refused:
        check_write_access(payload, "aeon-labs", endpoint=ENDPOINT)
    assert refused.value.code == "hub_token_scope"
    message = refused.value.message
    assert "fine-grained token 'afina-publish' of user ana has no write access to 'aeon-labs'" in message
    assert "repo.write" in message and SETTINGS in message


def test_a_fine_grained_token_with_repo_write_on_the_organization_passes() -> None:
    payload = whoami("fineGrained", orgs={"aeon-labs": "write"}, scoped={"aeon-labs": ["repo.write"]})
    assert check_write_access(payload, "aeon-labs", endpoint=ENDPOINT).token_role == "fineGrained"


def test_an_organization_token_is_refused() -> None:
    with pytest.raises(PublishRefused) as refused:
        check_write_access(whoami("write", kind="org", name="aeon-labs"), None, endpoint=ENDPOINT)
    assert refused.value.code == "hub_token_not_user"


def test_the_repository_may_leave_out_its_namespace() -> None:
    assert split_repo("aeon-labs/pt-assistant") == ("aeon-labs", "pt-assistant")
    assert split_repo("pt-assistant") == (None, "pt-assistant")


@pytest.mark.parametrize("token", [None, SecretStr(""), SecretStr("   ")])
def test_no_token_fails_the_publication_before_any_request(token: SecretStr | None, tmp_path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """This runs with TCP connections refused (tests/unit/): a request would fail the test, not the publication."""
    model = tmp_path / "model-q4_k_m.gguf"
    model.write_bytes(b"GGUF" + bytes(64))
    caplog.set_level(logging.INFO)
    offline_before = constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET
    publication = publish_to_hub(endpoint=ENDPOINT, token=token,
                                 target=HubTarget(repo="pt-assistant", token_env="ACME_HF_TOKEN"),
                                 files=[("model-q4_k_m.gguf", model)], model_card="---\n---\n", commit_message="x")
    assert publication.status == "failed"
    assert publication.repo == "pt-assistant" and publication.commit is None and publication.files == []
    assert publication.error is not None and publication.error.startswith("no Hub token: set ACME_HF_TOKEN")
    assert publication.private is True
    assert any(record.getMessage() == "hub.publish_refused" for record in caplog.records)
    assert (constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET) == offline_before
