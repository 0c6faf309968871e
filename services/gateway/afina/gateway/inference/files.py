"""GGUF files from the object store, downloaded once into the local model cache.

A file is named by a hash of its store key, and appears under that name only when
complete (the store's atomic download), so concurrent requests and several gateway
processes sharing the cache never see half a model.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from afina.core.runtime import Runtime


class ModelFileCache:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    @property
    def cache_dir(self) -> Path:
        return self.runtime.settings.resolved_model_cache_dir / "gguf"

    def path_for(self, key: str) -> Path:
        return self.cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.gguf"

    def fetch(self, key: str) -> Path:
        """The local path of the object ``key`` (blocking: call it from a worker thread)."""
        path = self.path_for(key)
        if path.is_file():
            return path
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if path.is_file():
                return path
            self.runtime.store.download_file(key, path)  # atomic, safe across gateway processes
        return path
