"""A full disk in the worker's work folder: the job fails saying so, the store is untouched, the next job runs.

The work folder is a real 1 MiB tmpfs mounted by the test where the machine allows it
(root in a sandbox that permits mounts); elsewhere the same stage meets an injected ENOSPC.
"""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from afina.core.db import repository as repo
from afina.core.queue.jobs import run_stage
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from afina.ingest.prepare import prepare_dataset
from tests.support.jobs import create_job, sample_examples, upload_file
from tests.support.models import shared_model_cache

pytestmark = pytest.mark.integration


@dataclass
class SmallDisk:
    folder: Path
    mounted: bool
    injecting: bool = False  # without a tmpfs: every write under the folder fails while this is set


@pytest.fixture
def small_work_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SmallDisk]:
    """A 1 MiB tmpfs if one can be mounted here, else a folder whose writes fail with ENOSPC on demand."""
    folder = tmp_path / "work"
    folder.mkdir()
    disk = SmallDisk(folder, subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                                            capture_output=True).returncode == 0)
    if not disk.mounted:
        import builtins

        real_open = builtins.open

        def open_with_quota(file, mode="r", *args, **kwargs):  # noqa: ANN001, ANN202
            if disk.injecting and str(file).startswith(str(folder)) and any(flag in mode for flag in "wax"):
                raise OSError(errno.ENOSPC, "No space left on device", str(file))
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", open_with_quota)
    yield disk
    if disk.mounted:
        subprocess.run(["umount", str(folder)], check=True)


def jsonl(records: list) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in records)


def test_a_full_work_folder_fails_the_job_clearly_and_the_next_job_runs(
        afina_home: Path, small_work_dir: SmallDisk, tmp_path_factory: pytest.TempPathFactory) -> None:
    work_dir = small_work_dir.folder
    runtime = Runtime(Settings(home=afina_home, log_json=False, work_dir=work_dir,
                               model_cache_dir=shared_model_cache(tmp_path_factory)))
    examples = sample_examples()
    big = [{"messages": [{"role": "user", "content": f"{i}: {e['messages'][-2]['content']} " + "x" * 400},
                         e["messages"][-1]]} for i, e in enumerate(examples * 40)]  # ~2 MiB: more than the disk
    too_big = upload_file(runtime, "acme", jsonl(big))
    job = create_job(runtime, "acme", too_big.id)
    stored_before = {info.key for info in runtime.store.list("")}

    small_work_dir.injecting = True
    assert run_stage(runtime, job.id, "ingest", prepare_dataset) == "failed"
    with runtime.db.session() as session:
        failed = repo.get_job(session, None, job.id)
    assert failed.error["code"] == "disk_full", failed.error
    assert "ran out of disk space" in failed.error["message"] and str(work_dir) not in failed.error["message"]
    assert {info.key for info in runtime.store.list("")} == stored_before  # nothing half-published
    assert not any(path.is_file() for path in work_dir.rglob("*"))  # the stage left no scratch behind
    small_work_dir.injecting = False

    small = upload_file(runtime, "acme", jsonl(examples[:20]))
    next_job = create_job(runtime, "acme", small.id)
    assert run_stage(runtime, next_job.id, "ingest", prepare_dataset) == "done"
    with runtime.db.session() as session:
        assert repo.get_job(session, None, next_job.id).status == "queued"
