"""Continue training from an earlier job's adapter (a job created with ``model: "ft:..."``).

The earlier job's adapter is in the store under its ``adapter_prefix``; its LoRA shape must
match this run's (same rank and target modules, else the weights do not fit), and its
weights are loaded into the freshly attached LoRA before the first step. Both backends
return a PEFT model, so the same loading serves ``hf`` and ``unsloth``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from afina.core.datasets.layout import adapter_prefix
from afina.core.errors import ObjectMissing, TrainingFailed
from afina.core.store import ArtifactStore

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def parent_job_of(method: dict[str, Any] | None) -> str | None:
    init_from = ((method or {}).get("supervised") or {}).get("init_from") or {}
    return init_from.get("job_id")


def fetch_parent_adapter(store: ArtifactStore, tenant_id: str, parent_job_id: str,
                         local_dir: Path) -> tuple[dict[str, Any], Path]:
    """(adapter_config, weights file) of ``parent_job_id``'s committed adapter (a job of the same tenant),
    downloaded to ``local_dir``."""
    prefix = adapter_prefix(tenant_id, parent_job_id)
    local_dir.mkdir(parents=True, exist_ok=True)
    try:
        config = json.loads(store.get_bytes(f"{prefix}/{ADAPTER_CONFIG}"))
        weights = local_dir / ADAPTER_WEIGHTS
        store.download_file(f"{prefix}/{ADAPTER_WEIGHTS}", weights)
    except ObjectMissing as exc:
        raise TrainingFailed(f"the adapter of job {parent_job_id} is no longer in the store ({exc}); "
                             "start from its base model instead") from exc
    return config, weights


def check_compatible(parent_config: dict[str, Any], lora_r: int, target_modules: tuple[str, ...]) -> None:
    """The earlier adapter's weights only fit a LoRA of the same rank on the same modules."""
    parent_r = int(parent_config.get("r", 0))
    parent_targets = set(parent_config.get("target_modules") or [])
    if parent_r != lora_r:
        raise TrainingFailed(f"the adapter this job continues from has LoRA rank {parent_r}; set "
                             f"hyperparameters.lora_r to {parent_r} (it is {lora_r})", code="incompatible_adapter")
    if parent_targets != set(target_modules):
        raise TrainingFailed(f"the adapter this job continues from targets {sorted(parent_targets)}; set "
                             f"hyperparameters.target_modules to that list", code="incompatible_adapter")


def load_parent_weights(model: Any, weights: Path) -> int:
    """Copy the earlier adapter's LoRA weights into ``model``; returns how many tensors were loaded."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(weights))
    result = set_peft_model_state_dict(model, state)
    unexpected = [key for key in getattr(result, "unexpected_keys", []) if "lora_" in key]
    if unexpected:
        raise TrainingFailed(f"the earlier adapter's weights do not fit this model ({unexpected[:3]} ...)",
                             code="incompatible_adapter")
    return len(state)
