"""Continue training from an earlier job's adapter (a job created with ``model: "ft:..."``).

The earlier job's adapter is in the store under its ``adapter_prefix``, committed by its
``AdapterManifest``; its LoRA shape must match this run's (same rank and target modules, else
the weights do not fit), and its weights, checked against the manifest's sha256, are loaded
into the freshly attached LoRA before the first step. Both backends return a PEFT model, so
the same loading serves ``hf`` and ``unsloth``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from afina.core.artifacts.adapter import ADAPTER_CONFIG, ADAPTER_MARKER, ADAPTER_WEIGHTS, AdapterManifest, LoraSettings
from afina.core.datasets.layout import adapter_prefix
from afina.core.errors import ObjectMissing, TrainingFailed
from afina.core.store import ArtifactStore
from afina.core.store.base import sha256_file


def parent_job_of(method: dict[str, Any] | None) -> str | None:
    """The job whose adapter this one continues from: ``method.supervised.init_from.job_id``, if any."""
    init_from = ((method or {}).get("supervised") or {}).get("init_from") or {}
    return init_from.get("job_id")


def fetch_parent_adapter(store: ArtifactStore, tenant_id: str, parent_job_id: str,
                         local_dir: Path) -> tuple[LoraSettings, Path]:
    """(LoRA settings, weights file) of ``parent_job_id``'s committed adapter (a job of the same tenant), the
    weights downloaded to ``local_dir`` and checked against the commit marker.

    The settings are the marker's; a version-1 marker recorded the family's module list rather than
    the modules PEFT saved, so for one of those they are read from ``adapter_config.json``.
    """
    prefix = adapter_prefix(tenant_id, parent_job_id)
    manifest = AdapterManifest.read(store, f"{prefix}/{ADAPTER_MARKER}")
    if manifest is None:
        raise TrainingFailed(f"job {parent_job_id} has no committed adapter (no {ADAPTER_MARKER}); "
                             "start from its base model instead")
    local_dir.mkdir(parents=True, exist_ok=True)
    weights = local_dir / ADAPTER_WEIGHTS
    try:
        if manifest.files:
            lora = manifest.lora
        else:
            lora = LoraSettings.from_peft_config(json.loads(store.get_bytes(f"{prefix}/{ADAPTER_CONFIG}")))
        store.download_file(f"{prefix}/{ADAPTER_WEIGHTS}", weights)
    except ObjectMissing as exc:
        raise TrainingFailed(f"the adapter of job {parent_job_id} is no longer in the store ({exc}); "
                             "start from its base model instead") from exc
    committed = next((entry for entry in manifest.files if entry.key == f"{prefix}/{ADAPTER_WEIGHTS}"), None)
    if committed is not None and sha256_file(weights) != committed.sha256:
        raise TrainingFailed(f"the adapter weights of job {parent_job_id} changed after that job committed them "
                             "(sha256 mismatch); start from its base model instead")
    return lora, weights


def check_compatible(parent: LoraSettings, lora_r: int, target_modules: tuple[str, ...]) -> None:
    """The earlier adapter's weights only fit a LoRA of the same rank on the same modules."""
    if parent.r != lora_r:
        raise TrainingFailed(f"the adapter this job continues from has LoRA rank {parent.r}; set "
                             f"hyperparameters.lora_r to {parent.r} (it is {lora_r})", code="incompatible_adapter")
    if set(parent.target_modules) != set(target_modules):
        raise TrainingFailed(f"the adapter this job continues from targets {sorted(parent.target_modules)}; set "
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
