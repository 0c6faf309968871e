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
    missing = rf"no committed adapter for job {job.id} \(no afina_adapter.json under jobs/acme/{job.id}/adapter\)"
    with pytest.raises(ExportFailed, match=missing):
        export_job(context_for(runtime, job, "export"))
    assert not (runtime.settings.resolved_work_dir / job.id).exists()


def _committed_adapter(runtime: Runtime, job_id: str, tmp_path: Path) -> str:
    """A small adapter folder committed as the trainer commits one (marker last)."""
    import orjson

    from afina.core.artifacts.adapter import commit_adapter
    from afina.core.catalog import CATALOG
    from afina.core.datasets.layout import adapter_prefix

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes(orjson.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                               "target_modules": ["v_proj", "q_proj"]}))
    (folder / "adapter_model.safetensors").write_bytes(b"not really weights")
    prefix = adapter_prefix("acme", job_id)
    commit_adapter(runtime.store, prefix, folder, job_id=job_id, base=CATALOG["smollm2-135m-instruct"],
                   global_step=1, trained_tokens=1)
    return prefix


def test_an_adapter_changed_after_its_commit_is_not_merged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from afina.exporter.pipeline import download_adapter

    runtime = make_runtime(tmp_path)
    job = export_job_row(runtime)
    prefix = _committed_adapter(runtime, job.id, tmp_path)
    download_adapter(runtime.store, "acme", job.id, tmp_path / "fetched")  # intact: fetched
    runtime.store.put_bytes(f"{prefix}/adapter_model.safetensors", b"not really weightz")  # same size
    with pytest.raises(ExportFailed, match="adapter_model.safetensors of job .* changed after the trainer"):
        download_adapter(runtime.store, "acme", job.id, tmp_path / "again")


def test_a_dora_adapter_is_refused_with_a_reason(tmp_path: Path) -> None:
    import orjson

    from afina.core.artifacts import AdapterManifest
    from afina.exporter.pipeline import download_adapter

    runtime = make_runtime(tmp_path)
    job = export_job_row(runtime)
    prefix = _committed_adapter(runtime, job.id, tmp_path)
    marker = orjson.loads(runtime.store.get_bytes(f"{prefix}/afina_adapter.json"))
    marker["lora"]["use_dora"] = True
    AdapterManifest.model_validate(marker).write(runtime.store, f"{prefix}/afina_adapter.json")
    with pytest.raises(ExportFailed, match="DoRA"):
        download_adapter(runtime.store, "acme", job.id, tmp_path / "fetched")
