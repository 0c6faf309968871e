"""Hardware sampling (the real psutil readings of this machine) and the two metrics files (real local store)."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY

from afina.core.metrics import set_gpu_memory
from afina.core.store.local import LocalStore
from afina.trainer.metrics_files import HARDWARE_METRICS_FILE, TRAINING_METRICS_FILE, MetricsFiles, parse_jsonl
from afina.trainer.monitor import HardwareMonitor, current_gpu_memory, describe_hardware, gpu_memory


def wait_for(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_a_sample_reads_this_machine(tmp_path: Path) -> None:
    import psutil

    samples: list[dict[str, Any]] = []
    monitor = HardwareMonitor(samples.append, tmp_path, interval_s=60)
    monitor.step, monitor.epoch, monitor.phase, monitor.attempt = 20, 0.5, "eval", 2
    record = monitor.sample("step")
    assert samples == [record]
    assert (record["step"], record["epoch"], record["phase"], record["attempt"], record["source"]) == (
        20, 0.5, "eval", 2, "step")
    rss = psutil.Process(os.getpid()).memory_info().rss / 1024**3
    assert record["process_rss_gb"] == pytest.approx(rss, abs=0.05) and record["process_rss_gb"] > 0.01
    assert 0 < record["ram_used_gb"] <= record["ram_total_gb"]
    assert record["disk_free_gb"] == pytest.approx(shutil.disk_usage(tmp_path).free / 1024**3, rel=0.05)
    assert record["timestamp"] == pytest.approx(time.time(), abs=5)
    if "torch" not in sys.modules or not sys.modules["torch"].cuda.is_available():
        assert not [key for key in record if key.startswith("gpu")]


def test_the_timer_samples_until_stopped(tmp_path: Path) -> None:
    samples: list[dict[str, Any]] = []
    ticks: list[float] = []
    monitor = HardwareMonitor(samples.append, tmp_path, interval_s=0.05, on_tick=lambda: ticks.append(time.time()))
    monitor.start()
    wait_for(lambda: len(samples) >= 3)
    monitor.stop()
    assert not monitor.running
    count = len(samples)
    time.sleep(0.2)
    assert len(samples) == count  # stopped means stopped
    assert {s["source"] for s in samples} == {"timer"} and len(ticks) == count
    assert all(later["elapsed_s"] > earlier["elapsed_s"] for earlier, later in zip(samples, samples[1:], strict=False))


def test_the_timer_stops_by_itself_when_its_folder_is_removed(tmp_path: Path) -> None:
    """A run that fails before ``close()``: the recipe's cleanup removes the work dir, and the sampler goes."""
    folder = tmp_path / "work" / "metrics"
    folder.mkdir(parents=True)
    monitor = HardwareMonitor(lambda record: None, folder, interval_s=0.05)
    monitor.start()
    assert monitor.running
    shutil.rmtree(tmp_path / "work")
    wait_for(lambda: not monitor.running, timeout=5)


def test_a_failing_upload_does_not_kill_the_sampler(tmp_path: Path) -> None:
    samples: list[dict[str, Any]] = []

    def broken_upload() -> None:
        raise ConnectionError("store unreachable")

    monitor = HardwareMonitor(samples.append, tmp_path, interval_s=0.05, on_tick=broken_upload)
    monitor.start()
    wait_for(lambda: len(samples) >= 3)
    assert monitor.running
    monitor.stop()


def test_without_cuda_there_are_no_gpu_figures() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("this process uses CUDA")
    assert gpu_memory() == [] and current_gpu_memory() == {}
    description = describe_hardware()
    assert description["gpus"] == [] and description["ram_total_gb"] > 0
    assert description["cpu_cores_logical"] >= 1 and description["torch"] == torch.__version__


def test_gpu_memory_gauges_per_device_and_kind() -> None:
    set_gpu_memory(1, allocated_bytes=3 * 1024**3, reserved_bytes=4 * 1024**3, peak_bytes=5 * 1024**3)
    value = lambda kind: REGISTRY.get_sample_value("afina_gpu_memory_bytes", {"device": "1", "kind": kind})  # noqa: E731
    assert (value("allocated"), value("reserved"), value("peak")) == (3 * 1024**3, 4 * 1024**3, 5 * 1024**3)


# the metrics files ----------------------------------------------------------------------------------------

def files_for(tmp_path: Path, name: str = "a1") -> tuple[MetricsFiles, LocalStore]:
    store = LocalStore(tmp_path / "store")
    return MetricsFiles(tmp_path / name, store, "jobs/ftjob-abc/report/"), store


def test_files_append_upload_and_restore_for_a_resumed_attempt(tmp_path: Path) -> None:
    first, store = files_for(tmp_path)
    assert first.restore(0) == 1  # nothing stored: the first attempt
    for step in range(1, 7):
        first.append_training({"type": "train", "step": step, "attempt": 1, "train_loss": 2.0 - step / 10})
    first.append_training({"type": "validation", "step": 4, "attempt": 1, "full_valid_loss": 1.7})
    for step in (0, 5):
        first.append_hardware({"step": step, "attempt": 1, "ram_used_gb": 3.2})
    first.upload()
    assert store.get_bytes("jobs/ftjob-abc/report/" + TRAINING_METRICS_FILE) == first.read_bytes(TRAINING_METRICS_FILE)

    # attempt 2 resumes from the checkpoint of step 4: steps 5-6 will be trained again
    second, _ = files_for(tmp_path, "a2")
    assert second.restore(4) == 2
    assert [(r["type"], r["step"]) for r in second.records(TRAINING_METRICS_FILE)] == [
        ("train", 1), ("train", 2), ("train", 3), ("train", 4), ("validation", 4)]
    assert [r["step"] for r in second.records(HARDWARE_METRICS_FILE)] == [0, 5]  # history is kept whole

    # attempt 3 finds no checkpoint at all: training starts over, hardware history stays
    third, _ = files_for(tmp_path, "a3")
    second.append_hardware({"step": 5, "attempt": 2, "ram_used_gb": 3.3})
    second.upload()
    assert third.restore(0) == 3
    assert third.records(TRAINING_METRICS_FILE) == []
    assert [r["attempt"] for r in third.records(HARDWARE_METRICS_FILE)] == [1, 1, 2]


def test_a_torn_line_is_skipped_not_fatal(tmp_path: Path) -> None:
    files, store = files_for(tmp_path)
    good = orjson.dumps({"type": "train", "step": 1, "train_loss": 1.5})
    store.put_bytes("jobs/ftjob-abc/report/" + TRAINING_METRICS_FILE, good + b"\n" + b'{"type": "tra')
    files.restore(3)
    assert files.records(TRAINING_METRICS_FILE) == [orjson.loads(good)]
    assert parse_jsonl(b"[1, 2]\n\n{\"a\": 1}\n") == [{"a": 1}]
