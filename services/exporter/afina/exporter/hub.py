"""Publish an exported model to a Hugging Face Hub repository with ``huggingface_hub``.

What users of fine-tuning tools hit here is a 401 or 403 after the upload has started (a read-only token,
a namespace the token cannot write: autotrain#769, huggingface_hub#1653). So the token is checked first
(``whoami``), and a missing, unknown or read-only token, a fine-grained token without ``repo.write`` on the
namespace, or a namespace that is neither the user's nor an organization they can write in, is refused
before anything is created or uploaded, with a message that names the user and the namespace.

Then the repository is made (private by default; an existing public one is never published into when
private was asked) and the files go up resumably: each large file is an LFS object the Hub keeps once
uploaded, and the LFS batch API answers "already there" for it on a later attempt, so a retry after a
failure re-uploads nothing that finished. One commit then makes everything visible at once: a failed
attempt leaves no half-published model.

The uploads use the plain Git LFS protocol, not Xet: the Hub accepts LFS for every repository (Xet-backed
ones too), and it is the protocol the tests' local Hub speaks, so what is tested is what runs. A publication
never fails the training: ``publish_to_hub`` returns a ``HubPublication`` whose ``status`` is ``failed``
with the reason, and the token appears in no message and no log line.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import CommitOperationAdd, HfApi, constants
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import disable_progress_bars
from pydantic import SecretStr

from afina.core.artifacts import HubPublication, HubTarget
from afina.core.errors import PermissionDenied, ServiceUnavailable
from afina.core.logging import REDACTED, log_event, redact, register_secret

log = logging.getLogger("afina.exporter.hub")

README = "README.md"
DEFAULT_TOKEN_ENV = "HF_TOKEN"
WRITE_PERMISSION = "repo.write"
# an organization member with one of these roles may create repositories there (a contributor only writes to
# the ones they created: the Hub refuses the rest at commit time)
ORG_WRITE_ROLES = frozenset({"admin", "write", "contributor"})

Progress = Callable[[str], None]


class PublishRefused(PermissionDenied):
    """The Hub would refuse this publication (the token or the namespace): nothing was uploaded.

    ``code`` says which refusal (``hub_token_missing``, ``hub_token_invalid``, ``hub_token_not_user``,
    ``hub_token_read_only``, ``hub_token_scope``, ``hub_namespace_forbidden``, ``hub_org_role``,
    ``hub_repo_public``); the message says what to change.
    """

    def __init__(self, message: str, *, code: str, user: str | None = None, namespace: str | None = None) -> None:
        super().__init__(message, param="export.hub", code=code)
        self.user = user
        self.namespace = namespace


class HubUnavailable(ServiceUnavailable):
    """The Hub could not be reached or answered with a server error: the same publication may work later."""

    code = "hub_unavailable"


@dataclass(frozen=True)
class HubIdentity:
    """Who the token is and where the publication goes, once ``whoami`` said the token may write there."""

    user: str
    namespace: str
    token_role: str | None
    token_name: str | None


def token_settings_url(endpoint: str) -> str:
    return f"{endpoint.rstrip('/')}/settings/tokens"


def split_repo(repo: str) -> tuple[str | None, str]:
    """``("namespace", "name")`` of ``namespace/name``; ``(None, name)`` when the namespace is left out."""
    namespace, _, name = repo.rpartition("/")
    return (namespace or None), name


def check_write_access(whoami: Mapping[str, Any], namespace: str | None, *, endpoint: str) -> HubIdentity:
    """What ``whoami-v2`` says about writing to ``namespace`` (None: the token's user); ``PublishRefused`` when
    the Hub would refuse it.

    Checked: the token is a user's (not an organization's or an app's), its role is not ``read``, a
    fine-grained token holds ``repo.write`` on the namespace, and the namespace is the user's own or an
    organization where their role may create repositories. A field the payload lacks is not held against
    the token: the Hub itself decides then, and its answer is reported as a failed publication.
    """
    settings = token_settings_url(endpoint)
    user = whoami.get("name")
    if whoami.get("type", "user") != "user" or not isinstance(user, str):
        raise PublishRefused(f"this is not a user's token (the Hub says it belongs to a {whoami.get('type')!r}): "
                             f"publish with a user's write token, created at {settings}", code="hub_token_not_user")
    target = namespace or user
    access_token = (whoami.get("auth") or {}).get("accessToken") or {}
    role = access_token.get("role")
    token_name = access_token.get("displayName")
    named = f" '{token_name}'" if token_name else ""
    if role == "read":
        raise PublishRefused(f"this token can only read; create a write token at {settings} (the token{named} of "
                             f"user {user} has the role 'read', so it cannot create or write {target}/...)",
                             code="hub_token_read_only", user=user, namespace=target)
    orgs = {org.get("name"): org for org in whoami.get("orgs") or [] if isinstance(org, Mapping)}
    if target != user:
        if target not in orgs:
            memberships = ", ".join(sorted(str(name) for name in orgs)) or "none"
            raise PublishRefused(f"user {user} cannot write to the namespace '{target}': it is neither {user}'s own "
                                 f"nor an organization {user} belongs to ({user}'s organizations: {memberships})",
                                 code="hub_namespace_forbidden", user=user, namespace=target)
        org_role = orgs[target].get("roleInOrg")
        if org_role is not None and org_role not in ORG_WRITE_ROLES:
            raise PublishRefused(f"user {user}'s role in the organization '{target}' is '{org_role}', which cannot "
                                 f"create or write repositories there: ask an admin of {target} for the write role",
                                 code="hub_org_role", user=user, namespace=target)
    if role == "fineGrained" and WRITE_PERMISSION not in _scoped_permissions(access_token, target):
        raise PublishRefused(f"the fine-grained token{named} of user {user} has no write access to '{target}' (it "
                             f"lacks {WRITE_PERMISSION} there): give the token write access to the repositories of "
                             f"{target} at {settings}, or use a write token",
                             code="hub_token_scope", user=user, namespace=target)
    return HubIdentity(user=user, namespace=target, token_role=role, token_name=token_name)


def _scoped_permissions(access_token: Mapping[str, Any], namespace: str) -> set[str]:
    scoped = ((access_token.get("fineGrained") or {}).get("scoped")) or []
    return {permission for entry in scoped if (entry.get("entity") or {}).get("name") == namespace
            for permission in entry.get("permissions") or []}


def check_hub_access(*, endpoint: str, token: SecretStr | None, target: HubTarget) -> HubIdentity:
    """``whoami`` with ``token`` and ``check_write_access`` for ``target``: what the API can run before it
    queues a publication. ``PublishRefused`` or ``HubUnavailable``; the token is in neither message."""
    secret = _secret(token, target)
    with _client_mode():
        return _identity(HfApi(endpoint=endpoint, token=secret, library_name="afina"), endpoint, secret, target)


def publish_to_hub(*, endpoint: str, token: SecretStr | None, target: HubTarget, files: Sequence[tuple[str, Path]],
                   model_card: str | Callable[[str], str], commit_message: str,
                   progress: Progress | None = None) -> HubPublication:
    """Upload ``files`` (path in the repository, local file) and the model card as ``README.md`` to ``target``
    in one commit; the ``HubPublication`` the model's registry row records, ``failed`` with the reason when the
    token or namespace is refused (before any upload) or the Hub fails.

    ``model_card`` is the card's text, or a function of the repository id (``namespace/name``) that renders
    it: the namespace is known only once ``whoami`` answered, when ``target.repo`` leaves it out.

    ``progress`` receives one line per file once it is uploaded (a job event, for the pipeline); what it raises
    (a cancelled job's ``check_continue``) stops the publication and propagates.
    Call it again after a failure: objects that reached the Hub are not uploaded twice.
    """
    _, name = split_repo(target.repo)
    repo_id = target.repo
    stage = "checking the token"
    secret: str | None = None
    try:
        secret = _secret(token, target)
        with _client_mode():
            api = HfApi(endpoint=endpoint, token=secret, library_name="afina")
            identity = _identity(api, endpoint, secret, target)
            repo_id = f"{identity.namespace}/{name}"
            stage = f"creating {repo_id}"
            repo_url = api.create_repo(repo_id, private=target.private, exist_ok=True)
            private = bool(api.repo_info(repo_id).private)
            if target.private and not private:
                raise PublishRefused(f"{repo_id} already exists and is public, but this publication is private: "
                                     f"make the repository private on the Hub, or publish with hub.private false",
                                     code="hub_repo_public", user=identity.user, namespace=identity.namespace)
            stage = f"preparing the files for {repo_id}"
            operations = _operations(files, model_card(repo_id) if callable(model_card) else model_card)
            for number, (operation, size) in enumerate(operations, start=1):
                stage = f"uploading {operation.path_in_repo} to {repo_id}"
                api.preupload_lfs_files(repo_id, additions=[operation], free_memory=False)
                if progress is not None:
                    progress(f"{operation.path_in_repo} ({size / 1e6:.1f} MB) is ready in {repo_id} "
                             f"({number}/{len(operations)}; visible once committed)")
            stage = f"committing to {repo_id}"
            commit = api.create_commit(repo_id, [operation for operation, _ in operations],
                                       commit_message=commit_message)
    except PublishRefused as exc:
        log_event(log, "hub.publish_refused", logging.WARNING, repo=repo_id, code=exc.code, user=exc.user,
                  namespace=exc.namespace)
        return _failed(repo_id, target, exc.message)
    except (HubUnavailable, HfHubHTTPError, httpx2.HTTPError, OSError, ValueError, RuntimeError) as exc:
        message = exc.message if isinstance(exc, HubUnavailable) else _describe(exc, endpoint, stage)
        message = _scrub(message, secret)
        log_event(log, "hub.publish_failed", logging.WARNING, repo=repo_id, stage=stage, error=message)
        return _failed(repo_id, target, message)
    paths = [path for path, _ in files] + [README]
    log_event(log, "hub.published", repo=repo_id, commit=commit.oid, files=len(paths), private=private)
    return HubPublication(repo=repo_id, status="registered", private=private, commit=commit.oid, url=str(repo_url),
                          files=paths, updated_at=int(time.time()))


# --- the steps ---------------------------------------------------------------------------------------------


def _secret(token: SecretStr | None, target: HubTarget) -> str:
    secret = token.get_secret_value().strip() if token is not None else ""
    if not secret:
        env = target.token_env or DEFAULT_TOKEN_ENV
        raise PublishRefused(f"no Hub token: set {env} to a write token of the account that publishes (nothing "
                             f"was uploaded)", code="hub_token_missing", namespace=split_repo(target.repo)[0])
    register_secret(secret)  # every afina log formatter redacts it from now on, whatever its shape
    return secret


def _identity(api: HfApi, endpoint: str, secret: str, target: HubTarget) -> HubIdentity:
    namespace, _ = split_repo(target.repo)
    try:
        whoami = api.whoami()
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            raise PublishRefused(f"the Hub at {endpoint} does not accept this token (401: unknown, revoked or "
                                 f"expired); create a write token at {token_settings_url(endpoint)}",
                                 code="hub_token_invalid", namespace=namespace) from None
        raise HubUnavailable(_scrub(_describe(exc, endpoint, "checking the token"), secret)) from None
    except httpx2.HTTPError as exc:
        raise HubUnavailable(_scrub(_describe(exc, endpoint, "checking the token"), secret)) from None
    return check_write_access(whoami, namespace, endpoint=endpoint)


def _operations(files: Sequence[tuple[str, Path]], model_card: str) -> list[tuple[CommitOperationAdd, int]]:
    """One addition per file, the model card last; a path named twice, or the card's own path, is refused."""
    paths = [path for path, _ in files]
    if README in paths or len(set(paths)) != len(paths):
        raise ValueError(f"the files to publish name a path twice or {README} (the model card's): {paths}")
    card = model_card.encode("utf-8")
    operations = [(CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(local)), local.stat().st_size)
                  for path, local in files]
    return [*operations, (CommitOperationAdd(path_in_repo=README, path_or_fileobj=card), len(card))]


def _failed(repo_id: str, target: HubTarget, message: str) -> HubPublication:
    return HubPublication(repo=repo_id, status="failed", private=target.private, error=message,
                          updated_at=int(time.time()))


def _describe(exc: BaseException, endpoint: str, stage: str) -> str:
    """What went wrong, for the user: the Hub's status and message when it answered, the transport error when
    it did not (the library wraps LFS upload errors in a RuntimeError whose cause says it)."""
    http = next((cause for cause in _causes(exc) if isinstance(cause, HfHubHTTPError)), None)
    if http is not None and http.response is not None:
        detail = http.server_message or str(http).strip().splitlines()[0]
        return f"the Hub at {endpoint} answered {http.response.status_code} while {stage}: {detail}"
    transport = next((cause for cause in _causes(exc) if isinstance(cause, httpx2.HTTPError)), None)
    if transport is not None:
        return f"could not reach the Hub at {endpoint} while {stage}: {type(transport).__name__}: {transport}"
    causes = "; ".join(str(cause) for cause in _causes(exc) if str(cause))
    return f"publishing to the Hub at {endpoint} failed while {stage}: {causes or type(exc).__name__}"


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _scrub(message: str, secret: str | None) -> str:
    if secret:
        message = message.replace(secret, REDACTED)
    return redact(message)


_CLIENT_MODE_LOCK = threading.Lock()


@contextmanager
def _client_mode() -> Iterator[None]:
    """``huggingface_hub`` reads process-wide switches on every request; a publication needs them set.

    ``HF_HUB_OFFLINE`` (set in afina's worker images so nothing is downloaded by accident) would refuse every
    request: a publication is an upload the operator configured. With ``hf_xet`` installed, uploads go
    through Xet unless ``HF_HUB_DISABLE_XET``: afina uploads over plain Git LFS (see the module docstring).
    And its terminal progress bars would fill the worker's log: the ``progress`` callback reports instead.
    All are restored afterwards; the lock keeps two publications in one process from restoring them under
    each other.
    """
    with _CLIENT_MODE_LOCK, disable_progress_bars():
        saved = constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET
        constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET = False, True
        try:
            yield
        finally:
            constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET = saved
