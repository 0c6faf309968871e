"""Fernet decryption of uploaded data (seed 001 encrypts dataframe fields with a Fernet key).

The key is read from the environment variable the ingest options name, on the worker,
at the moment it is needed; the variable must be one the operator allowed for the tenant
(``check_key_env``, before the ingest starts), and an unset one gets the same answer as a
variable that is not allowed (``afina.core.datasets.key_env``). No error, log line or report ever carries the key, the
token or the plaintext of a field that failed: only the variable's name and the field.
A variable may hold several keys separated by commas (key rotation): the first encrypts,
any of them decrypts (``MultiFernet``).
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path
from typing import Protocol

from afina.core.datasets.key_env import check_key_env_allowed, key_env_refusal
from afina.core.datasets.options import IngestOptions
from afina.core.errors import DatasetInvalid, InvalidRequest
from afina.ingest.sources.limits import MAX_ENCRYPTED_FILE_BYTES, MiB


class FernetLike(Protocol):
    def decrypt(self, token: bytes | str, ttl: int | None = None) -> bytes: ...


class DecryptionFailed(Exception):
    """A token did not decrypt: wrong key, damaged or not a Fernet token. Carries no secret."""


def check_key_env(options: IngestOptions, allowed: Collection[str]) -> None:
    """The worker's check of ``encryption.key_env``: in the tenant's set (``settings.key_envs_for``) and set
    here; one ``InvalidRequest`` for either failure. Call it before any work on the file."""
    check_key_env_allowed(options, allowed)
    if options.encryption is not None and not os.environ.get(options.encryption.key_env, "").strip():
        raise key_env_refusal(options.encryption.key_env)


def load_fernet(key_env: str) -> FernetLike:
    """The Fernet (or MultiFernet) for the key(s) in ``$key_env``; ``InvalidRequest`` naming the variable.

    ``key_env`` must have passed ``check_key_env`` for the tenant; unset, it is refused like a variable
    that is not allowed.
    """
    from cryptography.fernet import Fernet, MultiFernet

    raw = os.environ.get(key_env, "").strip()
    if not raw:
        raise key_env_refusal(key_env)
    keys = [part.strip() for part in raw.split(",") if part.strip()]
    try:
        fernets = [Fernet(key.encode("ascii")) for key in keys]
    except (ValueError, UnicodeEncodeError):
        raise InvalidRequest(f"the encryption key in {key_env} is not a valid Fernet key (32 url-safe base64-encoded "
                             f"bytes, as Fernet.generate_key() makes)", param="encryption.key_env") from None
    return fernets[0] if len(fernets) == 1 else MultiFernet(fernets)


def decrypt_field(token: str | bytes, fernet: FernetLike) -> str:
    """The UTF-8 plaintext of one Fernet token; ``DecryptionFailed`` (without any secret) otherwise."""
    from cryptography.fernet import InvalidToken

    if isinstance(token, str):
        token = token.strip().encode("ascii", "replace")
    try:
        plaintext = fernet.decrypt(token.strip())
    except (InvalidToken, TypeError, ValueError):
        raise DecryptionFailed("not a Fernet token for this key (wrong key, or the value is damaged or not "
                               "encrypted)") from None
    try:
        return plaintext.decode("utf-8")
    except UnicodeDecodeError:
        raise DecryptionFailed("decrypted, but the plaintext is not UTF-8 text") from None


def decrypt_file(path: Path, dest: Path, fernet: FernetLike, source: str, key_env: str) -> None:
    """A whole upload that is one Fernet token, decrypted to ``dest``; ``DatasetInvalid`` naming the file."""
    size = path.stat().st_size
    if size > MAX_ENCRYPTED_FILE_BYTES:
        raise DatasetInvalid(f"{source} is {size / MiB:.0f} MiB; whole-file Fernet decryption is limited to "
                             f"{MAX_ENCRYPTED_FILE_BYTES // MiB} MiB (Fernet decrypts in memory). Encrypt fields "
                             f"instead, or split the file", rule="file_too_large", param="file")
    if size == 0:
        raise DatasetInvalid(f"{source} is empty (0 bytes)", rule="empty_file", param="file")
    try:
        plaintext = fernet.decrypt(path.read_bytes().strip())
    except Exception:  # noqa: BLE001 - InvalidToken, or bytes that are not base64 at all: same answer
        raise DatasetInvalid(f"{source} could not be decrypted with the key in {key_env}: wrong key, or the file is "
                             f"not one Fernet token", rule="decryption_failed", param="file") from None
    dest.write_bytes(plaintext)
