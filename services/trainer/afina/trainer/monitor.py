"""Hardware samples of a training run: CPU, RAM, disk and GPU memory, every N steps and on a timer.

Each sample is one flat JSON object (one line of ``hardware_metrics.jsonl``, the layout the
users of ``seeds/001`` already read), and its GPU figures also go to the worker's Prometheus
gauges. GPU memory comes from torch's caching allocator and is read only once the run itself
has initialized CUDA, so a sampler never creates a context on a device; utilization comes
from NVML when torch can reach it (``pynvml``), else it is left out.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from afina.core.metrics import set_gpu_memory

log = logging.getLogger("afina.trainer")

GIB = 1024**3
HARDWARE_EVERY_STEPS = 10
HARDWARE_INTERVAL_S = 10.0


@dataclass(frozen=True)
class GpuMemory:
    """One device's memory as this process's allocator sees it (bytes), and its utilization if known."""

    index: int
    name: str
    allocated_bytes: int
    reserved_bytes: int
    peak_bytes: int
    total_bytes: int
    utilization_percent: float | None = None


def _cuda() -> Any | None:
    """torch.cuda if this process already uses CUDA, else None (never imports torch, never inits a device)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return None
    except Exception:  # a broken driver must not stop a run that is not using it
        return None
    return torch.cuda


def gpu_memory(utilization: bool = True) -> list[GpuMemory]:
    """Every visible device's memory, or an empty list when the run is not on CUDA."""
    cuda = _cuda()
    if cuda is None:
        return []
    devices = []
    for index in range(cuda.device_count()):
        properties = cuda.get_device_properties(index)
        percent = None
        if utilization:
            try:
                percent = float(cuda.utilization(index))
            except Exception:  # no pynvml, or NVML not permitted in this container
                percent = None
        devices.append(GpuMemory(index=index, name=properties.name,
                                 allocated_bytes=int(cuda.memory_allocated(index)),
                                 reserved_bytes=int(cuda.memory_reserved(index)),
                                 peak_bytes=int(cuda.max_memory_allocated(index)),
                                 total_bytes=int(properties.total_memory), utilization_percent=percent))
    return devices


def current_gpu_memory() -> dict[str, float]:
    """The training device's memory in GiB for a metrics event (``gpu_memory_*_gb``); empty off CUDA."""
    cuda = _cuda()
    if cuda is None:
        return {}
    index = cuda.current_device()
    return {"gpu_memory_allocated_gb": round(cuda.memory_allocated(index) / GIB, 3),
            "gpu_memory_reserved_gb": round(cuda.memory_reserved(index) / GIB, 3),
            "gpu_memory_peak_gb": round(cuda.max_memory_allocated(index) / GIB, 3)}


def reset_gpu_peaks() -> None:
    """Start the peak figures at this run (a warm worker keeps the previous job's otherwise)."""
    cuda = _cuda()
    if cuda is not None:
        for index in range(cuda.device_count()):
            cuda.reset_peak_memory_stats(index)


def describe_hardware() -> dict[str, Any]:
    """The machine, for the report: CPU, RAM, GPUs (name and memory) and the software that trained."""
    memory = psutil.virtual_memory()
    description: dict[str, Any] = {
        "host": platform.node(), "platform": platform.platform(terse=True), "python": platform.python_version(),
        "cpu_model": platform.processor() or platform.machine(), "cpu_cores_logical": psutil.cpu_count(),
        "cpu_cores_physical": psutil.cpu_count(logical=False), "ram_total_gb": round(memory.total / GIB, 2),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        description["torch"] = torch.__version__
    for package in ("transformers", "trl", "peft", "unsloth"):
        module = sys.modules.get(package)
        if module is not None and hasattr(module, "__version__"):
            description[package] = module.__version__
    description["gpus"] = [{"index": gpu.index, "name": gpu.name, "memory_gb": round(gpu.total_bytes / GIB, 2)}
                           for gpu in gpu_memory(utilization=False)]
    return description


class HardwareMonitor:
    """Samples the machine on demand (``sample``) and every ``interval_s`` on a daemon thread.

    The thread also runs ``on_tick`` (the periodic upload of the metrics files). It stops at
    ``stop()``, or by itself once ``sample_dir`` is removed (the recipe's cleanup of a failed
    run), so a run that dies without reaching ``stop`` leaves no sampler behind on a warm worker.
    """

    def __init__(self, sink: Callable[[dict[str, Any]], None], sample_dir: Path, *,
                 interval_s: float = HARDWARE_INTERVAL_S, on_tick: Callable[[], None] | None = None) -> None:
        self.sink = sink
        self.sample_dir = sample_dir
        self.interval_s = interval_s
        self.on_tick = on_tick
        self.attempt = 1
        self.step = 0
        self.epoch = 0.0
        self.phase = "train"
        self._process = psutil.Process(os.getpid())
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._started = time.monotonic()

    def start(self) -> None:
        psutil.cpu_percent(None)  # the first reading of a counter is meaningless: prime it
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="afina-hardware-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(5.0, self.interval_s))

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def begin(self, attempt: int, step: int, epoch: float) -> None:
        """An attempt of the run starts: peaks count from here, the thread runs (one per run, kept across a retry)."""
        reset_gpu_peaks()
        self.attempt, self.step, self.epoch, self.phase = attempt, step, epoch, "train"
        if not self.running:
            self.start()
        self.record("train_begin")

    def record(self, source: str) -> None:
        """``sample``, except that a failing probe is logged and the run goes on: a measurement never stops it."""
        try:
            self.sample(source)
        except Exception:
            log.warning("hardware sample failed", exc_info=True)

    def sample(self, source: str) -> dict[str, Any]:
        """Take one sample now, hand it to the sink and return it; ``source`` says why (step, timer, ...)."""
        with self._lock:
            record = self._measure(source)
            self.sink(record)
        return record

    def _measure(self, source: str) -> dict[str, Any]:
        memory = psutil.virtual_memory()
        record: dict[str, Any] = {
            "timestamp": round(time.time(), 3), "elapsed_s": round(time.monotonic() - self._started, 3),
            "attempt": self.attempt, "step": self.step, "epoch": round(self.epoch, 4), "phase": self.phase,
            "source": source, "cpu_percent": psutil.cpu_percent(None),
            "process_rss_gb": round(self._process.memory_info().rss / GIB, 3),
            "ram_used_gb": round((memory.total - memory.available) / GIB, 3),
            "ram_total_gb": round(memory.total / GIB, 3), "ram_percent": memory.percent,
        }
        try:
            record["disk_free_gb"] = round(psutil.disk_usage(str(self.sample_dir)).free / GIB, 3)
        except OSError:
            record["disk_free_gb"] = None
        for gpu in gpu_memory():
            prefix = f"gpu{gpu.index}_"
            record[prefix + "allocated_gb"] = round(gpu.allocated_bytes / GIB, 3)
            record[prefix + "reserved_gb"] = round(gpu.reserved_bytes / GIB, 3)
            record[prefix + "peak_gb"] = round(gpu.peak_bytes / GIB, 3)
            record[prefix + "total_gb"] = round(gpu.total_bytes / GIB, 3)
            if gpu.utilization_percent is not None:
                record[prefix + "utilization_percent"] = gpu.utilization_percent
            set_gpu_memory(gpu.index, gpu.allocated_bytes, gpu.reserved_bytes, gpu.peak_bytes)
        return record

    def _run(self) -> None:
        while not self._stopped.wait(self.interval_s):
            if not self.sample_dir.exists():
                return
            try:
                self.sample("timer")
                if self.on_tick is not None:
                    self.on_tick()
            except Exception:  # a sample or an upload that fails must not kill the sampler
                log.warning("hardware sample failed", exc_info=True)
