"""The adapter's commit marker: what PEFT saved (not what the family lists), each file's sha256, and older markers."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import orjson
import pytest

from afina.core.artifacts.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_MARKER,
    ADAPTER_WEIGHTS,
    AdapterManifest,
    commit_adapter,
)
from afina.core.catalog import CATALOG
from afina.core.errors import ObjectMissing
from afina.core.store.local import LocalStore
from afina.trainer.adapter import point_adapter_at

SPEC = CATALOG["smollm2-135m-instruct"]
PREFIX = "jobs/acme/ftjob-test/adapter"


def saved_adapter(tokenizer: Any, adapter_dir: Path, target_modules: list[str]) -> Path:
    """A real PEFT adapter of a tiny Llama on ``target_modules``, saved with the tokenizer as the recipe saves it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=target_modules,
                                                  task_type="CAUSAL_LM"))
    peft_model.save_pretrained(str(adapter_dir))
    point_adapter_at(adapter_dir, SPEC)
    tokenizer.save_pretrained(str(adapter_dir))
    return adapter_dir


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def test_the_marker_records_the_modules_peft_targeted_and_every_files_sha256(tokenizer: Any, store: LocalStore,
                                                                            tmp_path: Path) -> None:
    adapter_dir = saved_adapter(tokenizer, tmp_path / "adapter", ["q_proj", "v_proj"])
    store.put_bytes(f"{PREFIX}/stale-file-of-a-dead-attempt.bin", b"old")
    committed = commit_adapter(store, PREFIX, adapter_dir, job_id="ftjob-test", base=SPEC, global_step=6,
                               trained_tokens=1234)

    manifest = AdapterManifest.read(store, f"{PREFIX}/{ADAPTER_MARKER}")
    assert manifest == committed and manifest.schema_version == AdapterManifest.SCHEMA_VERSION
    # exactly the modules the job's LoRA adapted, not the family's seven
    assert manifest.lora.target_modules == ("q_proj", "v_proj")
    assert set(SPEC.family.target_modules) != {"q_proj", "v_proj"}
    assert (manifest.lora.r, manifest.lora.alpha, manifest.lora.dropout) == (4, 8.0, 0.0)
    assert (manifest.base_model, manifest.hf_repo, manifest.chat_family) == (SPEC.id, SPEC.hf_repo, SPEC.family.name)
    assert (manifest.global_step, manifest.trained_tokens) == (6, 1234)

    # every file of the adapter, with the size and sha256 of what is in the store; nothing else
    local_files = sorted(path.name for path in adapter_dir.iterdir() if path.is_file())
    assert sorted(manifest.name_of(entry, PREFIX) for entry in manifest.files) == local_files
    assert {ADAPTER_WEIGHTS, ADAPTER_CONFIG, "tokenizer.json"} <= set(local_files)
    for entry in manifest.files:
        data = store.get_bytes(entry.key)
        assert entry.bytes == len(data) and entry.sha256 == hashlib.sha256(data).hexdigest()
    assert not store.exists(f"{PREFIX}/stale-file-of-a-dead-attempt.bin")
    assert "tokenizer.json" in manifest.tokenizer_files and ADAPTER_WEIGHTS not in manifest.tokenizer_files
    saved_config = orjson.loads(store.get_bytes(f"{PREFIX}/{ADAPTER_CONFIG}"))
    assert saved_config["base_model_name_or_path"] == SPEC.hf_repo  # not this worker's cache path

    manifest.check_intact(store, PREFIX)
    store.put_bytes(f"{PREFIX}/{ADAPTER_WEIGHTS}", b"x" * manifest.files[0].bytes)  # same size, other bytes
    with pytest.raises(ObjectMissing, match=ADAPTER_WEIGHTS):
        manifest.check_intact(store, PREFIX)


VERSION_1_MARKER = {
    "job_id": "ftjob-old", "base_model": SPEC.id, "hf_repo": SPEC.hf_repo, "chat_family": SPEC.family.name,
    "global_step": 12, "trained_tokens": 4096,
    "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": list(SPEC.family.target_modules)},
    "files": ["adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "special_tokens_map.json",
              "tokenizer.json", "tokenizer_config.json"],
}


def test_a_version_1_marker_still_reads() -> None:
    manifest = AdapterManifest.parse(orjson.dumps(VERSION_1_MARKER), f"{PREFIX}/{ADAPTER_MARKER}")
    assert manifest.schema_version == AdapterManifest.SCHEMA_VERSION
    assert (manifest.job_id, manifest.global_step, manifest.trained_tokens) == ("ftjob-old", 12, 4096)
    assert (manifest.lora.r, manifest.lora.alpha, manifest.lora.dropout) == (16, 32.0, 0.05)
    assert manifest.lora.target_modules == SPEC.family.target_modules
    assert manifest.files == ()  # no hashes were recorded: its files are checked by name
    assert manifest.legacy_file_names == tuple(VERSION_1_MARKER["files"])
    assert set(manifest.tokenizer_files) == {"chat_template.jinja", "special_tokens_map.json", "tokenizer.json",
                                             "tokenizer_config.json"}


def test_a_version_1_marker_checks_its_files_by_name(store: LocalStore) -> None:
    manifest = AdapterManifest.parse(orjson.dumps(VERSION_1_MARKER), f"{PREFIX}/{ADAPTER_MARKER}")
    for name in VERSION_1_MARKER["files"]:
        store.put_bytes(f"{PREFIX}/{name}", b"{}")
    manifest.check_intact(store, PREFIX)
    store.delete(f"{PREFIX}/tokenizer.json")
    with pytest.raises(ObjectMissing, match="tokenizer.json"):
        manifest.check_intact(store, PREFIX)
