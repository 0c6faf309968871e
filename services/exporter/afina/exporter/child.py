"""Run an export tool (llama.cpp's converters) in a child process the stage can stop.

A converter that crashes, leaks or hangs cannot take the worker down: its output goes to a log the
error message quotes, ``check_continue`` is asked every second (a cancelled job or a lost lease stops
the child), and a time limit kills it.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from afina.core.errors import ExportFailed

POLL_S = 1.0
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def run_child(command: Sequence[str], *, cwd: Path, log_path: Path, what: str,
              check_continue: Callable[[], None] | None = None, timeout_s: float | None = None) -> int:
    """Run ``command`` to its end (output in ``log_path``); its exit code. ``ExportFailed`` naming ``what`` when it
    runs past ``timeout_s``; whatever ``check_continue`` raises stops the child and propagates."""
    started = time.monotonic()
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(list(command), stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env={**os.environ, **OFFLINE_ENV}, cwd=str(cwd))
        try:
            while process.poll() is None:
                if check_continue is not None:
                    check_continue()
                if timeout_s is not None and time.monotonic() - started > timeout_s:
                    raise ExportFailed(f"{what} did not finish within {timeout_s:.0f} s")
                try:
                    process.wait(timeout=POLL_S)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    return process.returncode
