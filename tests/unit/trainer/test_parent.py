"""Continuing from an earlier job's adapter: its committed LoRA settings, its weights checked, a shape that fits."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest

from afina.core.artifacts.adapter import ADAPTER_CONFIG, ADAPTER_MARKER, ADAPTER_WEIGHTS, LoraSettings, commit_adapter
from afina.core.catalog import CATALOG
from afina.core.datasets.layout import adapter_prefix
from afina.core.errors import TrainingFailed
from afina.core.store.local import LocalStore
from afina.trainer.parent import check_compatible, fetch_parent_adapter, parent_job_of

SPEC = CATALOG["smollm2-135m-instruct"]
PARENT = "ftjob-parent"
PREFIX = adapter_prefix("acme", PARENT)
PEFT_CONFIG = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["v_proj", "q_proj"],
               "peft_type": "LORA"}


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def committed_parent(store: LocalStore, tmp_path: Path) -> None:
    adapter_dir = tmp_path / "parent-adapter"
    adapter_dir.mkdir()
    (adapter_dir / ADAPTER_CONFIG).write_text(json.dumps(PEFT_CONFIG))
    (adapter_dir / ADAPTER_WEIGHTS).write_bytes(b"safetensors bytes of the parent")
    commit_adapter(store, PREFIX, adapter_dir, job_id=PARENT, base=SPEC, global_step=6, trained_tokens=100)


def test_the_parent_job_is_read_from_the_method() -> None:
    assert parent_job_of({"type": "supervised", "supervised": {"init_from": {"job_id": PARENT}}}) == PARENT
    assert parent_job_of({"type": "supervised", "supervised": {}}) is None
    assert parent_job_of(None) is None


def test_a_committed_adapter_gives_its_lora_settings_and_checked_weights(store: LocalStore, tmp_path: Path) -> None:
    committed_parent(store, tmp_path)
    lora, weights = fetch_parent_adapter(store, "acme", PARENT, tmp_path / "work")
    assert lora == LoraSettings.from_peft_config(PEFT_CONFIG)
    assert lora.target_modules == ("q_proj", "v_proj") and lora.r == 8
    assert weights.read_bytes() == b"safetensors bytes of the parent"
    check_compatible(lora, 8, ("v_proj", "q_proj"))  # the same modules in another order fit


def test_weights_changed_after_the_commit_are_refused(store: LocalStore, tmp_path: Path) -> None:
    committed_parent(store, tmp_path)
    store.put_bytes(f"{PREFIX}/{ADAPTER_WEIGHTS}", b"safetensors bytes of another run")
    with pytest.raises(TrainingFailed, match="sha256"):
        fetch_parent_adapter(store, "acme", PARENT, tmp_path / "work")


def test_an_adapter_without_its_marker_is_not_continued(store: LocalStore, tmp_path: Path) -> None:
    committed_parent(store, tmp_path)
    store.delete(f"{PREFIX}/{ADAPTER_MARKER}")  # a run that died while uploading its adapter
    with pytest.raises(TrainingFailed, match="no committed adapter"):
        fetch_parent_adapter(store, "acme", PARENT, tmp_path / "work")


def test_a_version_1_marker_takes_the_settings_peft_saved(store: LocalStore, tmp_path: Path) -> None:
    """A version-1 marker recorded the family's module list, whatever the run targeted: adapter_config.json says."""
    store.put_bytes(f"{PREFIX}/{ADAPTER_CONFIG}", json.dumps(PEFT_CONFIG).encode())
    store.put_bytes(f"{PREFIX}/{ADAPTER_WEIGHTS}", b"weights")
    store.put_bytes(f"{PREFIX}/{ADAPTER_MARKER}", orjson.dumps({
        "job_id": PARENT, "base_model": SPEC.id, "hf_repo": SPEC.hf_repo, "chat_family": SPEC.family.name,
        "global_step": 6, "trained_tokens": 100,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": list(SPEC.family.target_modules)},
        "files": [ADAPTER_CONFIG, ADAPTER_WEIGHTS]}))
    lora, weights = fetch_parent_adapter(store, "acme", PARENT, tmp_path / "work")
    assert lora.target_modules == ("q_proj", "v_proj")
    assert weights.read_bytes() == b"weights"


def test_a_lora_of_another_shape_is_refused_naming_the_setting() -> None:
    parent = LoraSettings.from_peft_config(PEFT_CONFIG)
    with pytest.raises(TrainingFailed, match="lora_r to 8") as caught:
        check_compatible(parent, 16, ("q_proj", "v_proj"))
    assert caught.value.code == "incompatible_adapter"
    with pytest.raises(TrainingFailed, match=r"targets \['q_proj', 'v_proj'\]"):
        check_compatible(parent, 8, SPEC.family.target_modules)
