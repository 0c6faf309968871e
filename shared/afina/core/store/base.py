"""The artifact store contract every backend honours.

Keys are POSIX-like relative paths (``datasets/<tenant>/<id>/manifest.json``).
A write is atomic: readers see the whole object or none of it, which is what
lets a manifest written last act as a commit marker.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from afina.core.errors import InvalidRequest

CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class ObjectInfo:
    """What the store knows of one object; ``sha256`` is set by writes, not by stat."""

    key: str
    size: int
    sha256: str | None = None


def validate_key(key: str) -> str:
    """Refuse keys that could escape a prefix (``..``, absolute paths, empty parts)."""
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise InvalidRequest(f"invalid object key {key!r}")
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise InvalidRequest(f"invalid object key {key!r}")
    return key


class HashingReader:
    """Wraps a binary stream, counting bytes and hashing them as they are read."""

    def __init__(self, stream: BinaryIO, limit: int | None = None) -> None:
        self._stream = stream
        self._limit = limit
        self.size = 0
        self._digest = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        chunk = self._stream.read(n)
        self.size += len(chunk)
        if self._limit is not None and self.size > self._limit:
            raise OverflowError(f"stream exceeds {self._limit} bytes")
        self._digest.update(chunk)
        return chunk

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ArtifactStore(ABC):
    """Object storage for datasets, checkpoints, adapters, GGUF files and reports."""

    @abstractmethod
    def put_stream(self, key: str, stream: BinaryIO, *, max_bytes: int | None = None) -> ObjectInfo:
        """Store everything read from ``stream``; raise ``OverflowError`` past ``max_bytes`` (nothing kept)."""

    @abstractmethod
    def iter_chunks(self, key: str, start: int = 0, length: int | None = None) -> Iterator[bytes]:
        """Yield the object's bytes in chunks (``length`` bytes from ``start``, to the end when None);
        ``ObjectMissing`` if absent. A ranged read serves HTTP range requests and resumed downloads."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size of an object; ``ObjectMissing`` if absent."""

    @abstractmethod
    def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix``, recursively, sorted by key."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove one object; absent objects are not an error."""

    # Derived operations: same behaviour for every backend.

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        import io

        return self.put_stream(key, io.BytesIO(data))

    def put_file(self, key: str, path: Path) -> ObjectInfo:
        with open(path, "rb") as handle:
            return self.put_stream(key, handle)

    def get_bytes(self, key: str) -> bytes:
        return b"".join(self.iter_chunks(key))

    def download_file(self, key: str, path: Path) -> Path:
        """Copy an object to ``path`` atomically: a partial download never appears there, and
        several threads or processes downloading to the same path at once each write their own
        temp file, the last rename winning with identical bytes."""
        import os
        import tempfile

        path.parent.mkdir(parents=True, exist_ok=True)
        fd, partial_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as handle:
                for chunk in self.iter_chunks(key):
                    handle.write(chunk)
            os.replace(partial_name, path)
        except BaseException:
            Path(partial_name).unlink(missing_ok=True)
            raise
        return path

    def exists(self, key: str) -> bool:
        from afina.core.errors import ObjectMissing

        try:
            self.stat(key)
        except ObjectMissing:
            return False
        return True

    def delete_prefix(self, prefix: str) -> int:
        objects = self.list(prefix)
        for info in objects:
            self.delete(info.key)
        return len(objects)

    def upload_dir(self, local_dir: Path, prefix: str) -> list[ObjectInfo]:
        """Upload every file under ``local_dir`` to ``prefix/<relative path>``."""
        uploaded = []
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            relative = path.relative_to(local_dir).as_posix()
            uploaded.append(self.put_file(f"{prefix.rstrip('/')}/{relative}", path))
        return uploaded

    def download_dir(self, prefix: str, local_dir: Path) -> list[Path]:
        """Download every object under ``prefix/`` into ``local_dir`` keeping relative paths."""
        base = prefix.rstrip("/") + "/"
        written = []
        for info in self.list(base):
            written.append(self.download_file(info.key, local_dir / info.key[len(base):]))
        return written
