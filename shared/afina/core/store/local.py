"""Artifact store on a local directory: the embedded default."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from afina.core.errors import ObjectMissing
from afina.core.store.base import CHUNK_BYTES, ArtifactStore, HashingReader, ObjectInfo, validate_key


class LocalStore(ArtifactStore):
    """Objects are files under ``root``; writes go to a temp file then ``os.replace``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def put_stream(self, key: str, stream: BinaryIO, *, max_bytes: int | None = None) -> ObjectInfo:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        reader = HashingReader(stream, limit=max_bytes)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as handle:
                for chunk in iter(lambda: reader.read(CHUNK_BYTES), b""):
                    handle.write(chunk)
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        return ObjectInfo(key=key, size=reader.size, sha256=reader.sha256)

    def iter_chunks(self, key: str, start: int = 0, length: int | None = None) -> Iterator[bytes]:
        path = self._path(key)
        try:
            handle = open(path, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectMissing(f"no object {key!r}") from None
        with handle:
            handle.seek(start)
            left = length
            while left is None or left > 0:
                chunk = handle.read(CHUNK_BYTES if left is None else min(CHUNK_BYTES, left))
                if not chunk:
                    return
                if left is not None:
                    left -= len(chunk)
                yield chunk

    def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        if not path.is_file():
            raise ObjectMissing(f"no object {key!r}")
        return ObjectInfo(key=key, size=path.stat().st_size)

    def list(self, prefix: str) -> list[ObjectInfo]:
        results = []
        for path in self.root.rglob("*"):
            if not path.is_file() or path.name.startswith(".incoming-"):
                continue
            key = path.relative_to(self.root).as_posix()
            if key.startswith(prefix):
                results.append(ObjectInfo(key=key, size=path.stat().st_size))
        return sorted(results, key=lambda info: info.key)

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent
