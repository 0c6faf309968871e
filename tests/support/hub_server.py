"""A local Hugging Face Hub for tests: the endpoints ``huggingface_hub`` 2.x calls to publish a model.

Only what cannot run here is stood in for, and it follows what ``huggingface_hub`` sends and reads
(``hf_api.py``, ``_commit_api.py``, ``lfs.py``, ``utils/_http.py`` of the installed version):

- ``GET /api/whoami-v2``: the user, their organizations (``roleInOrg``) and the token
  (``auth.accessToken.role`` read / write / fineGrained, with ``fineGrained.scoped`` permissions);
- ``POST /api/repos/create`` ``{name, organization, visibility}``: 403 on a namespace the token cannot
  create in, 409 when the repository exists (the client's ``exist_ok`` handles it);
- ``GET /api/models/{repo}[/revision/{rev}]`` (``repo_info``);
- ``POST /api/validate-yaml`` (``create_commit`` checks a README's metadata first);
- ``POST /api/models/{repo}/preupload/{rev}``: upload mode per file (lfs / regular) and the oid a file
  already has;
- ``POST /{repo}.git/info/lfs/objects/batch`` (git-lfs batch API): no ``actions`` for an object the
  repository already holds, else a presigned ``upload`` (basic, or multipart with ``chunk_size`` and part
  URLs past ``multipart_threshold``) and a ``verify`` action;
- the presigned uploads (``PUT``, no token, like S3) and ``POST /api/complete_multipart``: an object is kept
  only when its bytes hash to the announced sha256 and size;
- ``POST /{repo}.git/info/lfs/objects/verify``;
- ``POST /api/models/{repo}/commit/{rev}`` (NDJSON: header, file, lfsFile, deletedFile, deletedFolder): refused
  when an ``lfsFile`` names an object that was never uploaded, or a regular file is binary.

It enforces what the Hub enforces: 401 without a token or with an unknown one, 403 writing where the token
cannot (a read token, a fine-grained token without ``repo.write`` on the namespace, a namespace that is
neither the user's nor one of their organizations with write access), 404 (``X-Error-Code: RepoNotFound``)
for a repository the caller cannot see. Xet storage is not served: a client that tries it gets a 404 and the
request is listed in ``HubState.unhandled``, so a test that expects plain LFS sees it.

Tokens, repositories and failures to inject are set per test on the ``HubServer`` handle; what was asked
(``requests``) and which LFS objects were uploaded (``lfs_uploads``) are recorded for the test to check.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from math import ceil
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.support.servers import ServedApp, serve_app

TokenRole = Literal["read", "write", "fineGrained"]
OrgRole = Literal["admin", "write", "contributor", "read"]

READ_PERMISSION = "repo.content.read"
WRITE_PERMISSION = "repo.write"
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
# the Hub sends files above this size through LFS whatever their content
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
# the .gitattributes the Hub writes into a new model repository (files matching go through LFS)
DEFAULT_LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gguf", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
    "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle",
    "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite",
    "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
)
# the license identifiers the Hub accepts in a card's metadata (hub-docs, repositories-licenses.md)
HUB_LICENSES = frozenset({
    "apache-2.0", "mit", "openrail", "bigscience-openrail-m", "creativeml-openrail-m", "bigscience-bloom-rail-1.0",
    "bigcode-openrail-m", "afl-3.0", "artistic-2.0", "bsl-1.0", "bsd", "bsd-2-clause", "bsd-3-clause",
    "bsd-3-clause-clear", "c-uda", "cc", "cc0-1.0", "cc-by-2.0", "cc-by-2.5", "cc-by-3.0", "cc-by-4.0",
    "cc-by-sa-3.0", "cc-by-sa-4.0", "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nd-4.0",
    "cc-by-nc-nd-3.0", "cc-by-nc-nd-4.0", "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0",
    "cdla-sharing-1.0", "cdla-permissive-1.0", "cdla-permissive-2.0", "wtfpl", "ecl-2.0", "epl-1.0", "epl-2.0",
    "etalab-2.0", "eupl-1.1", "eupl-1.2", "agpl-3.0", "gfdl", "gpl", "gpl-2.0", "gpl-3.0", "lgpl", "lgpl-2.1",
    "lgpl-3.0", "isc", "h-research", "intel-research", "lppl-1.3c", "ms-pl", "apple-ascl", "apple-amlr",
    "mpl-2.0", "odc-by", "odbl", "openmdw-1.0", "openrail++", "osl-3.0", "postgresql", "ofl-1.1", "ncsa",
    "unlicense", "zlib", "pddl", "lgpl-lr", "deepfloyd-if-license", "fair-noncommercial-research-license",
    "llama2", "llama3", "llama3.1", "llama3.2", "llama3.3", "llama4", "gemma", "unknown", "other",
})
_OID = re.compile(r"[0-9a-f]{64}")
_REPO_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


@dataclass(frozen=True)
class HubToken:
    """A token the server knows: whose it is, its role, and (fine-grained) its permissions per namespace."""

    user: str
    role: TokenRole
    name: str
    scoped: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def label(self) -> str:
        return f"{self.user}:{self.role}:{self.name}"


@dataclass
class StoredFile:
    path: str
    size: int
    content: bytes | None = None  # a regular (git) file
    lfs_oid: str | None = None  # an LFS file: the sha256 of its content

    @property
    def oid(self) -> str:
        """What preupload reports: the sha256 of an LFS file, the git blob sha1 of a regular one."""
        if self.lfs_oid is not None:
            return self.lfs_oid
        assert self.content is not None
        return hashlib.sha1(b"blob %d\0" % len(self.content) + self.content).hexdigest()


@dataclass
class HubCommit:
    oid: str
    summary: str
    description: str
    author: str
    paths: tuple[str, ...]


@dataclass
class HubRepo:
    repo_id: str
    private: bool
    creator: str
    created_at: str
    objects_dir: Path
    files: dict[str, StoredFile] = field(default_factory=dict)
    commits: list[HubCommit] = field(default_factory=list)
    lfs_objects: dict[str, int] = field(default_factory=dict)  # oid -> size, stored under objects_dir

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/", 1)[0]

    @property
    def head(self) -> str:
        return self.commits[-1].oid

    def read(self, path: str) -> bytes:
        """The content of ``path`` at the head of ``main`` (LFS files resolved to their bytes)."""
        stored = self.files[path]
        if stored.content is not None:
            return stored.content
        assert stored.lfs_oid is not None
        return (self.objects_dir / stored.lfs_oid).read_bytes()


@dataclass
class RecordedRequest:
    route: str  # whoami, create, repo_info, validate_yaml, preupload, batch, upload, upload_part, complete,
    # verify, commit (or "unhandled")
    method: str
    path: str
    token: str | None  # the token's label (user:role:name), never the token itself
    status: int


@dataclass
class UploadTicket:
    """A presigned upload URL the batch API handed out (S3 needs no token: the URL is the credential)."""

    repo_id: str
    oid: str
    size: int
    chunk_size: int | None = None
    parts: dict[int, Path] = field(default_factory=dict)
    etags: dict[int, str] = field(default_factory=dict)


@dataclass
class InjectedFailure:
    status: int
    message: str
    remaining: int
    skip: int = 0


class HubState:
    """Everything the server holds, behind one lock (uvicorn's thread and the test's thread both reach it)."""

    def __init__(self, storage_dir: Path) -> None:
        self.storage_dir = storage_dir
        self.lock = threading.Lock()
        self.users: dict[str, dict[str, OrgRole]] = {}  # user -> {org: role in org}
        self.orgs: set[str] = set()
        self.tokens: dict[str, HubToken] = {}
        self.repos: dict[str, HubRepo] = {}
        self.requests: list[RecordedRequest] = []
        self.lfs_uploads: list[tuple[str, str]] = []  # (repo_id, oid) each time an object was stored
        self.tickets: dict[str, UploadTicket] = {}
        self.failures: dict[str, InjectedFailure] = {}
        self.multipart_threshold = 5 * 1024**3
        self.multipart_chunk_size = 100 * 1024 * 1024
        self.base_url = ""

    # --- what a test sets up -------------------------------------------------------------------------------

    def add_user(self, name: str, orgs: dict[str, OrgRole] | None = None) -> None:
        with self.lock:
            self.users[name] = dict(orgs or {})
            self.orgs.update(self.users[name])

    def issue_token(self, user: str, role: TokenRole, *, write_to: tuple[str, ...] = (),
                    read_from: tuple[str, ...] = (), name: str | None = None) -> str:
        """A new token of ``user``; for ``fineGrained``, ``repo.write`` on ``write_to`` and read on ``read_from``."""
        scoped: dict[str, tuple[str, ...]] = {}
        if role == "fineGrained":
            scoped.update({namespace: (READ_PERMISSION,) for namespace in read_from})
            scoped.update({namespace: (READ_PERMISSION, WRITE_PERMISSION) for namespace in write_to})
        token = "hf_" + secrets.token_urlsafe(26).replace("-", "x").replace("_", "y")
        with self.lock:
            if user not in self.users:
                raise KeyError(f"no user {user!r}: add_user first")
            self.tokens[token] = HubToken(user=user, role=role, name=name or f"{role}-token", scoped=scoped)
        return token

    def fail_next(self, route: str, status: int, *, times: int = 1, skip: int = 0,
                  message: str = "injected failure") -> None:
        """After ``skip`` more requests to ``route``, the next ``times`` are answered ``status`` (their body read)."""
        with self.lock:
            self.failures[route] = InjectedFailure(status=status, message=message, remaining=times, skip=skip)

    # --- what a test reads back ----------------------------------------------------------------------------

    def repo(self, repo_id: str) -> HubRepo:
        with self.lock:
            return self.repos[repo_id]

    def routes_seen(self) -> list[str]:
        with self.lock:
            return [request.route for request in self.requests]

    @property
    def unhandled(self) -> list[RecordedRequest]:
        with self.lock:
            return [request for request in self.requests if request.route == "unhandled"]

    # --- what the handlers use -----------------------------------------------------------------------------

    def take_failure(self, route: str) -> InjectedFailure | None:
        with self.lock:
            failure = self.failures.get(route)
            if failure is None:
                return None
            if failure.skip > 0:
                failure.skip -= 1
                return None
            failure.remaining -= 1
            if failure.remaining <= 0:
                del self.failures[route]
            return failure

    def can_create(self, token: HubToken, namespace: str) -> bool:
        return self._write_role(token.user, namespace) is not None and self._token_writes(token, namespace)

    def can_write(self, token: HubToken, repo: HubRepo) -> bool:
        role = self._write_role(token.user, repo.namespace)
        if role is None or not self._token_writes(token, repo.namespace):
            return False
        return role != "contributor" or repo.creator == token.user  # a contributor writes only what they made

    def can_read(self, token: HubToken | None, repo: HubRepo) -> bool:
        if not repo.private:
            return True
        if token is None:
            return False
        member = repo.namespace == token.user or repo.namespace in self.users.get(token.user, {})
        if not member:
            return False
        return token.role != "fineGrained" or READ_PERMISSION in token.scoped.get(repo.namespace, ())

    def _write_role(self, user: str, namespace: str) -> str | None:
        """The user's standing in ``namespace`` when it lets them write there (their own is "owner")."""
        if namespace == user:
            return "owner"
        role = self.users.get(user, {}).get(namespace)
        return role if role in ("admin", "write", "contributor") else None

    @staticmethod
    def _token_writes(token: HubToken, namespace: str) -> bool:
        if token.role == "write":
            return True
        return token.role == "fineGrained" and WRITE_PERMISSION in token.scoped.get(namespace, ())


@dataclass
class HubServer:
    """The running server: its URL for ``HfApi(endpoint=...)`` and the state a test sets up and reads."""

    state: HubState
    served: ServedApp

    @property
    def url(self) -> str:
        return self.served.url

    def stop(self) -> None:
        self.served.stop()


def start_hub_server(storage_dir: Path) -> HubServer:
    storage_dir.mkdir(parents=True, exist_ok=True)
    state = HubState(storage_dir)
    served = serve_app(hub_app(state))
    state.base_url = served.url
    return HubServer(state=state, served=served)


@pytest.fixture
def hub_server(tmp_path: Path) -> Iterator[HubServer]:
    """A fresh local Hub for one test, stopped (by its handle) afterwards."""
    server = start_hub_server(tmp_path / "hub")
    try:
        yield server
    finally:
        server.stop()


# --- the application ---------------------------------------------------------------------------------------

Handler = Callable[[Request, HubState], Awaitable[Response]]


def hub_app(state: HubState) -> Starlette:
    def route(path: str, name: str, handler: Handler, methods: list[str]) -> Route:
        async def endpoint(request: Request) -> Response:
            failure = state.take_failure(name)
            if failure is not None:
                await _drain(request)
                response: Response = _error(failure.status, failure.message)
            else:
                response = await handler(request, state)
            token = state.tokens.get(_bearer(request) or "")
            with state.lock:
                state.requests.append(RecordedRequest(route=name, method=request.method, path=request.url.path,
                                                      token=token.label() if token else None,
                                                      status=response.status_code))
            return response

        return Route(path, endpoint, methods=methods, name=name)

    async def unhandled(request: Request) -> Response:
        await _drain(request)
        with state.lock:
            state.requests.append(RecordedRequest(route="unhandled", method=request.method, path=request.url.path,
                                                  token=None, status=404))
        return _error(404, f"the test Hub does not serve {request.method} {request.url.path}")

    routes = [
        route("/api/whoami-v2", "whoami", _whoami, ["GET"]),
        route("/api/validate-yaml", "validate_yaml", _validate_yaml, ["POST"]),
        route("/api/repos/create", "create", _create_repo, ["POST"]),
        route("/api/models/{namespace}/{name}", "repo_info", _repo_info, ["GET"]),
        route("/api/models/{namespace}/{name}/revision/{revision}", "repo_info", _repo_info, ["GET"]),
        route("/api/models/{namespace}/{name}/preupload/{revision}", "preupload", _preupload, ["POST"]),
        route("/api/models/{namespace}/{name}/commit/{revision}", "commit", _commit, ["POST"]),
        route("/api/complete_multipart", "complete", _complete_multipart, ["POST"]),
        route("/{namespace}/{name}/info/lfs/objects/batch", "batch", _lfs_batch, ["POST"]),
        route("/{namespace}/{name}/info/lfs/objects/verify", "verify", _lfs_verify, ["POST"]),
        route("/lfs-storage/{ticket}", "upload", _lfs_put, ["PUT"]),
        route("/lfs-storage/{ticket}/part/{part}", "upload_part", _lfs_put_part, ["PUT"]),
        Route("/{path:path}", unhandled, methods=["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH"]),
    ]
    return Starlette(routes=routes)


# --- helpers -----------------------------------------------------------------------------------------------


def _error(status: int, message: str, code: str | None = None, **extra: Any) -> JSONResponse:
    headers = {"X-Error-Message": message}
    if code is not None:
        headers["X-Error-Code"] = code
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


async def _drain(request: Request) -> None:
    async for _chunk in request.stream():
        pass


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _authenticate(request: Request, state: HubState) -> HubToken | JSONResponse:
    """The request's token, or the Hub's 401 (no token, or one it does not know)."""
    token = state.tokens.get(_bearer(request) or "")
    if token is None:
        return _error(401, INVALID_CREDENTIALS)
    return token


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _repo_for(request: Request, state: HubState, token: HubToken | None, *, write: bool,
              git_suffix: bool = False) -> HubRepo | JSONResponse:
    """The repository the path names, when ``token`` may read it (and write it, with ``write``)."""
    namespace = request.path_params["namespace"]
    name = request.path_params["name"]
    if git_suffix:
        if not name.endswith(".git"):
            return _error(404, "Not Found")
        name = name.removesuffix(".git")
    repo_id = f"{namespace}/{name}"
    revision = request.path_params.get("revision")
    with state.lock:
        repo = state.repos.get(repo_id)
        readable = repo is not None and state.can_read(token, repo)
        writable = repo is not None and token is not None and state.can_write(token, repo)
    if repo is None or not readable:
        # the Hub does not tell a repository it hides from one that does not exist
        return _error(401 if token is None else 404, "Repository not found", code="RepoNotFound")
    if revision is not None and revision != "main":
        return _error(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
    if write and not writable:
        return _error(403, _forbidden_message(token, repo.namespace))
    return repo


def _forbidden_message(token: HubToken | None, namespace: str) -> str:
    if token is not None and token.role == "read":
        return "You have read access but not the required permissions for this operation (read-only token)"
    if token is not None and token.role == "fineGrained":
        return f"The fine-grained token you are using does not have write access to {namespace}"
    return f"You don't have the rights to write to {namespace}"


def _lfs_mode(path: str, size: int, sample: bytes, patterns: tuple[str, ...]) -> str:
    if size >= LFS_SIZE_THRESHOLD or b"\0" in sample:
        return "lfs"
    name = path.rsplit("/", 1)[-1]
    return "lfs" if any(fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(name, pattern)
                        for pattern in patterns) else "regular"


def _commit_oid(parent: str | None, summary: str, paths: tuple[str, ...]) -> str:
    material = json.dumps([parent, summary, paths, time.time_ns(), secrets.token_hex(8)]).encode()
    return hashlib.sha1(material).hexdigest()


def _gitattributes() -> bytes:
    return "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in DEFAULT_LFS_PATTERNS).encode()


def _lfs_patterns(repo: HubRepo) -> tuple[str, ...]:
    stored = repo.files.get(".gitattributes")
    if stored is None or stored.content is None:
        return ()
    return tuple(line.split()[0] for line in stored.content.decode().splitlines()
                 if "filter=lfs" in line and line.split())


# --- endpoints ---------------------------------------------------------------------------------------------


async def _whoami(request: Request, state: HubState) -> Response:
    token = _authenticate(request, state)
    if isinstance(token, JSONResponse):
        return token
    with state.lock:
        orgs = dict(state.users[token.user])
    access_token: dict[str, Any] = {"displayName": token.name, "role": token.role, "createdAt": _now()}
    if token.role == "fineGrained":
        access_token["fineGrained"] = {
            "canReadGatedRepos": False,
            "global": ["discussion.write", "post.write"],
            "scoped": [{"entity": {"_id": hashlib.md5(namespace.encode()).hexdigest()[:24],
                                   "type": "org" if namespace in orgs else "user", "name": namespace},
                        "permissions": list(permissions)}
                       for namespace, permissions in token.scoped.items()],
        }
    return JSONResponse({
        "type": "user", "id": hashlib.md5(token.user.encode()).hexdigest()[:24], "name": token.user,
        "fullname": token.user.title(), "email": f"{token.user}@example.org", "emailVerified": True,
        "canPay": False, "isPro": False, "periodEnd": None, "avatarUrl": f"/avatars/{token.user}.svg",
        "orgs": [{"type": "org", "id": hashlib.md5(org.encode()).hexdigest()[:24], "name": org,
                  "fullname": org.replace("-", " ").title(), "email": None, "canPay": False, "periodEnd": None,
                  "avatarUrl": f"/avatars/{org}.svg", "roleInOrg": role, "isEnterprise": False}
                 for org, role in orgs.items()],
        "auth": {"type": "access_token", "accessToken": access_token},
    })


async def _validate_yaml(request: Request, state: HubState) -> Response:
    body = await request.json()
    content = body.get("content")
    if not isinstance(content, str):
        return JSONResponse({"errors": [{"message": "content must be a string"}]}, status_code=400)
    errors = _card_metadata_errors(content)
    if errors:
        return JSONResponse({"errors": [{"message": message} for message in errors], "warnings": []},
                            status_code=400)
    return JSONResponse({"errors": [], "warnings": []})


def _card_metadata_errors(content: str) -> list[str]:
    """What the Hub refuses in a card's YAML front matter (the subset a model card of afina can get wrong)."""
    if not content.startswith("---\n"):
        return []
    end = content.find("\n---", 4)
    if end == -1:
        return ["the metadata block is not closed by a '---' line"]
    try:
        metadata = yaml.safe_load(content[4:end])
    except yaml.YAMLError as exc:
        return [f"invalid YAML: {exc}"]
    if metadata is None:
        return []
    if not isinstance(metadata, dict):
        return ["metadata must be a YAML mapping"]
    errors: list[str] = []
    licenses = metadata.get("license")
    for license_id in licenses if isinstance(licenses, list) else [licenses] if licenses is not None else []:
        if license_id not in HUB_LICENSES:
            errors.append(f'"license" must be one of the Hub\'s license identifiers, got {license_id!r}')
    for key in ("tags", "language"):
        value = metadata.get(key)
        if value is not None and not (isinstance(value, str) or
                                      (isinstance(value, list) and all(isinstance(v, str) for v in value))):
            errors.append(f'"{key}" must be a string or a list of strings')
    base_model = metadata.get("base_model")
    for base in base_model if isinstance(base_model, list) else [base_model] if base_model is not None else []:
        if not isinstance(base, str) or base.count("/") != 1:
            errors.append(f'"base_model" must name models as "namespace/name", got {base!r}')
    relation = metadata.get("base_model_relation")
    if relation is not None and relation not in ("adapter", "merge", "quantized", "finetune"):
        errors.append(f'"base_model_relation" must be adapter, merge, quantized or finetune, got {relation!r}')
    for key in ("library_name", "pipeline_tag"):
        if key in metadata and not isinstance(metadata[key], str):
            errors.append(f'"{key}" must be a string')
    return errors


async def _create_repo(request: Request, state: HubState) -> Response:
    token = _authenticate(request, state)
    if isinstance(token, JSONResponse):
        return token
    body = await request.json()
    name, organization = body.get("name"), body.get("organization")
    repo_type = body.get("type") or "model"
    if repo_type != "model":
        return _error(400, f"the test Hub serves model repositories only, not {repo_type!r}")
    if not isinstance(name, str) or not _REPO_NAME.fullmatch(name) or ".." in name or "--" in name \
            or name.endswith(".git"):
        return _error(400, f"Invalid repository name {name!r}")
    namespace = organization or token.user
    visibility = body.get("visibility")
    if visibility is None and "private" in body:  # the body older clients send
        visibility = "private" if body["private"] else "public"
    if visibility not in (None, "public", "private"):
        return _error(400, f"Invalid visibility {visibility!r}")
    repo_id = f"{namespace}/{name}"
    with state.lock:
        if not state.can_create(token, namespace):
            message = _forbidden_message(token, namespace) if token.role != "write" else \
                f'You don\'t have the rights to create a model under the namespace "{namespace}"'
            return _error(403, message)
        if repo_id in state.repos:
            return _error(409, "You already created this model repo", url=f"{state.base_url}/{repo_id}")
        objects_dir = state.storage_dir / "lfs" / repo_id.replace("/", "__")
        objects_dir.mkdir(parents=True, exist_ok=True)
        repo = HubRepo(repo_id=repo_id, private=visibility == "private", creator=token.user, created_at=_now(),
                       objects_dir=objects_dir)
        attributes = _gitattributes()
        repo.files[".gitattributes"] = StoredFile(path=".gitattributes", size=len(attributes), content=attributes)
        repo.commits.append(HubCommit(oid=_commit_oid(None, "initial commit", (".gitattributes",)),
                                      summary="initial commit", description="", author=token.user,
                                      paths=(".gitattributes",)))
        state.repos[repo_id] = repo
    return JSONResponse({"url": f"{state.base_url}/{repo_id}", "name": repo_id,
                         "id": hashlib.md5(repo_id.encode()).hexdigest()[:24]})


async def _repo_info(request: Request, state: HubState) -> Response:
    token = state.tokens.get(_bearer(request) or "")
    if _bearer(request) is not None and token is None:
        return _error(401, INVALID_CREDENTIALS)
    repo = _repo_for(request, state, token, write=False)
    if isinstance(repo, JSONResponse):
        return repo
    with state.lock:
        siblings = [{"rfilename": path} for path in sorted(repo.files)]
        head = repo.head
    return JSONResponse({"_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
                         "modelId": repo.repo_id, "author": repo.namespace, "sha": head, "private": repo.private,
                         "disabled": False, "gated": False, "createdAt": repo.created_at, "lastModified": _now(),
                         "tags": [], "siblings": siblings})


async def _preupload(request: Request, state: HubState) -> Response:
    token = _authenticate(request, state)
    if isinstance(token, JSONResponse):
        return token
    repo = _repo_for(request, state, token, write=True)
    if isinstance(repo, JSONResponse):
        return repo
    body = await request.json()
    files = body.get("files")
    if not isinstance(files, list):
        return _error(400, '"files" must be a list')
    answers = []
    with state.lock:
        patterns = _lfs_patterns(repo)
        for entry in files:
            path, size, sample = entry.get("path"), entry.get("size"), entry.get("sample", "")
            if not isinstance(path, str) or not isinstance(size, int):
                return _error(400, "each file needs a path and a size")
            answer: dict[str, Any] = {"path": path, "shouldIgnore": False,
                                      "uploadMode": _lfs_mode(path, size, base64.b64decode(sample), patterns)}
            stored = repo.files.get(path)
            if stored is not None:
                answer["oid"] = stored.oid
            answers.append(answer)
        head = repo.head
    return JSONResponse({"files": answers, "commitOid": head})


async def _lfs_batch(request: Request, state: HubState) -> Response:
    token = _authenticate(request, state)
    if isinstance(token, JSONResponse):
        return token
    repo = _repo_for(request, state, token, write=True, git_suffix=True)
    if isinstance(repo, JSONResponse):
        return repo
    body = await request.json()
    if body.get("operation") != "upload":
        return _error(422, "the test Hub serves LFS uploads only")
    if body.get("hash_algo", "sha256") != "sha256":
        return _error(422, "only sha256 is supported")
    transfers = body.get("transfers") or ["basic"]
    objects = []
    multipart = False
    with state.lock:
        for item in body.get("objects") or []:
            oid, size = item.get("oid"), item.get("size")
            if not isinstance(oid, str) or not _OID.fullmatch(oid) or not isinstance(size, int) or size < 0:
                objects.append({"oid": str(oid), "size": size if isinstance(size, int) else -1,
                                "error": {"code": 422, "message": "invalid object: oid must be a sha256, size >= 0"}})
                continue
            if repo.lfs_objects.get(oid) == size:
                objects.append({"oid": oid, "size": size})  # already there: nothing to do
                continue
            ticket = secrets.token_urlsafe(24)
            verify = {"href": f"{state.base_url}/{repo.repo_id}.git/info/lfs/objects/verify"}
            if size > state.multipart_threshold and "multipart" in transfers:
                multipart = True
                chunk = state.multipart_chunk_size
                state.tickets[ticket] = UploadTicket(repo_id=repo.repo_id, oid=oid, size=size, chunk_size=chunk)
                header: dict[str, str] = {"chunk_size": str(chunk)}
                header.update({f"{number:05d}": f"{state.base_url}/lfs-storage/{ticket}/part/{number}"
                               for number in range(1, ceil(size / chunk) + 1)})
                upload = {"href": f"{state.base_url}/api/complete_multipart?ticket={ticket}", "header": header}
            else:
                state.tickets[ticket] = UploadTicket(repo_id=repo.repo_id, oid=oid, size=size)
                upload = {"href": f"{state.base_url}/lfs-storage/{ticket}"}
            objects.append({"oid": oid, "size": size, "authenticated": True,
                            "actions": {"upload": upload, "verify": verify}})
    return JSONResponse({"transfer": "multipart" if multipart else "basic", "objects": objects,
                         "hash_algo": "sha256"}, media_type="application/vnd.git-lfs+json")


async def _receive(request: Request, target: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with target.open("wb") as out:
        async for chunk in request.stream():
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
    return digest.hexdigest(), size


def _keep_object(state: HubState, ticket: UploadTicket, source: Path, sha256: str, size: int) -> Response:
    """Store an uploaded object when its bytes are the ones announced; the upload is refused otherwise."""
    if sha256 != ticket.oid or size != ticket.size:
        source.unlink(missing_ok=True)
        return _error(400, f"the uploaded content (sha256 {sha256}, {size} bytes) is not the object announced "
                           f"(sha256 {ticket.oid}, {ticket.size} bytes)")
    with state.lock:
        repo = state.repos[ticket.repo_id]
        source.replace(repo.objects_dir / ticket.oid)
        repo.lfs_objects[ticket.oid] = size
        state.lfs_uploads.append((ticket.repo_id, ticket.oid))
    return Response(status_code=200, headers={"ETag": f'"{hashlib.md5(sha256.encode()).hexdigest()}"'})


def _ticket(request: Request, state: HubState, *, multipart: bool) -> UploadTicket | JSONResponse:
    with state.lock:
        ticket = state.tickets.get(request.path_params.get("ticket") or request.query_params.get("ticket", ""))
    if ticket is None or (ticket.chunk_size is not None) != multipart:
        return _error(403, "Request has expired or the signature does not match")
    return ticket


async def _lfs_put(request: Request, state: HubState) -> Response:
    ticket = _ticket(request, state, multipart=False)
    if isinstance(ticket, JSONResponse):
        await _drain(request)
        return ticket
    incoming = state.storage_dir / f"incoming-{secrets.token_hex(8)}"
    sha256, size = await _receive(request, incoming)
    response = _keep_object(state, ticket, incoming, sha256, size)
    if response.status_code == 200:
        with state.lock:
            state.tickets.pop(request.path_params["ticket"], None)
    return response


async def _lfs_put_part(request: Request, state: HubState) -> Response:
    ticket = _ticket(request, state, multipart=True)
    if isinstance(ticket, JSONResponse):
        await _drain(request)
        return ticket
    number = int(request.path_params["part"])
    part_path = state.storage_dir / f"part-{request.path_params['ticket']}-{number}"
    digest, _size = await _receive(request, part_path)
    etag = f'"{digest[:32]}"'
    with state.lock:
        ticket.parts[number] = part_path
        ticket.etags[number] = etag
    return Response(status_code=200, headers={"ETag": etag})


async def _complete_multipart(request: Request, state: HubState) -> Response:
    ticket = _ticket(request, state, multipart=True)
    if isinstance(ticket, JSONResponse):
        await _drain(request)
        return ticket
    body = await request.json()
    assert ticket.chunk_size is not None
    expected = ceil(ticket.size / ticket.chunk_size)
    parts = body.get("parts") or []
    if body.get("oid") != ticket.oid or [part.get("partNumber") for part in parts] != list(range(1, expected + 1)):
        return _error(400, f"the completion must list parts 1..{expected} of object {ticket.oid}")
    for part in parts:
        if ticket.etags.get(part["partNumber"]) != part.get("etag"):
            return _error(400, f"part {part['partNumber']} was not uploaded or its etag does not match")
    assembled = state.storage_dir / f"incoming-{secrets.token_hex(8)}"
    digest = hashlib.sha256()
    size = 0
    with assembled.open("wb") as out:
        for number in range(1, expected + 1):
            data = ticket.parts[number].read_bytes()
            digest.update(data)
            size += len(data)
            out.write(data)
            ticket.parts[number].unlink()
    response = _keep_object(state, ticket, assembled, digest.hexdigest(), size)
    if response.status_code == 200:
        with state.lock:
            state.tickets.pop(request.query_params["ticket"], None)
        return JSONResponse({}, status_code=200)
    return response


async def _lfs_verify(request: Request, state: HubState) -> Response:
    token = _authenticate(request, state)
    if isinstance(token, JSONResponse):
        return token
    repo = _repo_for(request, state, token, write=True, git_suffix=True)
    if isinstance(repo, JSONResponse):
        return repo
    body = await request.json()
    with state.lock:
        size = repo.lfs_objects.get(body.get("oid", ""))
    if size is None or size != body.get("size"):
        return _error(404, f"object {body.get('oid')} ({body.get('size')} bytes) is not in {repo.repo_id}")
    return JSONResponse({})


async def _commit(request: Request, state: HubState) -> Response:
    token = _authenticate(request, state)
    if isinstance(token, JSONResponse):
        await _drain(request)
        return token
    repo = _repo_for(request, state, token, write=True)
    if isinstance(repo, JSONResponse):
        await _drain(request)
        return repo
    lines = [json.loads(line) for line in (await request.body()).decode().splitlines() if line.strip()]
    if not lines or lines[0].get("key") != "header" or not lines[0].get("value", {}).get("summary"):
        return _error(400, "a commit starts with a header line holding its summary")
    header = lines[0]["value"]
    additions: dict[str, StoredFile] = {}
    deletions: list[tuple[str, bool]] = []
    with state.lock:
        if header.get("parentCommit") not in (None, repo.head):
            return _error(412, "A commit has happened since. Please refresh and try again.")
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value") or {}
            path = value.get("path")
            if not isinstance(path, str) or not path or path.startswith("/") or ".." in path.split("/"):
                return _error(400, f"invalid path {path!r}")
            if key == "file":
                content = base64.b64decode(value.get("content", "")) if value.get("encoding") == "base64" \
                    else str(value.get("content", "")).encode()
                if b"\0" in content[:8000] or len(content) >= LFS_SIZE_THRESHOLD:
                    return _error(400, "Your push was rejected because it contains binary files. Please use "
                                       f"https://huggingface.co/docs/hub/xet to store binary files. Offending file: "
                                       f"{path}")
                additions[path] = StoredFile(path=path, size=len(content), content=content)
            elif key == "lfsFile":
                oid, size = value.get("oid"), value.get("size")
                if value.get("algo", "sha256") != "sha256" or oid not in repo.lfs_objects or \
                        (size is not None and repo.lfs_objects[oid] != size):
                    return _error(400, "Your push was rejected because an LFS pointer pointed to a file that does "
                                       f"not exist. Offending file: - {path}")
                additions[path] = StoredFile(path=path, size=repo.lfs_objects[oid], lfs_oid=oid)
            elif key in ("deletedFile", "deletedFolder"):
                deletions.append((path, key == "deletedFolder"))
            else:
                return _error(400, f"unknown commit operation {key!r}")
        doomed: set[str] = set()
        for path, folder in deletions:
            matched = {p for p in repo.files if p == path or (folder and p.startswith(path.rstrip("/") + "/"))}
            if not matched:
                return _error(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
            doomed |= matched
        # checked in full before anything changes: a refused commit leaves the repository as it was
        for doomed_path in doomed:
            del repo.files[doomed_path]
        repo.files.update(additions)
        paths = tuple(sorted([*additions, *(path for path, _ in deletions)]))
        commit = HubCommit(oid=_commit_oid(repo.head, header["summary"], paths), summary=header["summary"],
                           description=header.get("description", ""), author=token.user, paths=paths)
        repo.commits.append(commit)
    return JSONResponse({"success": True, "commitOid": commit.oid,
                         "commitUrl": f"{state.base_url}/{repo.repo_id}/commit/{commit.oid}", "hookOutput": ""})
