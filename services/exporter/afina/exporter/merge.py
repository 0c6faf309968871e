"""Merge a LoRA adapter into the original 16/32-bit base weights, one tensor at a time.

Merging into a dequantized 4-bit base gives a model worse than the adapter it came from (a failure users
of other tools report), so the exporter always merges into the full-precision base that
``materialize_base_model`` keeps, and refuses a quantized one.

The usual path (transformers load → PEFT ``merge_and_unload`` → ``save_pretrained``) holds the whole model
in memory, ~1.2x its size, which is where users' exports get killed. Here the base's safetensors are
streamed: the plan (``merge_plan``) is made from the file headers, each output shard's header is written
first, then every tensor in order; a tensor the adapter does not touch is copied file to file by the kernel,
a targeted one is read, gets its delta, and is written before the next is read. Peak memory is the largest
targeted tensor and its float32 delta, not the model.

The result is bit-identical to PEFT's, tensor by tensor, because each delta is computed with PEFT's own
operations in PEFT's order (``peft/tuners/lora/layer.py``, merge with ``safe_merge=False``):

- a Linear: ``delta = (B @ A) * scaling`` in float32 (PEFT loads LoRA weights as
  float32 over a 16-bit base, ``autocast_adapter_dtype``), then ``weight += delta`` in place: the add runs in
  float32 and rounds once to the base dtype;
- an Embedding: ``delta = (B @ A).T * scaling`` in float32, cast to the base dtype first, then added: PEFT's
  ``Embedding.merge`` rounds twice, so this does too;
- a ``lora_bias``: ``bias += lora_B.bias * scaling``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from afina.core.artifacts.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, TOKENIZER_FILE_NAMES
from afina.core.errors import ExportFailed
from afina.exporter.merge_plan import (
    INDEX_FILE,
    SINGLE_FILE,
    AdapterTensors,
    BaseCheckpoint,
    LoraDelta,
    MergePlan,
    PlannedTensor,
    lora_settings,
    plan_merge,
)
from afina.exporter.safetensors_stream import OutputTensor, ShardWriter, read_tensor, torch_dtype

if TYPE_CHECKING:
    import torch

TOKENIZER_FILES = tuple(sorted(TOKENIZER_FILE_NAMES))
# transformers' long-standing default (the Hub's per-file comfort size); a bigger model is sharded with an index
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
COPIED_CONFIG_FILES = ("generation_config.json",)


@dataclass(frozen=True)
class MergeResult:
    """What was merged: enough for an event and for the verification report."""

    merged_dir: Path
    lora_rank: int
    target_modules: list[str]
    merged_modules: int  # LoRA deltas applied (one per targeted module)
    dtype: str
    replaced_tensors: int = 0  # full copies from the adapter (modules_to_save, trained biases, resized embeddings)
    shards: int = 1
    bytes_written: int = 0
    largest_loaded_bytes: int = 0  # the biggest tensor that had to be in memory (0: every tensor was copied)
    untied_embeddings: bool = False
    vocab_size: int | None = None  # set when the adapter resized the embeddings for added tokens


def check_adapter_dir(adapter_dir: Path) -> dict[str, Any]:
    """The adapter's config; ``ExportFailed`` when the trainer's output is incomplete, not LoRA, or a LoRA
    variant the merge cannot reproduce exactly."""
    missing = [name for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG) if not (adapter_dir / name).is_file()]
    if missing:
        raise ExportFailed(f"the trained adapter is incomplete: {', '.join(missing)} missing "
                           "(only safetensors adapters are accepted)")
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    lora_settings(config)
    return config


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path, *, chat_template: str,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> MergeResult:
    """Write ``base + adapter`` as a transformers checkpoint (safetensors shards, config, tokenizer) to ``out_dir``.

    The files are written to a sibling ``.partial`` folder that is renamed at the end: ``out_dir`` is either
    complete or absent. The tokenizer comes from the adapter folder when the trainer saved one (it may carry
    added tokens), else from the base; either way it is saved with ``chat_template``, the family's stock
    template, because that is the template the GGUF must carry.
    """
    config = check_adapter_dir(adapter_dir)
    settings = lora_settings(config)
    base = BaseCheckpoint.open(base_dir)
    plan = plan_merge(base, AdapterTensors.open(adapter_dir / ADAPTER_WEIGHTS), settings)

    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    vocab_size = plan.config_updates.get("vocab_size")
    try:
        _save_tokenizer(adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir, partial,
                        chat_template, embedding_rows=vocab_size or _embedding_rows(base, plan))
        shards, written, largest = _write_weights(plan, partial, max_shard_bytes)
        _write_configs(base_dir, partial, plan.config_updates)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)
    return MergeResult(merged_dir=out_dir, lora_rank=settings.r, target_modules=sorted(settings.target_modules),
                       merged_modules=len(plan.lora_modules), dtype=plan.dtype,
                       replaced_tensors=len(plan.replaced), shards=shards, bytes_written=written,
                       largest_loaded_bytes=largest,
                       untied_embeddings=plan.config_updates.get("tie_word_embeddings") is False,
                       vocab_size=vocab_size)


def _write_weights(plan: MergePlan, out_dir: Path, max_shard_bytes: int) -> tuple[int, int, int]:
    """Every planned tensor into shards (``model.safetensors``, or numbered shards with an index);
    returns (shards, bytes written, largest tensor loaded)."""
    shards = plan.shards(max_shard_bytes)
    names = [SINGLE_FILE] if len(shards) == 1 else \
        [f"model-{index:05d}-of-{len(shards):05d}.safetensors" for index in range(1, len(shards) + 1)]
    weight_map: dict[str, str] = {}
    written = largest = 0
    for name, tensors in zip(names, shards, strict=True):
        writer = ShardWriter(out_dir / name, [OutputTensor(t.name, t.dtype, t.shape, t.nbytes) for t in tensors])
        for planned in tensors:
            if planned.copied_verbatim:
                writer.copy_from(planned.source)
            else:
                writer.write_tensor(merged_tensor(planned))
                largest = max(largest, planned.nbytes)
            weight_map[planned.name] = name
            written += planned.nbytes
        writer.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": written}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return len(shards), written, largest


def merged_tensor(planned: PlannedTensor) -> torch.Tensor:
    """The output tensor: the source in the output dtype (the cast loading does), plus its LoRA delta."""
    weight = read_tensor(planned.source)
    target_dtype = torch_dtype(planned.dtype)
    if weight.dtype != target_dtype:
        weight = weight.to(target_dtype)
    if planned.delta is not None:
        _add_delta(weight, planned.delta)
    return weight


def _add_delta(weight: torch.Tensor, delta: LoraDelta) -> None:
    """Add the delta in place exactly as PEFT's unsafe merge does (see the module docstring)."""
    import torch

    lora_b = read_tensor(delta.lora_b).to(torch.float32)
    if delta.kind == "bias":
        weight += lora_b * delta.scaling
        return
    assert delta.lora_a is not None
    lora_a = read_tensor(delta.lora_a).to(torch.float32)
    product = lora_b @ lora_a
    del lora_a, lora_b
    if delta.kind == "embedding":
        weight += (product.T * delta.scaling).to(weight.dtype)
        return
    weight += product.mul_(delta.scaling)


def _embedding_rows(base: BaseCheckpoint, plan: MergePlan) -> int | None:
    embed = base.input_embedding()
    shapes = {tensor.name: tensor.shape for tensor in plan.tensors}
    return shapes[embed][0] if embed in shapes else None


def _save_tokenizer(source_dir: Path, out_dir: Path, chat_template: str, *, embedding_rows: int | None) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source_dir))
    if embedding_rows is not None and len(tokenizer) > embedding_rows:
        raise ExportFailed(f"the adapter's tokenizer has {len(tokenizer)} tokens but the model embeds "
                           f"{embedding_rows}; the trainer must save resized embeddings")
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(out_dir))


def _write_configs(base_dir: Path, out_dir: Path, updates: dict[str, Any]) -> None:
    """The base's config.json with what the merge changed (untied embeddings, resized vocabulary) and its
    generation config, as ``save_pretrained`` would write them for the merged model."""
    config = json.loads((base_dir / "config.json").read_text())
    for key, value in updates.items():
        config[key] = value
        text_config = config.get("text_config")
        if isinstance(text_config, dict) and key in text_config:
            text_config[key] = value
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in COPIED_CONFIG_FILES:
        if (base_dir / name).is_file():
            shutil.copyfile(base_dir / name, out_dir / name)
