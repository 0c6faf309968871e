"""Which chat family a model folder belongs to, from its ``config.json`` and ``tokenizer_config.json``.

A folder whose chat template is exactly a family's stock template is that family. Otherwise the
template's special tokens and the architecture (``model_type``) decide: ``<|im_start|>`` on a ``qwen2``
model is Qwen 2.5, on a ``llama`` one SmolLM2's ChatML, and so on. What matches nothing is refused with
the list of families to choose from (``hyperparameters.chat_family``), never guessed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from afina.core.catalog.family import ChatFamily


def chat_template_of(tokenizer_config: Mapping[str, Any] | None) -> str | None:
    """The default chat template a ``tokenizer_config.json`` carries (a string, or a list of named ones)."""
    template = (tokenizer_config or {}).get("chat_template")
    if isinstance(template, list):
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, Mapping)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def detect_family(families: Iterable[ChatFamily], config: Mapping[str, Any],
                  tokenizer_config: Mapping[str, Any] | None, chat_template: str | None = None) -> ChatFamily | None:
    """The family of a model folder, or None when nothing identifies one."""
    by_name = {family.name: family for family in families}
    template = chat_template or chat_template_of(tokenizer_config)
    model_type = str(config.get("model_type") or (config.get("text_config") or {}).get("model_type") or "")
    name = _by_markers(template or "", model_type) or _by_architecture(model_type)
    if template is not None:
        exact = [family for family in by_name.values() if template.strip() == family.stock_template.strip()]
        if exact:
            # families sharing a template (the DeepSeek-R1 distills) differ by architecture
            return next((family for family in exact if family.name == name), exact[0])
    return by_name.get(name) if name else None


def _by_markers(template: str, model_type: str) -> str | None:
    if "<｜Assistant｜>" in template:
        return "deepseek-r1-qwen" if model_type.startswith("qwen") else "deepseek-r1-llama"
    if "<|start_header_id|>" in template:
        return "llama3.2" if "strftime_now" in template else "llama3.1"
    if "<start_of_turn>" in template:
        return "gemma3" if model_type.startswith("gemma3") else "gemma2"
    if "[INST]" in template and model_type in {"mistral", "llama"}:
        return "mistral"
    if "<|im_start|>" in template:
        if model_type == "qwen3":
            return "qwen3"
        if model_type == "qwen2":
            return "qwen2.5"
        if model_type == "llama":
            return "chatml"
    return None


def _by_architecture(model_type: str) -> str | None:
    return {"qwen3": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3", "gemma3_text": "gemma3",
            "mistral": "mistral"}.get(model_type)
