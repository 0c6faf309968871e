"""GGUF files come from the store once, appear atomically, and are reused."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from afina.core.errors import ObjectMissing
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from afina.gateway.inference.files import ModelFileCache


def test_fetch_downloads_once_and_reuses(tmp_path: Path) -> None:
    runtime = Runtime(Settings(home=tmp_path, store_backend="local", store_root=None, model_cache_dir=None))
    runtime.store.put_bytes("models/acme/ftjob-1/model.gguf", b"GGUF" + b"\0" * 1000)
    cache = ModelFileCache(runtime)
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(cache.fetch, ["models/acme/ftjob-1/model.gguf"] * 8))
    assert len(set(paths)) == 1 and paths[0].read_bytes().startswith(b"GGUF")
    assert paths[0].parent == tmp_path / "models" / "gguf"
    assert sorted(p.name for p in paths[0].parent.iterdir()) == [paths[0].name]  # no temp files left
    runtime.store.delete("models/acme/ftjob-1/model.gguf")
    assert cache.fetch("models/acme/ftjob-1/model.gguf") == paths[0]  # served from the cache


def test_missing_object_leaves_nothing_behind(tmp_path: Path) -> None:
    cache = ModelFileCache(Runtime(Settings(home=tmp_path, store_backend="local", store_root=None,
                                            model_cache_dir=None)))
    with pytest.raises(ObjectMissing):
        cache.fetch("models/acme/none/model.gguf")
    assert not cache.cache_dir.exists() or list(cache.cache_dir.iterdir()) == []
