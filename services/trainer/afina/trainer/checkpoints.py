"""Checkpoints in the object store: publish, find the newest, download, prune.

A checkpoint is the whole directory transformers' Trainer writes (adapter,
optimizer, scheduler, RNG states, ``trainer_state.json``), uploaded under
``checkpoint_prefix(tenant_id, job_id, step)``. The database row is written after the
upload completes, so a row is the commit marker: a worker killed mid-upload
leaves objects without a row, which the next prune removes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from afina.core.artifacts.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from afina.core.datasets.layout import checkpoint_prefix, job_prefix
from afina.core.db import repository as repo
from afina.core.runtime import Runtime

log = logging.getLogger("afina.trainer")

# without these a directory cannot resume a run
REQUIRED_FILES = ("trainer_state.json", ADAPTER_WEIGHTS, ADAPTER_CONFIG)
ALL_ROWS = 1_000_000


@dataclass(frozen=True)
class CheckpointRef:
    step: int
    prefix: str


def publish_checkpoint(runtime: Runtime, tenant_id: str, job_id: str, step: int, local_dir: Path,
                       metrics: dict[str, Any], keep_last: int, *, owner: str | None = None) -> str:
    """Upload ``local_dir``, record it, and prune older checkpoints; returns the object prefix.

    With ``owner`` the row is written only while that worker holds the job's lease (``LeaseLost``
    otherwise, before anything is pruned): a stalled trainer never deletes its successor's checkpoints.
    """
    missing = [name for name in REQUIRED_FILES if not (local_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {local_dir} lacks {missing}")
    prefix = checkpoint_prefix(tenant_id, job_id, step)
    runtime.store.upload_dir(local_dir, prefix)
    with runtime.db.session() as session:
        if owner is not None:
            repo.get_owned_job(session, job_id, owner)
        repo.add_checkpoint(session, job_id, step, prefix, metrics)
    prune_checkpoints(runtime, tenant_id, job_id, keep_last)
    return prefix


def recorded_checkpoints(runtime: Runtime, job_id: str) -> list[CheckpointRef]:
    """The job's checkpoint rows, newest first."""
    with runtime.db.session() as session:
        rows, _ = repo.list_checkpoints(session, job_id, None, ALL_ROWS)
        return [CheckpointRef(step=row.step_number, prefix=row.object_prefix) for row in rows]


def prune_checkpoints(runtime: Runtime, tenant_id: str, job_id: str, keep_last: int) -> list[int]:
    """Keep the newest ``keep_last`` checkpoints (rows and objects); remove the rest and any orphaned upload."""
    recorded = recorded_checkpoints(runtime, job_id)
    keep, drop = recorded[:max(keep_last, 1)], recorded[max(keep_last, 1):]
    if drop:
        with runtime.db.session() as session:
            repo.delete_checkpoint_rows(session, job_id, [ref.step for ref in drop])
    kept_prefixes = {ref.prefix.rstrip("/") + "/" for ref in keep}
    base = f"{job_prefix(tenant_id, job_id)}/checkpoints/"
    stored_prefixes = {base + info.key[len(base):].split("/", 1)[0] + "/" for info in runtime.store.list(base)}
    for prefix in sorted(stored_prefixes - kept_prefixes):
        # only this job's lease holder writes here, so anything not kept is dropped or orphaned
        runtime.store.delete_prefix(prefix)
    return [ref.step for ref in drop]


def download_checkpoint(runtime: Runtime, ref: CheckpointRef, local_dir: Path) -> Path:
    """Copy a checkpoint into ``local_dir``; ``FileNotFoundError`` if the store lost part of it."""
    runtime.store.download_dir(ref.prefix, local_dir)
    missing = [name for name in REQUIRED_FILES if not (local_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint at step {ref.step} ({ref.prefix}) lacks {missing}")
    return local_dir
