"""Follow a fine-tuning job's events until it ends, drawing a progress line from metric events."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

TERMINAL = {"succeeded", "failed", "cancelled"}


def _bar(fraction: float, width: int = 24) -> str:
    filled = int(round(fraction * width))
    return "#" * filled + "-" * (width - filled)


def format_metrics(data: dict[str, Any]) -> str:
    step, total = data.get("step"), data.get("total_steps")
    parts = [f"step {step}/{total}" if total else f"step {step}"]
    if total:
        parts.insert(0, f"[{_bar(min(1.0, (step or 0) / total))}]")
    for key, label in (("train_loss", "loss"), ("valid_loss", "val_loss"), ("learning_rate", "lr"),
                       ("tokens_per_second", "tok/s")):
        value = data.get(key)
        if isinstance(value, (int, float)):
            parts.append(f"{label} {value:.4g}")
    return "  ".join(parts)


def watch_job(client, job_id: str, out: TextIO | None = None, poll_s: float = 1.0) -> Any:  # noqa: ANN001
    """Print each new event once (oldest first); return the job when it reaches a terminal status."""
    out = out or sys.stdout  # read now: a default bound at import would keep a replaced stdout
    seen: set[str] = set()
    while True:
        events = client.fine_tuning.jobs.list_events(job_id, limit=100).data
        for event in reversed(events):
            if event.id in seen:
                continue
            seen.add(event.id)
            if event.type == "metrics" and event.data:
                out.write("  " + format_metrics(dict(event.data)) + "\n")
            else:
                out.write(f"  [{event.level}] {event.message}\n")
            out.flush()
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in TERMINAL:
            return job
        time.sleep(poll_s)
