"""Fixtures of the evaluator's integration tests: the real SmolLM2 base, a LoRA adapter, its merge, the f16 GGUF
and a Q8_0 of it (each made once per session, shared with the exporter's tests where they run together)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from afina.exporter.gguf import convert_to_gguf, quantize_gguf
from afina.exporter.merge import merge_adapter
from tests.support import adapters
from tests.support.adapters import base_spec, exporter_shared_dir

exporter_model_cache = adapters.exporter_model_cache
base_model_dir = adapters.base_model_dir
lora_adapter_dir = adapters.lora_adapter_dir


@pytest.fixture(scope="session")
def merged_f16_gguf(tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path, lora_adapter_dir: Path) -> Path:
    out = exporter_shared_dir(tmp_path_factory) / "merged-f16.gguf"
    if not out.exists():
        merged = exporter_shared_dir(tmp_path_factory) / "merged"
        if not (merged / "config.json").exists():
            merge_adapter(base_model_dir, lora_adapter_dir, merged, chat_template=base_spec().family.stock_template)
        convert_to_gguf(merged, out, log_path=out.with_suffix(".log"))
    return out


@pytest.fixture(scope="session")
def merged_q8_gguf(tmp_path_factory: pytest.TempPathFactory, merged_f16_gguf: Path) -> Path:
    out = exporter_shared_dir(tmp_path_factory) / "merged-q8_0.gguf"
    if not out.exists():
        quantize_gguf(merged_f16_gguf, out, "q8_0")
    return out



@pytest.fixture(scope="session")
def damaged_q4_0_gguf(tmp_path_factory: pytest.TempPathFactory, merged_f16_gguf: Path) -> Path:
    """A deliberately degraded quantization: the f16 GGUF's block weights damaged with Gaussian noise (std 0.2 of
    each tensor's own) and then quantized to Q4_0 by the exporter's quantizer. On SmolLM2 this multiplies the
    perplexity about tenfold and keeps the text fluent but wrong: a broken quantization, not random bytes.
    (A real Q2_K of this 135M model is no use here: most of its rows are not whole 256-blocks, llama.cpp falls
    back to 4-bit types for them, and on a few held-out answers it scores as well as f16.)"""
    out = exporter_shared_dir(tmp_path_factory) / "damaged-q4_0.gguf"
    if not out.exists():
        noisy = out.with_name("damaged-f16.gguf")
        add_weight_noise(merged_f16_gguf, noisy, relative_std=0.2)
        quantize_gguf(noisy, out, "q4_0")
        noisy.unlink()
    return out


def add_weight_noise(source: Path, target: Path, *, relative_std: float, seed: int = 0) -> None:
    """Copy ``source`` to ``target`` with seeded noise added to every f16 tensor of the transformer blocks."""
    import gguf
    import numpy as np

    shutil.copyfile(source, target)
    reader = gguf.GGUFReader(str(target), "r+")  # the tensors are views into the file: changed in place
    generator = np.random.default_rng(seed)
    for tensor in reader.tensors:
        if tensor.tensor_type == gguf.GGMLQuantizationType.F16 and tensor.name.startswith("blk."):
            values = tensor.data.astype(np.float32)
            values += generator.standard_normal(values.shape, dtype=np.float32) * (relative_std * values.std())
            tensor.data[...] = values.astype(np.float16)
    reader.data.flush()
