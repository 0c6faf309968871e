"""Warm trainer workers: pay the imports and compilation once per worker process, not once per job.

Measured on the H200 (bench/RESULTS.md): a job on a fresh process waits ~50–80 s from stage
start to its first optimizer step with Unsloth (import, patching, compiling each decoder block),
and ~15–23 s on a process that already ran one. A worker process therefore imports everything
a job needs as soon as it starts, and points Unsloth's and PyTorch's compile caches at the
home volume, so a restarted worker (or a new pod on the same volume) finds them.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from pathlib import Path

from afina.core.logging import log_event
from afina.core.settings import Settings

log = logging.getLogger("afina.trainer")


def compile_cache_env(cache_root: Path) -> dict[str, str]:
    """Where Unsloth writes its compiled modules and PyTorch/Triton their kernels."""
    return {
        "UNSLOTH_COMPILE_LOCATION": str(cache_root / "unsloth_compiled"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache_root / "torchinductor"),
        "TRITON_CACHE_DIR": str(cache_root / "triton"),
    }


def warm_up(settings: Settings) -> list[str]:
    """Import what a training job imports (Unsloth first, on CUDA); returns the modules imported.

    Environment variables already set win over the defaults, so an operator can move the caches.
    """
    started = time.monotonic()
    for name, value in compile_cache_env(settings.home / "cache").items():
        os.environ.setdefault(name, value)
    imported: list[str] = []
    import torch

    imported.append("torch")
    cuda = settings.trainer_device != "cpu" and torch.cuda.is_available()
    from afina.trainer.backends import prepare_backend, unsloth_installed

    if cuda and unsloth_installed():
        prepare_backend("unsloth")  # must precede transformers, TRL and PEFT
        imported.append("unsloth")
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    import afina.trainer.recipe  # noqa: F401

    imported += ["transformers", "peft", "trl", "datasets", "afina.trainer.recipe"]
    if cuda:
        settle_heap()
    log_event(log, "trainer.warm", seconds=round(time.monotonic() - started, 2), cuda=cuda, modules=imported)
    return imported


def settle_heap() -> None:
    """Collect, then freeze what survives (``gc.freeze``), on a GPU worker between jobs.

    Unsloth runs a full collection a dozen times while it loads each model; each one walks every object the
    worker holds (the libraries, the compiled kernels' caches, what the last job left warm), about half a second
    apiece on a worker that has run a job: 14 calls, 8.4 s of a warm job's 17.6 s start under cProfile on the H100
    box. Frozen objects are left out of those walks. Called only where what survives is the worker's own (after
    its warm-up, after a job's cleanup), never while a job holds its model and data: those must stay collectable.
    """
    gc.collect()
    gc.freeze()
