"""The sweep of stranded scratch entries: only afina's own names, only stale ones, never through a link."""

from __future__ import annotations

import os
import time
from pathlib import Path

from afina.core.scratch import SCRATCH_ROOTS, sweep_stale_scratch
from afina.core.settings import Settings

HOUR = 3600


def _age(path: Path, seconds: float) -> None:
    moment = time.time() - seconds
    os.utime(path, (moment, moment), follow_symlinks=False)


def _settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home", work_dir=tmp_path / "work", stale_temp_after_s=6 * HOUR)


def test_only_stale_afina_entries_go(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    uploads, ingest = settings.resolved_work_dir / "uploads", settings.resolved_work_dir / "ingest"
    uploads.mkdir(parents=True)
    ingest.mkdir(parents=True)

    stale_spool = uploads / "upload-a1b2.part"
    fresh_spool = uploads / "upload-c3d4.part"
    foreign_file = uploads / "notes.txt"  # not a name afina makes
    for path in (stale_spool, fresh_spool, foreign_file):
        path.write_bytes(b"x")
    stale_ingest = ingest / "afina-ingest-old"
    (stale_ingest / "raw").mkdir(parents=True)
    (stale_ingest / "raw" / "upload").write_bytes(b"rows")
    busy_ingest = ingest / "afina-ingest-busy"  # an old folder with a file written a minute ago: still running
    busy_ingest.mkdir()
    (busy_ingest / "train.jsonl").write_bytes(b"{}")
    foreign_dir = ingest / "keep-me"
    foreign_dir.mkdir()

    for path in (stale_spool, foreign_file, stale_ingest / "raw" / "upload", stale_ingest / "raw", stale_ingest,
                 busy_ingest, foreign_dir):
        _age(path, 7 * HOUR)
    _age(fresh_spool, 5 * HOUR)
    _age(busy_ingest / "train.jsonl", 60)

    removed = sweep_stale_scratch(settings)

    assert sorted(removed) == sorted([stale_spool, stale_ingest])
    assert not stale_spool.exists() and not stale_ingest.exists()
    assert fresh_spool.exists() and foreign_file.exists() and busy_ingest.exists() and foreign_dir.exists()
    assert sweep_stale_scratch(settings) == []  # a second sweep finds nothing


def test_links_are_never_followed_nor_removed(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "data.bin").write_bytes(b"keep")
    _age(outside / "data.bin", 30 * HOUR)
    _age(outside, 30 * HOUR)
    uploads, ingest = settings.resolved_work_dir / "uploads", settings.resolved_work_dir / "ingest"
    uploads.mkdir(parents=True)
    ingest.mkdir(parents=True)
    linked_entry = ingest / "afina-ingest-link"
    linked_entry.symlink_to(outside, target_is_directory=True)
    linked_file = uploads / "upload-link.part"
    linked_file.symlink_to(outside / "data.bin")
    stale_with_link = ingest / "afina-ingest-with-link"
    stale_with_link.mkdir()
    (stale_with_link / "to-outside").symlink_to(outside, target_is_directory=True)
    for path in (linked_entry, linked_file, stale_with_link / "to-outside", stale_with_link):
        _age(path, 30 * HOUR)

    removed = sweep_stale_scratch(settings)

    assert removed == [stale_with_link]  # its link inside went with it, not what the link points to
    assert linked_entry.is_symlink() and linked_file.is_symlink()
    assert (outside / "data.bin").read_bytes() == b"keep"


def test_missing_roots_are_no_error_and_the_roots_live_under_the_work_dir(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    assert sweep_stale_scratch(settings) == []
    for root in SCRATCH_ROOTS:
        assert root.folder(settings).is_relative_to(settings.resolved_work_dir)
