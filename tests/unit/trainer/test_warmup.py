"""Warm workers: the trainer's imports happen at worker start, and compile caches live on the home volume."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from afina.core.settings import Settings
from afina.trainer.warmup import compile_cache_env, warm_up


def test_compile_caches_live_under_the_home_volume(tmp_path: Path) -> None:
    env = compile_cache_env(tmp_path / "cache")
    assert set(env) == {"UNSLOTH_COMPILE_LOCATION", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"}
    assert all(value.startswith(str(tmp_path / "cache")) for value in env.values())


def test_warm_up_imports_the_training_stack_on_a_cpu_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("UNSLOTH_COMPILE_LOCATION", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", "/operator/choice")
    imported = warm_up(Settings(home=tmp_path, trainer_device="cpu", log_json=False))
    assert imported[0] == "torch" and "unsloth" not in imported  # Unsloth only on a CUDA worker
    assert {"transformers", "peft", "trl", "afina.trainer.recipe"} <= set(imported)
    assert "afina.trainer.recipe" in sys.modules
    import os

    assert os.environ["UNSLOTH_COMPILE_LOCATION"] == str(tmp_path / "cache" / "unsloth_compiled")
    assert os.environ["TRITON_CACHE_DIR"] == "/operator/choice"  # an operator's setting wins


def test_settling_the_heap_freezes_what_survives() -> None:
    import gc

    from afina.trainer.warmup import settle_heap

    gc.unfreeze()
    try:
        settle_heap()
        assert gc.get_freeze_count() > 0  # the interpreter's own objects at least: out of later full collections
    finally:
        gc.unfreeze()  # this test process is not a worker


def test_unsloth_leaves_the_tokenizer_its_threads_unless_the_operator_says(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    from afina.trainer.backends import prepare_backend

    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    monkeypatch.setitem(sys.modules, "unsloth", types.ModuleType("unsloth"))  # no GPU here
    prepare_backend("unsloth")
    import os

    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    prepare_backend("unsloth")
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
