"""Removing the scratch files a crashed process left behind (upload spools, ingest temporary folders).

A process that dies mid-upload or mid-ingest never runs its own cleanup; the gateway
sweeps at start and the workers in their maintenance loop. Only names afina makes, in
the folders afina makes them in, are candidates, and only once nothing in them has
changed for ``settings.stale_temp_after_s``: an entry's age is that of the newest file
in it, so an upload or an ingest still writing is never taken. Symbolic links are
never followed (nor removed: afina makes none there).
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from afina.core.logging import log_event
from afina.core.settings import Settings

log = logging.getLogger("afina.scratch")


@dataclass(frozen=True)
class ScratchRoot:
    """A folder afina writes scratch entries into, and the name prefixes of those entries."""

    name: str
    folder: Callable[[Settings], Path]
    prefixes: tuple[str, ...]


# every place afina leaves scratch entries that a crash can strand; a new one is one row here
SCRATCH_ROOTS: tuple[ScratchRoot, ...] = (
    # the gateway's upload spool (files/router.py passes it to files/upload.py: mkstemp "upload-*.part")
    ScratchRoot("uploads", lambda settings: settings.resolved_work_dir / "uploads", ("upload-",)),
    # ingest's per-run temporary folder (ingest/pipeline.py: mkdtemp "afina-ingest-*" under <work>/ingest)
    ScratchRoot("ingest", lambda settings: settings.resolved_work_dir / "ingest", ("afina-ingest-",)),
)


def newest_mtime(path: Path) -> float:
    """The latest modification time of ``path`` and, for a folder, of everything under it (links not followed)."""
    status = path.lstat()
    newest = status.st_mtime
    if not stat.S_ISDIR(status.st_mode):
        return newest
    for folder, dirs, files in os.walk(path, followlinks=False):
        for name in (*dirs, *files):
            try:
                newest = max(newest, os.lstat(os.path.join(folder, name)).st_mtime)
            except FileNotFoundError:  # removed while we looked: its owner is alive
                continue
    return newest


def _remove(entry: Path, mode: int) -> None:
    if stat.S_ISDIR(mode):
        shutil.rmtree(entry)  # removes links inside a folder, never what they point to
    else:
        entry.unlink()


def sweep_stale_scratch(settings: Settings, *, now: float | None = None,
                        roots: tuple[ScratchRoot, ...] = SCRATCH_ROOTS) -> list[Path]:
    """Remove afina-made scratch entries unchanged for ``settings.stale_temp_after_s``; return what went.

    Never raises for a single entry (one that vanished or cannot be removed is skipped and logged):
    a sweep runs at start-up and must not stop a service from starting.
    """
    cutoff = (time.time() if now is None else now) - settings.stale_temp_after_s
    removed: list[Path] = []
    removed_by_root: dict[str, int] = {}
    for root in roots:
        folder = root.folder(settings)
        try:
            entries = list(folder.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if not entry.name.startswith(root.prefixes):
                continue
            try:
                mode = entry.lstat().st_mode
                if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                    continue  # a link, a socket, a FIFO: not something afina made here
                if newest_mtime(entry) >= cutoff:
                    continue
                _remove(entry, mode)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log_event(log, "scratch.remove_failed", logging.WARNING, root=root.name, entry=entry.name,
                          error=type(exc).__name__)
                continue
            removed.append(entry)
            removed_by_root[root.name] = removed_by_root.get(root.name, 0) + 1
    if removed:
        log_event(log, "scratch.swept", removed=removed_by_root, older_than_s=settings.stale_temp_after_s)
    return removed
