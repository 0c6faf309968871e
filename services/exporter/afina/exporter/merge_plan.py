"""What a LoRA merge will write, decided from file headers alone, before any weight is read.

The plan lists every output tensor (name, dtype, shape), where its bytes come from (the base checkpoint, or
a full copy the adapter carries) and which LoRA delta is added to it. It reproduces what PEFT's
``PeftModel.from_pretrained`` + ``merge_and_unload`` + ``save_pretrained`` does to the same files:

- ``<module>.lora_A/B.weight`` (a Linear) and ``<module>.lora_embedding_A/B`` (an Embedding) are deltas on
  ``<module>.weight``, scaled by ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA); ``lora_B.bias``
  (``lora_bias``) is a delta on ``<module>.bias``;
- every other adapter tensor replaces the base tensor of the same name (``<module>.base_layer.<p>`` names
  ``<module>.<p>``): ``modules_to_save`` copies, trained biases (``bias="all"``/``"lora_only"``) and the
  resized embeddings PEFT saves when tokens were added, cast to the base's dtype as loading does;
- tied embeddings: a ``modules_to_save`` copy of ``embed_tokens`` or ``lm_head`` unties them (PEFT then
  writes both and ``tie_word_embeddings: false``), unless ``ensure_weight_tying`` kept the copies tied.

What PEFT cannot merge into the trained model, or what this module does not reproduce exactly, is refused
with ``ExportFailed`` saying why: LoRA variants (DoRA, ...), per-module rank/alpha patterns, trainable token
deltas, layer replication, quantized base weights, and LoRA on a tied ``embed_tokens``/``lm_head`` (PEFT's
merge writes the delta into the weight both share, which changes the other one too: the merged model would
not be the model that was trained).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from afina.core.errors import ExportFailed
from afina.exporter.safetensors_stream import FLOAT_DTYPES, TensorSlot, read_header

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ADAPTER_KEY_PREFIX = "base_model.model."
OUTPUT_EMBEDDING = "lm_head.weight"
INPUT_EMBEDDING_SUFFIX = "embed_tokens.weight"
SAME_BYTES_CHUNK = 16 * 1024 * 1024

# LoraConfig fields PEFT marks ``is_lora_variant``: each changes what a merged weight is (a test keeps this in
# step with the installed PEFT)
LORA_VARIANT_FIELDS = {
    "use_dora": "DoRA (use_dora)",
    "velora_config": "VeLoRA (velora_config)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens), which cannot be merged at all",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
}
# init_lora_weights values that are variants too
LORA_VARIANT_INITS = {"mica": "MiCA (init_lora_weights='mica')"}
UNSUPPORTED_OPTIONS = {
    "use_qalora": "QA-LoRA (use_qalora), made for a quantized base",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "LoRA on bare parameters (target_parameters)",
    "trainable_token_indices": "trainable token deltas (trainable_token_indices)",
    # GPT-2-style Conv1D weights; PEFT itself turns it off on nn.Linear, which every catalog model uses
    "fan_in_fan_out": "transposed (Conv1D) target weights (fan_in_fan_out)",
}

DeltaKind = Literal["linear", "embedding", "bias"]


@dataclass(frozen=True)
class LoraSettings:
    """The parts of ``adapter_config.json`` that decide the merged weights."""

    r: int
    lora_alpha: float
    use_rslora: bool
    modules_to_save: tuple[str, ...]
    ensure_weight_tying: bool
    target_modules: tuple[str, ...]

    @property
    def scaling(self) -> float:
        """PEFT's ``self.scaling[adapter]``, computed the same way so the product has the same bits."""
        return self.lora_alpha / math.sqrt(self.r) if self.use_rslora else self.lora_alpha / self.r

    def saves_module(self, module: str) -> bool:
        """Whether PEFT wraps ``module`` in ``ModulesToSaveWrapper`` (its test: the module name ends with an entry)."""
        return any(module.endswith(entry) for entry in self.modules_to_save)


def lora_settings(config: dict[str, Any]) -> LoraSettings:
    """The merge settings of an adapter config; ``ExportFailed`` naming the first option that is not plain LoRA."""
    if config.get("peft_type", "LORA") != "LORA":
        raise ExportFailed(f"adapter type {config.get('peft_type')!r} cannot be merged; only LoRA adapters can")
    for name, what in LORA_VARIANT_FIELDS.items():
        if config.get(name):
            raise ExportFailed(f"the adapter uses {what}, a LoRA variant afina's exporter cannot merge exactly; "
                               "train with plain LoRA")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower() in LORA_VARIANT_INITS:
        raise ExportFailed(f"the adapter uses {LORA_VARIANT_INITS[init.lower()]}, a LoRA variant afina's exporter "
                           "cannot merge exactly; train with plain LoRA")
    for name, what in UNSUPPORTED_OPTIONS.items():
        if config.get(name):
            raise ExportFailed(f"the adapter uses {what}, which afina's exporter does not merge; train without it")
    try:
        r = int(config["r"])
        alpha = config.get("lora_alpha", r)
        if not isinstance(alpha, int | float) or r < 1:
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise ExportFailed("the adapter's adapter_config.json has no valid r / lora_alpha") from None
    targets = config.get("target_modules") or ()
    saved = config.get("modules_to_save") or ()
    return LoraSettings(r=r, lora_alpha=alpha, use_rslora=bool(config.get("use_rslora")),
                        modules_to_save=(saved,) if isinstance(saved, str) else tuple(saved),
                        ensure_weight_tying=bool(config.get("ensure_weight_tying")),
                        target_modules=(targets,) if isinstance(targets, str) else tuple(sorted(targets)))


@dataclass(frozen=True)
class LoraDelta:
    """A delta PEFT adds to one weight: ``B @ A`` (a Linear), ``(B @ A).T`` (an Embedding) or ``lora_B.bias``
    (a bias), times ``scaling``, all in float32."""

    kind: DeltaKind
    lora_b: TensorSlot
    lora_a: TensorSlot | None
    scaling: float


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its header entry, where its bytes come from and what is added to them."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: TensorSlot
    delta: LoraDelta | None = None

    @property
    def nbytes(self) -> int:
        if self.source.dtype == self.dtype and self.source.shape == self.shape:
            return self.source.nbytes
        numel = math.prod(self.shape)
        return numel * {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}[self.dtype]

    @property
    def copied_verbatim(self) -> bool:
        """True when the output bytes are the source's bytes: copied file to file, never loaded."""
        return self.delta is None and self.source.dtype == self.dtype


@dataclass(frozen=True)
class MergePlan:
    tensors: tuple[PlannedTensor, ...]
    config_updates: dict[str, Any] = field(default_factory=dict)
    lora_modules: tuple[str, ...] = ()
    replaced: tuple[str, ...] = ()

    @property
    def dtype(self) -> str:
        """The float dtype most of the weights are in (torch's spelling: ``bfloat16``)."""
        sizes: Counter[str] = Counter()
        for tensor in self.tensors:
            if tensor.dtype in FLOAT_DTYPES:
                sizes[tensor.dtype] += tensor.nbytes
        dtype = sizes.most_common(1)[0][0] if sizes else "F32"
        return {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype]

    def shards(self, max_shard_bytes: int) -> list[list[PlannedTensor]]:
        """Output tensors in files of at most ``max_shard_bytes`` (a larger tensor gets a file of its own)."""
        shards: list[list[PlannedTensor]] = [[]]
        size = 0
        for tensor in self.tensors:
            if shards[-1] and size + tensor.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(tensor)
            size += tensor.nbytes
        return shards


@dataclass(frozen=True)
class BaseCheckpoint:
    """A transformers checkpoint as its safetensors headers and config describe it."""

    directory: Path
    tensors: dict[str, TensorSlot]  # shard by shard, in file order
    config: dict[str, Any]
    tie_word_embeddings: bool  # as transformers loads it: tied in the config and not stored apart
    # tied in the config, yet the checkpoint holds an lm_head.weight that differs from the input embedding:
    # transformers then does not tie them, and PEFT's merge writes tie_word_embeddings false
    stored_untied: bool = False

    @classmethod
    def open(cls, base_dir: Path) -> BaseCheckpoint:
        config_path = base_dir / "config.json"
        if not config_path.is_file():
            raise ExportFailed(f"the base model at {base_dir} has no config.json")
        config = json.loads(config_path.read_text())
        if config.get("quantization_config"):
            method = config["quantization_config"].get("quant_method", "unknown")
            raise ExportFailed(f"the base model at {base_dir} is quantized ({method}); merging into a dequantized "
                               "quantized base degrades the model, so export needs the original 16/32-bit weights")
        tensors: dict[str, TensorSlot] = {}
        for path in _checkpoint_files(base_dir):
            tensors.update(read_header(path))
        checkpoint = cls(base_dir, tensors, config, _ties_embeddings(base_dir, config))
        embed = checkpoint.input_embedding()
        if checkpoint.tie_word_embeddings and OUTPUT_EMBEDDING in tensors and embed is not None \
                and not _same_bytes(tensors[OUTPUT_EMBEDDING], tensors[embed]):
            return cls(base_dir, tensors, config, tie_word_embeddings=False, stored_untied=True)
        return checkpoint

    def input_embedding(self) -> str | None:
        names = [name for name in self.tensors if name.endswith(INPUT_EMBEDDING_SUFFIX)]
        return names[0] if len(names) == 1 else None


@dataclass(frozen=True)
class AdapterTensors:
    """An adapter's tensors sorted by what the merge does with them."""

    linear: dict[str, dict[str, TensorSlot]]  # module -> {"A", "B", "bias"}
    embedding: dict[str, dict[str, TensorSlot]]  # module -> {"A", "B"}
    replacements: dict[str, TensorSlot]  # base tensor name -> the adapter's full copy

    @classmethod
    def open(cls, weights_path: Path) -> AdapterTensors:
        linear: dict[str, dict[str, TensorSlot]] = {}
        embedding: dict[str, dict[str, TensorSlot]] = {}
        replacements: dict[str, TensorSlot] = {}
        for key, slot in read_header(weights_path).items():
            if not key.startswith(ADAPTER_KEY_PREFIX):
                raise ExportFailed(f"adapter tensor {key!r} is not named as PEFT saves a causal LM's LoRA "
                                   f"({ADAPTER_KEY_PREFIX}...)")
            name = key.removeprefix(ADAPTER_KEY_PREFIX)
            if "lora_magnitude_vector" in name:
                raise ExportFailed("the adapter has DoRA magnitude vectors (lora_magnitude_vector), a LoRA variant "
                                   "afina's exporter cannot merge exactly; train with plain LoRA")
            if ".token_adapter." in name:
                raise ExportFailed("the adapter has trainable token deltas (trainable_token_indices), which afina's "
                                   "exporter does not merge; train without them")
            for suffix, table, part in ((".lora_A.weight", linear, "A"), (".lora_B.weight", linear, "B"),
                                        (".lora_B.bias", linear, "bias"), (".lora_embedding_A", embedding, "A"),
                                        (".lora_embedding_B", embedding, "B")):
                if name.endswith(suffix):
                    table.setdefault(name.removesuffix(suffix), {})[part] = slot
                    break
            else:
                if ".lora_" in name:
                    raise ExportFailed(f"adapter tensor {key!r} is a LoRA part afina's exporter does not know")
                replacements[name.replace(".base_layer.", ".")] = slot
        for module, parts in [*linear.items(), *embedding.items()]:
            if "A" not in parts or "B" not in parts:
                raise ExportFailed(f"the adapter's LoRA for {module} lacks its A or B matrix")
        return cls(linear, embedding, replacements)


def plan_merge(base: BaseCheckpoint, adapter: AdapterTensors, settings: LoraSettings) -> MergePlan:
    """The output tensors of ``base`` + ``adapter``, in the base's order; ``ExportFailed`` for what cannot be
    merged exactly (see the module docstring)."""
    sources = dict(base.tensors)
    replacements = dict(adapter.replacements)
    config_updates: dict[str, Any] = {}
    extra: dict[str, str] = {}  # an output tensor the base lacks -> the base tensor it follows in the output

    if base.tie_word_embeddings:
        _plan_tied_embeddings(base, adapter, settings, sources, replacements, config_updates, extra)
    elif base.stored_untied:
        config_updates["tie_word_embeddings"] = False

    for name, slot in replacements.items():
        if name not in sources:
            raise ExportFailed(f"the adapter carries a full copy of {name}, which the base model has not: it was "
                               "trained on another base model")
        _check_float(sources[name])
        if not slot.is_float:
            raise ExportFailed(f"the adapter's copy of {name} is {slot.dtype}, not a float tensor")
    vocab_rows = _resized_vocab(base, sources, replacements)
    if vocab_rows is not None:
        config_updates["vocab_size"] = vocab_rows

    deltas: dict[str, LoraDelta] = {}
    for module, parts in adapter.linear.items():
        weight = _target(module, sources, "a LoRA")
        shape = replacements[weight].shape if weight in replacements else sources[weight].shape
        lora_a, lora_b = parts["A"], parts["B"]
        _check_rank(module, lora_a.shape[0], lora_b.shape[-1], settings.r)
        _check_shape(module, shape, (lora_b.shape[0], lora_a.shape[1]))
        deltas[weight] = LoraDelta("linear", lora_b, lora_a, settings.scaling)
        if "bias" in parts:
            bias = f"{module}.bias"
            if bias not in sources:
                raise ExportFailed(f"the adapter trains a LoRA bias (lora_bias) for {module}, which has no bias in "
                                   "the base model; PEFT cannot merge that either")
            _check_float(sources[bias])
            deltas[bias] = LoraDelta("bias", parts["bias"], None, settings.scaling)
    for module, parts in adapter.embedding.items():
        weight = _target(module, sources, "an embedding LoRA")
        shape = replacements[weight].shape if weight in replacements else sources[weight].shape
        lora_a, lora_b = parts["A"], parts["B"]
        _check_rank(module, lora_a.shape[0], lora_b.shape[-1], settings.r)
        _check_shape(module, shape, (lora_a.shape[1], lora_b.shape[0]))
        deltas[weight] = LoraDelta("embedding", lora_b, lora_a, settings.scaling)
    for slot in (*(p for parts in adapter.linear.values() for p in parts.values()),
                 *(p for parts in adapter.embedding.values() for p in parts.values())):
        if not slot.is_float:
            raise ExportFailed(f"the adapter's {slot.name} is {slot.dtype}, not a float tensor")

    planned: list[PlannedTensor] = []
    followers = {after: name for name, after in extra.items()}
    for name in sources:
        if name in extra:
            continue
        for output_name in (name, followers.get(name)):
            if output_name is None:
                continue
            origin = sources[output_name]
            source = replacements.get(output_name, origin)
            planned.append(PlannedTensor(output_name, origin.dtype, source.shape, source, deltas.get(output_name)))
    return MergePlan(tuple(planned), config_updates, tuple(sorted({*adapter.linear, *adapter.embedding})),
                     tuple(sorted(replacements)))


def _plan_tied_embeddings(base: BaseCheckpoint, adapter: AdapterTensors, settings: LoraSettings,
                          sources: dict[str, TensorSlot], replacements: dict[str, TensorSlot],
                          config_updates: dict[str, Any], extra: dict[str, str]) -> None:
    """Input and output embeddings share one weight. Untouched by the adapter, ``lm_head.weight`` is neither
    loaded nor saved by transformers; touched, PEFT unties them (a ``modules_to_save`` copy replaced one of
    the two modules) or keeps the tie with the one value it loads into the shared weight."""
    embed = base.input_embedding()
    embed_module = embed.removesuffix(".weight") if embed else None
    head_module = OUTPUT_EMBEDDING.removesuffix(".weight")
    touched_by_lora = sorted({*adapter.linear, *adapter.embedding} & {embed_module, head_module})
    saved_modules = [module for module in (embed_module, head_module)
                     if module is not None and settings.saves_module(module)]
    if not touched_by_lora and not saved_modules and OUTPUT_EMBEDDING not in replacements \
            and (embed is None or embed not in replacements):
        sources.pop(OUTPUT_EMBEDDING, None)
        return
    if embed is None:
        raise ExportFailed("the base model ties its input and output embeddings, and afina's exporter cannot tell "
                           f"which tensor is the input embedding (no single *.{INPUT_EMBEDDING_SUFFIX}); the "
                           "adapter changes them, so it is not merged")
    if touched_by_lora:
        raise ExportFailed(f"the adapter puts LoRA on {', '.join(touched_by_lora)}, but the base model ties its "
                           "input and output embeddings: PEFT's merge writes that delta into the weight both share, "
                           "so the merged model would differ from the trained one; train with lm_head/embed_tokens "
                           "in modules_to_save instead, or without them in target_modules")
    head_copy = replacements.pop(OUTPUT_EMBEDDING, None)
    embed_copy = replacements.get(embed)
    untied = bool(saved_modules) and not settings.ensure_weight_tying
    if untied:
        # PEFT replaced one of the shared modules by its own copy: the two differ, so it sets
        # tie_word_embeddings false and saves both; the one not in modules_to_save keeps the shared value
        config_updates["tie_word_embeddings"] = False
        sources[OUTPUT_EMBEDDING] = sources[embed]
        extra[OUTPUT_EMBEDDING] = embed
        if head_copy is not None:
            replacements[OUTPUT_EMBEDDING] = head_copy
        return
    sources.pop(OUTPUT_EMBEDDING, None)
    if head_copy is None:
        return
    if embed_copy is None:
        replacements[embed] = head_copy  # loaded into the weight lm_head shares with the input embedding
    elif not _same_bytes(head_copy, embed_copy):
        raise ExportFailed("the adapter carries different copies of lm_head and the input embedding, but the base "
                           "model ties them: which one PEFT keeps depends on load order, so it is not merged")


def _resized_vocab(base: BaseCheckpoint, sources: dict[str, TensorSlot],
                   replacements: dict[str, TensorSlot]) -> int | None:
    """The new vocabulary size when the adapter's embeddings were resized for added tokens, else None; any
    other shape change is an adapter of another base."""
    embed = base.input_embedding()
    resized: dict[str, int] = {}
    for name, slot in replacements.items():
        origin = sources[name]
        if slot.shape == origin.shape:
            continue
        if name in (embed, OUTPUT_EMBEDDING) and len(slot.shape) == 2 and slot.shape[1:] == origin.shape[1:]:
            resized[name] = slot.shape[0]
            continue
        raise ExportFailed(f"the adapter's {name} has shape {list(slot.shape)} but the base model's has "
                           f"{list(origin.shape)}: it was trained on another base model")
    if not resized:
        return None
    embeddings = [name for name in (embed, OUTPUT_EMBEDDING) if name in sources]
    rows = {replacements[name].shape[0] if name in replacements else sources[name].shape[0] for name in embeddings}
    if len(rows) != 1:
        sizes = ", ".join(f"{name} {replacements[name].shape[0] if name in replacements else sources[name].shape[0]}"
                          for name in embeddings)
        raise ExportFailed(f"the adapter resized the embeddings for added tokens but not all of them ({sizes} "
                           "rows): save it with save_embedding_layers=True so both are in the adapter")
    return rows.pop()


def _target(module: str, sources: dict[str, TensorSlot], what: str) -> str:
    weight = f"{module}.weight"
    if weight not in sources:
        raise ExportFailed(f"the adapter has {what} for {module}, which the base model has not: it was trained "
                           "on another base model")
    _check_float(sources[weight])
    return weight


def _check_float(slot: TensorSlot) -> None:
    if not slot.is_float:
        raise ExportFailed(f"the base model's {slot.name} is {slot.dtype}, not 16/32-bit floats: a quantized base "
                           "cannot be merged into; export needs the original 16/32-bit weights")


def _check_rank(module: str, rank_a: int, rank_b: int, r: int) -> None:
    if rank_a != r or rank_b != r:
        raise ExportFailed(f"the adapter's LoRA for {module} has rank {rank_a}/{rank_b} but adapter_config.json "
                           f"says r={r}")


def _check_shape(module: str, weight_shape: tuple[int, ...], from_lora: tuple[int, int]) -> None:
    if tuple(weight_shape) != from_lora:
        raise ExportFailed(f"the adapter's LoRA for {module} makes a {list(from_lora)} delta but the base "
                           f"model's weight is {list(weight_shape)}: it was trained on another base model")


def _same_bytes(left: TensorSlot, right: TensorSlot) -> bool:
    if left.dtype != right.dtype or left.shape != right.shape:
        return False
    with open(left.path, "rb", buffering=0) as a, open(right.path, "rb", buffering=0) as b:
        for offset in range(0, left.nbytes, SAME_BYTES_CHUNK):
            count = min(SAME_BYTES_CHUNK, left.nbytes - offset)
            if os.pread(a.fileno(), count, left.begin + offset) != os.pread(b.fileno(), count, right.begin + offset):
                return False
    return True


def _checkpoint_files(base_dir: Path) -> list[Path]:
    index_path = base_dir / INDEX_FILE
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text()).get("weight_map") or {}
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not (base_dir / name).is_file()]
        if not files or missing:
            raise ExportFailed(f"the base model's {INDEX_FILE} names shard files that are not there: "
                               f"{', '.join(missing) or '(none listed)'}")
        return [base_dir / name for name in files]
    if (base_dir / SINGLE_FILE).is_file():
        return [base_dir / SINGLE_FILE]
    raise ExportFailed(f"the base model at {base_dir} has no {SINGLE_FILE} or {INDEX_FILE}: only safetensors base "
                       "weights are merged")


def _ties_embeddings(base_dir: Path, config: dict[str, Any]) -> bool:
    """``tie_word_embeddings`` as transformers resolves it: the config's value, else the model class default."""
    for scope in (config, config.get("text_config") or {}):
        if isinstance(scope, dict) and "tie_word_embeddings" in scope:
            return bool(scope["tie_word_embeddings"])
    from transformers import AutoConfig

    resolved = AutoConfig.from_pretrained(str(base_dir))
    text_config = resolved.get_text_config(decoder=True)
    return bool(getattr(text_config, "tie_word_embeddings", getattr(resolved, "tie_word_embeddings", False)))
