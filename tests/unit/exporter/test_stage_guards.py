"""Refusals that come before any heavy work: unknown quantization, too little disk, no adapter."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from afina.core.db import repository as repo
from afina.core.errors import ExportFailed
from afina.core.queue.jobs import run_stage
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from afina.exporter.pipeline import export_job
from tests.support.jobs import context_for, create_job

DiskUsage = namedtuple("DiskUsage", "total used free")


def make_runtime(tmp_path: Path, **settings: object) -> Runtime:
    return Runtime(Settings(home=tmp_path, log_json=False, **settings))


def export_job_row(runtime: Runtime):  # noqa: ANN201
    job = create_job(runtime, "acme", "file-test", stage="export", status="running")
    return job


def failed_job(runtime: Runtime, job_id: str):  # noqa: ANN201
    with runtime.db.session() as session:
        return repo.get_job(session, None, job_id)


def test_unknown_quantization_fails_the_job_with_the_allowed_names(tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path, export_quantizations=["Q4_K_M", "Q3_XL"])
    job = export_job_row(runtime)
    assert run_stage(runtime, job.id, "export", export_job) == "failed"
    row = failed_job(runtime, job.id)
    assert row.status == "failed" and row.fine_tuned_model is None
    assert row.error["code"] == "export_failed"
    assert "unknown quantization 'Q3_XL'" in row.error["message"] and "Q8_0" in row.error["message"]


def test_insufficient_disk_is_refused_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = make_runtime(tmp_path)
    job = export_job_row(runtime)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: DiskUsage(10**12, 10**12 - 300 * 10**6, 300 * 10**6))
    with pytest.raises(ExportFailed) as caught:
        export_job(context_for(runtime, job, "export"))
    message = caught.value.message
    # SmolLM2-135M: 134.5M parameters x 2 bytes x 4 = 1.08 GB
    assert "not enough disk space" in message and "0.30 GB free" in message and "1.08 GB needed" in message
    assert "AFINA_WORK_DIR" in message
    assert not (runtime.settings.resolved_work_dir / job.id).exists()


def test_enough_disk_passes_preflight_and_a_missing_adapter_is_named(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = make_runtime(tmp_path)
    job = export_job_row(runtime)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: DiskUsage(10**12, 0, 2 * 10**9))
    missing = rf"no trained adapter at jobs/acme/{job.id}/adapter/adapter_model.safetensors"
    with pytest.raises(ExportFailed, match=missing):
        export_job(context_for(runtime, job, "export"))
    assert not (runtime.settings.resolved_work_dir / job.id).exists()
