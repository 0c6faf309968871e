"""``AdapterManifest``: the trainer's commit marker, written after every adapter file is in the store.

It says what the adapter is (base model, family, the LoRA settings PEFT actually saved, with the
modules it really targets) and lists each file with its sha256, so the exporter merges only a
committed, intact adapter, and a job that continues from it checks compatibility without guessing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from afina.core.artifacts.manifest import FileEntry, Manifest
from afina.core.catalog.spec import BaseModelSpec
from afina.core.errors import ObjectMissing
from afina.core.store import ArtifactStore

ADAPTER_MARKER = "afina_adapter.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER_FILE_NAMES = frozenset({"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                  "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                                  "chat_template.jinja"})


class LoraSettings(BaseModel):
    """The LoRA as PEFT saved it (``adapter_config.json``), not as the job asked for it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    r: int = Field(ge=1)
    alpha: float
    dropout: float = 0.0
    target_modules: tuple[str, ...]
    modules_to_save: tuple[str, ...] = ()
    use_rslora: bool = False
    use_dora: bool = False

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> LoraSettings:
        targets = config.get("target_modules") or ()
        return cls(r=int(config["r"]), alpha=float(config.get("lora_alpha", config["r"])),
                   dropout=float(config.get("lora_dropout") or 0.0),
                   target_modules=tuple(sorted([targets] if isinstance(targets, str) else targets)),
                   modules_to_save=tuple(sorted(config.get("modules_to_save") or ())),
                   use_rslora=bool(config.get("use_rslora")), use_dora=bool(config.get("use_dora")))


class AdapterManifest(Manifest):
    KIND: ClassVar[str] = "adapter"
    SCHEMA_VERSION: ClassVar[int] = 2

    job_id: str
    base_model: str = Field(description="the base model's id, as the job resolved it")
    hf_repo: str = Field(description="the public repository the base weights are (a copy of)")
    chat_family: str
    global_step: int = Field(ge=0)
    trained_tokens: int = Field(ge=0)
    lora: LoraSettings
    files: tuple[FileEntry, ...] = Field(description="every adapter object but this marker")
    tokenizer_files: tuple[str, ...] = Field(default=(), description="the names among files that are the tokenizer")
    # a version-1 marker listed names only; its files are checked for presence, not hashes
    legacy_file_names: tuple[str, ...] = ()

    @classmethod
    def _upgrade(cls, version: int, data: dict[str, Any]) -> dict[str, Any]:
        names = [name for name in data.get("files") or [] if isinstance(name, str)]
        lora = dict(data.get("lora") or {})
        return {**data, "files": [], "legacy_file_names": names,
                "tokenizer_files": [name for name in names if name in TOKENIZER_FILE_NAMES],
                "lora": {**lora, "alpha": lora.get("alpha", lora.get("r", 1)),
                         "target_modules": lora.get("target_modules") or []}}

    def name_of(self, entry: FileEntry, prefix: str) -> str:
        return entry.key.removeprefix(prefix.rstrip("/") + "/")

    def check_intact(self, store: ArtifactStore, prefix: str) -> None:
        """Every listed file is in the store as committed; ``ObjectMissing`` naming the first that is not."""
        for entry in self.files:
            if not entry.matches(store):
                raise ObjectMissing(f"adapter file {self.name_of(entry, prefix)} of job {self.job_id} is missing "
                                    "or changed since the trainer committed it")
        for name in self.legacy_file_names:
            if not store.exists(f"{prefix}/{name}"):
                raise ObjectMissing(f"adapter file {name} of job {self.job_id} is missing")


def commit_adapter(store: ArtifactStore, prefix: str, adapter_dir: Path, *, job_id: str, base: BaseModelSpec,
                   global_step: int, trained_tokens: int) -> AdapterManifest:
    """Upload a saved PEFT adapter folder to ``prefix`` (replacing what an earlier attempt left), then write
    its ``AdapterManifest`` last: the commit. The LoRA settings are read from the ``adapter_config.json``
    PEFT wrote, so the marker says what was trained, not what was asked for."""
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    store.delete_prefix(prefix.rstrip("/") + "/")
    uploaded = store.upload_dir(adapter_dir, prefix)
    files = tuple(sorted((FileEntry.of(info) for info in uploaded), key=lambda entry: entry.key))
    names = [entry.key.removeprefix(prefix.rstrip("/") + "/") for entry in files]
    marker = AdapterManifest.build(
        job_id=job_id, base_model=base.id, hf_repo=base.hf_repo, chat_family=base.family.name, global_step=global_step,
        trained_tokens=trained_tokens, lora=LoraSettings.from_peft_config(config), files=files,
        tokenizer_files=[name for name in names if name in TOKENIZER_FILE_NAMES])
    marker.write(store, f"{prefix.rstrip('/')}/{ADAPTER_MARKER}")
    return marker
