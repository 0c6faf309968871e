"""``training_metrics.jsonl`` and ``hardware_metrics.jsonl``: written locally as the run goes, copied to the store.

The store copy under ``jobs/<id>/report/`` is refreshed periodically and at every checkpoint,
so a worker that dies leaves its curves behind; a resumed attempt starts from that copy,
keeping the training records up to the checkpoint it resumes from (the steps after it are
trained again) and every hardware sample (marked with its attempt number).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from afina.core.store import ArtifactStore

log = logging.getLogger("afina.trainer")

TRAINING_METRICS_FILE = "training_metrics.jsonl"
HARDWARE_METRICS_FILE = "hardware_metrics.jsonl"
UPLOAD_EVERY_S = 60.0


def parse_jsonl(data: bytes) -> list[dict[str, Any]]:
    """The JSON objects of ``data``, one a line; a torn or foreign line is skipped, not fatal."""
    records = []
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def to_jsonl(records: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(record) + b"\n" for record in records)


class MetricsFiles:
    """The run's two metrics files: appended from the training loop and the monitor thread, uploaded
    to ``prefix`` in the store (thread-safe; an upload never sees half a line)."""

    def __init__(self, local_dir: Path, store: ArtifactStore, prefix: str) -> None:
        self.local_dir = local_dir
        self.store = store
        self.prefix = prefix.rstrip("/")
        self._lock = threading.Lock()
        self._upload_lock = threading.Lock()
        local_dir.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.local_dir / name

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def restore(self, resumed_step: int) -> int:
        """Continue the files of an earlier attempt: this worker's own (a retry in the same process) or else the
        store's copy (a worker that died); returns this attempt's number (1 for a first run)."""
        with self._lock:
            training = [r for r in self._earlier(TRAINING_METRICS_FILE) if 0 < int(r.get("step") or 0) <= resumed_step]
            hardware = self._earlier(HARDWARE_METRICS_FILE)
            self.path(TRAINING_METRICS_FILE).write_bytes(to_jsonl(training))
            self.path(HARDWARE_METRICS_FILE).write_bytes(to_jsonl(hardware))
        return max((int(record.get("attempt") or 1) for record in hardware), default=0) + 1

    def _earlier(self, name: str) -> list[dict[str, Any]]:
        if self.path(name).exists():
            return parse_jsonl(self.path(name).read_bytes())
        if not self.store.exists(self.key(name)):
            return []
        return parse_jsonl(self.store.get_bytes(self.key(name)))

    def append(self, name: str, record: dict[str, Any]) -> None:
        with self._lock, self.path(name).open("ab") as handle:
            handle.write(orjson.dumps(record) + b"\n")

    def append_training(self, record: dict[str, Any]) -> None:
        self.append(TRAINING_METRICS_FILE, record)

    def append_hardware(self, record: dict[str, Any]) -> None:
        self.append(HARDWARE_METRICS_FILE, record)

    def read_bytes(self, name: str) -> bytes:
        with self._lock:
            path = self.path(name)
            return path.read_bytes() if path.exists() else b""

    def records(self, name: str) -> list[dict[str, Any]]:
        return parse_jsonl(self.read_bytes(name))

    def upload(self) -> None:
        """Copy both files to the store now (one upload at a time, so an older snapshot never lands last)."""
        with self._upload_lock:
            for name in (TRAINING_METRICS_FILE, HARDWARE_METRICS_FILE):
                self.store.put_bytes(self.key(name), self.read_bytes(name))


class MetricsUploader:
    """The store copies a crash leaves behind: uploaded at every checkpoint, at the end and every ``every_s``.

    Best effort: a failed upload is logged and the next one tries again (the report uploads the
    final files itself), and nothing is uploaded once ``lease_lost`` is set, since another worker
    owns the job and writes these keys now.
    """

    def __init__(self, files: MetricsFiles, lease_lost: threading.Event, *, every_s: float = UPLOAD_EVERY_S) -> None:
        self.files = files
        self.lease_lost = lease_lost
        self.every_s = every_s
        self._last_upload = time.monotonic()

    def now(self) -> None:
        if self.lease_lost.is_set():
            return
        self._last_upload = time.monotonic()
        try:
            self.files.upload()
        except Exception:
            log.warning("uploading the metrics files failed; the next checkpoint or minute tries again",
                        exc_info=True)

    def if_due(self) -> None:
        """The periodic copy (called from the hardware sampler's thread)."""
        if time.monotonic() - self._last_upload >= self.every_s:
            self.now()
