"""Which base models a tenant may name: its own store models, the operator's shared ones, and local paths
only inside the directories the operator allows (``settings.allowed_model_dirs``).

A base model named by a path (``/…``, ``./…``, ``../…``, ``~/…``, ``file://…``) is read from the
worker's own filesystem, so without a list of allowed directories any tenant could probe that
filesystem or train on any readable model (other tenants' exports in the local store included).
The refusal is one message whatever the path is — existing, missing, unreadable, a symlink out of an
allowed directory — so it tells nothing about the machine. Nothing here reads the environment: the
caller passes the operator's list from its settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from afina.core.errors import InvalidRequest

STORE_SCHEME = "store://"
FILE_SCHEME = "file://"
LOCAL_PREFIXES = ("/", "./", "../", "~")
SHARED_BASE_MODELS_PREFIX = "base-models/"
LOCAL_PATH_REFUSED_CODE = "model_path_not_allowed"


def is_local_reference(name: str) -> bool:
    """True when ``name`` names a file or folder on the worker (a path or a ``file://`` URI)."""
    return name.startswith(FILE_SCHEME) or name.startswith(LOCAL_PREFIXES)


def _refusal(name: str, param: str) -> InvalidRequest:
    return InvalidRequest(f"{param} {name!r}: a path on the server is not accepted as a base model here; name a "
                          f"catalog model, a store:// model, or ask the operator to allow its directory "
                          f"(allowed_model_dirs)", param=param, code=LOCAL_PATH_REFUSED_CODE)


def _expand(raw: str) -> Path | None:
    """The path ``raw`` names; None for ``~user`` forms (whether a user exists is not the caller's to learn)."""
    if raw == "~" or raw.startswith("~/"):
        return Path(raw).expanduser()
    if raw.startswith("~"):
        return None
    return Path(raw)


def allowed_local_path(name: str, allowed_dirs: Sequence[Path], param: str = "model") -> Path:
    """The resolved path a local model reference names, when it lies inside one of ``allowed_dirs``.

    Symlinks and ``..`` are resolved before the check, so a link inside an allowed directory that
    points outside it is refused like any other outside path. Raises one ``InvalidRequest`` for
    every refusal, the same whether the path exists or not.
    """
    if not allowed_dirs:
        raise _refusal(name, param)  # off: no filesystem call at all
    path = _expand(name.removeprefix(FILE_SCHEME))
    if path is None:
        raise _refusal(name, param)
    try:
        resolved = path.resolve()
        roots = [Path(root).expanduser().resolve() for root in allowed_dirs]
    except (OSError, RuntimeError, ValueError):  # unreadable parents, symlink loops, NUL bytes
        raise _refusal(name, param) from None
    if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        raise _refusal(name, param)
    return resolved


def check_store_access(name: str, tenant_id: str, param: str = "model") -> None:
    """A ``store://`` base model is the tenant's own (``models/<tenant>/``) or an operator's (``base-models/``)."""
    if not name.startswith(STORE_SCHEME):
        return
    prefix = name.removeprefix(STORE_SCHEME).strip("/")
    parts = prefix.split("/")
    allowed = (f"models/{tenant_id}/", SHARED_BASE_MODELS_PREFIX)
    if ".." in parts or "" in parts or not (prefix + "/").startswith(allowed) or prefix + "/" in allowed:
        raise InvalidRequest(f"{param} {name!r}: a store base model must be under store://models/{tenant_id}/ "
                             f"or store://{SHARED_BASE_MODELS_PREFIX}", param=param)


def check_model_access(name: str, tenant_id: str, allowed_dirs: Sequence[Path], param: str = "model") -> None:
    """Refuse a base model ``tenant_id`` may not name, before anything of it is read."""
    check_store_access(name, tenant_id, param)
    if is_local_reference(name):
        allowed_local_path(name, allowed_dirs, param)
