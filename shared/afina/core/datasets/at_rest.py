"""Normalized dataset files encrypted at rest with Fernet, in blocks so neither side holds a whole file.

A Fernet token encrypts one message in memory, so a split file is cut into blocks of at
most ``BLOCK_BYTES`` plaintext bytes, each stored as one token on its own line (tokens are
URL-safe base64: no newline inside). Decrypting every line and concatenating gives the
plaintext back. The manifest marks such a split ``"encryption": SCHEME``; the ingest worker
writes them and the trainer reads them, both with ``Settings.data_encryption_key``.
The key is a ``SecretStr`` everywhere and never appears in an error message.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from pydantic import SecretStr

from afina.core.errors import AfinaError, InvalidRequest

SCHEME = "fernet-blocks-v1"
BLOCK_BYTES = 1024 * 1024


class DecryptionFailed(AfinaError):
    """Stored data did not decrypt with the configured key (wrong key, or the data was changed)."""

    error_type = "server_error"
    code = "dataset_decryption_failed"


def _fernet(key: SecretStr | None):  # noqa: ANN202 - cryptography.fernet.Fernet
    from cryptography.fernet import Fernet

    if key is None or not key.get_secret_value():
        raise InvalidRequest("encryption at rest needs AFINA_DATA_ENCRYPTION_KEY (a Fernet key) on the workers",
                             param="ingest_options.encrypt_at_rest", code="encryption_key_missing")
    try:
        return Fernet(key.get_secret_value().encode())
    except (ValueError, TypeError):
        raise InvalidRequest("AFINA_DATA_ENCRYPTION_KEY is not a valid Fernet key (32 url-safe base64 bytes)",
                             param="ingest_options.encrypt_at_rest", code="encryption_key_invalid") from None


def check_key(key: SecretStr | None) -> None:
    """Raise ``InvalidRequest`` now if ``key`` is missing or is no Fernet key (before any work is done)."""
    _fernet(key)


def encrypt_file(source: Path, target: Path, key: SecretStr | None) -> None:
    """Write ``source`` encrypted to ``target``, block by block."""
    fernet = _fernet(key)
    with open(source, "rb") as reader, open(target, "wb") as writer:
        for block in iter(lambda: reader.read(BLOCK_BYTES), b""):
            writer.write(fernet.encrypt(block) + b"\n")


def iter_decrypted(chunks: Iterable[bytes], key: SecretStr | None) -> Iterator[bytes]:
    """The plaintext of an encrypted file read as ``chunks`` (any chunking), one block at a time."""
    from cryptography.fernet import InvalidToken

    fernet = _fernet(key)
    pending = b""
    for chunk in chunks:
        pending += chunk
        *tokens, pending = pending.split(b"\n")
        for token in tokens:
            if token.strip():
                try:
                    yield fernet.decrypt(token.strip())
                except InvalidToken:
                    raise DecryptionFailed("a dataset block did not decrypt with AFINA_DATA_ENCRYPTION_KEY: "
                                           "the key changed since ingest, or the data was altered") from None
    if pending.strip():
        try:
            yield fernet.decrypt(pending.strip())
        except InvalidToken:
            raise DecryptionFailed("a dataset block did not decrypt with AFINA_DATA_ENCRYPTION_KEY") from None


def decrypt_bytes(data: bytes, key: SecretStr | None) -> bytes:
    return b"".join(iter_decrypted([data], key))
