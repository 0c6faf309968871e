"""Public names of fine-tuned models, shared by the gateway (before export) and the exporter (after)."""

from __future__ import annotations


def fine_tuned_model_name(base: str, tenant: str, suffix: str | None, job_id: str) -> str:
    """``ft:<base>:<tenant>:<suffix>:<job-id>``, OpenAI's shape; an absent suffix leaves its field empty.

    The job id makes the name unique, so two jobs with the same suffix never collide.
    """
    return f"ft:{base}:{tenant}:{suffix or ''}:{job_id}"


def checkpoint_model_name(model_name: str, step: int) -> str:
    """The name OpenAI gives a checkpoint of a fine-tune: ``<model>:ckpt-step-<n>``."""
    return f"{model_name}:ckpt-step-{step}"
