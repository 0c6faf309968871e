"""Identifiers in the shapes OpenAI's clients expect (``file-…``, ``ftjob-…``)."""

from __future__ import annotations

import secrets


def new_id(prefix: str) -> str:
    """``prefix`` followed by 24 random hex characters (96 bits)."""
    return f"{prefix}{secrets.token_hex(12)}"


def file_id() -> str:
    return new_id("file-")


def job_id() -> str:
    return new_id("ftjob-")


def event_id() -> str:
    return new_id("ftevent-")


def checkpoint_id() -> str:
    return new_id("ftckpt_")
