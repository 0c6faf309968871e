"""The trained adapter before it is committed (``afina.core.artifacts.adapter.commit_adapter`` uploads it and
writes its ``AdapterManifest`` last, built from what PEFT saved, not from what the job asked for)."""

from __future__ import annotations

import json
from pathlib import Path

from afina.core.artifacts.adapter import ADAPTER_CONFIG
from afina.core.catalog import BaseModelSpec


def point_adapter_at(adapter_dir: Path, base: BaseModelSpec) -> None:
    """Name the base model in ``adapter_config.json`` by its public repo id, not this worker's cache path."""
    config_path = adapter_dir / ADAPTER_CONFIG
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base.hf_repo
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
