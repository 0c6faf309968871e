"""Where a job's start-up time goes: queued → first optimizer step, phase by phase, said in one event.

A warm worker should reach its first step in seconds (issue 15's target: ≤ 15 s for a 1B
model); when it does not, the event says which phase took the time (backend import and
patching, base model files, dataset, model load, trainer setup, the first step itself,
which includes compiling kernels).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class PhaseClock:
    """Marks the end of each start-up phase; ``summary()`` is the event's text."""

    started: float = field(default_factory=time.monotonic)
    marks: list[tuple[str, float]] = field(default_factory=list)
    queued_for: float | None = None  # seconds the job waited in the queue before this stage began

    def mark(self, phase: str) -> None:
        self.marks.append((phase, time.monotonic()))

    def durations(self) -> list[tuple[str, float]]:
        previous, spans = self.started, []
        for phase, at in self.marks:
            spans.append((phase, at - previous))
            previous = at
        return spans

    def total(self) -> float:
        return (self.marks[-1][1] if self.marks else time.monotonic()) - self.started

    def summary(self) -> str:
        parts = ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in self.durations())
        queued = f"; {self.queued_for:.1f} s queued before that" if self.queued_for is not None else ""
        return f"First optimizer step {self.total():.1f} s after the stage started ({parts}){queued}"
