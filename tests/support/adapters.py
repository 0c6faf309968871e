"""A LoRA adapter made without training, for testing the stages after the trainer.

The adapter is what the trainer writes (``adapter_model.safetensors``,
``adapter_config.json``, the tokenizer with the stock chat template), with its
LoRA B matrices set to small random values so a merge really changes the
targeted weights (a fresh LoRA has B = 0 and merges to the base itself).
"""

from __future__ import annotations

import fcntl
import shutil
from pathlib import Path

import pytest

from afina.core.artifacts.adapter import commit_adapter
from afina.core.catalog import CATALOG, BaseModelSpec
from afina.core.datasets.layout import adapter_prefix
from afina.core.runtime import Runtime
from tests.support.models import materialized_base_model, shared_model_cache

DEFAULT_BASE = "smollm2-135m-instruct"
LORA_RANK = 8
LORA_ALPHA = 16
LORA_TARGETS = ("q_proj", "v_proj")
B_SCALE = 0.02
DONE = "afina-adapter-complete"


def base_spec() -> BaseModelSpec:
    return CATALOG[DEFAULT_BASE]


def make_perturbed_adapter(base_dir: Path, out_dir: Path, *, seed: int = 0, scale: float = B_SCALE) -> Path:
    """Save a LoRA adapter (r=8 on q_proj/v_proj, B ~ N(0, scale)) for ``base_dir`` to ``out_dir``, once."""
    if (out_dir / DONE).exists():
        return out_dir
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out_dir / DONE).exists():
            return out_dir
        shutil.rmtree(out_dir, ignore_errors=True)
        model = AutoModelForCausalLM.from_pretrained(str(base_dir))
        config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                            task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, config)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # A and B both from the seeded generator: the same adapter on every run
            for name, parameter in peft_model.named_parameters():
                if "lora_A" in name:
                    bound = parameter.shape[1] ** -0.5
                    parameter.copy_((torch.rand(parameter.shape, generator=generator) * 2 - 1) * bound)
                elif "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
        peft_model.save_pretrained(str(out_dir))
        tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
        tokenizer.chat_template = base_spec().family.stock_template
        tokenizer.save_pretrained(str(out_dir))
        (out_dir / DONE).write_text("ok")
    return out_dir


def store_adapter(runtime: Runtime, tenant_id: str, job_id: str, adapter_dir: Path) -> str:
    """Commit an adapter where (and as) the trainer commits it for ``job_id`` of ``tenant_id``; returns the prefix."""
    prefix = adapter_prefix(tenant_id, job_id)
    spec = base_spec()
    staged = adapter_dir.parent / f"{adapter_dir.name}-staged-{job_id}"
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(adapter_dir, staged, ignore=shutil.ignore_patterns(DONE))
    try:
        commit_adapter(runtime.store, prefix, staged, job_id=job_id, base=spec, global_step=1, trained_tokens=1)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return prefix


# Session fixtures of tests/integration/exporter (its conftest imports them). The files live in the session's
# temp root and are made once; the base model is the one tests/support/models.py materializes for the trainer's
# tests too, so the ~30 s conversion happens once per session.


def exporter_shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.getbasetemp() / "exporter-shared"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def exporter_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model cache dir to pass as ``Settings(model_cache_dir=...)``: the base is materialized once."""
    return shared_model_cache(tmp_path_factory)


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory: pytest.TempPathFactory, exporter_model_cache: Path) -> Path:
    return materialized_base_model(tmp_path_factory, DEFAULT_BASE)


@pytest.fixture(scope="session")
def lora_adapter_dir(tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path) -> Path:
    return make_perturbed_adapter(base_model_dir, exporter_shared_dir(tmp_path_factory) / "adapter")
