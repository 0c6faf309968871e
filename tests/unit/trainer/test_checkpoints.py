"""Checkpoints in the store: rows written after uploads, the newest kept, older and orphaned ones pruned."""

from __future__ import annotations

from pathlib import Path

import pytest

from afina.core.datasets.layout import checkpoint_prefix
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from afina.trainer import checkpoints
from tests.support.jobs import create_job


def fake_checkpoint(root: Path, step: int) -> Path:
    directory = root / f"checkpoint-{step}"
    directory.mkdir(parents=True)
    for name in (*checkpoints.REQUIRED_FILES, "optimizer.pt"):
        (directory / name).write_text(f"{name} at {step}")
    return directory


@pytest.fixture
def runtime(tmp_path: Path) -> Runtime:
    return Runtime(Settings(home=tmp_path / "home", log_json=False))


def test_publish_keeps_the_newest_and_prunes_rows_objects_and_orphans(runtime: Runtime, tmp_path: Path) -> None:
    job = create_job(runtime, "acme", "file-test", stage="train", status="running")
    # a dead attempt's upload that never got its row
    runtime.store.put_bytes(f"{checkpoint_prefix(job.tenant_id, job.id, 3)}/optimizer.pt", b"partial")
    for step in (2, 4, 6):
        checkpoints.publish_checkpoint(runtime, job.tenant_id, job.id, step, fake_checkpoint(tmp_path, step),
                                       {"step": step}, keep_last=2)
    assert [ref.step for ref in checkpoints.recorded_checkpoints(runtime, job.id)] == [6, 4]
    stored = {info.key.split("/")[4] for info in runtime.store.list(f"jobs/acme/{job.id}/checkpoints/")}
    assert stored == {"step-0000004", "step-0000006"}

    newest = checkpoints.recorded_checkpoints(runtime, job.id)[0]
    local = checkpoints.download_checkpoint(runtime, newest, tmp_path / "restore")
    assert (local / "trainer_state.json").read_text() == "trainer_state.json at 6"


def test_an_incomplete_checkpoint_is_refused(runtime: Runtime, tmp_path: Path) -> None:
    job = create_job(runtime, "acme", "file-test", stage="train", status="running")
    directory = fake_checkpoint(tmp_path, 2)
    (directory / "trainer_state.json").unlink()
    with pytest.raises(FileNotFoundError):
        checkpoints.publish_checkpoint(runtime, job.tenant_id, job.id, 2, directory, {}, keep_last=2)
    assert checkpoints.recorded_checkpoints(runtime, job.id) == []

    complete = fake_checkpoint(tmp_path / "ok", 4)
    checkpoints.publish_checkpoint(runtime, job.tenant_id, job.id, 4, complete, {}, keep_last=2)
    runtime.store.delete(f"{checkpoint_prefix(job.tenant_id, job.id, 4)}/adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="adapter_model"):
        checkpoints.download_checkpoint(runtime, checkpoints.recorded_checkpoints(runtime, job.id)[0],
                                        tmp_path / "restore")


def test_a_trainer_that_lost_its_lease_records_and_prunes_nothing(runtime: Runtime, tmp_path: Path) -> None:
    from afina.core.db import repository as repo
    from afina.core.errors import LeaseLost

    job = create_job(runtime, "acme", "file-test", stage="train", status="running")
    with runtime.db.session() as session:
        assert repo.acquire_lease(session, job.id, "the-new-owner", 60)
    checkpoints.publish_checkpoint(runtime, job.tenant_id, job.id, 2, fake_checkpoint(tmp_path, 2), {"step": 2},
                                   keep_last=1, owner="the-new-owner")
    with pytest.raises(LeaseLost):  # the stalled worker's later checkpoint would prune step 2
        checkpoints.publish_checkpoint(runtime, job.tenant_id, job.id, 4, fake_checkpoint(tmp_path, 4),
                                       {"step": 4}, keep_last=1, owner="the-stalled-owner")
    assert [ref.step for ref in checkpoints.recorded_checkpoints(runtime, job.id)] == [2]
    assert runtime.store.list(f"{checkpoint_prefix(job.tenant_id, job.id, 2)}/")
