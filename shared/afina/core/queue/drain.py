"""Graceful worker stop: on SIGTERM a running stage checkpoints, hands its job back, and the worker exits.

``docker compose stop`` and Kubernetes send SIGTERM to the worker's main process and
SIGKILL after a grace period. Celery's warm shutdown would wait for a training task to
finish (hours) and be killed anyway, losing every step since the last checkpoint. So the
main process, when it starts shutting down, leaves a drain marker; a stage polling
``JobContext.check_continue`` (the trainer does at every step, at most every 0.5 s) sees
it, saves a checkpoint and raises ``WorkerDraining``; ``run_stage`` then releases the lease
and queues the same stage again, so another worker resumes the job from that checkpoint
at once instead of after the lease expires.

The marker is a file named after the main process's PID: pool children find it through
their parent's PID, a solo worker through its own, and a restarted worker (new PID)
never sees a stale one.
"""

from __future__ import annotations

import os
from pathlib import Path

from afina.core.settings import Settings


class WorkerDraining(Exception):
    """The worker is shutting down: the stage stopped at a safe point and the job goes back to the queue."""


def drain_marker(settings: Settings, pid: int) -> Path:
    return settings.home / "run" / f"drain-{pid}"


def request_drain(settings: Settings, pid: int | None = None) -> Path:
    """Ask the stages running under worker ``pid`` (default: this process) to checkpoint and stop."""
    marker = drain_marker(settings, os.getpid() if pid is None else pid)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("draining\n")
    return marker


def drain_requested(settings: Settings) -> bool:
    return any(drain_marker(settings, pid).exists() for pid in {os.getpid(), os.getppid()})


def clear_drain(settings: Settings, pid: int | None = None) -> None:
    drain_marker(settings, os.getpid() if pid is None else pid).unlink(missing_ok=True)
