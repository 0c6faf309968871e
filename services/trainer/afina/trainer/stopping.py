"""When a training run must stop early: the job was cancelled, the worker is draining, or the lease is lost.

A cancellation and a drain are asked for from outside (the API, the worker's SIGTERM) and
end the loop at a safe point: the step that sees them saves a checkpoint and stops, and
the recipe raises ``JobCancelled`` / ``WorkerDraining`` once ``trainer.train`` returns, so
``run_stage`` finishes the job or queues it again. A lost lease is different: another worker
owns the job now, so nothing more may be written, not even a checkpoint; ``LeaseLost``
is raised at once, from inside the loop.
"""

from __future__ import annotations

from typing import Literal

from afina.core.errors import LeaseLost
from afina.core.queue.drain import WorkerDraining
from afina.core.queue.jobs import JobCancelled, JobContext

StopReason = Literal["cancelled", "draining"]


class StopWatcher:
    """Asked at every step end whether the run must save and stop; remembers why, for the recipe."""

    def __init__(self, context: JobContext) -> None:
        self.context = context
        self.reason: StopReason | None = None

    @property
    def cancelled(self) -> bool:
        return self.reason == "cancelled"

    @property
    def draining(self) -> bool:
        return self.reason == "draining"

    def should_stop(self, step: int) -> bool:
        """True when the loop must checkpoint ``step`` and stop; ``LeaseLost`` when it must stop without saving."""
        if self.reason is not None:
            return True
        try:
            self.context.check_continue()
        except JobCancelled:
            self.reason = "cancelled"
            self.context.event(f"Cancellation requested: saving a checkpoint at step {step} and stopping",
                               level="warn")
        except WorkerDraining:
            self.reason = "draining"
            self.context.event(f"Worker shutting down: saving a checkpoint at step {step}; the job resumes "
                               f"from it on another worker", level="warn")
        return self.reason is not None

    def ensure_owned(self) -> None:
        """``LeaseLost`` if another worker owns the job: its checkpoints are that worker's to write now."""
        if self.context.lease_lost.is_set():
            raise LeaseLost(self.context.job_id)

    def raise_if_stopped(self) -> None:
        """After the loop returned: turn a stop into the exception ``run_stage`` acts on."""
        if self.cancelled:
            raise JobCancelled(self.context.job_id)
        if self.draining:
            raise WorkerDraining(self.context.job_id)
