"""The catalog (every family and model afina knows) and ``resolve_base_model``, the one way to name a base model.

A job's ``model`` is a catalog id or alias (``llama-3.2-1b-instruct``, ``meta-llama/Llama-3.2-1B-Instruct``,
``llama3.2:1b``), or names weights outside the catalog: a transformers folder or ``.gguf`` file on this
machine, a ``store://`` URI, or a Hub id present in the local Hub cache. Those get their family from their
own files (``detect``), or from ``hyperparameters.chat_family``. Anything else is a 400 naming ``model``
and listing the catalog, at job creation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from afina.core.catalog import chatml, deepseek_r1, gemma, llama3, mistral, qwen2_5, qwen3
from afina.core.catalog.detect import detect_family
from afina.core.catalog.family import ChatFamily
from afina.core.catalog.gguf_metadata import ChunkStream, config_from_gguf, gguf_metadata, read_gguf_stream
from afina.core.catalog.sources import GgufFileSource, HubSource, ModelSource, StoreSource, parse_model_reference
from afina.core.catalog.spec import BaseModelSpec
from afina.core.errors import InvalidRequest

if TYPE_CHECKING:
    from afina.core.store import ArtifactStore

_MODULES = (chatml, llama3, qwen2_5, qwen3, gemma, mistral, deepseek_r1)

FAMILIES: dict[str, ChatFamily] = {
    family.name: family
    for family in (chatml.CHATML, llama3.LLAMA31, llama3.LLAMA32, qwen2_5.QWEN25, qwen3.QWEN3, gemma.GEMMA2,
                   gemma.GEMMA3, mistral.MISTRAL, deepseek_r1.DEEPSEEK_R1_QWEN, deepseek_r1.DEEPSEEK_R1_LLAMA)
}

CATALOG: dict[str, BaseModelSpec] = {spec.id: spec for module in _MODULES for spec in module.MODELS}

_BY_NAME: dict[str, BaseModelSpec] = {}
for _spec in CATALOG.values():
    for _name in (_spec.id, *_spec.aliases, *([_spec.unsloth_repo] if _spec.unsloth_repo else [])):
        if _BY_NAME.setdefault(_name.lower(), _spec) is not _spec:
            raise ValueError(f"catalog name {_name!r} is claimed by two models")

DEFAULT_CONTEXT_LENGTH = 2048


def family_by_name(name: str, param: str = "hyperparameters.chat_family") -> ChatFamily:
    """The family called ``name``; a 400 naming ``param`` and listing the families otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise InvalidRequest(f"unknown chat family {name!r}; choose one of {sorted(FAMILIES)}", param=param,
                             code="unknown_chat_family") from None


def catalog_model(name: str) -> BaseModelSpec | None:
    """The catalog entry called ``name`` (id, alias or Unsloth repo, any case), or None."""
    return _BY_NAME.get(name.lower())


def resolve_base_model(name: str, *, chat_family: str | None = None, store: ArtifactStore | None = None,
                       allowed_model_dirs: Sequence[Path] | None = None) -> BaseModelSpec:
    """The base model ``name`` names; ``chat_family`` overrides the family (a catalog model's included).

    ``store`` lets a ``store://`` model's family be read from its files; without it such a model needs
    ``chat_family``. ``allowed_model_dirs`` (the operator's ``settings.allowed_model_dirs``) is given
    wherever ``name`` comes from a user: a local path outside those directories is refused before anything
    is read (see ``access``). Raises ``InvalidRequest`` (param ``model``) for a name that names nothing.
    """
    spec = catalog_model(name)
    if spec is not None:
        if chat_family is not None and chat_family != spec.family.name:
            spec = replace(spec, family=family_by_name(chat_family))
        return spec
    source = parse_model_reference(name, allowed_model_dirs=allowed_model_dirs)
    if source is None:
        raise InvalidRequest(
            f"model {name!r} is not a base model afina can fine-tune; available: {sorted(CATALOG)} (or a local "
            f"model folder, a .gguf file, a store:// URI, or a Hugging Face id in the local cache)",
            param="model", code="model_not_available")
    return _custom_spec(name, source, chat_family, store)


def _custom_spec(name: str, source: ModelSource, chat_family: str | None,
                 store: ArtifactStore | None) -> BaseModelSpec:
    config, tokenizer_config, template = _read_model_files(name, source, store, need_family=chat_family is None)
    text_config = config.get("text_config") or config
    if not isinstance(text_config, dict):
        raise InvalidRequest(f"model {name!r}: text_config in its config.json is not a JSON object", param="model",
                             code="invalid_model_config")
    if chat_family is not None:
        family = family_by_name(chat_family)
    else:
        detected = detect_family(FAMILIES.values(), config, tokenizer_config, template)
        if detected is None:
            raise InvalidRequest(f"could not tell which chat family {name} is (model_type "
                                 f"{config.get('model_type')!r}, no known chat template); set "
                                 f"hyperparameters.chat_family to one of {sorted(FAMILIES)}",
                                 param="hyperparameters.chat_family", code="unknown_chat_family")
        family = detected
    return BaseModelSpec(
        id=name, display_name=name, family=family, source=source,
        parameters=estimate_parameters(text_config),
        context_length=_context_length(name, text_config.get("max_position_embeddings")),
        hf_repo=source.repo if isinstance(source, HubSource) else name, catalog=False,
    )


def _read_model_files(name: str, source: ModelSource, store: ArtifactStore | None,
                      need_family: bool) -> tuple[dict[str, Any], dict[str, Any] | None, str | None]:
    """``config.json`` and ``tokenizer_config.json`` of a model (or their GGUF equivalents) and its chat template."""
    if isinstance(source, GgufFileSource):
        metadata = gguf_metadata(_exists(name, source.path), name=name)
        return config_from_gguf(metadata), None, _template_text(name, metadata.get("tokenizer.chat_template"))
    if isinstance(source, StoreSource):
        if store is None:
            if need_family:
                raise InvalidRequest(f"{name}: the family of a store model is read from the store; set "
                                     f"hyperparameters.chat_family to one of {sorted(FAMILIES)}",
                                     param="hyperparameters.chat_family")
            return {}, None, None
        if source.format == "gguf":
            if not store.exists(source.prefix):
                raise InvalidRequest(f"{name} does not exist in the store", param="model")
            stream = ChunkStream(store.iter_chunks(source.prefix))
            metadata = read_gguf_stream(stream, name=name)  # type: ignore[arg-type]
            return config_from_gguf(metadata), None, _template_text(name, metadata.get("tokenizer.chat_template"))
        config_bytes = _store_bytes(store, f"{source.prefix}/config.json")
        if config_bytes is None:
            raise InvalidRequest(f"{name} holds no config.json: upload a transformers model folder there",
                                 param="model")
        tokenizer_bytes = _store_bytes(store, f"{source.prefix}/tokenizer_config.json")
        template_bytes = _store_bytes(store, f"{source.prefix}/chat_template.jinja")
        return (_json_object(name, "config.json", config_bytes),
                None if tokenizer_bytes is None else _json_object(name, "tokenizer_config.json", tokenizer_bytes),
                None if template_bytes is None else _text(name, "chat_template.jinja", template_bytes))
    folder = source.locate() if isinstance(source, HubSource) else _exists(name, source.path)
    if not (folder / "config.json").is_file():
        raise InvalidRequest(f"{name} is not a transformers model folder (no config.json)", param="model")
    tokenizer_file, template_file = folder / "tokenizer_config.json", folder / "chat_template.jinja"
    tokenizer_config = (_json_object(name, "tokenizer_config.json", tokenizer_file.read_bytes())
                        if tokenizer_file.is_file() else None)
    template = _text(name, "chat_template.jinja", template_file.read_bytes()) if template_file.is_file() else None
    return _json_object(name, "config.json", (folder / "config.json").read_bytes()), tokenizer_config, template


def _exists(name: str, path: Path) -> Path:
    if not path.exists():
        raise InvalidRequest(f"model {name!r} does not exist on this machine", param="model")
    return path


def _store_bytes(store: ArtifactStore, key: str) -> bytes | None:
    return store.get_bytes(key) if store.exists(key) else None


def _text(name: str, filename: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"model {name!r}: its {filename} is not UTF-8 text", param="model",
                             code="invalid_model_config") from None


def _json_object(name: str, filename: str, raw: bytes) -> dict[str, Any]:
    """``raw`` parsed as a JSON object; a 400 naming the model and the file for anything else (a list, a
    string, invalid JSON): a model folder is user input, its files are read only through here."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: a file of nothing but nested brackets
        raise InvalidRequest(f"model {name!r}: its {filename} is not valid JSON", param="model",
                             code="invalid_model_config") from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"model {name!r}: its {filename} is a JSON {_json_kind(value)}, not an object "
                             f"({{\"model_type\": ...}})", param="model", code="invalid_model_config")
    return value


def _json_kind(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _template_text(name: str, template: Any) -> str | None:
    """A GGUF's ``tokenizer.chat_template``: a string, or absent; any other type is a broken file."""
    if template is None or isinstance(template, str):
        return template
    raise InvalidRequest(f"model {name!r}: its tokenizer.chat_template is not a string", param="model",
                         code="invalid_model_config")


def _context_length(name: str, value: Any) -> int:
    """``max_position_embeddings`` as a positive int (the default when absent); a 400 for anything else."""
    if value is None or value == 0:
        return DEFAULT_CONTEXT_LENGTH
    if isinstance(value, float) and value.is_integer() and value > 0:
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequest(f"model {name!r}: max_position_embeddings in its config is {value!r}, not a positive "
                             f"integer", param="model", code="invalid_model_config")
    return value


def estimate_parameters(config: dict[str, Any]) -> int:
    """Parameters of a decoder from its config (embeddings, attention, gated MLP); 0 when the config lacks them."""
    try:
        hidden = int(config["hidden_size"])
        layers = int(config["num_hidden_layers"])
        intermediate = int(config["intermediate_size"])
        vocab = int(config["vocab_size"])
        heads = int(config.get("num_attention_heads") or 1)
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
    except (KeyError, TypeError, ValueError, OverflowError, ZeroDivisionError):  # a config is user input
        return 0
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings", True) else 2)
    return embeddings + layers * (attention + 3 * hidden * intermediate)
