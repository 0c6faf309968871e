"""Which environment variables ingest's ``encryption.key_env`` may name: the operator's set for the tenant.

Without a set, a tenant could point ``key_env`` at any variable of the worker (``AFINA_S3_SECRET_KEY``,
``PATH``, another tenant's key) and learn from the answer whether it exists, or decrypt with a key that
is not theirs. The set is ``settings.key_envs_for(tenant_id)`` (``encryption_key_envs``: per tenant,
``"*"`` for all). Every refusal is one message — not in the set, or in it and unset on the worker — so
the answer says nothing about the worker's environment. The gateway checks the set at upload; the
ingest worker checks it again, and that the variable is set, before it reads anything.
"""

from __future__ import annotations

from collections.abc import Collection

from afina.core.datasets.options import IngestOptions
from afina.core.errors import InvalidRequest

KEY_ENV_PARAM = "encryption.key_env"
KEY_ENV_REFUSED_CODE = "key_env_not_allowed"


def key_env_refusal(key_env: str, param: str = KEY_ENV_PARAM) -> InvalidRequest:
    """The one answer for a ``key_env`` the tenant may not use or the worker does not have."""
    return InvalidRequest(f"{param} {key_env!r} is not one of the key variables the operator made available to "
                          f"your tenant; ask the operator to list it in encryption_key_envs and set it on the "
                          f"ingest workers", param=param, code=KEY_ENV_REFUSED_CODE)


def check_key_env_allowed(options: IngestOptions | None, allowed: Collection[str],
                          param: str = KEY_ENV_PARAM) -> None:
    """Refuse options whose ``encryption.key_env`` is not in ``allowed`` (the tenant's set)."""
    encryption = options.encryption if options is not None else None
    if encryption is not None and encryption.key_env not in allowed:
        raise key_env_refusal(encryption.key_env, param)
