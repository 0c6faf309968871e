"""Fixtures of the exporter's integration tests (shared on disk with the unit tests' ones)."""

from __future__ import annotations

from tests.support import adapters

# the session fixtures shared with tests/unit/exporter
exporter_model_cache = adapters.exporter_model_cache
base_model_dir = adapters.base_model_dir
lora_adapter_dir = adapters.lora_adapter_dir
