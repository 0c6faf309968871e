"""One fine-tunable base model: its family, where its weights are, and the figures the trainer sizes with."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from afina.core.catalog.family import ChatFamily
from afina.core.catalog.sources import GgufFileSource, GgufPackageSource, ModelSource
from afina.core.errors import NotFound

_SAFE_ID = re.compile(r"[a-z0-9][a-z0-9._-]*")


@dataclass(frozen=True)
class BaseModelSpec:
    """A base model: a catalog entry, or one named by path, store URI or Hub id (``catalog=False``).

    ``hf_repo`` is the public repository the weights are (a copy of): adapters name it as their base.
    ``unsloth_repo`` is Unsloth's pre-quantized (bitsandbytes 4-bit) upload of the same weights, which the
    Unsloth backend loads for QLoRA when it is in the local cache.
    """

    id: str
    display_name: str
    family: ChatFamily
    source: ModelSource
    parameters: int
    context_length: int
    hf_repo: str
    aliases: tuple[str, ...] = field(default_factory=tuple)
    unsloth_repo: str | None = None
    catalog: bool = True

    def gguf_path(self) -> Path:
        """The GGUF file of a model that ships as one (llama.cpp serves it as is); NotFound otherwise."""
        if isinstance(self.source, GgufPackageSource | GgufFileSource):
            return self.source.locate()
        raise NotFound(f"{self.id} has no GGUF file on this machine (its weights are {self.source.describe()})")

    @property
    def cache_key(self) -> str:
        """A folder name for this model in the model cache: the id for catalog models, else a slug and a hash."""
        if self.catalog and _SAFE_ID.fullmatch(self.id):
            return self.id
        slug = re.sub(r"[^a-z0-9._-]+", "-", self.id.lower()).strip("-.")[-48:] or "model"
        return f"custom-{slug}-{hashlib.sha256(self.id.encode()).hexdigest()[:12]}"
