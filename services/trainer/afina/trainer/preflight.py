"""Before loading anything: will this run fit in this worker's GPU memory, RAM and disk?

Users guess batch sizes until CUDA runs out of memory (seed 002_*). The preflight
estimates the peak from the model's shape and the run's config, compares it with what
the worker has free, and refuses a run that cannot fit with a concrete change that would
("set batch_size 2 and gradient_accumulation_steps 8": the same effective batch), so the
job fails in a second instead of after minutes of loading.

The estimate is deliberately simple and calibrated against measured peaks
(bench/RESULTS.md records estimate vs measured for every GPU run):

- weights: parameters × bytes per parameter (bf16 2, fp32 4; 4-bit ≈ 0.56 for the
  quantized linear layers, embeddings stay 16-bit);
- LoRA: trainable parameters × 16 bytes (weights, gradients, two AdamW moments);
- activations per token: with gradient checkpointing, each layer's input (2·h bytes)
  plus one layer recomputed (34·h bytes, Korthikanti et al.); without, 34·h per layer;
- logits: tokens × vocabulary × 2 bytes for transformers (the bf16 logits; calibrated on the
  H200 runs in bench/RESULTS.md, where the measured peaks stayed below this estimate), and
  a quarter of that for a chunked cross-entropy (Unsloth's, Liger's fused linear cross-entropy);
- a fixed 0.75 GiB for the CUDA context and allocator slack, and a 15% margin on the total.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from afina.core.errors import InsufficientMemory, TrainingFailed

GIB = 1024**3
MARGIN = 1.15
CUDA_CONTEXT_BYTES = 0.75 * GIB
LORA_BYTES_PER_PARAM = 16
ACTIVATION_BYTES_PER_HIDDEN = 34  # per token per layer, 16-bit (Korthikanti et al. 2022)
# transformers' unfused layers keep more: 49.7 GiB measured for Llama-3.2-1B, 16 × 2048 tokens, no checkpointing,
# Liger's kernels on (H100, 2026-12-07, bench/RESULTS.md), i.e. about 46·h a token a layer; Unsloth's fused
# layers measured 36.0 GiB for the same run, within the 34·h rule
ACTIVATION_BYTES_PER_HIDDEN_HF = 48
# QLoRA through the hf backend keeps more again: PEFT's prepare_model_for_kbit_training runs the norms in fp32 and
# each layer dequantizes its weights; 66.6 GiB measured for Qwen2.5-7B, 4 × 2048 tokens, no checkpointing (H100,
# 2026-12-07), about 75·h a token a layer
ACTIVATION_BYTES_PER_HIDDEN_HF_QUANTIZED = 80
LOGIT_BYTES_HF = 2
LOGIT_BYTES_UNSLOTH = 0.5
BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0}
QUANTIZED_BYTES_PER_PARAM = {"4bit": 0.5625, "8bit": 1.0625}


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a transformers ``config.json``."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tied_embeddings: bool

    @classmethod
    def from_config_file(cls, path: Path) -> ModelShape:
        config = json.loads(path.read_text())
        config = config.get("text_config", config)  # multimodal configs (gemma3) nest the language model
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return cls(hidden_size=hidden, intermediate_size=int(config["intermediate_size"]),
                   num_layers=int(config["num_hidden_layers"]), vocab_size=int(config["vocab_size"]),
                   num_heads=heads, num_kv_heads=int(config.get("num_key_value_heads") or heads),
                   head_dim=int(config.get("head_dim") or hidden // heads),
                   tied_embeddings=bool(config.get("tie_word_embeddings", False)))

    @property
    def layer_linear_params(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attention = h * self.num_heads * d * 2 + h * self.num_kv_heads * d * 2
        return attention + 3 * h * i

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)

    @property
    def parameters(self) -> int:
        return self.num_layers * self.layer_linear_params + self.embedding_params

    def lora_params(self, r: int, target_modules: tuple[str, ...]) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        shapes = {"q_proj": (h, self.num_heads * d), "k_proj": (h, self.num_kv_heads * d),
                  "v_proj": (h, self.num_kv_heads * d), "o_proj": (self.num_heads * d, h),
                  "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        per_layer = sum(r * (fan_in + fan_out) for name, (fan_in, fan_out) in shapes.items() if name in target_modules)
        return per_layer * self.num_layers


@dataclass(frozen=True)
class RunShape:
    """The parts of a run's config that decide its memory."""

    backend: str  # "hf" | "unsloth"
    device: str  # "cpu" | "cuda"
    dtype: str
    quantization: str
    batch_size: int
    gradient_accumulation_steps: int
    tokens_per_row: int  # longest row a micro-batch can hold (max_seq_len when packing)
    gradient_checkpointing: bool
    lora_r: int
    target_modules: tuple[str, ...]
    checkpoint_layers: int | None = None  # with gradient checkpointing: layers that checkpoint (None: all)
    fused_loss: bool = False  # a chunked/fused cross-entropy (Unsloth's, Liger's): the logits never exist whole


@dataclass(frozen=True)
class MemoryEstimate:
    weights: float
    lora: float
    activations: float
    logits: float
    overhead: float

    @property
    def total(self) -> float:
        return (self.weights + self.lora + self.activations + self.logits + self.overhead) * MARGIN

    def describe(self) -> str:
        parts = {"weights": self.weights, "LoRA+optimizer": self.lora, "activations": self.activations,
                 "logits": self.logits}
        return ", ".join(f"{name} {value / GIB:.1f}" for name, value in parts.items()) + \
            f" GiB (+{(MARGIN - 1) * 100:.0f}% margin: {self.total / GIB:.1f} GiB)"


def estimate_memory(model: ModelShape, run: RunShape) -> MemoryEstimate:
    """Peak bytes of one training step on the device that holds the model."""
    if run.quantization in QUANTIZED_BYTES_PER_PARAM:
        # PEFT's prepare_model_for_kbit_training (the hf backend) upcasts what stays unquantized to fp32
        embedding_bytes = 4 if run.backend == "hf" else 2
        weights = (model.num_layers * model.layer_linear_params * QUANTIZED_BYTES_PER_PARAM[run.quantization]
                   + model.embedding_params * embedding_bytes)
    else:
        weights = model.parameters * BYTES_PER_PARAM.get(run.dtype, 2.0)
    act_scale = BYTES_PER_PARAM.get(run.dtype, 2.0) / 2  # the 34·h rule counts 16-bit activations
    tokens = run.batch_size * run.tokens_per_row
    hidden = model.hidden_size
    per_layer = ACTIVATION_BYTES_PER_HIDDEN  # a layer that keeps all its activations
    if run.backend == "hf" and run.device == "cuda":
        per_layer = ACTIVATION_BYTES_PER_HIDDEN_HF_QUANTIZED if run.quantization != "none" \
            else ACTIVATION_BYTES_PER_HIDDEN_HF
    if run.gradient_checkpointing and run.backend == "unsloth":
        # Unsloth offloads the checkpointed layer inputs to CPU memory: one layer's activations stay
        per_token = ACTIVATION_BYTES_PER_HIDDEN * hidden * act_scale
    elif run.gradient_checkpointing:
        # checkpointed layers keep their input (2·h) and one of them is recomputed at a time (34·h); with
        # selective checkpointing the first layers checkpoint and the others keep all their activations, which
        # backward frees before it reaches a checkpointed layer: the peak holds one or the other, not both
        checkpointed = min(model.num_layers, run.checkpoint_layers or model.num_layers)
        kept = max(model.num_layers - checkpointed, 1)
        per_token = (checkpointed * 2 + kept * per_layer) * hidden * act_scale
    else:
        per_token = model.num_layers * per_layer * hidden * act_scale
    logit_bytes = LOGIT_BYTES_UNSLOTH if run.backend == "unsloth" or run.fused_loss else LOGIT_BYTES_HF
    return MemoryEstimate(
        weights=weights,
        lora=model.lora_params(run.lora_r, run.target_modules) * LORA_BYTES_PER_PARAM,
        activations=tokens * per_token,
        logits=tokens * model.vocab_size * logit_bytes * act_scale,
        overhead=CUDA_CONTEXT_BYTES if run.device == "cuda" else 0.5 * GIB,
    )


def suggest_fit(model: ModelShape, run: RunShape, available: float) -> str | None:
    """The smallest change that fits ``available`` bytes, said as a user would set it; None if nothing does."""
    batch, accumulation = run.batch_size, run.gradient_accumulation_steps
    while batch > 1:
        batch //= 2
        accumulation *= 2
        smaller = RunShape(**{**run.__dict__, "batch_size": batch, "gradient_accumulation_steps": accumulation})
        if estimate_memory(model, smaller).total <= available:
            return (f"set batch_size {batch} and gradient_accumulation_steps {accumulation} "
                    f"(the same effective batch of {run.batch_size * run.gradient_accumulation_steps})")
    one = RunShape(**{**run.__dict__, "batch_size": 1,
                      "gradient_accumulation_steps": run.batch_size * run.gradient_accumulation_steps})
    if not run.gradient_checkpointing:
        checkpointed = RunShape(**{**one.__dict__, "gradient_checkpointing": True})
        if estimate_memory(model, checkpointed).total <= available:
            return (f"set gradient_checkpointing true, batch_size 1 and gradient_accumulation_steps "
                    f"{one.gradient_accumulation_steps}")
    if run.device == "cuda" and run.quantization == "none":
        quantized = RunShape(**{**one.__dict__, "quantization": "4bit", "gradient_checkpointing": True})
        if estimate_memory(model, quantized).total <= available:
            return (f"set quantization 4bit (QLoRA), gradient_checkpointing true, batch_size 1 and "
                    f"gradient_accumulation_steps {one.gradient_accumulation_steps}")
    for length in (run.tokens_per_row // 2, run.tokens_per_row // 4):
        shorter = RunShape(**{**one.__dict__, "tokens_per_row": max(16, length), "gradient_checkpointing": True})
        if length >= 16 and estimate_memory(model, shorter).total <= available:
            return f"set max_seq_len {length}, batch_size 1 and gradient_checkpointing true"
    return None


@dataclass(frozen=True)
class Resources:
    """What the worker has free now, in bytes (None where it does not apply)."""

    gpu_free: float | None
    gpu_total: float | None
    ram_available: float
    disk_free: float

    @classmethod
    def measure(cls, device: str, work_dir: Path) -> Resources:
        import psutil

        gpu_free = gpu_total = None
        if device == "cuda":
            gpu_free, gpu_total = cuda_free_bytes()
        work_dir.mkdir(parents=True, exist_ok=True)
        return cls(gpu_free=gpu_free, gpu_total=gpu_total, ram_available=float(psutil.virtual_memory().available),
                   disk_free=float(shutil.disk_usage(work_dir).free))


def cuda_free_bytes() -> tuple[float, float]:
    """(free, total) bytes of this process's GPU as a new run can use them: what the driver reports free plus
    what this process's caching allocator holds reserved but unallocated (a warm worker's earlier job left it
    there; the driver counts it as used, and the run will get it)."""
    import torch

    free, total = torch.cuda.mem_get_info()
    cached = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    return float(free + max(cached, 0)), float(total)


def check_fits(model: ModelShape, run: RunShape, resources: Resources, *, disk_needed: float) -> MemoryEstimate:
    """The estimate when the run fits; ``InsufficientMemory`` with advice otherwise."""
    estimate = estimate_memory(model, run)
    if run.device == "cuda":
        available, where = resources.gpu_free or 0.0, "GPU memory"
    else:
        available, where = resources.ram_available, "RAM"
    if estimate.total > available:
        advice = suggest_fit(model, run, available)
        fix = f"; {advice}" if advice else "; no smaller setting fits: use a smaller model or a larger worker"
        raise InsufficientMemory(f"this run needs about {estimate.total / GIB:.1f} GiB of {where} "
                                 f"({estimate.describe()}) and the worker has {available / GIB:.1f} GiB free{fix}",
                                 needed_bytes=estimate.total, available_bytes=available)
    if disk_needed > resources.disk_free:
        raise TrainingFailed(f"this run needs about {disk_needed / GIB:.1f} GiB of disk for the base model and "
                             f"checkpoints and the work directory has {resources.disk_free / GIB:.1f} GiB free; "
                             f"free space or point AFINA_WORK_DIR at a larger volume", code="insufficient_disk")
    return estimate


def checkpoint_bytes(model: ModelShape, run: RunShape) -> float:
    """One checkpoint on disk: adapter (fp32) + AdamW moments, about 12 bytes a trainable parameter."""
    return float(model.lora_params(run.lora_r, run.target_modules) * 12)


def halve_micro_batch(batch_size: int, gradient_accumulation_steps: int) -> tuple[int, int] | None:
    """The OOM retry's change: half the micro-batch, double the accumulation (same effective batch)."""
    if batch_size <= 1:
        return None
    return math.ceil(batch_size / 2), gradient_accumulation_steps * 2
